"""Peer for the linear-scan benchmark: plain PyTorch on CUDA.

Two implementations, the faster of which is reported per size:
  * loop: the step-by-step recurrence, vectorised over batch x channels (what a user writes first);
  * chunked: a two-level scan with torch ops: a loop inside chunks of 64 steps for every chunk at
    once, a loop over chunk carries, then a broadcast fix-up. Far fewer launches than the loop.
Backward is autograd through the same code. Prints one JSON line: {"times": {"BxCxL/dtype/pass": ms}}.
"""
import json

from timing import DTYPES, request, time_ms  # exits with an answer when torch is missing

import torch  # noqa: E402


def loop_scan(a, b):
    h = torch.empty_like(b)
    s = torch.zeros_like(b[..., 0], dtype=torch.float32)
    for t in range(a.shape[-1]):
        s = a[..., t].float() * s + b[..., t].float()
        h[..., t] = s.to(h.dtype)
    return h


def chunked_scan(a, b, chunk=64):
    B, C, L = a.shape
    pad = (-L) % chunk
    af = torch.nn.functional.pad(a.float(), (0, pad), value=1.0)
    bf = torch.nn.functional.pad(b.float(), (0, pad), value=0.0)
    n = af.shape[-1] // chunk
    af = af.view(B, C, n, chunk)
    bf = bf.view(B, C, n, chunk)
    # Local scans from zero state, and cumulative products, inside every chunk at once.
    hs, ps = [], []
    s = torch.zeros_like(bf[..., 0])
    p = torch.ones_like(af[..., 0])
    for t in range(chunk):
        s = af[..., t] * s + bf[..., t]
        p = p * af[..., t]
        hs.append(s)
        ps.append(p)
    hloc = torch.stack(hs, -1)
    prod = torch.stack(ps, -1)
    # Carries across chunks.
    carries = []
    c = torch.zeros_like(hloc[..., 0, 0])
    for k in range(n):
        carries.append(c)
        c = prod[..., k, -1] * c + hloc[..., k, -1]
    carry = torch.stack(carries, -1).unsqueeze(-1)
    h = hloc + prod * carry
    return h.view(B, C, n * chunk)[..., :L].to(a.dtype)


def main():
    cfg = request()
    dt = DTYPES
    times = {}
    for B, C, L in cfg["sizes"]:
        for name in cfg["dtypes"]:
            a = (torch.rand(B, C, L, device="cuda") * 0.5 + 0.499).to(dt[name]).requires_grad_()
            b = (torch.rand(B, C, L, device="cuda") * 2 - 1).to(dt[name]).requires_grad_()
            g = torch.rand(B, C, L, device="cuda").to(dt[name])
            best_f, best_b = None, None
            impls = [chunked_scan] + ([loop_scan] if L <= 4096 else [])
            for impl in impls:
                iters = 5 if impl is loop_scan else 10
                with torch.no_grad():
                    f = time_ms(lambda: impl(a, b), iters)
                h = impl(a, b)
                bwd = time_ms(lambda: torch.autograd.grad(h, (a, b), g, retain_graph=True), iters)
                best_f = f if best_f is None else min(best_f, f)
                best_b = bwd if best_b is None else min(best_b, bwd)
            key = f"{B}x{C}x{L}/{name}"
            times[f"{key}/fwd"] = best_f
            times[f"{key}/bwd"] = best_b
    print(json.dumps({"times": times}))


main()
