import math

import pytest
import torch
import torch.nn.functional as F

from fdrl.core.divergences import PAIRINGS, get_pairing

CATEGORIES = 6


def _empirical_minimiser(pairing, idx_p, idx_q):
    """Minimise the pairing's loss over a free output per category (a table 'network')."""
    out = torch.zeros(CATEGORIES, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([out], lr=1, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = pairing.loss(out[idx_p], out[idx_q])
        loss.backward()
        return loss

    opt.step(closure)
    return out.detach()


@pytest.mark.parametrize("name", sorted(PAIRINGS))
def test_loss_minimiser_is_the_density_ratio(name):
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.3, 0.2, 0.2, 0.1, 0.1, 0.1])
    q = torch.tensor([0.1, 0.1, 0.2, 0.2, 0.2, 0.2])
    idx_p = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    idx_q = torch.multinomial(q, 200_000, replacement=True, generator=gen)
    pairing = get_pairing(name)
    out = _empirical_minimiser(pairing, idx_p, idx_q)
    empirical = (torch.bincount(idx_q, minlength=CATEGORIES).double()
                 / torch.bincount(idx_p, minlength=CATEGORIES).double())
    estimated = out if pairing.output == "r" else out.exp()
    # Exact for the sample, and close to the true ratio q/p.
    torch.testing.assert_close(estimated, empirical, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(estimated, (q / p).double(), rtol=0.03, atol=0)


# f' of the paper's table 2, written in terms of r itself.
TABLE_F_PRIME = {
    "lsif-chi2": lambda r: 2 * (r - 1),
    "lr-kl": lambda r: torch.log(r) + 1,
    "lr-js": lambda r: torch.log(2 * r / (r + 1)),
    "lr-logd": lambda r: torch.log(r + 1) + 1,
}


@pytest.mark.parametrize("name", sorted(PAIRINGS))
def test_f_prime_gradients_match_paper_table(name):
    torch.manual_seed(0)
    pairing = get_pairing(name)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(64, 3, dtype=torch.float64, requires_grad=True)
    net = net.double()
    out = net(x).squeeze(-1)
    if pairing.output == "r":
        out = out.abs() + 0.5  # LSIF: the network emits r > 0
        r = out
    else:
        r = out.exp()
    (ours,) = torch.autograd.grad(pairing.f_prime(out).sum(), x, retain_graph=True)
    (table,) = torch.autograd.grad(TABLE_F_PRIME[name](r).sum(), x)
    torch.testing.assert_close(ours, table)


def test_lr_loss_is_stable_for_large_outputs():
    pairing = get_pairing("lr-kl")
    big = torch.tensor([1e4, -1e4])
    assert torch.isfinite(pairing.loss(big, big))
    assert math.isfinite(F.logsigmoid(torch.tensor(-1e4)).item())


def test_unknown_pairing_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_pairing("wasserstein")
    for name in PAIRINGS:
        assert name in str(err.value)
    assert "wasserstein" in str(err.value)
