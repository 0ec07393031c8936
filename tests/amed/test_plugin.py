"""AMED-Plugin (the learned point inserted into a base solver): exact reduction to each base on the
log-midpoint-refined grid, the NFE, one interval written out by hand, fitting by continuation on an
exact mixture, the base-solver check, and exact resume of a continuation fit."""
from __future__ import annotations

import pytest
import torch

import difflab
from difflab import GaussianMixture, get_sigmas
from difflab.amed.fit import AMEDConfig, fit_amed
from difflab.amed.plugin import BASE_SOLVERS, amed_plugin, amed_sample, refined_sigmas
from difflab.amed.predictor import AMEDParams, ConstantPredictor, amed_nfe, amed_solver, predictor_sigmas
from difflab.core.errors import AddonMismatchError, ConfigError
from difflab.sampling import SOLVERS
from tests.sampling.helpers import CountingDenoiser

PLUGIN_ONLY = [b for b in BASE_SOLVERS if b != "dpm2"]


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture([[-4.0, 0.0], [3.0, 3.0], [2.0, -4.0]], stds=[[0.5, 1.0], [0.8, 0.4], [0.6, 0.7]],
                           weights=[0.5, 0.3, 0.2], labels=[0, 1, 1])


def _noise(n: int = 64, seed: int = 0) -> torch.Tensor:
    return 80.0 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _mean_l2(x, reference) -> float:
    return float((x.double() - reference.double()).norm(dim=1).mean())


@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("base", PLUGIN_ONLY)
def test_half_one_one_is_the_base_solver_on_the_log_midpoint_grid(mixture, base, afs):
    """r = ½, c = 1, a = 1 inserts sqrt(t_i t_{i+1}) into every interval: the base solver, history,
    lower-order-final rule and UniC corrector included, on the refined grid."""
    x, sigmas = _noise(), get_sigmas("karras", 5, 0.002, 80.0)
    plugin = amed_plugin(mixture, x, sigmas, ConstantPredictor(0.5, 1.0, 1.0), base=base, afs=afs)
    reference = SOLVERS[base].fn(mixture, x, refined_sigmas(sigmas), afs=afs)
    torch.testing.assert_close(plugin, reference, rtol=0, atol=1e-12)


def test_refined_grid_inserts_the_log_midpoints():
    refined = refined_sigmas(torch.tensor([80.0, 1.0, 0.01], dtype=torch.float64))
    torch.testing.assert_close(refined, torch.tensor([80.0, 80**0.5, 1.0, 0.1, 0.01], dtype=torch.float64))


@pytest.mark.parametrize("to_zero", [False, True])
@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("base", BASE_SOLVERS)
def test_nfe_is_that_of_amed_solver(mixture, base, afs, to_zero):
    sigmas = get_sigmas("karras", 5, 0.002, 80.0)
    if to_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    counter = CountingDenoiser(mixture)
    amed_plugin(counter, _noise(4), sigmas, ConstantPredictor(0.4, 1.0, 1.0), base=base, afs=afs)
    assert counter.calls == amed_nfe(len(sigmas), to_zero, afs)


class FixedPredictor(torch.nn.Module):
    """Per-sample (r, c, a) given as [B] tensors, the same for every interval."""

    def __init__(self, r, c, a):
        super().__init__()
        self.r, self.c, self.a = r, c, a
        self.fitted_for: dict = {}

    def forward(self, feature, sigma_cur, sigma_next):
        return AMEDParams(self.r, self.c, self.a)


def test_one_euler_interval_written_out(mixture):
    """x_s = x + (s − t)ε̂(x; t); x' = x_s + c·(t' − s)·(x_s − D(x_s; a·s))/s, with s = t'^r t^{1−r} per sample."""
    x, t, t_next = _noise(3, seed=1) / 16, 5.0, 1.0
    r = torch.tensor([0.3, 0.5, 0.8], dtype=torch.float64)
    c = torch.tensor([1.05, 0.95, 1.0], dtype=torch.float64)
    a = torch.tensor([0.9, 1.1, 1.0], dtype=torch.float64)
    s = (t_next**r * t ** (1 - r))[:, None]
    x_s = x + (s - t) * (x - mixture(x, torch.full((3,), t, dtype=torch.float64))) / t
    expected = x_s + c[:, None] * (t_next - s) * (x_s - mixture(x_s, (a[:, None] * s).flatten())) / s
    out = amed_plugin(mixture, x, torch.tensor([t, t_next], dtype=torch.float64), FixedPredictor(r, c, a),
                      base="euler", afs=False)
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)


