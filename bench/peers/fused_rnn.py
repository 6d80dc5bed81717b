"""Peer for the fused-rnn benchmark: PyTorch on CUDA.

Configuration of the benchmark: wx (batch, T, G, H, D) in the benchmark dtype, R (G, H, D, D) in the
same dtype, b (G, H, D) float32, zero initial states; cells lstm (gates i, f, z, o) and gru (r, z,
n; b_n inside the r-gated term). Per size "BxTxHxD" and cell:
  * fwd, fwd+bwd: a plain PyTorch loop over the steps, float32 state, the recurrent product of every
    head at once as a batched matmul with the block-diagonal weights (torch.einsum), backward by
    autograd through the loop (grads of wx, R, b from a grad of h).
  * cudnn: torch.nn.LSTM / torch.nn.GRU (cuDNN) with hidden size H * D and input size H * D, one
    layer, batch_first, forward only. cuDNN has no block-diagonal weights and includes the input
    matmul, so it is a reference point, not the same computation.
Times are CUDA events, median after warm-up. Prints one JSON line: {"times":
{"BxTxHxD/cell/dtype/pass": ms}, "notes": [...]}.
"""
import json

from timing import DTYPES, request, time_ms  # exits with an answer when torch is missing

import torch  # noqa: E402

GATES = {"lstm": 4, "gru": 3}


def loop_rnn(cell, wx, R, b):
    """wx (batch, T, G, H, D), R (G, H, D, D), b (G, H, D) -> h (batch, T, H, D) in wx's dtype."""
    batch, T, G, H, D = wx.shape
    Rf, bf = R.float(), b.float()
    h = wx.new_zeros(batch, H, D, dtype=torch.float32)
    c = torch.zeros_like(h)
    outs = []
    for t in range(T):
        x = wx[:, t].float()
        rec = torch.einsum("bhi,ghij->bghj", h, Rf)
        if cell == "lstm":
            pre = x + bf + rec
            i, f, z, o = pre.unbind(1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(z)
            h = torch.sigmoid(o) * torch.tanh(c)
        else:
            r = torch.sigmoid(x[:, 0] + bf[0] + rec[:, 0])
            z = torch.sigmoid(x[:, 1] + bf[1] + rec[:, 1])
            n = torch.tanh(x[:, 2] + r * (rec[:, 2] + bf[2]))
            h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs, 1).to(wx.dtype)


def main():
    cfg = request()
    dev = torch.device("cuda")
    times, notes = {}, []
    for dtype_name in cfg.get("dtypes", ["bfloat16"]):
        dt = DTYPES[dtype_name]
        for batch, T, H, D in cfg["sizes"]:
            size = f"{batch}x{T}x{H}x{D}"
            for cell in cfg.get("cells", ["lstm", "gru"]):
                G = GATES[cell]
                key = f"{size}/{cell}/{dtype_name}"
                wx = (torch.rand(batch, T, G, H, D, device=dev) * 2 - 1).to(dt).requires_grad_()
                R = ((torch.rand(G, H, D, D, device=dev) * 2 - 1) / D ** 0.5).to(dt).requires_grad_()
                b = (torch.rand(G, H, D, device=dev) * 0.2 - 0.1).requires_grad_()
                gh = (torch.rand(batch, T, H, D, device=dev) * 2 - 1).to(dt)
                with torch.no_grad():
                    times[f"{key}/fwd"] = time_ms(lambda: loop_rnn(cell, wx, R, b), 5)

                def fwd_bwd():
                    h = loop_rnn(cell, wx, R, b)
                    torch.autograd.backward(h, gh)

                times[f"{key}/fwd+bwd"] = time_ms(fwd_bwd, 3)
                mod = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(H * D, H * D, batch_first=True).to(dev, dt)
                x = torch.rand(batch, T, H * D, device=dev, dtype=dt, requires_grad=True)
                with torch.no_grad():
                    times[f"{key}/cudnn"] = time_ms(lambda: mod(x), 10)
                gy = torch.rand(batch, T, H * D, device=dev, dtype=dt)

                def cudnn_fwd_bwd():
                    y, _ = mod(x)
                    torch.autograd.backward(y, gy)

                times[f"{key}/cudnn/fwd+bwd"] = time_ms(cudnn_fwd_bwd, 5)
                notes.append(f"{key}: loop fwd {times[f'{key}/fwd']:.3f} ms, fwd+bwd {times[f'{key}/fwd+bwd']:.3f} ms, "
                             f"cuDNN {cell} fwd {times[f'{key}/cudnn']:.3f} ms, "
                             f"fwd+bwd {times[f'{key}/cudnn/fwd+bwd']:.3f} ms")
    print(json.dumps({"times": times, "notes": notes}))


if __name__ == "__main__":
    main()
