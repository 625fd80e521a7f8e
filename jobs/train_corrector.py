"""Train a density-ratio corrector d_lambda for a registered generator (DGflow section 3) and
register it as a new version of that generator's model (alias ``candidate``).

    # VAE refined with a GAN's discriminator: d_lambda starts from d_phi of --reference and learns
    # to separate the GAN's samples (class 1) from the VAE's; the ratio is exp(-d_phi) exp(-d_lambda)
    python jobs/train_corrector.py --generator models:/vae-mnist@candidate --reference models:/gan-mnist@candidate
    # a WGAN critic (not a calibrated logit): d_lambda calibrates it, d + d_lambda separates data
    # from the generator's samples; a model without a discriminator gets a fresh d_lambda
    python jobs/train_corrector.py --generator models:/gan-25gaussians@candidate --iters 2000

SGD lr 1e-4, momentum 0.9, batch 64 (the paper's), --iters iterations (paper 10k).
"""

import fdrl  # noqa: F401  (environment defaults before Ray and MLflow: fdrl/env.py)

import argparse
import copy
import json
import sys
import time

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", required=True, help="models:/NAME@ALIAS of the generator to correct")
    p.add_argument("--reference", default=None, help="models:/NAME@ALIAS of a GAN whose d_phi to reuse")
    p.add_argument("--iters", type=int, default=10_000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=500)
    p.add_argument("--experiment", default="fdrl-generators")
    p.add_argument("--tracking-uri", default=None)
    args = p.parse_args(argv)

    from fdrl.core.dgflow import Logit
    from fdrl.core.gan import corrector_loss
    from fdrl.core.generator_nets import build_net
    from fdrl.distributed.gan_worker import load_data
    from fdrl.tracking.generators import load_generator, log_generator
    from fdrl.tracking.tracker import Tracker

    if args.iters < 1 or args.batch < 1:
        sys.exit(f"error: --iters and --batch must be >= 1, got {args.iters}, {args.batch}")
    try:
        model = load_generator(args.generator, args.tracking_uri)
        reference = load_generator(args.reference, args.tracking_uri) if args.reference else None
        if reference is not None:
            if "discriminator" not in reference.nets:
                raise ValueError(f"--reference {args.reference} has no discriminator to start from")
            if tuple(reference.data_shape) != tuple(model.data_shape):
                raise ValueError(f"--reference makes {reference.data_shape}, the generator {model.data_shape}")
    except (ValueError, LookupError) as err:
        sys.exit(f"error: {err}")

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    own = model.nets.get("discriminator")
    scalar = lambda spec: spec.get("out_dim", 1) == 1  # noqa: E731
    if reference is not None:  # d_lambda from d_phi, on reference samples (class 1) vs ours
        d_phi, phi_spec = reference.nets["discriminator"], reference.specs["discriminator"]
        spec = phi_spec if scalar(phi_spec) else dict(phi_spec, out_dim=1)
        corrector = copy.deepcopy(d_phi) if scalar(phi_spec) else build_net(spec)
        train_logit, base = corrector, ("discriminator", phi_spec, d_phi)
        positives = lambda n: _draw(reference, n, gen)  # noqa: E731
    else:  # calibrate our own d (or learn from scratch): d + d_lambda separates data from ours
        spec = dict(model.specs["discriminator"], out_dim=1) if own is not None else _fresh_spec(model)
        corrector = build_net(spec)
        _zero_last_layer(corrector)  # start at d itself
        use_own = own is not None and scalar(model.specs["discriminator"])
        train_logit = Logit(own, corrector) if use_own else Logit(corrector)
        base = ("discriminator", model.specs["discriminator"], own) if own is not None else None
        pool = load_data(model.info.get("dataset", "mnist"), args.seed)
        positives = lambda n: pool[torch.randint(len(pool), (n,), generator=gen)]  # noqa: E731
    corrector.train().requires_grad_(True)
    opt = torch.optim.SGD(corrector.parameters(), lr=args.lr, momentum=args.momentum)
    name = model.name
    with Tracker(args.experiment, run_name=f"corrector-{name}-v{model.version}",
                 tracking_uri=args.tracking_uri,
                 tags={"model_uri": args.generator, "reference": args.reference or ""}) as t:
        t.log_params(vars(args))
        start = time.perf_counter()
        for it in range(1, args.iters + 1):
            loss = corrector_loss(train_logit, positives(args.batch), _draw(model, args.batch, gen))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if it % args.log_every == 0 or it == args.iters:
                t.log_metrics({"corrector_loss": loss.item()}, it)
                print(f"iter {it:6d} loss {loss.item():.4f}", flush=True)
        corrector.eval().requires_grad_(False)
        nets = {role: (model.specs[role], net) for role, net in model.nets.items() if role != "corrector"}
        if base is not None:
            nets[base[0]] = (base[1], base[2])
        nets["corrector"] = (spec, corrector)
        info = {**model.info, "corrector_of": f"models:/{name}/{model.version}",
                "corrector_reference": args.reference, "corrector_iters": args.iters,
                "corrector_seconds": time.perf_counter() - start}
        mv = log_generator(t.run_id, name, model.kind, model.latent_dim, model.data_shape, nets, info,
                           tracking_uri=args.tracking_uri)
    print(json.dumps({"model_uri": f"models:/{name}@candidate", "version": str(mv.version)}))
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