def test_per_sample_points_give_per_sample_steps(mixture):
    """Each sample's step depends on its own r only: a batch with two r's equals the two runs apart."""
    x, sigmas = _noise(4, seed=2), get_sigmas("karras", 4, 0.002, 80.0)
    r = torch.tensor([0.3, 0.6, 0.3, 0.6], dtype=torch.float64)
    ones = torch.ones(4, dtype=torch.float64)
    both = amed_plugin(mixture, x, sigmas, FixedPredictor(r, ones, ones), base="unipc", afs=True)
    for value in (0.3, 0.6):
        alone = amed_plugin(mixture, x, sigmas, ConstantPredictor(value, 1.0, 1.0), base="unipc", afs=True)
        torch.testing.assert_close(both[r == value], alone[r == value], rtol=0, atol=1e-12)


# ----- fitting ----------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["ipndm", "unipc"])
def test_fitting_by_continuation_beats_the_base_solver_at_nfe5(mixture, base):
    """Fitted with an accurate teacher (Heun on 25 points, error ~0.03 here), the plugin's error at
    NFE 5 falls well below where it started (the base solver on the log-midpoint grid)."""
    config = AMEDConfig(nfe=5, M=7, trajectories=2048, batch_size=128, base_solver=base)
    predictor = fit_amed(mixture, config, shape=(2,)).model
    assert predictor.fitted_for["base_solver"] == base
    x = _noise(512, seed=7)
    reference = difflab.sample(mixture, x, get_sigmas("karras", 401, 0.002, 80.0), solver="heun")
    sigmas = predictor_sigmas(predictor)
    with torch.no_grad():
        fitted = _mean_l2(amed_sample(mixture, x.float(), sigmas, predictor), reference)
    start = _mean_l2(amed_plugin(mixture, x, sigmas, ConstantPredictor(), base=base), reference)
    print(f"{base} plugin at NFE 5: start {start:.3f}, fitted {fitted:.3f}")
    assert fitted < 0.8 * start


def test_a_predictor_drives_only_the_base_solver_it_was_fitted_for(mixture):
    config = AMEDConfig(nfe=3, trajectories=32, batch_size=32, base_solver="ipndm")
    predictor = fit_amed(mixture, config, shape=(2,)).model
    x, sigmas = _noise(4).float(), predictor_sigmas(predictor)
    amed_plugin(mixture, x, sigmas, predictor, base="ipndm")
    with pytest.raises(AddonMismatchError, match="base solver 'ipndm'"):
        amed_plugin(mixture, x, sigmas, predictor, base="unipc")
    with pytest.raises(AddonMismatchError, match="base solver"):
        amed_solver(mixture, x, sigmas, predictor)
    with pytest.raises(ConfigError, match="no base solver 'heun'"):
        fit_amed(mixture, AMEDConfig(nfe=3, trajectories=32, batch_size=32, base_solver="heun"), shape=(2,))


def test_an_interrupted_continuation_fit_resumes_to_the_same_predictor(mixture, tmp_path):
    """checkpoint_every = 4 is rounded up to 6 (two batches of N − 1 = 3 intervals), so checkpoints sit
    at batch boundaries, where the continuation student starts afresh: the resume is bitwise."""
    kwargs = dict(shape=(2,), config=AMEDConfig(nfe=5, M=1, trajectories=4 * 32, batch_size=32,
                                                base_solver="dpmpp_2m", checkpoint_every=4))
    whole = fit_amed(mixture, **kwargs).model

    class Interrupt(Exception):
        pass

    def crash_at_batch_3(generator, n):      # batch 3 starts at step 9, after the checkpoint at step 6
        if crash_at_batch_3.calls == 3:
            raise Interrupt
        crash_at_batch_3.calls += 1
        return {}

    crash_at_batch_3.calls = 0
    with pytest.raises(Interrupt):
        fit_amed(mixture, **kwargs, out_dir=tmp_path, cond_sampler=crash_at_batch_3)
    resumed = fit_amed(mixture, **kwargs, out_dir=tmp_path).model
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("base", BASE_SOLVERS)
def test_a_non_finite_model_output_stops_the_plugin_at_its_step(mixture, base):
    from difflab.core.errors import NonFiniteError

    def broken(x, sigma, **cond):         # NaN once σ drops below 1: at the midpoint of step 2
        out = mixture(x, sigma)
        return torch.where(torch.as_tensor(sigma).reshape(-1, 1) < 1.0, torch.full_like(out, float("nan")), out)

    sigmas = get_sigmas("karras", 5, 0.002, 80.0)          # 80, 17.5, 2.52, 0.170, 0.002
    with pytest.raises(NonFiniteError, match=r"amed.* at step 2 \(sigma 2\.515"):
        amed_plugin(broken, _noise(4), sigmas, ConstantPredictor(), base=base, afs=True)
