"""Peer for the selective-scan benchmark: plain PyTorch on CUDA.

Configuration of the benchmark: u, delta, z (batch, dim, seqlen) and B, C (batch, 1, dstate, seqlen)
in the benchmark dtype, A (dim, dstate) and D (dim) float32, softplus on delta, no delta bias. As in
the real kernel, the inputs are read in their dtype, the state and all arithmetic are float32, and
y is returned in the input dtype.

Two implementations, the faster of which is reported per size and pass:
  * loop: the sequential reference form (as `selective_scan_ref`): exp(dt * A) and dt * B * u for
    every step up front, then one step of the recurrence per position, vectorised over
    batch x dim x dstate. Run only for seqlen <= 4096 (one launch chain per position).
  * chunked: a two-level scan. Positions are cut into chunks of K (about sqrt(seqlen)); a loop of
    K steps scans every chunk at once from a zero state, a loop over the chunks carries the state
    across them, and a broadcast adds each carry times the cumulative decay, exp(cumsum(dt * A)),
    which stays in range because it is computed from the sum of exponents.
Backward is autograd through the same code, for every input. Times are CUDA events, median after
warm-up. Prints one JSON line: {"times": {"BxDxLxN/dtype/pass": ms}, "notes": [each implementation's
times, or why it did not run]}.
"""
import json
import math

from timing import DTYPES, request, time_ms  # exits with an answer when torch is missing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def loop_scan(u, delta, A, B, C, D, z):
    dtype = u.dtype
    uf, zf = u.float(), z.float()
    dt = F.softplus(delta.float())  # threshold 20, as the kernel
    Bf, Cf = B[:, 0].float(), C[:, 0].float()  # (batch, dstate, seqlen)
    dA = torch.exp(torch.einsum("bdl,dn->bdln", dt, A))
    dBu = torch.einsum("bdl,bnl,bdl->bdln", dt, Bf, uf)
    x = uf.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        x = dA[:, :, t] * x + dBu[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", x, Cf[:, :, t]))
    y = torch.stack(ys, dim=2) + uf * D[:, None]
    return (y * F.silu(zf)).to(dtype)


def chunk_length(L):
    return max(16, min(256, 1 << round(math.log2(math.sqrt(L)))))


def chunked_scan(u, delta, A, B, C, D, z):
    dtype = u.dtype
    batch, dim, L = u.shape
    N = A.shape[1]
    K = chunk_length(L)
    pad = (-L) % K
    nc = (L + pad) // K
    uf, zf = u.float(), z.float()
    dt = F.softplus(delta.float())
    Bf, Cf = B[:, 0].float(), C[:, 0].float()
    if pad:
        dt_p, u_p = F.pad(dt, (0, pad)), F.pad(uf, (0, pad))
        Bf, Cf = F.pad(Bf, (0, pad)), F.pad(Cf, (0, pad))
    else:
        dt_p, u_p = dt, uf
    # Everything as (K, batch, dim, nc, N) so that each step of the inner loop is contiguous.
    dt_k = dt_p.view(batch, dim, nc, K).permute(3, 0, 1, 2)                     # (K, b, d, nc)
    dtA = dt_k.unsqueeze(-1) * A.view(1, 1, dim, 1, N)                            # (K, b, d, nc, N)
    decay = torch.exp(dtA)
    B_k = Bf.view(batch, N, nc, K).permute(3, 0, 2, 1).unsqueeze(2)               # (K, b, 1, nc, N)
    C_k = Cf.view(batch, N, nc, K).permute(3, 0, 2, 1)                            # (K, b, nc, N)
    dtu = (dt_k * u_p.view(batch, dim, nc, K).permute(3, 0, 1, 2)).unsqueeze(-1)  # (K, b, d, nc, 1)
    dBu = (dtu * B_k).contiguous()
    # Local scans from a zero state, inside every chunk at once.
    s = torch.zeros_like(dBu[0])
    hs = []
    for t in range(K):
        s = torch.addcmul(dBu[t], decay[t], s)
        hs.append(s)
    hloc = torch.stack(hs, 0)
    # Cumulative decay inside each chunk, and the states carried into the chunks.
    prod = torch.exp(torch.cumsum(dtA, 0))
    carries = []
    c = torch.zeros_like(s[..., 0, :])
    for k in range(nc):
        carries.append(c)
        c = prod[-1, :, :, k] * c + hloc[-1, :, :, k]
    carry = torch.stack(carries, 2)                                               # (b, d, nc, N)
    x = hloc + prod * carry.unsqueeze(0)
    y = torch.einsum("kbdcn,kbcn->bdck", x, C_k).reshape(batch, dim, nc * K)[..., :L]
    y = y + uf * D[:, None]
    return (y * F.silu(zf)).to(dtype)


def make_inputs(batch, dim, L, N, dtype):
    dev = "cuda"
    u = (torch.rand(batch, dim, L, device=dev) * 2 - 1).to(dtype).requires_grad_()
    delta = (torch.rand(batch, dim, L, device=dev) * 4 - 6).to(dtype).requires_grad_()
    z = (torch.rand(batch, dim, L, device=dev) * 4 - 2).to(dtype).requires_grad_()
    B = (torch.rand(batch, 1, N, L, device=dev) * 2 - 1).to(dtype).requires_grad_()
    C = (torch.rand(batch, 1, N, L, device=dev) * 2 - 1).to(dtype).requires_grad_()
    A = (-torch.arange(1, N + 1, device=dev, dtype=torch.float32)).repeat(dim, 1).requires_grad_()
    D = (torch.rand(dim, device=dev) + 0.5).requires_grad_()
    gy = (torch.rand(batch, dim, L, device=dev) * 2 - 1).to(dtype)
    return (u, delta, A, B, C, D, z), gy


def main():
    cfg = request()
    dt = DTYPES
    times = {}
    notes = []
    for batch, dim, L, N in cfg["sizes"]:
        for name in cfg["dtypes"]:
            args, gy = make_inputs(batch, dim, L, N, dt[name])
            best = {"fwd": None, "bwd": None}
            impls = [chunked_scan] + ([loop_scan] if L <= 4096 else [])
            for impl in impls:
                iters = 5 if impl is loop_scan else 10
                try:
                    with torch.no_grad():
                        f = time_ms(lambda: impl(*args), iters)
                    y = impl(*args)
                    b = time_ms(lambda: torch.autograd.grad(y, args, gy, retain_graph=True), iters)
                    del y
                except torch.cuda.OutOfMemoryError:
                    notes.append(f"{impl.__name__} out of memory at {batch}x{dim}x{L}x{N}/{name}")
                    continue
                finally:
                    torch.cuda.empty_cache()
                notes.append(f"{impl.__name__} at {batch}x{dim}x{L}x{N}/{name}: fwd {f:.3f} ms, bwd {b:.3f} ms")
                best["fwd"] = f if best["fwd"] is None else min(best["fwd"], f)
                best["bwd"] = b if best["bwd"] is None else min(best["bwd"], b)
            key = f"{batch}x{dim}x{L}x{N}/{name}"
            for p, v in best.items():
                if v is not None:
                    times[f"{key}/{p}"] = v
            del args, gy
            torch.cuda.empty_cache()
    print(json.dumps({"times": times, "notes": notes}))


main()
