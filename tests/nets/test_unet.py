"""Properties of the DDPM-style U-Net: the network interface contract, any input size, attention
placement, conditioning and the bottleneck feature."""

import json

import pytest
import torch

from difflab.core.errors import ConfigError, ShapeError
from difflab.nets import UNet
from difflab.nets.unet import SelfAttention

SMALL = {"base_channels": 16, "channel_mults": [1, 2, 2], "num_res_blocks": 1, "groups": 4}


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


def make_inputs(shape=(3, 1, 8, 8), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape[0], generator=generator)


@pytest.mark.parametrize(
    "shape",
    [(2, 1, 8, 8), (1, 1, 28, 28), (3, 3, 32, 32), (2, 1, 7, 9), (1, 2, 1, 1), (4, 1, 5, 16)],
)
def test_output_shape_equals_input_shape(shape):
    net = randomize_zero_init(UNet(in_channels=shape[1], **SMALL))
    x, c_noise = make_inputs(shape)
    output = net(x, c_noise)
    assert output.shape == x.shape
    assert torch.isfinite(output).all()


def test_default_unet_keeps_8x8_digit_shape_and_reports_its_size():
    net = UNet()
    x, c_noise = make_inputs((4, 1, 8, 8))
    assert net(x, c_noise).shape == x.shape
    num_parameters = sum(parameter.numel() for parameter in net.parameters())
    print(f"default UNet: {num_parameters:,} parameters")
    assert 1e6 < num_parameters < 1e7  # broad: catches a lost level or an exploded width


def test_out_channels_may_differ_from_in_channels():
    net = UNet(in_channels=3, out_channels=6, **SMALL)
    x, c_noise = make_inputs((2, 3, 7, 9))
    assert net(x, c_noise).shape == (2, 6, 7, 9)


def test_zero_init_output_gives_exactly_zero_output():
    x, c_noise = make_inputs()
    assert torch.equal(UNet(**SMALL)(x, c_noise), torch.zeros_like(x))
    assert UNet(**SMALL, zero_init_output=False)(x, c_noise).abs().max() > 0


def test_output_depends_on_c_noise():
    torch.manual_seed(0)
    net = randomize_zero_init(UNet(**SMALL))
    x, c_noise = make_inputs()
    # 0.5 is a small shift on both the EDM scale (ln σ / 4) and the VP scale (timesteps)
    assert not torch.allclose(net(x, c_noise), net(x, c_noise + 0.5))


def test_output_depends_on_class_label_and_null_label_differs_from_every_class():
    torch.manual_seed(0)
    net = randomize_zero_init(UNet(**SMALL, num_classes=10))
    x, c_noise = make_inputs((2, 1, 8, 8))
    outputs = [net(x, c_noise, torch.full((2,), label)) for label in (0, 7, 9, -1)]
    for i in range(4):
        for j in range(i):
            assert not torch.allclose(outputs[i], outputs[j]), (i, j)
    assert torch.equal(net(x, c_noise, None), outputs[-1])  # None = every sample null


def test_extra_has_exactly_no_effect_at_init_and_an_effect_once_its_projection_is_trained():
    torch.manual_seed(0)
    net = UNet(**SMALL, extra_embed=True)
    randomize_zero_init(net, skip_prefix="cond_embed.extra_embed")  # nonzero output, extra still 0
    x, c_noise = make_inputs()
    without = net(x, c_noise)
    assert without.abs().max() > 0
    assert torch.equal(net(x, c_noise, extra=torch.full((3,), 4.0)), without)
    randomize_zero_init(net)
    assert not torch.allclose(net(x, c_noise, extra=torch.full((3,), 4.0)), without)


def test_config_is_json_and_rebuilds_an_identical_network():
    torch.manual_seed(0)
    net = UNet(in_channels=2, out_channels=3, base_channels=8, channel_mults=(1, 3),
               num_res_blocks=1, attn_resolutions=(4, 8), dropout=0.1, num_classes=4,
               extra_embed=True, groups=2)
    randomize_zero_init(net).eval()  # eval: dropout off, so outputs are deterministic
    config = json.loads(json.dumps(net.config))
    assert isinstance(config["channel_mults"], list)
    rebuilt = type(net)(**config).eval()
    rebuilt.load_state_dict(net.state_dict())
    x, c_noise = make_inputs((2, 2, 8, 8))
    labels, extra = torch.tensor([3, -1]), torch.tensor([0.0, 2.0])
    assert torch.equal(rebuilt(x, c_noise, labels, extra), net(x, c_noise, labels, extra))


@pytest.mark.parametrize("size, lowest", [((8, 8), (2, 2)), ((7, 9), (2, 3)), ((28, 28), (7, 7))])
def test_bottleneck_has_the_lowest_resolution_and_passes_gradient_to_x(size, lowest):
    net = UNet(**SMALL)
    assert net.bottleneck is None
    x, c_noise = make_inputs((2, 1, *size))
    x.requires_grad_()
    net(x, c_noise)
    assert net.bottleneck.shape == (2, 16 * 2, *lowest)  # base_channels * channel_mults[-1]
    net.bottleneck.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_attention_is_placed_at_the_listed_feature_map_sizes():
    # 8x8 with 3 levels has sizes 8, 4, 2: attention at 4 follows 2 encoder and 3 decoder
    # ResBlocks, plus the one in the middle block
    def count_attention(net):
        return sum(isinstance(module, SelfAttention) for module in net.modules())

    assert count_attention(UNet(**SMALL, attn_resolutions=[4])) == 1 + 1 + 2
    assert count_attention(UNet(**SMALL, attn_resolutions=[])) == 1
    assert count_attention(UNet(**SMALL, attn_resolutions=[8, 4])) == 1 + 2 * (1 + 2)


@pytest.mark.parametrize(
    "x, c_noise, kwargs",
    [
        (torch.randn(2, 3, 8, 8), torch.randn(2), {}),  # wrong channel count
        (torch.randn(2, 8, 8), torch.randn(2), {}),  # no channel axis
        (torch.randn(2, 1, 1, 8, 8), torch.randn(2), {}),  # 5-D
        (torch.randn(2, 1, 8, 8), torch.randn(3), {}),  # c_noise batch mismatch
        (torch.randn(2, 1, 8, 8), torch.randn(2, 1), {}),  # c_noise not [B]
        (torch.randn(2, 1, 8, 8), torch.randn(2), {"class_labels": torch.tensor([0, 1])}),
        (torch.randn(2, 1, 8, 8), torch.randn(2), {"extra": torch.zeros(2)}),  # no extra slot
        (torch.zeros(2, 1, 8, 8, dtype=torch.long), torch.randn(2), {}),  # integer images
    ],
)
def test_bad_input_raises_shape_error(x, c_noise, kwargs):
    with pytest.raises(ShapeError):
        UNet(**SMALL)(x, c_noise, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_channels": 12, "groups": 8},  # 12 channels in 8 groups
        {"base_channels": 16, "channel_mults": [1, 3], "groups": 32},
        {"channel_mults": []},
        {"base_channels": 15, "groups": 1},  # odd: no sinusoidal embedding of that width
        {"dropout": 1.0},
    ],
)
def test_bad_config_raises_config_error(kwargs):
    with pytest.raises(ConfigError):
        UNet(**{**SMALL, **kwargs})
