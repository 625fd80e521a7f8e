"""GAN training maths for the baseline generators DGflow refines (no Ray, no MLflow).

* ``wgan-gp`` (2D, as in DGflow's appendix): critic loss E[d(g(z))] - E[d(x)] + w * GP, with
  GP = E[(|grad d(x_hat)| - 1)^2] on random interpolates (w = 10 in DGflow's appendix; Gulrajani
  et al.'s toy code uses 0.1); generator loss -E[d(g(z))].
* ``hinge`` (SN-DCGAN on MNIST): critic E[relu(1 - d(x))] + E[relu(1 + d(g(z)))]; generator -E[d].

d is high on data, so exp(-d(x)) reads as the ratio generator/data (DGflow's convention).
The update functions return a loss and leave the gradients for the caller: a Ray worker all-reduces
them between backward and the optimiser step (DDP cannot do the penalty's double backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("wgan-gp", "hinge")
GP_WEIGHT = 10.0


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
    alpha = torch.rand((len(real),) + (1,) * (real.dim() - 1), generator=generator, device=real.device)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def critic_loss(loss: str, critic, real, fake, generator, gp_weight: float = GP_WEIGHT) -> torch.Tensor:
    fake = fake.detach()
    if loss == "wgan-gp":
        return (critic(fake).mean() - critic(real).mean()
                + gp_weight * gradient_penalty(critic, real, fake, generator))
    if loss == "hinge":
        return F.relu(1 - critic(real)).mean() + F.relu(1 + critic(fake)).mean()
    raise ValueError(f"unknown GAN loss {loss!r}; valid: {', '.join(LOSSES)}")


def generator_loss(loss: str, critic, fake) -> torch.Tensor:
    if loss not in LOSSES:
        raise ValueError(f"unknown GAN loss {loss!r}; valid: {', '.join(LOSSES)}")
    return -critic(fake).mean()


def vae_loss(encoder, decoder, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Negative ELBO per image: Gaussian decoder with unit variance (squared error / 2) + KL."""
    mean, log_var = encoder(x).chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=generator, device=x.device)
    recon = decoder(mean + (0.5 * log_var).exp() * eps)
    rec = 0.5 * (recon - x).pow(2).flatten(1).sum(1)
    kl = 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum(1)
    return (rec + kl).mean()


def corrector_loss(logit, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Logistic loss with ``positives`` (data, or the reference GAN's samples) as class 1: its
    optimum is logit = log(p_pos / p_neg), so exp(-logit) reads as the ratio negatives/positives."""
    return -F.logsigmoid(logit(positives)).mean() - F.logsigmoid(-logit(negatives)).mean()


def fit_corrector(corrector: torch.nn.Module, logit, positives, negatives, *, iters: int,
                  lr: float = 1e-4, momentum: float = 0.9, batch: int = 64, log_every: int = 500,
                  on_log=None) -> None:
    """DGflow's density-ratio corrector: SGD on ``corrector``'s parameters with the logistic loss
    of ``logit`` (which includes the corrector) on ``positives(batch)`` (class 1) against
    ``negatives(batch)``. ``on_log(iteration, loss)`` every ``log_every`` iterations and at the end."""
    if iters < 1 or batch < 1:
        raise ValueError(f"iters and batch must be >= 1, got {iters}, {batch}")
    corrector.train().requires_grad_(True)
    opt = torch.optim.SGD(corrector.parameters(), lr=lr, momentum=momentum)
    for it in range(1, iters + 1):
        loss = corrector_loss(logit, positives(batch), negatives(batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_log is not None and (it % log_every == 0 or it == iters):
            on_log(it, loss.item())
    corrector.eval().requires_grad_(False)
