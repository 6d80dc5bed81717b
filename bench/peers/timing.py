"""Shared by the PyTorch peers: the torch check, the request, dtypes, and timing (median of CUDA-event
times after two warm-up calls). A peer without torch, or without a CUDA device for it, answers
{"unavailable": why} and exits 0."""
import json
import sys

try:
    import torch
except Exception as e:  # noqa: BLE001
    print(json.dumps({"unavailable": f"torch not importable: {e}"}))
    sys.exit(0)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def request():
    """The benchmark's request (JSON in argv[1]); exits with an "unavailable" answer without a CUDA device."""
    if not torch.cuda.is_available():
        print(json.dumps({"unavailable": "no CUDA device for torch"}))
        sys.exit(0)
    return json.loads(sys.argv[1])


def time_ms(fn, iters):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]
