"""What does a second CPU worker cost, and why? Two processes (torch.multiprocessing, one thread
each) run the FDRL training step of the cifar10 net (batch 8, K = 5, LSIF-chi2), with
--precision and channels_last for bf16, in one of these modes:

* ``solo``     independent processes, no process group (what two unsynchronised jobs get);
* ``pg``       a gloo process group exists, nothing is exchanged;
* ``barrier``  a gloo barrier once per step (no gradient bytes: lockstep alone);
* ``spin``     the same barrier, awaited by polling (the waiting core never idles);
* ``ddp``      DistributedDataParallel, as training runs;
* ``pin``      DDP, each rank pinned to its own core;
* ``busy``     DDP, with an idle-priority (SCHED_IDLE) busy loop pinned to every core, so no
               vCPU halts while the ranks wait (tried on the Ray Train path too: BENCHMARKS.md);
* ``rotate``   DDP, the ranks take turns on the cores: every 50 ms each moves every thread to the
               next core, in step by the shared monotonic clock (tried in the Ray Train worker
               too: BENCHMARKS.md, issue 11).

Prints each rank's median seconds per step and per flow, and the time of one all-reduce of
the whole gradient. ``--world 1`` gives the single-process reference.

Usage: python benchmarks/lockstep.py --modes solo pg barrier ddp pin rotate busy [--precision bf16] [--steps 14]
"""

import argparse
import os
import statistics
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


ROTATE_PERIOD_S = 0.05


def rotate_cores(rank: int, cores: list[int]) -> None:
    """Background thread: at every period boundary, rank r moves all its threads to core
    (r + tick) mod len(cores); every rank reads the same clock, so no two share a core."""
    def loop():
        while True:
            tick = int(time.monotonic() / ROTATE_PERIOD_S)
            core = {cores[(rank + tick) % len(cores)]}
            for tid in os.listdir("/proc/self/task"):
                try:
                    os.sched_setaffinity(int(tid), core)
                except OSError:
                    pass
            time.sleep(ROTATE_PERIOD_S - time.monotonic() % ROTATE_PERIOD_S)

    threading.Thread(target=loop, daemon=True).start()


def idle_spinner(core: int):
    """A busy loop pinned to ``core`` at SCHED_IDLE: it runs only when the core would idle."""
    import multiprocessing

    def spin():
        os.sched_setaffinity(0, {core})
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        while True:
            pass

    proc = multiprocessing.get_context("fork").Process(target=spin, daemon=True)
    proc.start()
    return proc


def worker(rank, world, mode, precision, steps, port, queue):
    import fdrl.core.step as stepmod
    from fdrl.core.acceleration import to_channels_last
    from fdrl.core.divergences import get_pairing
    from fdrl.core.flow import FlowSettings
    from fdrl.core.networks import build_network
    from fdrl.core.priors import make_simple_prior
    from fdrl.core.step import make_state, train_step

    torch.set_num_threads(1)
    cores = sorted(os.sched_getaffinity(0))
    if mode == "pin":
        os.sched_setaffinity(0, {cores[rank % len(cores)]})
    elif mode == "rotate" and world > 1:
        rotate_cores(rank, cores)
    spinners = [idle_spinner(core) for core in cores] if mode == "busy" and rank == 0 else []
    grouped = mode != "solo" and world > 1
    if grouped:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    module = build_network("cifar10")
    if precision == "bf16":
        module = to_channels_last(module)
    ddp = grouped and mode in ("ddp", "pin", "rotate", "busy")
    model = torch.nn.parallel.DistributedDataParallel(module) if ddp else module
    state = make_state(model, 2e-4, module=module)
    flow_times, run_flow = [], stepmod.run_flow

    def timed_flow(*args, **kwargs):
        start = time.perf_counter()
        out = run_flow(*args, **kwargs)
        flow_times.append(time.perf_counter() - start)
        return out

    stepmod.run_flow = timed_flow
    prior, pairing = make_simple_prior("uniform", (3, 32, 32)), get_pairing("lsif-chi2")
    flow = FlowSettings(flow_steps=5, extra_steps=0, eta=1.0, nu=0.01, precision=precision)
    gen = torch.Generator().manual_seed(rank)
    data = torch.rand(8, 3, 32, 32, generator=gen) * 2 - 1
    times = []
    for _ in range(steps):
        if grouped and mode == "barrier":
            dist.barrier()
        elif grouped and mode == "spin":
            work = dist.barrier(async_op=True)
            while not work.is_completed():
                pass
        start = time.perf_counter()
        train_step(state, data, prior, pairing, flow, gen)
        times.append(time.perf_counter() - start)
    all_reduce = None
    if grouped:
        flat = torch.zeros(sum(p.numel() for p in module.parameters()))
        spans = []
        for _ in range(5):
            start = time.perf_counter()
            dist.all_reduce(flat)
            spans.append(time.perf_counter() - start)
        all_reduce = statistics.median(spans)
        dist.destroy_process_group()
    for proc in spinners:
        proc.kill()
    # barrier and spin modes time the step after the barrier: the wait itself is not counted
    queue.put((rank, statistics.median(times[2:]), statistics.median(flow_times[2:]), all_reduce))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["solo", "pg", "barrier", "ddp"])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    port = 29700 + os.getpid() % 200
    for r in range(args.rounds):
        for mode in ["solo-1"] + args.modes:
            world = 1 if mode == "solo-1" else args.world
            queue = ctx.Queue()
            port += 1
            procs = [ctx.Process(target=worker, args=(rank, world, mode.split("-")[0], args.precision,
                                                       args.steps, port, queue)) for rank in range(world)]
            for proc in procs:
                proc.start()
            rows = sorted(queue.get() for _ in procs)
            for proc in procs:
                proc.join()
            steps = " ".join(f"{s:.3f}" for _, s, _, _ in rows)
            flows = " ".join(f"{f:.3f}" for _, _, f, _ in rows)
            ar = f", all-reduce of the gradient {rows[0][3] * 1000:.0f} ms" if rows[0][3] else ""
            print(f"round {r + 1} {mode:8s} {args.precision}: s/step per rank {steps}; flow {flows}{ar}",
                  flush=True)


if __name__ == "__main__":
    main()
