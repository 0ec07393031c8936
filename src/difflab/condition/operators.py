"""Measurement operators y = A(x0) + σ_y·n for inverse problems (docs/methods/deft.md (11)).

Every operator maps a batch x [B, ...] to a measurement y [B, ...] and provides

    forward(x) = A(x)                    the noiseless measurement
    adjoint(v, at) = Aᵀ v                linear operators; a documented surrogate (or the exact
                                          Jacobian transpose J_A(at)ᵀ v) for the non-linear ones
    measure(x, generator) = A(x) + σ_y n
    log_likelihood_grad(x0_hat, y) = adjoint(y − A(x0_hat), x0_hat)/σ_y²
                                          = ∇_x0 log N(y; A(x0), σ_y² I) (Gaussian noise)
    gram_solve(v, r2) = (r2·A Aᵀ + σ_y² I)⁻¹ v   (ΠGDM's likelihood covariance)

| name     | A                                                      | Aᵀ                                              |
|----------|--------------------------------------------------------|-------------------------------------------------|
| inpaint  | m ⊙ x, mask m ∈ {0, 1} (box / random pixels / strokes; | m ⊙ v                                           |
|          | vectors: observed coordinates)                         |                                                 |
| superres | f×f average pooling of the trailing spatial dims       | nearest upsampling / f^d                        |
| blur     | correlation with a known kernel, zero padding, "same"  | transposed convolution, same kernel             |
| hdr      | clip(2x, −1, 1) (non-linear)                           | surrogate 2v: the adjoint of the unclipped 2x   |
| phase    | |F(pad(x))|, F the orthonormal 2-D FFT of the image    | exact J_A(at)ᵀ v by autograd                    |
|          | zero-padded ×`oversample`                              |                                                 |
| ct       | parallel-beam Radon: rotate (bilinear) by each angle,  | back-projection: the exact transpose of that    |
|          | sum over rows                                          | discretisation (autograd VJP of the linear map) |

Operators with a random mask draw a fresh one per sample with `resample(batch, generator)`
(DEFT's fitting draws fresh y, masks included, every step); the others return themselves.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from difflab.core.errors import ConfigError, ShapeError, UnknownNameError


class Operator:
    """A measurement operator with Gaussian noise σ_y (see the module docstring).

    Subclasses implement `forward` (and `adjoint` unless they are linear and autograd's transpose
    is wanted). `linear` says whether `adjoint` is the exact transpose; `name` and `options()`
    describe the operator for an add-on's config.
    """

    name = "operator"
    linear = True
    image_like = False      # y has x's shape (or upsamples to it) and is one of DEFT's NN1 inputs

    def __init__(self, sigma_y: float = 0.05):
        if not (isinstance(sigma_y, (int, float)) and sigma_y > 0 and math.isfinite(sigma_y)):
            raise ConfigError(f"sigma_y must be a positive float (the measurement noise std), got {sigma_y!r}")
        self.sigma_y = float(sigma_y)

    # ----- the map and its adjoint --------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def adjoint(self, v: Tensor, at: Tensor | None = None) -> Tensor:
        """Aᵀ v: v like y [B, ...] -> like x [B, ...]; `at` (the linearisation point) is for non-linear ones."""
        raise NotImplementedError

    # ----- noise and likelihood --------------------------------------------------------------
    def measure(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """y = A(x) + σ_y·n, n ~ N(0, I) drawn from `generator` (on x's device)."""
        y = self.forward(x)
        noise = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
        return y + self.sigma_y * self.noise_support(noise)

    def noise_support(self, noise: Tensor) -> Tensor:
        """Noise where it is measured (an inpainting mask zeroes the hidden pixels)."""
        return noise

    def log_likelihood(self, x0: Tensor, y: Tensor) -> Tensor:
        """log N(y; A(x0), σ_y² I) up to a constant: −‖y − A(x0)‖²/(2σ_y²). [B]."""
        return -(y - self.forward(x0)).flatten(1).square().sum(1) / (2 * self.sigma_y**2)

    def log_likelihood_grad(self, x0_hat: Tensor, y: Tensor) -> Tensor:
        """g = ∇_x0 log p(y | x0) at x0_hat = Aᵀ(y − A(x̂0))/σ_y² (the operator only, no network)."""
        return self.adjoint(y - self.forward(x0_hat), x0_hat) / self.sigma_y**2

    def gram_solve(self, v: Tensor, r2: Tensor) -> Tensor:
        """(r2·A Aᵀ + σ_y² I)⁻¹ v per sample (r2: [B]); conjugate gradients on the linear map.

        Operators whose A Aᵀ is a multiple of the identity (on its support) override this exactly.
        """
        if not self.linear:
            raise ConfigError(f"the {self.name!r} operator is non-linear and has no Gram surrogate; "
                              "ΠGDM cannot use it (use DPS or DEFT)")
        r2 = r2.to(v.dtype).reshape(-1, *([1] * (v.ndim - 1)))

        def apply(u: Tensor) -> Tensor:
            return r2 * self.forward(self.adjoint(u)) + self.sigma_y**2 * u

        return conjugate_gradient(apply, v)

    # ----- description ------------------------------------------------------------------------
    def resample(self, batch: int, generator: torch.Generator | None = None) -> "Operator":
        """The operator with fresh random parts (masks) for a batch; deterministic ones return self."""
        return self

    def image_input(self, y: Tensor) -> Tensor | None:
        """The measurement as an x-shaped input for DEFT's NN1 (None unless `image_like`)."""
        return y if self.image_like else None

    @property
    def mask(self) -> Tensor | None:
        return None

    def options(self) -> dict[str, Any]:
        return {}

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "sigma_y": self.sigma_y, **self.options()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items() if k != 'name')})"


