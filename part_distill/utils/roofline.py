"""Machine limits measured in the same run as a benchmark, so a figure reads as a fraction of them.

On a shared machine absolute times drift with the load; a benchmark that measures the stream
bandwidth and the matmul peak right beside the job (and prints the load average) reports how far
the job is from what this machine could do at that moment, which stays comparable across loads.
"""
import os
import time

import torch

__all__ = ["load_average", "sync", "best_time", "stream_read_time", "stream_bandwidth", "matmul_peak",
           "MachineLimits", "roofline"]


def load_average():
    """(1, 5, 15)-minute load averages, or None where the OS has none."""
    try:
        return tuple(round(v, 2) for v in os.getloadavg())
    except OSError:
        return None


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device, repeats=3, warmup=1):
    """Minimum wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def stream_read_time(x, repeats=3):
    """Seconds to read tensor ``x`` once (a full-tensor sum: one streaming pass, negligible math)."""
    flat = x.reshape(-1)
    return best_time(lambda: flat.sum(), x.device, repeats=repeats)


def stream_bandwidth(device, nbytes=1 << 30, repeats=3):
    """Read bandwidth in bytes/s over a fresh float32 buffer of ``nbytes`` (larger than the caches)."""
    x = torch.ones(max(1, nbytes // 4), device=device)
    return x.numel() * 4 / stream_read_time(x, repeats)


def matmul_peak(device, dtype=torch.float32, n=None, repeats=3):
    """Dense square matmul FLOP/s in ``dtype`` (the compute roof; TF32 follows torch's settings)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / best_time(lambda: a @ b, device, repeats=repeats)


class MachineLimits:
    """Stream bandwidth (bytes/s) and matmul peak (FLOP/s) of ``device``, measured now."""

    def __init__(self, device, nbytes=1 << 30, dtype=torch.float32):
        self.device = torch.device(device)
        self.load_before = load_average()
        self.bandwidth = stream_bandwidth(self.device, nbytes)
        self.peak = matmul_peak(self.device, dtype)
        self.threads = torch.get_num_threads()

    def as_dict(self):
        return {"device": str(self.device), "threads": self.threads, "stream_GBps": self.bandwidth / 1e9,
                "matmul_GFLOPps": self.peak / 1e9, "load_average": self.load_before}

    def __str__(self):
        return (f"machine limits on {self.device} ({self.threads} threads, load average {self.load_before}): "
                f"stream read {self.bandwidth / 1e9:.1f} GB/s, fp32 matmul {self.peak / 1e9:.0f} GFLOP/s")


def roofline(seconds, nbytes=0.0, flops=0.0, bandwidth=None, peak=None, read_seconds=None):
    """Lower bound on the time of a job moving ``nbytes`` and doing ``flops``, and ``seconds`` against it.

    ``read_seconds`` (measured time to stream the job's bytes) replaces ``nbytes / bandwidth``
    when given. Returns dict(limit_s, bound: "bandwidth" | "compute", fraction = limit / seconds).
    """
    t_bw = read_seconds if read_seconds is not None else (nbytes / bandwidth if bandwidth else 0.0)
    t_fl = flops / peak if peak else 0.0
    limit = max(t_bw, t_fl)
    return {"limit_s": limit, "bound": "bandwidth" if t_bw >= t_fl else "compute",
            "bandwidth_s": t_bw, "compute_s": t_fl, "fraction": limit / seconds if seconds > 0 else float("nan")}


def write_report(out, dest, **json_kwargs):
    """A benchmark's ``--json`` output: printed when ``dest`` is "-", else written atomically to ``dest``."""
    import json

    from .io import atomic_write_json

    if dest == "-":
        print(json.dumps(out, indent=1, **json_kwargs))
    else:
        atomic_write_json(dest, out, indent=1, **json_kwargs)
