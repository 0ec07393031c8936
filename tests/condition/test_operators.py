"""Measurement operators: adjointness ⟨A x, v⟩ = ⟨x, Aᵀ v⟩ (a wrong adjoint fails), likelihood
gradients against autograd, the Gram solves against dense linear algebra, masks, configs."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from difflab.condition.operators import (
    HDR,
    OPERATORS,
    Blur,
    Inpaint,
    Operator,
    PhaseRetrieval,
    Radon,
    SuperResolution,
    draw_masks,
    operator_from_config,
)
from difflab.core.errors import ConfigError, ShapeError, UnknownNameError

IMAGE = (2, 8, 8)


def adjoint_gap(op: Operator, shape, seed: int = 0) -> float:
    """|⟨A x, v⟩ − ⟨x, Aᵀ v⟩| / (‖A x‖‖v‖) for random float64 x, v (0 up to round-off for a true adjoint)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((3, *shape), generator=g, dtype=torch.float64)
    y = op(x)
    v = torch.randn(y.shape, generator=g, dtype=torch.float64)
    lhs, rhs = (y * v).sum(), (x * op.adjoint(v, x)).sum()
    return float((lhs - rhs).abs() / (y.norm() * v.norm()))


def asymmetric_kernel() -> torch.Tensor:
    return torch.arange(1.0, 10.0).reshape(3, 3) / 45


LINEAR_CASES = [
    ("inpaint box", lambda: Inpaint(shape=IMAGE), IMAGE),
    ("inpaint random per-sample",
     lambda: Inpaint(kind="random", shape=IMAGE).resample(3, torch.Generator().manual_seed(1)), IMAGE),
    ("inpaint strokes",
     lambda: Inpaint(kind="strokes", shape=IMAGE).resample(3, torch.Generator().manual_seed(2)), IMAGE),
    ("inpaint coords (vectors)", lambda: Inpaint(torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0]), kind="coords"), (5,)),
    ("superres x2", lambda: SuperResolution(2), IMAGE),
    ("superres x4", lambda: SuperResolution(4), IMAGE),
    ("superres x2 (vectors)", lambda: SuperResolution(2), (6,)),
    ("blur gaussian", lambda: Blur(5, 1.0), IMAGE),
    ("blur asymmetric kernel", lambda: Blur(kernel=asymmetric_kernel()), IMAGE),
    ("ct", lambda: Radon(6), (1, 8, 8)),
]


@pytest.mark.parametrize("name,make,shape", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
def test_adjoint_matches_forward(name, make, shape):
    # float64: a true adjoint agrees to ~1e-16 relative; 1e-12 leaves room for sums over 128 pixels
    assert adjoint_gap(make(), shape) < 1e-12


class WrongBlurAdjoint(Blur):
    """Uses the forward correlation as its 'adjoint': only right for symmetric kernels."""

    def adjoint(self, v, at=None):
        return self.forward(v)


class WrongSuperResAdjoint(SuperResolution):
    """Forgets the 1/f² of the nearest-upsampling adjoint."""

    def adjoint(self, v, at=None):
        return v.repeat_interleave(self.factor, -2).repeat_interleave(self.factor, -1)


class WrongRadonAdjoint(Radon):
    """Back-projects by smearing and rotating back by −θ: the continuum adjoint, not the discrete one."""

    def adjoint(self, v, at=None):
        return v.sum(2, keepdim=True).expand(*v.shape[:2], v.shape[-1], v.shape[-1]) / 2


@pytest.mark.parametrize("op,shape", [(WrongBlurAdjoint(kernel=asymmetric_kernel()), IMAGE),
                                      (WrongSuperResAdjoint(2), IMAGE), (WrongRadonAdjoint(6), (1, 8, 8))])
def test_a_wrong_adjoint_fails_the_check(op, shape):
    assert adjoint_gap(op, shape) > 1e-3


def test_blur_is_the_documented_zero_padded_correlation():
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    kernel = asymmetric_kernel().double()
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernel[None, None])
    assert torch.allclose(Blur(kernel=kernel)(x), expected, atol=1e-12)


def test_superres_pools_blocks():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(SuperResolution(2)(x), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))


def test_ct_projection_at_angle_zero_sums_columns():
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    # θ = 0 is the identity rotation (exact bilinear sampling at pixel centres): the column sums
    assert torch.allclose(Radon(4)(x)[:, :, 0], x.sum(2), atol=1e-10)


