"""Parameter and FLOP counting (nets/flops.py) against closed forms, attention included."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from difflab.nets import MLP, CUNet, UNet
from difflab.nets.flops import attention_flops, count_flops, count_parameters, flops_by_operator, network_cost
from difflab.nets.unet import SelfAttention


@pytest.mark.parametrize("stride, padding, groups", [(1, 1, 1), (2, 1, 1), (1, 0, 3)])
def test_conv_flops_match_the_closed_form(stride, padding, groups):
    # 2 · B · C_out · H_out · W_out · (C_in / groups) · k_h · k_w (bias not counted)
    conv = nn.Conv2d(6, 9, (3, 5), stride=stride, padding=padding, groups=groups)
    x = torch.randn(2, 6, 11, 13)
    batch, out_channels, out_h, out_w = conv(x).shape
    expected = 2 * batch * out_channels * out_h * out_w * (6 // groups) * 3 * 5
    assert count_flops(conv, x) == expected


def test_linear_flops_match_the_closed_form():
    assert count_flops(nn.Linear(7, 5), torch.randn(4, 7)) == 2 * 4 * 7 * 5


def test_cpu_attention_kernel_is_counted():
    # contiguous [B, H, L, E] inputs take the fused CPU kernel, which torch's own counter sees as 0 FLOPs
    query, key, value = (torch.randn(2, 3, 10, 8) for _ in range(3))
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(query, key, value)
    counted = count_flops(F.scaled_dot_product_attention, query, key, value)
    assert counted == 2 * 2 * 3 * 10 * 10 * (8 + 8) == attention_flops(query.shape, key.shape, value.shape)
    assert plain.get_total_flops() in (0, counted)  # 0 on torch versions without a CPU rule


def test_cpu_attention_backward_is_counted_like_torchs_gpu_kernels():
    query, key, value = (torch.randn(1, 2, 6, 4, requires_grad=True) for _ in range(3))
    total = count_flops(F.scaled_dot_product_attention, query, key, value, backward=True)
    forward = attention_flops(query.shape, key.shape, value.shape)
    assert total == forward + 2.5 * forward  # backward: recomputed scores + 4 products (E = Ev)


def test_self_attention_block_counts_projections_and_attention():
    channels, side, batch = 16, 4, 2
    block = SelfAttention(channels, groups=4)
    pixels = side * side
    projections = 2 * batch * pixels * channels * (3 * channels + channels)  # 1x1 qkv and output convs
    attention = 2 * batch * 1 * pixels * pixels * (channels + channels)      # one head of 16 channels
    assert count_flops(block, torch.randn(batch, channels, side, side)) == projections + attention


def test_parameter_count_and_breakdown():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    assert count_parameters(net) == 3 * 4 + 4 + 4 * 2 + 2
    net[0].requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == 4 * 2 + 2
    assert flops_by_operator(net, torch.randn(5, 3)) == {"addmm": 2 * 5 * (3 * 4 + 4 * 2)}


@pytest.mark.parametrize("net", [MLP(dim=2, hidden=16, depth=2), UNet(base_channels=8, groups=4),
                                 CUNet(base_channels=8, groups=4)], ids=["MLP", "UNet", "CUNet"])
def test_network_cost_scales_linearly_with_the_batch(net):
    one, four = network_cost(net, batch_size=1), network_cost(net, batch_size=4)
    assert one["parameters"] == four["parameters"] == count_parameters(net)
    assert four["flops"] == 4 * one["flops"] > 0
