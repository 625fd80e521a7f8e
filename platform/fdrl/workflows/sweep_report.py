"""The results of a sweep: one row per trial (from Tune's result grid and each trial's run info),
written as CSV, Markdown and a plot; and the best trial."""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from fdrl.data import storage
from fdrl.workflows.train import RUN_INFO


@dataclass
class TrialRow:
    trial: str
    status: str  # finished, stopped early (ASHA), failed
    params: dict
    step: int
    metric: float
    error: str
    mlflow_run_id: str
    checkpoint: str


def trial_id(result) -> str:
    """Tune names a trial directory <trainable>_<id>_<n>_<params>...; ids look like 'ab12c_00003'."""
    found = re.search(r"_([0-9a-f]{5}_\d{5})(_|$)", Path(result.path or "").name)
    return (result.metrics or {}).get("trial_id") or (found.group(1) if found else "?")


def collect_rows(grid, metric_key: str, trials: str, searched: list[str]) -> list[TrialRow]:
    """One row per trial of Tune's result grid; ``trials``: the folder (or URI) of the trials'
    run folders, whose run info names each trial's MLflow run."""
    rows = []
    for result in grid:
        cfg = result.config or {}
        name = trial_id(result)
        metrics = result.metrics or {}
        info_path = storage.join(trials, f"trial-{name}", RUN_INFO)
        info = json.loads(storage.read_text(info_path)) if storage.is_file(info_path) else {}
        error = ""
        if result.error is not None:
            error = _short_error(result.error)
            status = "failed"
        elif metrics.get("step", 0) < cfg.get("steps", 0):
            status = "stopped early"
        else:
            status = "finished"
        value = metrics.get(metric_key, math.nan) if not error else math.nan
        rows.append(TrialRow(name, status, {k: cfg.get(k) for k in searched},
                             int(metrics.get("step", 0)), float(value), error,
                             info.get("mlflow_run_id", ""), metrics.get("checkpoint_path", "")))
    return rows


def _short_error(err: BaseException) -> str:
    """The innermost useful line: e.g. 'NonFiniteLossError: non-finite loss at step 3: ...'."""
    text = str(err)
    for line in reversed(text.splitlines()):
        if "Error" in line and ":" in line:
            return line.strip()[:300]
    return (text.splitlines() or [type(err).__name__])[-1][:300]


def rows_to_markdown(rows: list[TrialRow], metric: str, searched: list[str]) -> str:
    head = ["trial", "status", *searched, "step", metric, "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (math.isnan(r.metric), r.metric)):
        vals = [_fmt(r.params[k]) for k in searched]
        lines.append("| " + " | ".join([r.trial, r.status, *vals, str(r.step), _fmt(r.metric), r.error]) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def plot_rows(rows: list[TrialRow], metric: str, path: Path) -> Path:
    """One column per pairing; the metric against eta (top) and against K (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairings = sorted({r.params.get("pairing") for r in rows if r.params.get("pairing")}) or ["all"]
    fig, axes = plt.subplots(2, len(pairings), figsize=(3.2 * len(pairings), 5.5), squeeze=False,
                             sharey=True)
    finite = [r.metric for r in rows if not math.isnan(r.metric)]
    floor = min(finite, default=0.0)  # failed trials are drawn as crosses on this level
    for col, pairing in enumerate(pairings):
        mine = [r for r in rows if pairing == "all" or r.params.get("pairing") == pairing]
        for row, (field, scale) in enumerate((("eta", "log"), ("flow_steps", "linear"))):
            ax = axes[row][col]
            ok = [r for r in mine if not math.isnan(r.metric) and r.params.get(field) is not None]
            bad = [r for r in mine if math.isnan(r.metric) and r.params.get(field) is not None]
            ax.scatter([r.params[field] for r in ok], [r.metric for r in ok], c="tab:blue", label="trial")
            if bad:
                ax.scatter([r.params[field] for r in bad], [floor] * len(bad), marker="x", c="tab:red",
                           label="failed (no metric)")
            ax.set_xscale(scale)
            ax.set_xlabel("eta" if field == "eta" else "K (flow steps)")
            ax.set_ylabel(metric)
            if row == 0:
                ax.set_title(pairing)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_csv(rows: list[TrialRow], metric: str, searched: list[str], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "status", *searched, "step", metric, "error", "mlflow_run_id"])
        for r in rows:
            writer.writerow([r.trial, r.status, *(r.params[k] for k in searched), r.step, r.metric,
                             r.error, r.mlflow_run_id])
    return path


def write_report(rows: list[TrialRow], metric: str, searched: list[str], out: Path) -> list[Path]:
    """results.md, results.csv and results.png in ``out``."""
    (out / "results.md").write_text(rows_to_markdown(rows, metric, searched) + "\n")
    write_csv(rows, metric, searched, out / "results.csv")
    plot_rows(rows, metric, out / "results.png")
    return [out / "results.md", out / "results.csv", out / "results.png"]


def best_row(rows: list[TrialRow]):
    """The finished trial with the lowest metric and a checkpoint, or None."""
    done = [r for r in rows if r.status == "finished" and not math.isnan(r.metric) and r.checkpoint]
    return min(done, key=lambda r: r.metric) if done else None