def conjugate_gradient(apply, b: Tensor, iterations: int = 100, tol: float = 1e-12) -> Tensor:
    """Solve apply(u) = b per sample for a symmetric positive-definite linear `apply`. b: [B, ...].

    Stops when every sample's residual norm is below tol·‖b‖ (or after `iterations`)."""
    def dot(p: Tensor, q: Tensor) -> Tensor:
        return (p * q).flatten(1).sum(1).reshape(-1, *([1] * (b.ndim - 1)))

    u = torch.zeros_like(b)
    residual, direction = b.clone(), b.clone()
    rr = dot(residual, residual)
    for _ in range(iterations):
        if bool((rr <= tol**2 * dot(b, b)).all()):
            break
        a_dir = apply(direction)
        step = rr / dot(direction, a_dir).clamp_min(1e-300)
        u, residual = u + step * direction, residual - step * a_dir
        rr_next = dot(residual, residual)
        direction = residual + rr_next / rr.clamp_min(1e-300) * direction
        rr = rr_next
    return u


def linear_adjoint(forward, v: Tensor, x_shape: Sequence[int]) -> Tensor:
    """Aᵀ v of a linear `forward` by autograd: the VJP of A at 0 (exact transpose of its discretisation)."""
    with torch.enable_grad():
        x = torch.zeros(tuple(x_shape), dtype=v.dtype, device=v.device, requires_grad=True)
        (transpose,) = torch.autograd.grad(forward(x), x, grad_outputs=v)
    return transpose


# ----- inpainting ------------------------------------------------------------------------------
MASK_KINDS = ("box", "random", "strokes", "coords")


class Inpaint(Operator):
    """y = m ⊙ (x + σ_y n): the pixels (or coordinates) where m = 1 are observed.

    mask: [*shape] (shared) or [B, *shape] (per sample), 1 = observed. For random masks, `kind`
    and `fraction` (the hidden fraction) say how `resample` draws fresh ones; `shape` is the
    per-sample shape (taken from the mask if it is given).
    """

    name = "inpaint"
    image_like = True

    def __init__(self, mask: Tensor | None = None, sigma_y: float = 0.05, kind: str = "box",
                 fraction: float = 0.5, shape: Sequence[int] | None = None):
        super().__init__(sigma_y)
        if kind not in MASK_KINDS:
            raise UnknownNameError(f"unknown mask kind {kind!r}; choose one of {MASK_KINDS}")
        if not 0 < fraction < 1:
            raise ConfigError(f"the hidden fraction must be in (0, 1), got {fraction}")
        if mask is None:
            if shape is None:
                raise ConfigError("Inpaint needs a mask or the per-sample shape to draw one")
            mask = draw_masks(kind, 1, tuple(shape), fraction, torch.Generator().manual_seed(0))[0]
        self.kind, self.fraction = kind, float(fraction)
        self._mask = mask.float()
        self.shape = tuple(shape) if shape is not None else tuple(mask.shape)

    @property
    def mask(self) -> Tensor:
        return self._mask

    def _mask_for(self, x: Tensor) -> Tensor:
        mask = self._mask.to(x.device, x.dtype)
        if mask.shape != x.shape and mask.shape != x.shape[1:]:
            raise ShapeError(f"the inpainting mask has shape {tuple(mask.shape)}, x has {tuple(x.shape)}; "
                             "give a mask [*shape] or [B, *shape]")
        return mask

    def forward(self, x: Tensor) -> Tensor:
        return self._mask_for(x) * x                                   # A x = m ⊙ x

    def adjoint(self, v: Tensor, at: Tensor | None = None) -> Tensor:
        return self._mask_for(v) * v                                   # Aᵀ = A (a projection)

    def noise_support(self, noise: Tensor) -> Tensor:
        return self._mask_for(noise) * noise

    def gram_solve(self, v: Tensor, r2: Tensor) -> Tensor:
        r2 = r2.to(v.dtype).reshape(-1, *([1] * (v.ndim - 1)))
        return v / (r2 * self._mask_for(v) + self.sigma_y**2)          # A Aᵀ = diag(m)

    def resample(self, batch: int, generator: torch.Generator | None = None) -> "Inpaint":
        if self.kind in ("box", "coords"):
            return self
        masks = draw_masks(self.kind, batch, self.shape, self.fraction, generator, self._mask.device)
        return Inpaint(masks, self.sigma_y, self.kind, self.fraction, self.shape)

    def options(self) -> dict[str, Any]:
        fixed = self.kind in ("box", "coords")
        return {"kind": self.kind, "fraction": self.fraction, "shape": list(self.shape),
                "mask": self._mask.flatten().tolist() if fixed and self._mask.ndim == len(self.shape) else None}


