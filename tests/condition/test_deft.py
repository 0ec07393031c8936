"""DEFT: the h-network at initialisation, a frozen base (no gradient during fitting, no graph at
sampling), samples against the exact posterior of a Gaussian mixture, every solver, add-on files."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from difflab import EDMDenoiser, GaussianMixture, get_sigmas, sample
from difflab.amed.predictor import ConstantPredictor, amed_solver
from difflab.condition import DPS, DEFTDenoiser, HNetwork, Inpaint, SuperResolution, fit_deft, load_hnet
from difflab.condition.deft import DEFTConfig, deft_x0
from difflab.core.errors import AddonMismatchError, ConfigError, ModelFormatError
from difflab.core.fingerprint import fingerprint
from difflab.metrics import sliced_wasserstein
from difflab.nets import MLP, UNet
from difflab.sampling import SOLVERS, PerSampleGenerator

MEANS = [[-4.0, 0.0], [3.0, 3.0], [2.0, -4.0]]
STDS = [[0.5, 1.0], [0.8, 0.4], [0.6, 0.7]]
SIGMA_Y, Y_OBS = 0.5, 2.5   # observing x[0] ≈ 2.5 leaves two modes in x[1] (≈ 3 and ≈ −4)


def prior_2d() -> GaussianMixture:
    return GaussianMixture(MEANS, stds=STDS, weights=[0.5, 0.3, 0.2])


def observe_first() -> Inpaint:
    return Inpaint(torch.tensor([1.0, 0.0]), sigma_y=SIGMA_Y, kind="coords")


@pytest.fixture(scope="module")
def fitted():
    """A DEFT h-network fitted on the exact 2-D mixture (the base), 500 steps of 256 pairs (~5 s)."""
    torch.manual_seed(0)
    prior = prior_2d()
    data = prior.sample(4096, generator=torch.Generator().manual_seed(0))
    config = DEFTConfig(train_steps=500, batch_size=256, lr=2e-3, seed=0, nn1={"hidden": 64, "depth": 2}, p_mean=0.5,
                        p_std=1.5)
    hnet = fit_deft(prior, observe_first(), data, config).model
    return prior, hnet


def heun_grid(points: int) -> torch.Tensor:
    return torch.cat([get_sigmas("karras", points, 0.002, 80.0), torch.zeros(1, dtype=torch.float64)])


def test_deft_samples_match_the_exact_posterior(fitted):
    prior, hnet = fitted
    n = 3000
    posterior = prior.posterior(torch.tensor([[1.0, 0.0]]), torch.tensor([Y_OBS]), SIGMA_Y)
    reference = posterior.sample(n, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([[Y_OBS, 0.0]]).expand(n, 2)
    noise = 80 * torch.randn(n, 2, generator=torch.Generator().manual_seed(2))
    deft = DEFTDenoiser(prior, hnet)
    with torch.no_grad():
        deft_heun = sample(deft, noise, heun_grid(18), "heun", y=y)                 # 35 NFE
        deft_fast = sample(deft, noise, heun_grid(10), "dpmpp_2m", y=y)             # 10 NFE
        dps = sample(DPS(prior, observe_first(), zeta=1.0), noise, heun_grid(18), "heun", y=y)
    # 64 directions suffice in 2-D (and POT's cost jumps for 3000 points × 256 directions)
    sw = {name: sliced_wasserstein(x, reference, n_projections=64) for name, x in
          (("deft", deft_heun), ("deft_fast", deft_fast), ("dps", dps),
           ("prior", prior.sample(n, generator=torch.Generator().manual_seed(3))))}
    # measured: prior 2.96, DPS (its best ζ of 0.1/0.3/1) 0.91, DEFT 0.2–0.6 (fresh exact samples: 0.12)
    assert sw["deft"] < 0.35 * sw["prior"] and sw["deft"] <= sw["dps"]
    assert sw["deft_fast"] < 0.35 * sw["prior"] and sw["deft_fast"] <= sw["dps"]
    # the posterior's mode weights: P(x[1] > 0 | y) = 0.57; 3000 samples: std 0.009
    exact_upper = float((reference[:, 1] > 0).float().mean())
    assert abs(float((deft_heun[:, 1] > 0).float().mean()) - exact_upper) < 0.08


def image_base() -> EDMDenoiser:
    torch.manual_seed(0)
    return EDMDenoiser(UNet(base_channels=16, channel_mults=[1, 2], attn_resolutions=[], zero_init_output=False),
                       data_shape=(1, 8, 8))


@pytest.mark.parametrize("nn1_class", [None, "UNet", "CUNet"])
def test_at_init_the_conditional_denoiser_is_the_base_plus_the_nn2_term(nn1_class):
    for base, op, shape in [(prior_2d(), observe_first(), (2,)),
                            (image_base(), SuperResolution(2, sigma_y=0.1), (1, 8, 8))]:
        vector = len(shape) == 1
        if vector and nn1_class is not None:
            continue
        hnet = HNetwork(shape, op, fingerprint(base), nn2_bias=0.007, nn1_class=nn1_class).double()
        assert type(hnet.nn1).__name__ == ("VectorNet" if vector else nn1_class or "UNet")
        base = base.double()
        g = torch.Generator().manual_seed(0)
        x = 3 * torch.randn((4, *shape), generator=g, dtype=torch.float64)
        sigma = torch.tensor([0.01, 0.5, 2.0, 40.0], dtype=torch.float64)
        y = op.measure(torch.randn((4, *shape), generator=g, dtype=torch.float64), g)
        with torch.no_grad():
            x0_base = base(x, sigma)
            grad_term = op.log_likelihood_grad(x0_base, y)
            cond = DEFTDenoiser(base, hnet)(x, sigma, y=y)
        # D = D_base − σ ε_φ with ε_φ = 0 − NN2(σ)·g and NN2 ≡ its bias at init
        expected = x0_base + sigma.reshape(-1, *[1] * len(shape)) * 0.007 * grad_term
        assert torch.allclose(cond, expected, rtol=1e-6, atol=1e-9)


class Recorder(torch.nn.Module):
    """Wraps a denoiser and records, per call, whether autograd was on and whether the output has a graph."""

    def __init__(self, base):
        super().__init__()
        self.base, self.calls = base, []
        self.data_shape, self.sigma_data = base.data_shape, base.sigma_data

    def forward(self, x, sigma, **cond):
        out = self.base(x, sigma, **cond)
        self.calls.append((torch.is_grad_enabled(), out.requires_grad))
        return out


def small_base() -> EDMDenoiser:
    torch.manual_seed(0)
    return EDMDenoiser(MLP(dim=2, hidden=32, depth=2, zero_init_output=False), sigma_data=2.0, data_shape=(2,))


def test_fitting_sends_no_gradient_to_the_base_and_runs_it_without_a_graph():
    base = small_base()
    assert all(p.requires_grad for p in base.parameters())      # trainable on purpose
    recorder = Recorder(base)
    data = prior_2d().sample(256, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    fit_deft(recorder, observe_first(), data, DEFTConfig(train_steps=3, batch_size=32, seed=0))
    assert recorder.calls and all(not grad_on and not graph for grad_on, graph in recorder.calls)
    assert all(p.grad is None for p in base.parameters())
    assert all(p.requires_grad for p in base.parameters())      # restored after the fit
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_sampling_builds_no_graph_through_the_base(fitted):
    prior, hnet = fitted
    base = small_base()
    recorder = Recorder(base)
    hnet_for_base = HNetwork((2,), observe_first(), fingerprint(recorder), sigma_data=2.0)
    deft = DEFTDenoiser(recorder, hnet_for_base)
    x = 80 * torch.randn(4, 2)
    out = sample(deft, x, heun_grid(4), "heun", y=torch.zeros(4, 2))   # autograd left ON here
    assert recorder.calls and all(not graph for _, graph in recorder.calls)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


def test_every_solver_runs_the_deft_denoiser(fitted):
    prior, hnet = fitted
    deft = DEFTDenoiser(prior, hnet)
    x = 80 * torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([[Y_OBS, 0.0]]).expand(3, 2)
    sigmas = get_sigmas("karras", 8, 0.002, 80.0)
    with torch.no_grad():
        for name, spec in SOLVERS.items():
            extra = {"generator": PerSampleGenerator([0, 1, 2])} if spec.stochastic else {}
            out = sample(deft, x, sigmas, name, y=y, **extra)
            assert out.shape == x.shape and bool(torch.isfinite(out).all()), name
        # AMED-Solver's step with r = ½ (= DPM-Solver-2): a plain predictor-driven solver works too
        out = amed_solver(deft, x, sigmas, ConstantPredictor(), check=False, y=y)
        assert bool(torch.isfinite(out).all())


def test_hnetwork_saves_loads_and_refuses_another_base_or_operator(fitted, tmp_path):
    prior, hnet = fitted
    hnet.save(tmp_path / "h")
    loaded = load_hnet(tmp_path / "h", base=prior)
    x, sigma, y = torch.randn(5, 2), torch.full((5,), 0.7), torch.randn(5, 2)
    with torch.no_grad():
        assert torch.equal(deft_x0(prior, loaded, observe_first(), x, sigma, y),
                           deft_x0(prior, hnet, observe_first(), x, sigma, y))
    from difflab import load
    assert isinstance(load(tmp_path / "h"), HNetwork)
    other = GaussianMixture(MEANS, stds=STDS, weights=[0.4, 0.4, 0.2])
    with pytest.raises(AddonMismatchError):
        load_hnet(tmp_path / "h", base=other)
    with pytest.raises(AddonMismatchError):
        DEFTDenoiser(other, loaded)
    with pytest.raises(AddonMismatchError):
        DEFTDenoiser(prior, loaded, operator=Inpaint(torch.tensor([0.0, 1.0]), kind="coords"))
    with pytest.raises(ModelFormatError):
        load_hnet(tmp_path / "missing")
    with pytest.raises(ConfigError):
        DEFTDenoiser(prior, loaded)(x, sigma)


def test_the_fitting_loss_is_the_epsilon_matching_loss():
    """With ε_φ ≡ 0 (NN2 bias 0 at init) the loss is E‖ε − ε̂_base‖². For the prior N(0, s²) that is
    E_σ[s²/(s² + σ²)] (closed form per σ: E[(s²ε − σ x0)²]/(s² + σ²)²), averaged over ln σ ~ N(P_mean, P_std²)."""
    from difflab.condition.deft import deft_loss

    s, p_mean, p_std, n = 0.5, -0.5, 1.5, 40_000
    prior = GaussianMixture([[0.0]], stds=[s])
    op = Inpaint(torch.tensor([1.0]), sigma_y=0.3, kind="coords")
    hnet = HNetwork((1,), op, None, nn2_bias=0.0).double()
    data = prior.sample(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss = deft_loss(prior, op, data, n, p_mean, p_std)(hnet, torch.Generator().manual_seed(1))
    nodes, weights = np.polynomial.hermite.hermgauss(64)          # ∫ e^{−t²} f(t) dt
    sigma = np.exp(p_mean + np.sqrt(2) * p_std * nodes)
    expected = float((weights * s**2 / (s**2 + sigma**2)).sum() / np.sqrt(np.pi))
    # 40,000 draws of (x0, σ, ε): relative error ≈ 1% (expected 0.456; an x0-space loss, no 1/σ², gives 0.136)
    assert abs(float(loss.detach()) - expected) < 0.04 * expected


def test_a_cunet_h_network_fits_on_images_saves_loads_and_bad_classes_are_refused(tmp_path):
    base, op = image_base(), Inpaint(kind="box", shape=(1, 8, 8), sigma_y=0.05)
    data = torch.rand(64, 1, 8, 8) * 2 - 1
    config = DEFTConfig(train_steps=4, batch_size=8, seed=0, ema_decay=0.0, nn1_class="CUNet")
    hnet = fit_deft(base, op, data, config).model
    fresh = HNetwork((1, 8, 8), op, fingerprint(base), nn1_class="CUNet")
    assert type(hnet.nn1).__name__ == "CUNet"
    assert not torch.equal(hnet.nn1.conv_out.weight, fresh.nn1.conv_out.weight)   # the fit moved NN1
    hnet.save(tmp_path / "h")
    loaded = load_hnet(tmp_path / "h", base=base, operator=op)
    assert type(loaded.nn1).__name__ == "CUNet"
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([0.1, 1.0, 10.0])
    y = op.measure(data[:3], g)
    with torch.no_grad():
        assert torch.equal(DEFTDenoiser(base, loaded)(x, sigma, y=y), DEFTDenoiser(base, hnet)(x, sigma, y=y))
    with pytest.raises(ConfigError, match="one of"):
        HNetwork((1, 8, 8), op, nn1_class="MLP")
    with pytest.raises(ConfigError, match="VectorNet"):
        HNetwork((2,), observe_first(), nn1_class="CUNet")


@pytest.mark.parametrize("bogus", ["Bogus", "VectorNet", None])
def test_a_saved_h_network_naming_an_unknown_nn1_is_refused(tmp_path, bogus):
    import json

    base, op = image_base(), SuperResolution(2, sigma_y=0.1)
    HNetwork((1, 8, 8), op, fingerprint(base)).save(tmp_path / "h")
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["nn1"]["class"] == "UNet"
    config["nn1"]["class"] = bogus
    (tmp_path / "h" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="not a valid DEFT h-network"):
        load_hnet(tmp_path / "h")
