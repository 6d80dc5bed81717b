"""Peer for the newton-rnn benchmark: a plain PyTorch sequential loop on CUDA.
Configuration of the benchmark: wx (batch, T, 3, hidden) in the benchmark dtype, b (3, hidden)
float32, no initial state; R (3, hidden) for the diagonal cells, (3, heads, headDim, headDim) for
gru (heads default hidden / 64). As in the real kernels, wx is read in its dtype, the state and all
arithmetic are float32, and y is returned in wx's dtype. One step per time step, vectorised over
batch x channels (the dense GRU's recurrent part as one batched matmul over the heads):
    gru-diag, gru:    r = sig(wx_r + b_r + rec_r), z = sig(wx_z + b_z + rec_z),
                      n = tanh(wx_n + r (rec_n + b_n)),  h = (1 - z) n + z h
    lstm-cifg-diag:   f = sig(wx_f + b_f + rec_f), c = f c + (1 - f) tanh(wx_z + b_z + rec_z),
                      h = sig(wx_o + b_o + rec_o) tanh(c)
with rec_g = R_g * h (diagonal cells) or h @ R_g per head (gru).
fwd+bwd is the forward followed by autograd for wx, R and b.
Times are CUDA events, median after warm-up. Prints one JSON line: {"times":
{"BxTxNxH/dtype/cell/pass": ms}, "notes": [...]}.
"""
import json

from timing import DTYPES, request, time_ms  # exits with an answer when torch is missing

import torch  # noqa: E402

LOOP_MAX_T = 16384


def loop_rnn(cell, wx, R, b, heads):
    dtype = wx.dtype
    batch, T, _, N = wx.shape
    x = wx.float()
    h = x.new_zeros(batch, N)
    c = x.new_zeros(batch, N)
    ys = []
    for t in range(T):
        if cell == "gru":
            D = N // heads
            rec = torch.einsum("bhk,ghkj->gbhj", h.view(batch, heads, D), R).reshape(3, batch, N)
        else:
            rec = R[:, None, :] * h[None]
        xt = x[:, t]
        if cell == "lstm-cifg-diag":
            f = torch.sigmoid(xt[:, 0] + b[0] + rec[0])
            c = f * c + (1 - f) * torch.tanh(xt[:, 1] + b[1] + rec[1])
            h = torch.sigmoid(xt[:, 2] + b[2] + rec[2]) * torch.tanh(c)
        else:
            r = torch.sigmoid(xt[:, 0] + b[0] + rec[0])
            z = torch.sigmoid(xt[:, 1] + b[1] + rec[1])
            n = torch.tanh(xt[:, 2] + r * (rec[2] + b[2]))
            h = (1 - z) * n + z * h
        ys.append(h)
    return torch.stack(ys, 1).to(dtype)


def main():
    cfg = request()
    dt = DTYPES
    times = {}
    notes = []
    # Each job is (cell, [batch, T, hidden, heads]); older callers send sizes x cells.
    jobs = cfg.get("jobs") or [
        (cell, list(size[:3]) + [size[3] if len(size) > 3 else (max(1, size[2] // 64) if cell == "gru" else 1)])
        for size in cfg["sizes"] for cell in cfg["cells"]
    ]
    for cell, size in jobs:
        batch, T, N, heads = size
        D = N // heads
        if T > LOOP_MAX_T:
            notes.append(f"{cell} at {batch}x{T}x{N}x{heads}: not run (T > {LOOP_MAX_T})")
            continue
        for name in cfg["dtypes"]:
            key = f"{batch}x{T}x{N}x{heads}/{name}/{cell}"
            wx = (torch.rand(batch, T, 3, N, device="cuda") * 2 - 1).to(dt[name]).requires_grad_()
            b = (torch.rand(3, N, device="cuda") - 0.5).requires_grad_()
            if cell == "gru":
                R = ((torch.rand(3, heads, D, D, device="cuda") * 2 - 1) / D ** 0.5).requires_grad_()
            else:
                R = (torch.rand(3, N, device="cuda") - 0.5).requires_grad_()
            gy = (torch.rand(batch, T, N, device="cuda") * 2 - 1).to(dt[name])

            def fwd_bwd():
                y = loop_rnn(cell, wx, R, b, heads)
                torch.autograd.grad(y, (wx, R, b), gy)

            try:
                with torch.no_grad():
                    f = time_ms(lambda: loop_rnn(cell, wx, R, b, heads), 3)
                fb = time_ms(fwd_bwd, 3)
            except torch.cuda.OutOfMemoryError:
                notes.append(f"out of memory at {key}")
                continue
            finally:
                torch.cuda.empty_cache()
            notes.append(f"loop at {key}: fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms")
            times[f"{key}/fwd"] = f
            times[f"{key}/fwd+bwd"] = fb
    print(json.dumps({"times": times, "notes": notes}))


if __name__ == "__main__":
    main()