def draw_masks(kind: str, batch: int, shape: tuple[int, ...], fraction: float,
               generator: torch.Generator | None = None, device="cpu") -> Tensor:
    """[batch, *shape] float masks (1 = observed) hiding about `fraction` of each sample.

    box: the right `fraction` of the columns of an image (for vectors: the last coordinates);
    random: each pixel hidden independently with probability `fraction`;
    strokes: free-form brush strokes (random walks of 3×3 brushes) until `fraction` is hidden.
    All channels of a pixel share its mask.
    """
    spatial = shape[1:] if len(shape) == 3 else shape
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if kind in ("box", "coords"):
        keep = torch.ones(spatial)
        width = spatial[-1]
        keep[..., width - max(1, round(fraction * width)):] = 0
        keep = keep.expand(batch, *spatial)
    elif kind == "random":
        keep = (torch.rand((batch, *spatial), generator=generator, device=gen_device) >= fraction).float()
    elif kind == "strokes":
        if len(spatial) != 2:
            raise ShapeError(f"stroke masks need images [C, H, W] or [H, W], got per-sample shape {shape}")
        keep = torch.stack([_strokes(spatial, fraction, generator, gen_device) for _ in range(batch)])
    else:
        raise UnknownNameError(f"unknown mask kind {kind!r}; choose one of {MASK_KINDS}")
    keep = keep.to(device)
    if len(shape) == 3:
        keep = keep[:, None].expand(batch, *shape)
    return keep.contiguous()


def _strokes(spatial: tuple[int, int], fraction: float, generator, device) -> Tensor:
    """One free-form mask: random-walk strokes of a 3×3 brush until `fraction` of pixels are hidden."""
    height, width = spatial
    hidden = torch.zeros(height, width, device=device)
    moves = torch.tensor([[0, 1], [1, 0], [0, -1], [-1, 0], [1, 1], [-1, -1], [1, -1], [-1, 1]], device=device)
    row = int(torch.randint(height, (1,), generator=generator, device=device))
    col = int(torch.randint(width, (1,), generator=generator, device=device))
    while float(hidden.mean()) < fraction:
        hidden[max(row - 1, 0):row + 2, max(col - 1, 0):col + 2] = 1
        step = moves[int(torch.randint(len(moves), (1,), generator=generator, device=device))]
        row, col = (row + int(step[0])) % height, (col + int(step[1])) % width
    return 1 - hidden


