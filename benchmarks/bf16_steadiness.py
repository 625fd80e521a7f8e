"""How steady is this machine's conv throughput? A 128-channel conv3x3 (batch 8, 32x32,
channels_last, 1 thread) runs for --seconds on one core and prints GFLOP/s per 2 s window.
With --neighbour, a second process runs the same conv on the other core during the middle third,
so a window with and without a busy neighbour can be compared in one run. With --both, one
process per core runs for the whole time and each prints its own windows: do the two cores of
this VM run at one speed at the same moment?
Usage: python benchmarks/bf16_steadiness.py [--dtype bf16|fp32] [--seconds 42] [--neighbour | --both]"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

FLOP = 2 * 8 * 128 * 128 * 9 * 32 * 32


def windows(dtype: torch.dtype, seconds: float, window: float = 2.0) -> list[tuple[float, float]]:
    """[(end time since start, GFLOP/s)] for consecutive windows."""
    torch.set_num_threads(1)
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).to(dtype).to(memory_format=torch.channels_last)
    x = torch.randn(8, 128, 32, 32, dtype=dtype).to(memory_format=torch.channels_last)
    out, t0 = [], time.perf_counter()
    with torch.no_grad():
        conv(x)
        while time.perf_counter() - t0 < seconds:
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < window:
                conv(x)
                n += 1
            end = time.perf_counter()
            out.append((end - t0, FLOP * n / (end - start) / 1e9))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--seconds", type=float, default=42.0)
    p.add_argument("--neighbour", action="store_true")
    p.add_argument("--both", action="store_true", help="one process per core, side by side")
    p.add_argument("--child", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--print-core", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.child:
        result = windows(dtype, args.child)
        if args.print_core >= 0:
            print(f"core {args.print_core}: " + " ".join(f"{g:.0f}" for _, g in result), flush=True)
        return
    if args.both:
        print(f"{args.dtype} conv3x3 GFLOP/s per 2 s window, one process pinned to each core, same clock:")
        cores = sorted(os.sched_getaffinity(0))[:2]
        procs = [subprocess.Popen(["taskset", "-c", str(c), sys.executable, __file__, "--dtype", args.dtype,
                                   "--child", str(args.seconds), "--print-core", str(c)]) for c in cores]
        for proc in procs:
            proc.wait()
        return
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:
        os.sched_setaffinity(0, {0})
    neighbour = None
    third = args.seconds / 3
    if args.neighbour:  # starts after one third, runs for one third, on core 1
        cmd = [sys.executable, __file__, "--dtype", args.dtype, "--child", str(third)]
        neighbour = subprocess.Popen(["taskset", "-c", "1", "sh", "-c", f"sleep {third}; exec \"$@\"", "_", *cmd])
    result = windows(dtype, args.seconds)
    if neighbour:
        neighbour.wait()
    print(f"{args.dtype} conv3x3 GFLOP/s per 2 s window (1 thread, core 0):")
    print(" ".join(f"{g:.0f}" for _, g in result))
    rates = [g for _, g in result]
    print(f"min {min(rates):.0f}  median {statistics.median(rates):.0f}  max {max(rates):.0f}  "
          f"max/min {max(rates) / min(rates):.2f}")
    if args.neighbour:
        busy = [g for t, g in result if third + 2 < t <= 2 * third]
        idle = [g for t, g in result if t <= third or t > 2 * third + 2]
        print(f"median alone {statistics.median(idle):.0f}, with a busy neighbour "
              f"{statistics.median(busy):.0f} (neighbour's start-up window excluded)")


if __name__ == "__main__":
    main()
