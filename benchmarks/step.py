"""Time one FDRL training step (prior draw, K-step flow, update, EMA) for each speed option alone
and all together, interleaved in one run, and print ratios against our fp32 eager step.

Presets:
* reference: the public reference's CIFAR10 configuration: the cifar10 net (11.4M parameters) with
  spectral norm on every layer, batch 8, K = 5, LSIF-chi2, a full data-dependent Gaussian prior
  over 3072 dims, 2 threads.
* demo: one worker of the MNIST demo (fdrl/presets.py): the mnist32 net, 32 images per worker,
  K = 20, a full prior over 1024 dims, 1 thread.

Variants: fp32 eager (ours), "reference flow" (the reference's arithmetic: the network in train
mode during the flow, so spectral norm iterates at every flow step, and weight gradients built),
bf16, channels_last, compile, and all of bf16 + channels_last + compile. Each round times one
step of every variant in turn, so load from other processes spreads over all of them; the table
gives medians. It also measures this machine's conv3x3 peak (128 channels, fp32 and bf16) and the
step's GFLOP/s from the FLOPs torch counts for one step.

``--json``: ``fp32_eager_s`` and ``optimized_s`` (the faster of "all" and "bf16+channels_last",
named in ``optimized_variant``), median seconds per step.

Usage: python benchmarks/step.py [--preset reference|demo|both] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from fdrl.core.acceleration import compile_network, to_channels_last
from fdrl.core.divergences import get_pairing
from fdrl.core.flow import FlowSettings
from fdrl.core.networks import build_network
from fdrl.core.priors import FullGaussianPrior
from fdrl.core.step import make_state, train_step

PRESETS = {
    "reference": dict(arch="cifar10", net=dict(spectral_norm=True), batch=8, flow_steps=5,
                      threads=2),
    "demo": dict(arch="mnist32", net={}, batch=32, flow_steps=20, threads=1),
}
# name -> (precision, channels_last, compile, reference-style flow)
VARIANTS = {
    "fp32_eager": ("fp32", False, False, False),
    "reference_flow": ("fp32", False, False, True),
    "bf16": ("bf16", False, False, False),
    "channels_last": ("fp32", True, False, False),
    "compile": ("fp32", False, True, False),
    "bf16+channels_last": ("bf16", True, False, False),
    "all": ("bf16", True, True, False),
}
WITHOUT_COMPILE = {"all": ("bf16", True, False, False)}  # --no-compile: "all" is bf16 + channels_last


def synthetic_prior(shape, seed=0) -> FullGaussianPrior:
    """A full Gaussian with a dense lower-triangular factor: the same matmul as a fitted prior."""
    dim = shape[0] * shape[1] * shape[2]
    g = torch.Generator().manual_seed(seed)
    tril = torch.tril(torch.randn(dim, dim, generator=g)) / dim**0.5
    return FullGaussianPrior(shape, torch.zeros(dim), tril, clamp=1.0)


@contextlib.contextmanager
def reference_flow():
    """The reference's flow arithmetic: train mode (spectral norm iterates every flow step), no
    frozen parameters and no weight cache. Patches the flow's context for the duration."""
    import fdrl.core.flow as flow_module

    original = flow_module.frozen_for_flow

    @contextlib.contextmanager
    def train_mode(net):
        yield net

    flow_module.frozen_for_flow = train_mode
    try:
        yield
    finally:
        flow_module.frozen_for_flow = original


