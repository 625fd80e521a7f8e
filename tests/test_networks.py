import pytest
import torch

from fdrl.core.networks import ARCHITECTURES, build_network, count_parameters

# Parameter counts of the reference implementation (FDRL paper, table 3 networks).
REFERENCE_COUNTS = {"cifar10": 11.37e6, "celeba64": 5.13e6, "church128": 5.44e6,
                    "cat2dog64": 1.55e6}


@pytest.mark.parametrize("arch", sorted(REFERENCE_COUNTS))
def test_parameter_counts_within_one_percent(arch):
    count = count_parameters(build_network(arch))
    assert abs(count - REFERENCE_COUNTS[arch]) / REFERENCE_COUNTS[arch] < 0.01, count


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_forward_gives_one_output_per_sample(arch):
    net = build_network(arch)
    x = torch.randn(2, *ARCHITECTURES[arch]["in_shape"])
    assert net(x).shape == (2,)


def test_mlp_and_wrong_input_shape():
    net = build_network("mlp")
    assert net(torch.randn(5, 2)).shape == (5,)
    with pytest.raises(ValueError, match=r"expects input of shape \(batch, 2\), got \(5, 3\)"):
        net(torch.randn(5, 3))
    conv = build_network("mnist32")
    with pytest.raises(ValueError, match=r"\(batch, 1, 32, 32\)"):
        conv(torch.randn(2, 3, 32, 32))


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown network architecture 'vgg'.*cifar10"):
        build_network("vgg")


def test_spectral_norm_is_applied_for_cat2dog():
    net = build_network("cat2dog64")
    assert any("parametrizations" in name for name, _ in net.named_parameters())
