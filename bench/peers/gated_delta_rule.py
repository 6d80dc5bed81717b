"""Peer for the gated-delta-rule benchmark: plain PyTorch on CUDA.

Configuration of the benchmark: q, k (batch, T, H, K), v (batch, T, H, V) with V = K and beta
(batch, T, H) in the benchmark dtype, g (batch, T, H) float32 log-decay, q and k L2-normalised
(x / sqrt(sum x^2 + 1e-6)), scale K^-0.5, no initial or final state. As in the real kernel, the
inputs are read in their dtype, the state (K x V per head) and all arithmetic are float32, and o is
returned in the input dtype. The recurrence, per head:

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = scale * S_t^T q_t

Two implementations of the forward, the faster of which is reported per size and pass:
  * loop: one step of the recurrence per token, vectorised over batch x heads. Run only for
    T <= 4096 (one launch chain per token, and autograd keeps every step's state).
  * chunked: the WY / UT form with chunks of 64 tokens. Inside a chunk, with gamma the cumulative
    sum of g from the chunk start and S0 the state entering it, S_t = exp(gamma_t) S0 +
    sum_{j<=t} exp(gamma_t - gamma_j) k_j u_j^T, where the pseudo-values u solve the unit lower
    triangular system (I + A) u = beta v - beta exp(gamma) K S0 with
    A_tj = beta_t exp(gamma_t - gamma_j) k_t . k_j (j < t). Its two right-hand sides are solved for
    every chunk at once (torch.linalg.solve_triangular); a loop over the chunks then carries the
    state with a few matmuls per chunk. Every exponent is a difference gamma_t - gamma_j <= 0 for
    j <= t, so nothing overflows.
fwd+bwd is the forward followed by autograd through the same code, for q, k, v, g and beta.
When flash-linear-attention is importable, its Triton kernel chunk_gated_delta_rule (the reference
the issue's targets were measured with) is timed as a separate peer ("key/fla/pass").
The device's bf16 matmul rate (torch.matmul, 8192^3) is measured once ("matmul/bfloat16", in
TFLOP/s), so that the benchmark can report achieved TFLOP/s against it.
The decode rows (T = 1) advance a float32 state (batch, H, K, V) in place by one token.
Times are CUDA events, median after warm-up. Prints one JSON line: {"times":
{"BxTxHxK/dtype/pass": ms}, "notes": [each implementation's times, or why it did not run]}.
"""
import json

from timing import DTYPES, request, time_ms  # exits with an answer when torch is missing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CHUNK = 64
LOOP_MAX_T = 4096

try:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk  # noqa: E402
except Exception:  # noqa: BLE001
    fla_chunk = None


def fla_gdr(q, k, v, g, beta):
    o, _ = fla_chunk(q, k, v, g, beta, scale=q.shape[-1] ** -0.5, use_qk_l2norm_in_kernel=True)
    return o


def matmul_tflops(n=8192):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, 20)
    return 2 * n ** 3 / (ms * 1e9)


def l2norm(x):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def loop_gdr(q, k, v, g, beta):
    """Token by token; (batch, T, H, *) in, o (batch, T, H, V) out."""
    dtype = q.dtype
    batch, T, H, K = q.shape
    V = v.shape[-1]
    qf, kf = l2norm(q.float()), l2norm(k.float())
    vf, bf, a = v.float(), beta.float(), torch.exp(g)
    S = qf.new_zeros(batch, H, K, V)
    outs = []
    for t in range(T):
        kt, at = kf[:, t], a[:, t, :, None]
        u = torch.einsum("bhk,bhkv->bhv", kt, S)
        w = bf[:, t, :, None] * (vf[:, t] - at * u)
        S = at[..., None] * S + kt[..., :, None] * w[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], S))
    return (torch.stack(outs, 1) * K ** -0.5).to(dtype)


