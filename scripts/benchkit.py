"""The harness of scripts/bench.py: one JSON line per measurement, interleaved timed rounds, peak memory.

Each figure is the median over rounds, the variants compared timed in turn within each round, so
drifting clocks or a noisy neighbour hit all alike. `warmup` runs the first calls (cuDNN autotuning,
compilation) untimed.
"""
import json
import statistics
import threading
import time

import torch


def emit(**kw):
    print(json.dumps(kw), flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync point: timing


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(cases, device, rounds):
    """{name: median seconds of one call} over `rounds` interleaved rounds."""
    times = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def _rss_anon_mib():
    """Anonymous resident memory of this process (file-backed pages, e.g. a
    memory-mapped gallery, are not counted: they are the page cache's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakMemory:
    """Peak memory above the level at entry, in MiB: the CUDA allocator's peak
    on GPUs; on CPU, anonymous RSS polled every millisecond."""

    def __init__(self, device):
        self.device, self.peak_mib = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base, self.high, self.stop = _rss_anon_mib(), 0.0, threading.Event()

            def poll():
                while not self.stop.is_set():
                    self.high = max(self.high, _rss_anon_mib())
                    time.sleep(0.001)
            self.thread = threading.Thread(target=poll, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.peak_mib = max(self.high, _rss_anon_mib()) - self.base


def warmup(fn, device, calls=2):
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return time.perf_counter() - t
