"""Peer for the Mamba-2 benchmark on CUDA: mamba_ssm's mamba_chunk_scan_combined, and plain PyTorch.

Configuration of the benchmark (bench/ops/mamba2-scan.mjs): x (batch, T, H, P), dt (batch, T, H), B, C
(batch, T, G, N) and z (batch, T, H, P) in the benchmark dtype; A (H) < 0, D (H) and dtBias (H)
float32. The 'full' tag uses dt through softplus with dtBias, D and the z gate; the 'scan' tag the
bare scan (dt is the time step itself, no D, no z). No initial or final states.

Implementations, each reported under its own key:
  * mamba_ssm: mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined (chunk 256), when
    importable ("key/mamba_ssm/pass").
  * torch: the chunked SSD form in plain PyTorch, in float32 ("key/torch/pass"). Per chunk of Q
    tokens, with c the cumulative sum of d A inside the chunk and S0 the state entering it:
      y_t = sum_{s<=t} exp(c_t - c_s) (C_t . B_s) d_s x_s + exp(c_t) C_t S0
      S_end = exp(c_last) S0 + sum_s exp(c_last - c_s) d_s x_s B_s^T
    the intra-chunk part as batched matmuls for every chunk at once, then a loop over the chunks
    carrying the state. Every exponent is a difference c_t - c_s <= 0 (s <= t), so nothing
    overflows.
fwd+bwd is the forward followed by autograd for every input. Times are CUDA events, median after
warm-up. Prints one JSON line: {"times": {"BxTxHxPxN[xG]/dtype/tag/impl/pass": ms}, "notes": [...]}.
"""
import json

from timing import DTYPES, request, time_ms  # exits with an answer when torch is missing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CHUNK = 64


def time_step(dt, dt_bias, softplus):
    d = dt.float()
    if dt_bias is not None:
        d = d + dt_bias
    return F.softplus(d) if softplus else d  # softplus has threshold 20, as the kernels


def torch_ssd(x, dt, A, B, C, D, z, dt_bias, softplus):
    """The chunked form above, in float32; returns y in x's dtype."""
    batch, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    d = time_step(dt, dt_bias, softplus)  # (b, T, H)
    # Heads read their group's B and C.
    Bh = B.float().repeat_interleave(H // G, dim=2)  # (b, T, H, N)
    Ch = C.float().repeat_interleave(H // G, dim=2)
    xd = x.float() * d[..., None]  # d_s x_s
    pad = (-T) % CHUNK
    if pad:
        xd, Bh, Ch = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xd, Bh, Ch))
        d = F.pad(d, (0, 0, 0, pad))
    nc = (T + pad) // CHUNK
    # (b, H, nc, Q, ...) per chunk.
    xd = xd.view(batch, nc, CHUNK, H, P).permute(0, 3, 1, 2, 4)
    Bh = Bh.view(batch, nc, CHUNK, H, N).permute(0, 3, 1, 2, 4)
    Ch = Ch.view(batch, nc, CHUNK, H, N).permute(0, 3, 1, 2, 4)
    c = torch.cumsum((d * A).view(batch, nc, CHUNK, H).permute(0, 3, 1, 2), dim=-1)  # (b, H, nc, Q)
    # exp(c_t - c_s) for s <= t, 0 above the diagonal.
    diff = c[..., :, None] - c[..., None, :]
    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(diff.masked_fill(~causal, float("-inf")))
    scores = (Ch @ Bh.transpose(-1, -2)) * decay  # (b, H, nc, Q, Q)
    y = scores @ xd  # the intra-chunk part
    # Each chunk's own contribution to the state at its end: (b, H, nc, P, N).
    tail = torch.exp(c[..., -1:] - c)  # (b, H, nc, Q)
    local = (xd * tail[..., None]).transpose(-1, -2) @ Bh
    S = x.new_zeros(batch, H, P, N, dtype=torch.float32)
    entering = []
    for i in range(nc):
        entering.append(S)
        S = torch.exp(c[:, :, i, -1])[..., None, None] * S + local[:, :, i]
    S0 = torch.stack(entering, dim=2)  # (b, H, nc, P, N)
    y = y + torch.exp(c)[..., None] * (Ch @ S0.transpose(-1, -2))
    y = y.permute(0, 2, 3, 1, 4).reshape(batch, nc * CHUNK, H, P)[:, :T]
    if D is not None:
        y = y + x.float() * D[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def mamba_ssm_fn():
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # noqa: PLC0415

        return mamba_chunk_scan_combined, None
    except Exception as e:  # noqa: BLE001
        return None, f"mamba_ssm not importable: {e}"


def main():
    cfg = request()
    dev = "cuda"
    times, notes = {}, []
    mamba_chunk_scan_combined, why = mamba_ssm_fn()
    if why:
        notes.append(why)
    for batch, T, H, P, N, G in cfg["sizes"]:
        key = f"{batch}x{T}x{H}x{P}x{N}" + (f"x{G}" if G > 1 else "")
        for name in cfg["dtypes"]:
            dtype = getattr(torch, name)
            for tag in ("scan", "full"):
                full = tag == "full"
                g = torch.Generator(device=dev).manual_seed(0)

                def rnd(*shape, lo=-1.0, hi=1.0, dt=dtype):
                    return (torch.rand(*shape, generator=g, device=dev) * (hi - lo) + lo).to(dt)

                x = rnd(batch, T, H, P)
                dt = rnd(batch, T, H, lo=-4.0, hi=0.0) if full else F.softplus(rnd(batch, T, H, lo=-4.0, hi=0.0))
                A = -rnd(H, lo=1.0, hi=16.0, dt=torch.float32)
                B = rnd(batch, T, G, N)
                C = rnd(batch, T, G, N)
                D = rnd(H, lo=0.5, hi=1.5, dt=torch.float32) if full else None
                z = rnd(batch, T, H, P, lo=-2.0, hi=2.0) if full else None
                dt_bias = rnd(H, dt=torch.float32) if full else None
                leaves = [t for t in (x, dt, A, B, C, D, z, dt_bias) if t is not None]
                gy = rnd(batch, T, H, P)
                impls = [("torch", lambda: torch_ssd(x, dt, A, B, C, D, z, dt_bias, full))]
                if mamba_chunk_scan_combined is not None:
                    impls.append(
                        (
                            "mamba_ssm",
                            lambda: mamba_chunk_scan_combined(
                                x, dt, A, B, C, chunk_size=256, D=D, z=z, dt_bias=dt_bias, dt_softplus=full
                            ),
                        )
                    )
                for impl, fn in impls:
                    try:
                        with torch.no_grad():
                            times[f"{key}/{name}/{tag}/{impl}/fwd"] = time_ms(fn, 10)

                        def both(fn=fn):
                            for t in leaves:
                                t.requires_grad_(True)
                                t.grad = None
                            fn().backward(gy)

                        times[f"{key}/{name}/{tag}/{impl}/fwd+bwd"] = time_ms(both, 10)
                        for t in leaves:
                            t.requires_grad_(False)
                    except Exception as e:  # noqa: BLE001
                        notes.append(f"{impl} {key} {name} {tag}: {type(e).__name__}: {e}")
                        torch.cuda.empty_cache()
    print(json.dumps({"times": times, "notes": notes}))


if __name__ == "__main__":
    main()