class Variant:
    def __init__(self, name, preset, base_net, seed=0):
        precision, channels_last, compiled, self.reference = VARIANTS[name]
        self.name, self.preset = name, preset
        net = copy.deepcopy(base_net)
        if channels_last:
            net = to_channels_last(net)
        self.state = make_state(net, lr=1e-4)
        self.compiled = compile_network(net) if compiled else False
        self.flow = FlowSettings(preset["flow_steps"], 0, 3.0, 0.01, precision)
        self.gen = torch.Generator().manual_seed(seed)
        self.pairing = get_pairing("lsif-chi2")

    def step(self, data, prior) -> tuple[float, float]:
        """Wall seconds and CPU seconds (all threads of this process) of one step. On a shared
        machine the CPU seconds measure the work, whatever share of the cores the step got."""
        ctx = reference_flow() if self.reference else contextlib.nullcontext()
        start, cpu_start = time.perf_counter(), time.process_time()
        with ctx:
            train_step(self.state, data, prior, self.pairing, self.flow, self.gen)
        return time.perf_counter() - start, time.process_time() - cpu_start


class FlopCount(TorchDispatchMode):
    """Matmul and conv FLOPs of the ops run inside, by torch's own formulas. (FlopCounterMode
    itself cannot follow autograd.grad on inputs, which the flow uses.)"""

    total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def conv_peak(dtype, threads, repeats=5) -> float:
    """GFLOP/s of a conv3x3, 128 -> 128 channels, batch 16 at 32x32, channels_last."""
    x = torch.randn(16, 128, 32, 32).to(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).to(memory_format=torch.channels_last)
    flops = 2 * 16 * 128 * 32 * 32 * 128 * 9
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
    times = []
    with torch.no_grad(), ctx:
        conv(x)
        for _ in range(repeats):
            start = time.perf_counter()
            conv(x)
            times.append(time.perf_counter() - start)
    return flops / min(times) / 1e9  # best of: the machine's peak, not its load


def prior_share(prior, batch, step_s, repeats=20) -> float:
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(repeats):
        prior.sample(batch, g)
    return (time.perf_counter() - start) / repeats / step_s


