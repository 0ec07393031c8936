"""Properties of the residual MLP: the network interface contract, conditioning and trainability."""

import json

import pytest
import torch

from difflab.core.errors import ConfigError, ShapeError
from difflab.nets import MLP, NETWORKS, UNet


@pytest.fixture(autouse=True)
def one_thread():
    """Nets this small run about as fast on one thread, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_zero_init(net, skip_prefix="\0"):
    """Give every all-zero parameter (zero-initialised layers) small random values, except those
    whose name starts with `skip_prefix`; a zero output layer would make every output 0."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if not name.startswith(skip_prefix) and not parameter.any():
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return net


def make_inputs(batch=5, dim=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=generator), torch.randn(batch, generator=generator)


@pytest.mark.parametrize("dim, batch", [(1, 1), (2, 7), (3, 16), (64, 4)])
def test_output_shape_equals_input_shape(dim, batch):
    net = MLP(dim, hidden=32, depth=2)
    x, c_noise = make_inputs(batch, dim)
    assert net(x, c_noise).shape == x.shape


def test_zero_init_output_gives_exactly_zero_output():
    x, c_noise = make_inputs()
    assert torch.equal(MLP(2)(x, c_noise), torch.zeros_like(x))
    assert MLP(2, zero_init_output=False)(x, c_noise).abs().min() > 0


def test_output_depends_on_c_noise():
    torch.manual_seed(0)
    net = randomize_zero_init(MLP(2, hidden=32, depth=2))
    x, c_noise = make_inputs()
    # 0.5 is a small shift on both the EDM scale (ln σ / 4) and the VP scale (timesteps)
    assert not torch.allclose(net(x, c_noise), net(x, c_noise + 0.5))


def test_output_depends_on_class_label_and_null_label_differs_from_every_class():
    torch.manual_seed(0)
    net = randomize_zero_init(MLP(2, hidden=32, depth=2, num_classes=3))
    x, c_noise = make_inputs(batch=4)
    outputs = [net(x, c_noise, torch.full((4,), label)) for label in (0, 1, 2, -1)]
    for i in range(4):
        for j in range(i):
            assert not torch.allclose(outputs[i], outputs[j]), (i, j)


def test_none_and_any_negative_label_mean_the_null_class():
    torch.manual_seed(0)
    net = randomize_zero_init(MLP(2, hidden=32, depth=2, num_classes=3))
    x, c_noise = make_inputs(batch=4)
    null = net(x, c_noise, torch.full((4,), -1))
    assert torch.equal(net(x, c_noise, None), null)
    assert torch.equal(net(x, c_noise, torch.tensor([-1, -5, -1, -100])), null)


def test_extra_has_exactly_no_effect_at_init_and_an_effect_once_its_projection_is_trained():
    torch.manual_seed(0)
    net = MLP(2, hidden=32, depth=2, extra_embed=True)
    randomize_zero_init(net, skip_prefix="cond_embed.extra_embed")  # nonzero output, extra still 0
    x, c_noise = make_inputs()
    without = net(x, c_noise)
    assert without.abs().max() > 0
    assert torch.equal(net(x, c_noise, extra=torch.full((5,), 3.0)), without)
    randomize_zero_init(net)
    assert not torch.allclose(net(x, c_noise, extra=torch.full((5,), 3.0)), without)


def test_config_is_json_and_rebuilds_an_identical_network():
    torch.manual_seed(0)
    net = randomize_zero_init(MLP(3, hidden=48, depth=3, embed_dim=16, num_classes=2,
                                  extra_embed=True))
    config = json.loads(json.dumps(net.config))
    rebuilt = type(net)(**config)
    rebuilt.load_state_dict(net.state_dict())
    x, c_noise = make_inputs(dim=3)
    labels, extra = torch.tensor([0, 1, -1, 0, 1]), torch.linspace(0, 2, 5)
    assert torch.equal(rebuilt(x, c_noise, labels, extra), net(x, c_noise, labels, extra))


def test_bottleneck_is_the_middle_hidden_activation_and_passes_gradient_to_x():
    net = MLP(2, hidden=32, depth=4)
    assert net.bottleneck is None
    x, c_noise = make_inputs()
    x.requires_grad_()
    net(x, c_noise)
    assert net.bottleneck.shape == (5, 32)
    net.bottleneck.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "x, c_noise, kwargs",
    [
        (torch.randn(5, 3), torch.randn(5), {}),  # wrong dim
        (torch.randn(5, 2, 1), torch.randn(5), {}),  # wrong ndim
        (torch.randn(2), torch.randn(1), {}),  # a single vector without batch axis
        (torch.randn(5, 2), torch.randn(4), {}),  # c_noise batch mismatch
        (torch.randn(5, 2), torch.randn(5, 1), {}),  # c_noise not [B]
        (torch.randn(5, 2), torch.tensor(0.3), {}),  # c_noise scalar
        (torch.randn(5, 2), torch.arange(5), {}),  # integer c_noise
        (torch.randn(5, 2), torch.randn(5), {"class_labels": torch.zeros(5, dtype=torch.long)}),
        (torch.randn(5, 2), torch.randn(5), {"extra": torch.zeros(5)}),  # no extra slot
    ],
)
def test_bad_input_raises_shape_error(x, c_noise, kwargs):
    with pytest.raises(ShapeError):
        MLP(2, hidden=16, depth=1)(x, c_noise, **kwargs)


@pytest.mark.parametrize(
    "labels",
    [torch.zeros(5), torch.zeros(4, dtype=torch.long), torch.full((5,), 3)],  # float, [4], >= 3
)
def test_bad_class_labels_raise_shape_error(labels):
    x, c_noise = make_inputs()
    with pytest.raises(ShapeError):
        MLP(2, hidden=16, depth=1, num_classes=3)(x, c_noise, labels)


@pytest.mark.parametrize("kwargs", [{"depth": 0}, {"embed_dim": 7}, {"num_classes": -1}])
def test_bad_config_raises_config_error(kwargs):
    with pytest.raises(ConfigError):
        MLP(2, **kwargs)


def test_tiny_mlp_overfits_a_fixed_target():
    torch.manual_seed(0)
    net = MLP(2, hidden=64, depth=2, embed_dim=16)
    x, c_noise = make_inputs(batch=128)
    target = torch.stack([torch.sin(2 * x[:, 0]), x[:, 0] * x[:, 1]], dim=1)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        loss = (net(x, c_noise) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # a trainable net fits 128 points of a smooth target far better than 10x; 10x is the claim
    assert losses[-1] < losses[0] / 10


def test_networks_allow_list_names_every_network_class():
    from difflab.nets import CUNet

    assert {"MLP": MLP, "UNet": UNet, "CUNet": CUNet} == NETWORKS