def test_phase_retrieval_adjoint_is_the_jacobian_transpose():
    op = PhaseRetrieval(oversample=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    u = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    v = torch.randn(op(x).shape, generator=g, dtype=torch.float64)
    _, ju = torch.func.jvp(op.forward, (x,), (u,))
    assert torch.allclose((ju * v).sum(), (u * op.adjoint(v, x)).sum(), rtol=1e-10)
    # |F x|: Parseval with the orthonormal FFT, so ‖A x‖ = ‖x‖
    assert torch.allclose(op(x).flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-10)


def test_hdr_clips_and_uses_the_documented_surrogate_adjoint():
    x = torch.tensor([[-1.0, -0.2, 0.1, 0.8]])
    assert torch.equal(HDR()(x), torch.tensor([[-1.0, -0.4, 0.2, 1.0]]))
    v = torch.ones(1, 4)
    assert torch.equal(HDR().adjoint(v, x), 2 * v)   # saturated entries keep their signal (not 0)


@pytest.mark.parametrize("make,shape", [(lambda: Inpaint(shape=IMAGE), IMAGE), (lambda: SuperResolution(2), IMAGE),
                                        (lambda: Blur(kernel=asymmetric_kernel()), IMAGE),
                                        (lambda: Radon(4), (1, 8, 8)), (lambda: PhaseRetrieval(), (1, 4, 4))])
def test_log_likelihood_grad_is_the_gradient_of_the_log_likelihood(make, shape):
    op = make()
    g = torch.Generator().manual_seed(4)
    x0, x_true = (torch.randn((2, *shape), generator=g, dtype=torch.float64) for _ in range(2))
    y = op.measure(x_true, g)
    x_req = x0.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(op.log_likelihood(x_req, y).sum(), x_req)
    assert torch.allclose(op.log_likelihood_grad(x0, y), expected, rtol=1e-9, atol=1e-9)


def dense_matrix(op: Operator, shape) -> torch.Tensor:
    """A as an [M, D] matrix, column j = A e_j (independent of the adjoint under test)."""
    dim = int(torch.tensor(shape).prod())
    basis = torch.eye(dim, dtype=torch.float64).reshape(dim, *shape)
    return op(basis).reshape(dim, -1).T


@pytest.mark.parametrize("make,shape", [(lambda: Inpaint(shape=(1, 4, 4), sigma_y=0.3), (1, 4, 4)),
                                        (lambda: SuperResolution(2, sigma_y=0.3), (1, 4, 4)),
                                        (lambda: Blur(3, 0.8, sigma_y=0.3), (1, 4, 4)),
                                        (lambda: Radon(3, sigma_y=0.3), (1, 4, 4))])
def test_gram_solve_matches_a_dense_solve(make, shape):
    op = make()
    A = dense_matrix(op, shape)
    g = torch.Generator().manual_seed(5)
    v = torch.randn((2, *op(torch.zeros((1, *shape), dtype=torch.float64)).shape[1:]), generator=g, dtype=torch.float64)
    r2 = torch.tensor([0.5, 2.0], dtype=torch.float64)
    for b in range(2):
        gram = r2[b] * A @ A.T + 0.09 * torch.eye(A.shape[0], dtype=torch.float64)
        expected = torch.linalg.solve(gram, v[b].flatten())
        assert torch.allclose(op.gram_solve(v, r2)[b].flatten(), expected, rtol=1e-7, atol=1e-8)


def test_inpaint_noise_only_on_observed_pixels():
    op = Inpaint(shape=(1, 8, 8), sigma_y=0.1)
    x = torch.zeros(500, 1, 8, 8)
    y = op.measure(x, torch.Generator().manual_seed(0))
    assert bool((y[:, :, :, 4:] == 0).all())
    assert abs(float(y[:, :, :, :4].std()) - 0.1) < 0.005   # 16,000 draws: std of the std ≈ 0.0006


@pytest.mark.parametrize("kind", ["random", "strokes"])
def test_random_masks_hide_about_the_fraction_and_differ_per_sample(kind):
    masks = draw_masks(kind, 64, (1, 16, 16), 0.5, torch.Generator().manual_seed(0))
    assert masks.shape == (64, 1, 16, 16)
    assert 0.4 < 1 - float(masks.mean()) < 0.65
    assert not torch.equal(masks[0], masks[1])


def test_resample_gives_fresh_masks_and_keeps_fixed_ones():
    random_op = Inpaint(kind="random", shape=(1, 8, 8))
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(random_op.resample(4, g).mask, random_op.resample(4, g).mask)
    box = Inpaint(shape=(1, 8, 8))
    assert box.resample(4, g) is box and SuperResolution(2).resample(4, g) is not None


@pytest.mark.parametrize("op", [Inpaint(shape=(1, 8, 8), sigma_y=0.2), Inpaint(torch.tensor([1.0, 0.0]), kind="coords"),
                                Inpaint(kind="strokes", shape=(1, 8, 8)), SuperResolution(4), Blur(3, 0.7),
                                HDR(0.1), PhaseRetrieval(3), Radon(5)])
def test_operator_config_round_trip(op):
    rebuilt = operator_from_config(op.config())
    assert type(rebuilt) is type(op) and rebuilt.config() == op.config()
    x = torch.randn(2, *(op.shape if isinstance(op, Inpaint) else (1, 8, 8)))
    assert torch.equal(rebuilt(x), op(x))


def test_operator_errors_are_specific():
    with pytest.raises(ConfigError):
        Inpaint(shape=(1, 8, 8), sigma_y=0.0)
    with pytest.raises(UnknownNameError):
        Inpaint(shape=(1, 8, 8), kind="circle")
    with pytest.raises(ShapeError):
        SuperResolution(4)(torch.zeros(1, 1, 6, 6))
    with pytest.raises(ShapeError):
        Inpaint(shape=(1, 8, 8))(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ConfigError):
        PhaseRetrieval().gram_solve(torch.zeros(1, 1, 4, 4), torch.ones(1))
    with pytest.raises(UnknownNameError):
        operator_from_config({"name": "deconvolve"})
    assert set(OPERATORS) == {"inpaint", "superres", "blur", "hdr", "phase", "ct"}