def run_preset(name: str, rounds: int, warmup: int, log) -> dict:
    preset = PRESETS[name]
    torch.set_num_threads(preset["threads"])
    torch.manual_seed(0)
    base = build_network(preset["arch"], **preset["net"])
    shape = base.in_shape
    prior = synthetic_prior(shape)
    data = torch.rand(preset["batch"], *shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    variants = [Variant(v, preset, base) for v in VARIANTS]
    log(f"[{name}] warm-up ({warmup} steps per variant; compile happens here)")
    flops = 0
    for v in variants:
        for i in range(warmup):
            if v.name == "fp32_eager" and i == 0:  # FLOPs counted on an untimed step
                with FlopCount() as counter:
                    v.step(data, prior)
                flops = counter.total
            else:
                v.step(data, prior)
    times = {v.name: [] for v in variants}
    cpu = {v.name: [] for v in variants}
    for r in range(rounds):
        for v in variants:
            wall, used = v.step(data, prior)
            times[v.name].append(wall)
            cpu[v.name].append(used)
        log(f"[{name}] round {r + 1}/{rounds}: " + ", ".join(
            f"{k} {times[k][-1]:.2f}s ({cpu[k][-1]:.2f} CPU s)" for k in times))
    medians = {k: statistics.median(t) for k, t in times.items()}
    cpu_medians = {k: statistics.median(t) for k, t in cpu.items()}
    peak32, peak16 = conv_peak(torch.float32, preset["threads"]), conv_peak(torch.bfloat16, preset["threads"])
    base_s = medians["fp32_eager"]
    fastest = min((k for k in ("all", "bf16+channels_last") if k in medians), key=medians.get)
    return {
        "preset": name, "arch": preset["arch"], "batch": preset["batch"], "flow_steps": preset["flow_steps"],
        "threads": preset["threads"], "rounds": rounds, "spectral_norm": bool(preset["net"].get("spectral_norm")),
        # The fastest combination: on CPU, compile slows bf16 + channels_last down (BENCHMARKS.md).
        "fp32_eager_s": base_s, "optimized_s": medians[fastest], "optimized_variant": fastest,
        "median_s": medians, "median_cpu_s": cpu_medians,
        "fp32_eager_cpu_s": cpu_medians["fp32_eager"], "optimized_cpu_s": cpu_medians[fastest],
        "cpu_speedup": {k: cpu_medians["fp32_eager"] / c for k, c in cpu_medians.items()}, "speedup": {k: base_s / s for k, s in medians.items()},
        "compiled": {v.name: v.compiled for v in variants},
        "variants": {v.name: dict(zip(("precision", "channels_last", "compile", "reference_flow"),
                                      VARIANTS[v.name])) for v in variants},
        "step_gflop": flops / 1e9, "gflops": {k: flops / s / 1e9 for k, s in medians.items()},
        "conv_peak_gflops": {"fp32": peak32, "bf16": peak16},
        "prior_share": prior_share(prior, preset["batch"], base_s),
    }


def table(result: dict) -> str:
    peak32, peak16 = result["conv_peak_gflops"]["fp32"], result["conv_peak_gflops"]["bf16"]
    lines = [f"{result['preset']}: {result['arch']}, batch {result['batch']}, K = {result['flow_steps']}, "
             f"{result['threads']} threads, {result['step_gflop']:.1f} GFLOP per step; conv3x3 peak "
             f"{peak32:.0f} GFLOP/s fp32, {peak16:.0f} bf16; prior draw {100 * result['prior_share']:.2f}% "
             f"of the fp32 step", "",
             "| variant | median s/step | × fp32 eager | median CPU s/step | × fp32 eager (CPU) | GFLOP/s | % of its conv peak |",
             "|---|---|---|---|---|---|---|"]
    for name, s in result["median_s"].items():
        spec = result["variants"][name]
        peak = peak16 if spec["precision"] == "bf16" else peak32
        gf = result["gflops"][name]
        note = "" if result["compiled"][name] or not spec["compile"] else " (compile fell back)"
        if name == "all":
            note += " (" + " + ".join(k for k in ("precision", "channels_last", "compile")
                                     if spec[k] not in (False, "fp32")).replace("precision", "bf16") + ")"
        cpu_s, cpu_x = result.get("median_cpu_s", {}).get(name), result.get("cpu_speedup", {}).get(name)
        cpu_cells = f"{cpu_s:.3f} | {cpu_x:.2f}" if cpu_s is not None else "- | -"
        lines.append(f"| {name}{note} | {s:.3f} | {result['speedup'][name]:.2f} | {cpu_cells} | {gf:.0f} | {100 * gf / peak:.0f}% |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["reference", "demo", "both"], default="both")
    p.add_argument("--rounds", type=int, default=5, help="timed steps per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (>= 1)")
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=None,
                   help="a subset (fp32_eager and all are always run)")
    p.add_argument("--no-compile", action="store_true",
                   help="leave torch.compile out (its first calls compile for minutes on 2 busy cores)")
    p.add_argument("--table", metavar="JSON", help="print the markdown table of a saved --json output")
    p.add_argument("--json", action="store_true", help="print one JSON object (one preset) or a list")
    args = p.parse_args(argv)
    if args.no_compile:
        for name in [n for n, v in VARIANTS.items() if v[2]]:
            del VARIANTS[name]
        VARIANTS.update(WITHOUT_COMPILE)
        VARIANTS.pop("bf16+channels_last")
    if args.variants is not None:
        keep = {"fp32_eager", "all", *args.variants}
        for name in list(VARIANTS):
            if name not in keep:
                del VARIANTS[name]
    if args.table:
        saved = json.load(open(args.table))
        print("\n\n".join(table(r) for r in (saved if isinstance(saved, list) else [saved])))
        return
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    names = ["reference", "demo"] if args.preset == "both" else [args.preset]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        results = [run_preset(n, args.rounds, args.warmup, log) for n in names]
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results))
    else:
        print("\n\n".join(table(r) for r in results))


if __name__ == "__main__":
    main()
