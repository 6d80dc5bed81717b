"""Peer for the linear-attention benchmark on CUDA: flash-linear-attention's Triton kernels.

Configuration of the benchmark (bench/ops/linear-attention.mjs): q, k (batch, T, H, K) of unit rows,
v (batch, T, H, V) with V = K, in the benchmark dtype; the decay a float32 log-sigmoid, one per head
(batch, T, H) or per key (batch, T, H, K); beta (batch, T, H) in (0, 1); scale K^-0.5; no initial or
final state. Per rule and decay shape (the benchmark's tags) the kernel of flash-linear-attention
that computes the same recurrence:

    gated_delta          chunk_gated_delta_rule(q, k, v, g, beta)    (Gated DeltaNet)
    gated_delta per-key  chunk_kda(q, k, v, g, beta)                 (KDA: the delta rule, a decay per key)
    gated per-key        chunk_gla(q, k, v, g)                       (GLA)
    linear               chunk_linear_attn(q, k, v), no normalisation

each called with its (batch, T, H, D) layout, q and k passed already normalised (no in-kernel L2
norm). fwd is the call under torch.no_grad(), fwd+bwd the call followed by autograd for every input.
Times are CUDA events, median after warm-up. Prints one JSON line: {"times":
{"BxTxHxK/dtype/tag/pass": ms}, "notes": [...]}; a kernel that is not importable (or fails) is left
out and said so in the notes.
"""
import inspect
import json

from timing import DTYPES, request, time_ms  # exits with an answer when torch is missing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def importable(module, name):
    try:
        mod = __import__(module, fromlist=[name])
        return getattr(mod, name)
    except Exception:  # noqa: BLE001
        return None


# tag: (kernel, how many of q, k, v, g, beta it takes)
KERNELS = {
    "gated_delta": (importable("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"), 5),
    "gated_delta per-key": (importable("fla.ops.kda", "chunk_kda"), 5),
    "gated per-key": (importable("fla.ops.gla", "chunk_gla"), 4),
    "linear": (importable("fla.ops.linear_attn", "chunk_linear_attn"), 3),
}


def call(fn, *args):
    kw = {"scale": args[0].shape[-1] ** -0.5}
    if "normalize" in inspect.signature(fn).parameters:
        kw["normalize"] = False
    out = fn(*args, **kw)
    return out[0] if isinstance(out, tuple) else out


def make_inputs(tag, batch, T, H, K, dtype, dev="cuda"):
    V = K
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    q = unit(torch.rand(batch, T, H, K, device=dev) * 2 - 1).to(dtype).requires_grad_()
    k = unit(torch.rand(batch, T, H, K, device=dev) * 2 - 1).to(dtype).requires_grad_()
    v = (torch.rand(batch, T, H, V, device=dev) * 2 - 1).to(dtype).requires_grad_()
    gshape = (batch, T, H, K) if tag.endswith("per-key") else (batch, T, H)
    g = F.logsigmoid(torch.rand(*gshape, device=dev) * 10.9 - 4.9).requires_grad_()
    beta = torch.sigmoid(torch.rand(batch, T, H, device=dev) * 8 - 4).to(dtype).requires_grad_()
    go = (torch.rand(batch, T, H, V, device=dev) * 2 - 1).to(dtype)
    return (q, k, v, g, beta), go


def main():
    cfg = request()
    times = {}
    notes = []
    for tag, (fn, _) in KERNELS.items():
        if fn is None:
            notes.append(f"flash-linear-attention's kernel for '{tag}' not importable: not run")
    for batch, T, H, K in cfg["sizes"]:
        for name in cfg["dtypes"]:
            for tag, (fn, n) in KERNELS.items():
                if fn is None:
                    continue
                key = f"{batch}x{T}x{H}x{K}/{name}/{tag}"
                inputs, go = make_inputs(tag, batch, T, H, K, DTYPES[name])
                args = inputs[:n]

                def fwd_bwd():
                    o = call(fn, *args)
                    torch.autograd.grad(o, args, go)

                try:
                    with torch.no_grad():
                        f = time_ms(lambda: call(fn, *args), 10)
                    b = time_ms(fwd_bwd, 10)
                except Exception as e:  # noqa: BLE001
                    notes.append(f"{tag} at {key}: failed ({type(e).__name__}: {e})")
                    continue
                finally:
                    torch.cuda.empty_cache()
                notes.append(f"{tag} at {key}: fwd {f:.3f} ms, fwd+bwd {b:.3f} ms")
                times[f"{key}/fwd"] = f
                times[f"{key}/fwd+bwd"] = b
                del inputs, args, go
    print(json.dumps({"times": times, "notes": notes}))


if __name__ == "__main__":
    main()