def chunked_gdr(q, k, v, g, beta, C=CHUNK):
    """WY / UT chunked form; (batch, T, H, *) in, o (batch, T, H, V) out."""
    dtype = q.dtype
    batch, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5
    pad = (-T) % C
    n = (T + pad) // C
    qf, kf = l2norm(q.float()), l2norm(k.float())
    vf, bf, gf = v.float(), beta.float(), g.float()
    if pad:  # padded tokens have beta = 0 and g = 0: they leave the state alone
        qf, kf, vf = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (qf, kf, vf))
        bf, gf = F.pad(bf, (0, 0, 0, pad)), F.pad(gf, (0, 0, 0, pad))

    def chunks(x):  # (batch, T, H, D) -> (batch, H, n, C, D)
        return x.view(batch, n, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    qc, kc, vc = chunks(qf), chunks(kf), chunks(vf)
    bc = bf.view(batch, n, C, H).permute(0, 3, 1, 2)                      # (b, H, n, C)
    gam = gf.view(batch, n, C, H).permute(0, 3, 1, 2).cumsum(-1)            # (b, H, n, C)
    incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = (gam[..., :, None] - gam[..., None, :]).masked_fill(~incl, float("-inf"))
    decay = torch.exp(diff)                                                 # exp(gam_t - gam_j), j <= t
    A = (bc[..., None] * (kc @ kc.transpose(-1, -2)) * decay).tril(-1)
    eye = torch.eye(C, device=q.device)
    M = A + eye
    wv = torch.linalg.solve_triangular(M, bc[..., None] * vc, upper=False, unitriangular=True)
    wk = torch.linalg.solve_triangular(M, (bc * torch.exp(gam))[..., None] * kc, upper=False, unitriangular=True)
    attn = scale * (qc @ kc.transpose(-1, -2)) * decay                       # (b, H, n, C, C)
    qe = scale * qc * torch.exp(gam)[..., None]                             # (b, H, n, C, K)
    glast = gam[..., -1]                                                    # (b, H, n)
    kd = kc * torch.exp(glast[..., None] - gam)[..., None]                  # (b, H, n, C, K)
    S = qf.new_zeros(batch, H, K, V)
    outs = []
    for i in range(n):
        u = wv[:, :, i] - wk[:, :, i] @ S
        outs.append(qe[:, :, i] @ S + attn[:, :, i] @ u)
        S = torch.exp(glast[:, :, i])[..., None, None] * S + kd[:, :, i].transpose(-1, -2) @ u
    o = torch.stack(outs, 2)                                                # (b, H, n, C, V)
    return o.permute(0, 2, 3, 1, 4).reshape(batch, n * C, H, V)[:, :T].to(dtype)


def decode_step(state, q, k, v, g, beta):
    """One token (batch, 1, H, *) through the recurrence; state (batch, H, K, V) float32 in place."""
    batch, _, H, K = q.shape
    V = v.shape[-1]
    qf, kf = l2norm(q[:, 0].float()), l2norm(k[:, 0].float())
    state.mul_(torch.exp(g[:, 0])[..., None, None])
    u = torch.einsum("bhk,bhkv->bhv", kf, state)
    w = beta[:, 0].float()[..., None] * (v[:, 0].float() - u)
    state.view(batch * H, K, V).baddbmm_(kf.reshape(batch * H, K, 1), w.reshape(batch * H, 1, V))
    o = torch.einsum("bhk,bhkv->bhv", qf, state) * K ** -0.5
    return o.to(q.dtype).unsqueeze(1)


def make_inputs(batch, T, H, K, dtype, dev="cuda"):
    V = K
    q = (torch.rand(batch, T, H, K, device=dev) * 2 - 1).to(dtype).requires_grad_()
    k = (torch.rand(batch, T, H, K, device=dev) * 2 - 1).to(dtype).requires_grad_()
    v = (torch.rand(batch, T, H, V, device=dev) * 2 - 1).to(dtype).requires_grad_()
    g = F.logsigmoid(torch.rand(batch, T, H, device=dev) * 10.9 - 4.9).requires_grad_()
    beta = torch.sigmoid(torch.rand(batch, T, H, device=dev) * 8 - 4).to(dtype).requires_grad_()
    go = (torch.rand(batch, T, H, V, device=dev) * 2 - 1).to(dtype)
    return (q, k, v, g, beta), go


def main():
    cfg = request()
    dt = DTYPES
    times = {}
    notes = []
    rate = matmul_tflops()
    times["matmul/bfloat16"] = rate
    notes.append(f"bf16 matmul (8192^3, torch.matmul): {rate:.0f} TFLOP/s")
    if fla_chunk is None:
        notes.append("flash-linear-attention not importable: its Triton peer is not run")
    for batch, T, H, K in cfg["sizes"]:
        for name in cfg["dtypes"]:
            key = f"{batch}x{T}x{H}x{K}/{name}"
            args, go = make_inputs(batch, T, H, K, dt[name])
            if T == 1:
                state = torch.rand(batch, H, K, K, device="cuda") * 0.2 - 0.1
                with torch.no_grad():
                    d = time_ms(lambda: decode_step(state, *args), 50)
                notes.append(f"decode at {key}: {d:.4f} ms")
                times[f"{key}/decode"] = d
                del args, go, state
                torch.cuda.empty_cache()
                continue
            best = {"fwd": None, "fwd+bwd": None}
            impls = [chunked_gdr] + ([loop_gdr] if T <= LOOP_MAX_T else [])
            for impl in impls:
                iters = 5 if impl is loop_gdr else 10

                def fwd_bwd():
                    o = impl(*args)
                    torch.autograd.grad(o, args, go)

                try:
                    with torch.no_grad():
                        f = time_ms(lambda: impl(*args), iters)
                    b = time_ms(fwd_bwd, iters)
                except torch.cuda.OutOfMemoryError:
                    notes.append(f"{impl.__name__} out of memory at {key}")
                    continue
                finally:
                    torch.cuda.empty_cache()
                notes.append(f"{impl.__name__} at {key}: fwd {f:.3f} ms, fwd+bwd {b:.3f} ms")
                best["fwd"] = f if best["fwd"] is None else min(best["fwd"], f)
                best["fwd+bwd"] = b if best["fwd+bwd"] is None else min(best["fwd+bwd"], b)
            for p, v in best.items():
                if v is not None:
                    times[f"{key}/{p}"] = v
            if fla_chunk is not None:
                def fla_fwd_bwd():
                    o = fla_gdr(*args)
                    torch.autograd.grad(o, args, go)

                try:
                    with torch.no_grad():
                        f = time_ms(lambda: fla_gdr(*args), 20)
                    b = time_ms(fla_fwd_bwd, 20)
                    times[f"{key}/fla/fwd"], times[f"{key}/fla/fwd+bwd"] = f, b
                    notes.append(f"fla chunk_gated_delta_rule at {key}: fwd {f:.3f} ms, fwd+bwd {b:.3f} ms")
                except Exception as e:  # noqa: BLE001
                    notes.append(f"fla chunk_gated_delta_rule at {key}: not run ({e})")
                finally:
                    torch.cuda.empty_cache()
            del args, go
            torch.cuda.empty_cache()
    print(json.dumps({"times": times, "notes": notes}))


if __name__ == "__main__":
    main()
