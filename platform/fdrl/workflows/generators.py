"""The generators DGflow refines: train a baseline on Ray Train and register it
(``jobs/train_gan.py``), and train a density-ratio corrector for a registered one
(``jobs/train_corrector.py``). Both register through ``fdrl.tracking.generators`` (alias
``candidate``)."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from typing import Optional

import torch

from fdrl.config import storage_root
from fdrl.core.generator_nets import build_net
from fdrl.distributed.gan_worker import GenConfig, gan_loop_per_worker, load_checkpoint, load_data, net_specs


RUN_INFO = "fdrl_gan_run.json"  # in the run folder: the MLflow run id, for resume


def train_generator(cfg: GenConfig, train_loop=gan_loop_per_worker) -> dict:
    """Train on a TorchTrainer, register as ``gan-<dataset>``/``vae-<dataset>`` (alias candidate).
    With ``cfg.resume`` the run folder's checkpoints and MLflow run are continued. ``train_loop``
    is the per-worker function (tests wrap it). Returns {"model_uri", "run_id", "version",
    "seconds", "config"}."""
    from fdrl.data import storage
    from fdrl.distributed.cluster import connect
    from fdrl.distributed.trainer import RunFailed, TrainerSpec, fit
    from fdrl.tracking.generators import log_generator
    from fdrl.tracking.tracker import Tracker, default_tracking_uri, git_commit

    cfg.validate()
    cfg.tracking_uri = cfg.tracking_uri or default_tracking_uri()
    cfg.specs = net_specs(cfg)
    name = cfg.register_name or f"{cfg.model}-{cfg.dataset}"
    root = cfg.storage = storage_root(cfg.storage, "generators")  # the workers' restore reads it
    cfg.run_name = cfg.run_name or (_latest_run(root, name, cfg.seed) if cfg.resume
                                    else f"{name}-s{cfg.seed}-{int(time.time())}")
    info_path = storage.join(root, cfg.run_name, RUN_INFO)
    started = storage.is_file(info_path)
    if started and not cfg.resume:  # Ray Train would silently continue the old checkpoints
        raise FileExistsError(f"{storage.join(root, cfg.run_name)} exists: pass resume (--resume) "
                              "to continue it, or a new run name")
    if cfg.resume and not started:
        raise FileNotFoundError(f"resume: no run {cfg.run_name!r} under {root}")
    previous = json.loads(storage.read_text(info_path)) if started else {}
    connect()
    tracker = Tracker(cfg.experiment, run_name=f"{name}-s{cfg.seed}", tracking_uri=cfg.tracking_uri,
                      run_id=previous.get("mlflow_run_id"))
    if not started:
        tracker.log_params({k: v for k, v in asdict(cfg).items() if k not in ("specs", "resume")})
        tracker.set_tags({"dataset": cfg.dataset, "git_commit": git_commit() or "unknown"})
        storage.write_text(info_path, json.dumps({"mlflow_run_id": tracker.run_id}))

    def on_report(metrics: dict, checkpoint) -> None:
        step = int(metrics.pop("step"))
        tracker.log_metrics(metrics, step)
        print(f"step {step:6d} " + " ".join(f"{k} {v:+.4f}" for k, v in metrics.items()), flush=True)

    spec = TrainerSpec(train_loop, asdict(cfg), cfg.run_name, root, cfg.workers, cpus_per_worker=1,
                       keep_checkpoints=cfg.keep_checkpoints, max_failures=cfg.max_failures)
    try:
        result = fit(spec, on_report)
    except BaseException as err:
        if isinstance(err, RunFailed):
            tracker.set_tags({"fdrl.failure": str(err)})
        tracker.end("FAILED")
        raise
    seconds = float(result.metrics["seconds"])  # every attempt's, resumed ones included
    built = {role: build_net(net_spec) for role, net_spec in cfg.specs.items()}
    with result.checkpoint.as_directory() as d:
        load_checkpoint(d, built)
    nets = {role: (cfg.specs[role], net) for role, net in built.items()}
    kind = "vae" if cfg.model == "vae" else "gan"
    data_shape = (1, 32, 32) if cfg.dataset == "mnist" else (2,)
    info = {"dataset": cfg.dataset, "steps": cfg.steps, "seed": cfg.seed, "loss": cfg.loss,
            "gp_weight": cfg.gp_weight, "train_seconds": seconds}
    mv = log_generator(tracker.run_id, name, kind, cfg.latent_dim, data_shape, nets, info,
                       tracking_uri=cfg.tracking_uri)
    tracker.log_metrics({"train_wall_seconds": seconds}, cfg.steps)
    tracker.end("FINISHED")
    uri = f"models:/{name}@candidate"
    print(f"registered {name} version {mv.version} ({uri}) in {seconds:.0f} s")
    return {"model_uri": uri, "run_id": tracker.run_id, "version": str(mv.version), "seconds": seconds,
            "config": json.loads(json.dumps(asdict(cfg), default=str))}


def _latest_run(root: str, name: str, seed: int) -> str:
    """The run folder of ``name`` and ``seed`` under ``root`` created last."""
    from fdrl.data import storage

    latest = storage.latest_folder(root, f"{name}-s{seed}-*", RUN_INFO)
    if latest is None:
        raise FileNotFoundError(f"resume: no run of {name} seed {seed} under {root}")
    return latest


def train_corrector(generator_uri: str, reference_uri: Optional[str] = None, *, iters: int = 10_000,
                    lr: float = 1e-4, momentum: float = 0.9, batch: int = 64, seed: int = 0,
                    log_every: int = 500, experiment: str = "fdrl-generators",
                    tracking_uri: Optional[str] = None) -> dict:
    """Fit a corrector d_lambda for a registered generator and register the generator with it as
    a new version (alias ``candidate``).

    With ``reference_uri`` (a GAN): d_lambda starts from that GAN's d_phi and learns to separate
    its samples (class 1) from ours, so the ratio is exp(-d_phi) exp(-d_lambda). Without: d + d_lambda
    separates data from our samples (a WGAN critic is calibrated; a model without a
    discriminator gets a fresh d_lambda)."""
    from fdrl.core.gan import fit_corrector
    from fdrl.core.dgflow import Logit
    from fdrl.tracking.generators import load_generator, log_generator
    from fdrl.tracking.tracker import Tracker

    if iters < 1 or batch < 1:
        raise ValueError(f"--iters and --batch must be >= 1, got {iters}, {batch}")
    model = load_generator(generator_uri, tracking_uri)
    reference = load_generator(reference_uri, tracking_uri) if reference_uri else None
    if reference is not None:
        if "discriminator" not in reference.nets:
            raise ValueError(f"--reference {reference_uri} has no discriminator to start from")
        if tuple(reference.data_shape) != tuple(model.data_shape):
            raise ValueError(f"--reference makes {reference.data_shape}, the generator {model.data_shape}")

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    own = model.nets.get("discriminator")
    scalar = lambda spec: spec.get("out_dim", 1) == 1  # noqa: E731
    if reference is not None:
        d_phi, phi_spec = reference.nets["discriminator"], reference.specs["discriminator"]
        spec = phi_spec if scalar(phi_spec) else dict(phi_spec, out_dim=1)
        corrector = copy.deepcopy(d_phi) if scalar(phi_spec) else build_net(spec)
        train_logit, base = corrector, ("discriminator", phi_spec, d_phi)
        positives = lambda n: _draw(reference, n, gen)  # noqa: E731
    else:
        spec = dict(model.specs["discriminator"], out_dim=1) if own is not None else _fresh_spec(model)
        corrector = build_net(spec)
        _zero_last_layer(corrector)  # start at d itself
        use_own = own is not None and scalar(model.specs["discriminator"])
        train_logit = Logit(own, corrector) if use_own else Logit(corrector)
        base = ("discriminator", model.specs["discriminator"], own) if own is not None else None
        pool = load_data(model.info.get("dataset", "mnist"), seed)
        positives = lambda n: pool[torch.randint(len(pool), (n,), generator=gen)]  # noqa: E731
    with Tracker(experiment, run_name=f"corrector-{model.name}-v{model.version}",
                 tracking_uri=tracking_uri,
                 tags={"model_uri": generator_uri, "reference": reference_uri or ""}) as t:
        t.log_params({"generator": generator_uri, "reference": reference_uri, "iters": iters,
                      "lr": lr, "momentum": momentum, "batch": batch, "seed": seed})
        start = time.perf_counter()

        def on_log(it: int, loss: float) -> None:
            t.log_metrics({"corrector_loss": loss}, it)
            print(f"iter {it:6d} loss {loss:.4f}", flush=True)

        fit_corrector(corrector, train_logit, positives, lambda n: _draw(model, n, gen),
                      iters=iters, lr=lr, momentum=momentum, batch=batch, log_every=log_every,
                      on_log=on_log)
        nets = {role: (model.specs[role], net) for role, net in model.nets.items() if role != "corrector"}
        if base is not None:
            nets[base[0]] = (base[1], base[2])
        nets["corrector"] = (spec, corrector)
        info = {**model.info, "corrector_of": f"models:/{model.name}/{model.version}",
                "corrector_reference": reference_uri, "corrector_iters": iters,
                "corrector_seconds": time.perf_counter() - start}
        mv = log_generator(t.run_id, model.name, model.kind, model.latent_dim, model.data_shape,
                           nets, info, tracking_uri=tracking_uri)
    return {"model_uri": f"models:/{model.name}@candidate", "version": str(mv.version)}


def _draw(model, n, gen):
    with torch.no_grad():
        return model.generator(torch.randn(n, model.latent_dim, generator=gen))


def _fresh_spec(model):
    if tuple(model.data_shape) == (2,):
        return {"arch": "mlp", "in_dim": 2, "out_dim": 1, "width": 128, "depth": 3}
    return {"arch": "dcgan_d"}


def _zero_last_layer(net):
    from torch.nn.utils import parametrize

    last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    if parametrize.is_parametrized(last):  # spectral norm of a zero matrix is undefined
        return
    with torch.no_grad():
        for p in last.parameters():
            p.zero_()