# ----- super-resolution --------------------------------------------------------------------------
class SuperResolution(Operator):
    """y = f×f average pooling (x: [B, C, H, W], H and W multiples of f); vectors [B, D]: pooling of f
    consecutive coordinates. Aᵀ v = nearest upsampling of v divided by f^d (d = 2 or 1)."""

    name = "superres"
    image_like = True

    def __init__(self, factor: int = 2, sigma_y: float = 0.05):
        super().__init__(sigma_y)
        if factor not in (2, 4) and not (isinstance(factor, int) and factor >= 2):
            raise ConfigError(f"the super-resolution factor must be an int >= 2 (2 or 4), got {factor!r}")
        self.factor = int(factor)

    def _check(self, x: Tensor) -> None:
        if x.ndim not in (2, 4) or any(s % self.factor for s in x.shape[2:] if x.ndim == 4) or \
                (x.ndim == 2 and x.shape[1] % self.factor):
            raise ShapeError(f"×{self.factor} super-resolution needs [B, C, H, W] (or [B, D]) with sizes divisible "
                             f"by {self.factor}, got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        if x.ndim == 2:
            return F.avg_pool1d(x[:, None], self.factor)[:, 0]
        return F.avg_pool2d(x, self.factor)

    def adjoint(self, v: Tensor, at: Tensor | None = None) -> Tensor:
        if v.ndim == 2:
            return v.repeat_interleave(self.factor, dim=1) / self.factor
        up = v.repeat_interleave(self.factor, dim=-2).repeat_interleave(self.factor, dim=-1)
        return up / self.factor**2

    def gram_solve(self, v: Tensor, r2: Tensor) -> Tensor:
        r2 = r2.to(v.dtype).reshape(-1, *([1] * (v.ndim - 1)))
        scale = self.factor ** (1 if v.ndim == 2 else 2)
        return v / (r2 / scale + self.sigma_y**2)                      # A Aᵀ = I / f^d

    def image_input(self, y: Tensor) -> Tensor:
        scale = self.factor ** (1 if y.ndim == 2 else 2)
        return scale * self.adjoint(y)                                 # y upsampled (nearest)

    def options(self) -> dict[str, Any]:
        return {"factor": self.factor}


# ----- blur ---------------------------------------------------------------------------------------
def gaussian_kernel(size: int, std: float) -> Tensor:
    """A normalised [size, size] Gaussian kernel (size odd)."""
    if size < 1 or size % 2 == 0 or std <= 0:
        raise ConfigError(f"a blur kernel needs an odd size >= 1 and std > 0, got size={size}, std={std}")
    axis = torch.arange(size, dtype=torch.float64) - size // 2
    profile = torch.exp(-axis**2 / (2 * std**2))
    kernel = profile[:, None] * profile[None, :]
    return (kernel / kernel.sum()).float()


class Blur(Operator):
    """y = k ⋆ x per channel (cross-correlation, zero padding, output the size of x); images [B, C, H, W].

    kernel: [k, k] (odd k), default a Gaussian of `size` and `std`. Aᵀ is the transposed convolution
    with the same kernel (equal to A for a symmetric kernel, not in general).
    """

    name = "blur"
    image_like = True

    def __init__(self, size: int = 5, std: float = 1.0, sigma_y: float = 0.05, kernel: Tensor | None = None):
        super().__init__(sigma_y)
        self.kernel = gaussian_kernel(size, std) if kernel is None else torch.as_tensor(kernel, dtype=torch.float32)
        if self.kernel.ndim != 2 or self.kernel.shape[0] % 2 == 0 or self.kernel.shape[0] != self.kernel.shape[1]:
            raise ConfigError(f"the blur kernel must be square with an odd size, got {tuple(self.kernel.shape)}")
        self.size, self.std = int(self.kernel.shape[0]), float(std)

    def _weight(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ShapeError(f"blur needs images [B, C, H, W], got {tuple(x.shape)}")
        return self.kernel.to(x.device, x.dtype)[None, None].expand(x.shape[1], 1, -1, -1)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self._weight(x), padding=self.size // 2, groups=x.shape[1])

    def adjoint(self, v: Tensor, at: Tensor | None = None) -> Tensor:
        return F.conv_transpose2d(v, self._weight(v), padding=self.size // 2, groups=v.shape[1])

    def options(self) -> dict[str, Any]:
        return {"size": self.size, "std": self.std, "kernel": self.kernel.flatten().tolist()}


# ----- HDR (non-linear) ---------------------------------------------------------------------------
class HDR(Operator):
    """y = clip(2x, −1, 1) (DEFT's HDR task; any shape). Non-linear: `adjoint` is the surrogate
    Aᵀ v = 2v, the adjoint of the unclipped map 2x, so saturated pixels still pull x̂0 towards
    y/2 (the exact Jacobian transpose 2·1{|2x| < 1}·v would give them no signal at all)."""

    name = "hdr"
    linear = False
    image_like = True

    def forward(self, x: Tensor) -> Tensor:
        return (2 * x).clamp(-1, 1)

    def adjoint(self, v: Tensor, at: Tensor | None = None) -> Tensor:
        return 2 * v                                                    # surrogate: ignores the clipping

    def gram_solve(self, v: Tensor, r2: Tensor) -> Tensor:
        r2 = r2.to(v.dtype).reshape(-1, *([1] * (v.ndim - 1)))
        return v / (4 * r2 + self.sigma_y**2)                            # surrogate A Aᵀ = 4 I


# ----- phase retrieval (non-linear) ----------------------------------------------------------------
class PhaseRetrieval(Operator):
    """y = |F(pad(x))|: the magnitude of the orthonormal 2-D FFT of each channel zero-padded to
    `oversample`× its size (x: [B, C, H, W] -> y: [B, C, s·H, s·W]). `adjoint(v, at)` is the exact
    Jacobian transpose J_A(at)ᵀ v (autograd through the FFT; the operator only)."""

    name = "phase"
    linear = False

    def __init__(self, oversample: int = 2, sigma_y: float = 0.05):
        super().__init__(sigma_y)
        if not isinstance(oversample, int) or oversample < 1:
            raise ConfigError(f"oversample must be an int >= 1, got {oversample!r}")
        self.oversample = oversample

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ShapeError(f"phase retrieval needs images [B, C, H, W], got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        padded = F.pad(x, (0, (self.oversample - 1) * width, 0, (self.oversample - 1) * height))
        return torch.fft.fft2(padded, norm="ortho").abs()

    def adjoint(self, v: Tensor, at: Tensor | None = None) -> Tensor:
        if at is None:
            raise ConfigError("phase retrieval is non-linear: its adjoint needs the linearisation point `at`")
        with torch.enable_grad():
            point = at.detach().requires_grad_(True)
            (transpose,) = torch.autograd.grad(self.forward(point), point, grad_outputs=v)
        return transpose

    def options(self) -> dict[str, Any]:
        return {"oversample": self.oversample}


# ----- parallel-beam CT ----------------------------------------------------------------------------
class Radon(Operator):
    """Parallel-beam CT: for each of `angles` angles θ in [0, π), rotate the image by θ (bilinear,
    zeros outside) and sum over rows: y [B, C, angles, W]. Aᵀ is the back-projection, the exact
    transpose of this discretisation (the VJP of the linear map)."""

    name = "ct"

    def __init__(self, angles: int = 16, sigma_y: float = 0.05):
        super().__init__(sigma_y)
        if not isinstance(angles, int) or angles < 1:
            raise ConfigError(f"angles must be an int >= 1, got {angles!r}")
        self.angles = angles

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ShapeError(f"CT needs images [B, C, H, W], got {tuple(x.shape)}")
        batch, channels, height, width = x.shape
        theta = torch.arange(self.angles, dtype=x.dtype, device=x.device) * math.pi / self.angles
        cos, sin, zero = theta.cos(), theta.sin(), torch.zeros_like(theta)
        rotation = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(rotation, [self.angles, 1, height, width], align_corners=False)   # [A, H, W, 2]
        images = x.reshape(batch * channels, 1, height, width)
        rotated = F.grid_sample(images.repeat_interleave(self.angles, 0),
                                grid.repeat(batch * channels, 1, 1, 1), align_corners=False)
        return rotated.sum(2).reshape(batch, channels, self.angles, width)   # line integrals along columns

    def adjoint(self, v: Tensor, at: Tensor | None = None) -> Tensor:
        width = v.shape[-1]
        return linear_adjoint(self.forward, v, (*v.shape[:2], width, width))

    def options(self) -> dict[str, Any]:
        return {"angles": self.angles}


OPERATORS = {"inpaint": Inpaint, "superres": SuperResolution, "blur": Blur, "hdr": HDR,
             "phase": PhaseRetrieval, "ct": Radon}


def operator_from_config(config: dict[str, Any]) -> Operator:
    """Rebuild an operator from `Operator.config()` (an add-on's config names its operator)."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in OPERATORS:
        raise UnknownNameError(f"unknown operator {name!r}; known: {sorted(OPERATORS)}")
    if name == "inpaint":
        mask = config.pop("mask", None)
        shape = config.get("shape")
        mask = None if mask is None else torch.tensor(mask, dtype=torch.float32).reshape(shape)
        return Inpaint(mask, **config)
    if name == "blur":
        kernel = config.pop("kernel", None)
        size = config.get("size", 5)
        return Blur(**config, kernel=None if kernel is None else torch.tensor(kernel).reshape(size, size))
    return OPERATORS[name](**config)


__all__ = ["Operator", "Inpaint", "SuperResolution", "Blur", "HDR", "PhaseRetrieval", "Radon", "OPERATORS",
           "MASK_KINDS", "draw_masks", "gaussian_kernel", "operator_from_config", "conjugate_gradient",
           "linear_adjoint"]
