"""AMED-Solver and its predictor: the layout's size, the exact reduction to DPM-Solver-2, the NFE,
fitting on an exact mixture against a reference ODE solution, per-sample features, models on disk
with the add-on checks, guidance, and exact resume of the fit."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import difflab
from difflab import CFGDenoiser, EDMDenoiser, GaussianMixture, get_sigmas
from difflab.amed.fit import AMEDConfig, fit_amed, teacher_trajectory
from difflab.amed.predictor import (
    AMEDPredictor,
    ConstantPredictor,
    amed_nfe,
    amed_points,
    amed_solver,
    amed_step,
    load_predictor,
    pool_feature,
    predictor_sigmas,
)
from difflab.core.errors import AddonMismatchError, ConfigError, ModelFormatError
from difflab.core.fingerprint import fingerprint
from difflab.models import fingerprint_of
from difflab.nets import MLP, UNet
from difflab.sampling import SOLVERS
from tests.conftest import np_denoiser


class CountingDenoiser(torch.nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base, self.calls = base, 0

    def forward(self, x, sigma, **cond):
        self.calls += 1
        return self.base(x, sigma, **cond)


def _mean_l2(x, reference) -> float:
    return float((x.double() - reference.double()).flatten(1).norm(dim=1).mean())


def _fine_heun(denoiser, x, sigma_min, sigma_max, **cond):
    """Reference ODE solution: Heun on 400 Karras steps, float64. Its own error on mix2d is ~7e-5
    (checked against 800 steps), four orders of magnitude below the 5-NFE errors compared here."""
    return difflab.sample(denoiser, x.double(), get_sigmas("karras", 401, sigma_min, sigma_max), solver="heun", **cond)


def _random_head(predictor: AMEDPredictor) -> AMEDPredictor:
    """A predictor whose (zero-initialised) head is random, so that its output depends on the feature."""
    torch.nn.init.normal_(predictor.head.weight, std=0.5)
    return predictor


# ----- the predictor ----------------------------------------------------------------------------
def test_a_fresh_predictor_is_the_base_solver_on_the_log_midpoint_grid():
    params = AMEDPredictor(delta_c=0.2, delta_a=0.2)(torch.randn(3, 4, 8, 8), torch.full((3,), 5.0), torch.ones(3))
    for value, name in ((0.5, "r"), (1.0, "c"), (1.0, "a")):
        torch.testing.assert_close(getattr(params, name).detach(), torch.full((3,), value), msg=name)


def test_predictor_has_about_9k_parameters_in_the_documented_layout():
    predictor = AMEDPredictor()
    count = sum(p.numel() for p in predictor.parameters())
    print(f"AMEDPredictor parameters: {count}")
    # Linear(64→128) + Linear(128→4) + shared Linear(8→8) + head Linear(20→3)
    assert count == (64 * 128 + 128) + (128 * 4 + 4) + (8 * 8 + 8) + (20 * 3 + 3) == 8971
    assert 8_500 <= count <= 9_500          # docs/methods/amed.md: "8,971 parameters"


def test_heads_stay_in_their_ranges_and_delta_zero_fixes_a_at_one():
    torch.manual_seed(0)
    predictor = AMEDPredictor(delta_c=0.01, delta_a=0.0)
    with torch.no_grad():
        for p in predictor.parameters():
            p.mul_(50)                      # saturate the sigmoids
        out = predictor(torch.randn(16, 32), torch.full((16,), 5.0), torch.full((16,), 1.0))
    assert bool(((out.r >= 0) & (out.r <= 1)).all())
    assert bool(((out.c >= 0.99) & (out.c <= 1.01)).all())
    assert bool((out.a == 1).all())


@pytest.mark.parametrize("shape", [(3, 32), (3, 7), (3, 16, 2, 2), (3, 4, 8, 8), (3, 5, 16, 16), (3, 6, 10)])
def test_pool_feature_gives_64_values_per_sample_and_averages_channels(shape):
    feature = torch.randn(shape)
    pooled = pool_feature(feature, 3)
    assert pooled.shape == (3, 64)
    if len(shape) == 4 and shape[2] == 8:   # an 8×8 map: exactly the channel mean
        torch.testing.assert_close(pooled, feature.mean(1).flatten(1))
    assert bool((pool_feature(None, 3) == 0).all())


# ----- the solver -------------------------------------------------------------------------------
def _hand_written_dpm2(case, x: np.ndarray, sigmas: np.ndarray, afs: bool) -> np.ndarray:
    """DPM-Solver-2 (docs/methods/solvers.md (9)), with the numpy denoiser of conftest: s = sqrt(t t'),
    x' = x + (t' − t)·ε̂(x + (s − t)d, s); AFS: d = x/sqrt(1 + t²) on the first step."""
    for i, (t, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        d = x / np.sqrt(1 + t**2) if afs and i == 0 else (x - np_denoiser(case, x, t)) / t
        s = np.sqrt(t * t_next)
        x_mid = x + (s - t) * d
        x = x + (t_next - t) * (x_mid - np_denoiser(case, x_mid, s)) / s
    return x


@pytest.mark.parametrize("afs", [True, False])
def test_amed_with_half_one_one_is_dpm2_exactly(mix2d, rng, afs):
    sigmas = get_sigmas("karras", 5, 0.01, 20.0)
    x = torch.as_tensor(20.0 * rng.standard_normal((8, 2)))
    out = amed_solver(mix2d.model, x, sigmas, ConstantPredictor(0.5, 1.0, 1.0), afs=afs)
    expected = _hand_written_dpm2(mix2d, x.numpy(), sigmas.numpy(), afs)
    # float64 throughout; only round-off differs (t'^½·t^½ vs sqrt(t·t'), scipy vs torch densities)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-10)
    if "dpm2" in SOLVERS:                   # the library's DPM-Solver-2, when present
        dpm2 = SOLVERS["dpm2"].fn
        kwargs = {"afs": afs} if "afs" in inspect.signature(dpm2).parameters else {}
        if kwargs or not afs:
            torch.testing.assert_close(out, dpm2(mix2d.model, x, sigmas, **kwargs), rtol=1e-12, atol=1e-12)


def test_amed_step_evaluates_the_denoiser_at_a_s_and_divides_by_s(mix2d, rng):
    """With r, c, a fixed, one step is x + c(t' − t)(x_mid − D(x_mid; a·s))/s, s = t'^r t^{1−r}."""
    x = torch.as_tensor(3.0 * rng.standard_normal((6, 2)))
    t, t_next, r, c, a = 3.0, 1.0, 0.3, 1.01, 0.9
    out, _ = amed_step(mix2d.model, x, t, t_next, ConstantPredictor(r, c, a))
    xn = x.numpy()
    s = t_next**r * t ** (1 - r)
    x_mid = xn + (s - t) * (xn - np_denoiser(mix2d, xn, t)) / t
    expected = xn + c * (t_next - t) * (x_mid - np_denoiser(mix2d, x_mid, a * s)) / s
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-10)   # float64 round-off


@pytest.mark.parametrize("n_points", [3, 4, 5, 6])
@pytest.mark.parametrize("afs", [True, False])
def test_nfe_is_two_per_step_minus_one_with_afs(mix2d, n_points, afs):
    counter = CountingDenoiser(mix2d.model)
    amed_solver(counter, torch.randn(4, 2), get_sigmas("karras", n_points, 0.01, 10.0), AMEDPredictor(), afs=afs)
    assert counter.calls == 2 * (n_points - 1) - int(afs) == amed_nfe(n_points, afs=afs)
    if afs:
        assert amed_points(counter.calls) == n_points      # NFE 3, 5, 7, 9 <-> N = 3, 4, 5, 6
    counter.calls = 0                                       # a final σ = 0 is one Euler step: one evaluation
    amed_solver(counter, torch.randn(4, 2), torch.cat([get_sigmas("karras", n_points, 0.01, 10.0),
                                                       torch.zeros(1, dtype=torch.float64)]), AMEDPredictor(), afs=afs)
    assert counter.calls == amed_nfe(n_points + 1, to_zero=True, afs=afs) == 2 * (n_points - 1) + 1 - int(afs)


def test_even_nfe_with_afs_is_refused():
    with pytest.raises(ConfigError, match="nearest budgets: 5 or 7"):
        amed_points(6)


# ----- fitting ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture([[-4.0, 0.0], [3.0, 3.0], [2.0, -4.0]], stds=[[0.5, 1.0], [0.8, 0.4], [0.6, 0.7]],
                           weights=[0.5, 0.3, 0.2], labels=[0, 1, 1])


@pytest.fixture(scope="module")
def fitted(mixture):
    """A predictor fitted for NFE 5 on the exact mixture (black box: per-step constants), with the
    defaults of docs/methods/amed.md (10)–(11): Karras grid 80 → 0.002, teacher Heun with M = 1, Adam lr 5e−3."""
    return fit_amed(mixture, AMEDConfig(nfe=5, trajectories=2048, batch_size=128), shape=(2,))


def test_teacher_states_land_on_the_student_grid(mixture):
    """(M+1)(N−1)+1 teacher points, every (M+1)-th kept: N states, the last the teacher's own result."""
    n_points, M = 4, 2
    fine = get_sigmas("karras", (M + 1) * (n_points - 1) + 1, 0.002, 80.0)
    torch.testing.assert_close(fine[:: M + 1], get_sigmas("karras", n_points, 0.002, 80.0), rtol=1e-12, atol=0)
    x = 80.0 * torch.randn(8, 2, dtype=torch.float64)
    states = teacher_trajectory(mixture, x, fine, M + 1)
    assert len(states) == n_points and states[0] is x
    torch.testing.assert_close(states[-1], SOLVERS["heun"].fn(mixture, x, fine), rtol=0, atol=0)


def test_fitting_on_mixture_beats_the_untrained_predictor_and_dpm2_at_nfe5(mixture, fitted):
    predictor, result = fitted.model, fitted
    sigmas = predictor_sigmas(predictor)
    assert len(sigmas) == 4 and amed_nfe(len(sigmas)) == 5
    x = 80.0 * torch.randn(512, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    reference = _fine_heun(mixture, x, 0.002, 80.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(AMEDConfig().seed)       # the fit's initial weights
        untrained = AMEDPredictor()
    with torch.no_grad():
        err_fitted = _mean_l2(amed_solver(mixture, x.float(), sigmas, predictor), reference)
        err_untrained = _mean_l2(amed_solver(mixture, x.float(), sigmas, untrained), reference)
    err_dpm2 = _mean_l2(amed_solver(mixture, x, sigmas, ConstantPredictor()), reference)
    print(f"mean L2 error at NFE 5: untrained {err_untrained:.3f}, DPM-2 (AFS) {err_dpm2:.3f}, "
          f"AMED fitted {err_fitted:.3f}; losses {result.history[-3:]}")
    # observed: untrained 7.18, DPM-2 6.53, fitted 1.32 (ratio 0.20); a halving is a clear margin with slack
    assert err_fitted < 0.5 * err_untrained
    assert err_fitted < 0.5 * err_dpm2


def test_a_denoiser_with_a_feature_gets_per_sample_r_c_a_and_can_be_fitted():
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=32, depth=2, embed_dim=16, zero_init_output=False)
    denoiser = EDMDenoiser(net, sigma_data=2.0, sigma_min=0.01, sigma_max=20.0, data_shape=(2,))
    x = 5.0 * torch.randn(16, 2)
    denoiser(x, torch.full((16,), 5.0))
    assert denoiser.last_feature.shape == (16, 32)
    predictor = _random_head(AMEDPredictor(delta_c=0.2, delta_a=0.2))
    _, params = amed_step(denoiser, x, 5.0, 1.0, predictor)
    for name in ("r", "c", "a"):          # per sample: different features give different values
        assert float(getattr(params, name).detach().std()) > 1e-5, name
    _, params_afs = amed_step(denoiser, x, 5.0, 1.0, predictor, analytic_first=True)
    assert float(params_afs.r.detach().std()) == 0   # h = 0 on an AFS step: one value for the whole batch

    result = fit_amed(denoiser, AMEDConfig(nfe=3, trajectories=64, batch_size=32, delta_a=0.2))
    fitted = result.model
    assert all(np.isfinite(loss) for _, loss in result.history)
    assert all(p.requires_grad for p in denoiser.parameters())     # the freeze is undone afterwards
    out = amed_solver(denoiser, 20.0 * torch.randn(8, 2), predictor_sigmas(fitted), fitted)
    assert out.shape == (8, 2) and bool(torch.isfinite(out).all())


def test_a_unet_feature_map_is_pooled_and_gives_per_sample_r():
    torch.manual_seed(0)
    net = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(),
               groups=4, zero_init_output=False, image_size=8)
    denoiser = EDMDenoiser(net, sigma_data=0.5, data_shape=(1, 8, 8))
    x = 2.0 * torch.randn(5, 1, 8, 8)
    seen = []

    def predictor(feature, sigma_cur, sigma_next):
        seen.append(feature)
        return _random_head(AMEDPredictor())(feature, sigma_cur, sigma_next)

    with torch.no_grad():
        _, params = amed_step(denoiser, x, 2.0, 1.0, predictor)
    assert seen[0].ndim == 4 and seen[0].shape[0] == 5          # [B, C, h, w] bottleneck
    assert float(params.r.std()) > 1e-6


# ----- models on disk and the add-on checks ---------------------------------------------------
def test_save_load_round_trip_gives_identical_outputs(mixture, fitted, tmp_path):
    predictor = fitted.model
    predictor.save(tmp_path / "amed")
    loaded = difflab.load(tmp_path / "amed")
    assert isinstance(loaded, AMEDPredictor) and loaded.config() == predictor.config()
    via_check = load_predictor(tmp_path / "amed", base_model=mixture, nfe=5)
    x = 80.0 * torch.randn(32, 2, generator=torch.Generator().manual_seed(3))
    sigmas = predictor_sigmas(predictor)
    with torch.no_grad():
        expected = amed_solver(mixture, x, sigmas, predictor)
        torch.testing.assert_close(amed_solver(mixture, x, sigmas, loaded), expected, rtol=0, atol=0)
        torch.testing.assert_close(amed_solver(mixture, x, sigmas, via_check), expected, rtol=0, atol=0)


def test_fingerprint_names_the_content_and_matches_a_saved_folder(mixture, tmp_path):
    mixture.save(tmp_path / "mix")
    assert fingerprint_of(tmp_path / "mix") == fingerprint(mixture)
    moved = GaussianMixture(mixture.means + 0.1, covs=mixture.covs, weights=mixture.weights, labels=mixture.labels)
    assert fingerprint(moved) != fingerprint(mixture)
    assert fingerprint(lambda x, sigma: x) is None


def test_another_base_model_or_nfe_is_refused(mixture, fitted, tmp_path):
    predictor = fitted.model
    predictor.save(tmp_path / "amed")
    other = GaussianMixture([[0.0, 0.0]], stds=[1.0])
    other.save(tmp_path / "other")
    for base in (other, tmp_path / "other", fingerprint(other)):
        with pytest.raises(AddonMismatchError, match="base model"):
            load_predictor(tmp_path / "amed", base_model=base)
    with pytest.raises(AddonMismatchError, match="NFE 5"):
        load_predictor(tmp_path / "amed", nfe=7)
    with pytest.raises(ModelFormatError, match="not an AMEDPredictor"):
        load_predictor(tmp_path / "other")
    x = torch.randn(4, 2)
    with pytest.raises(AddonMismatchError, match="base model"):
        amed_solver(other, x, predictor_sigmas(predictor), predictor)
    with pytest.raises(AddonMismatchError, match="NFE 5"):
        amed_solver(mixture, x, get_sigmas("karras", 5, 0.002, 80.0), predictor)        # NFE 7
    with pytest.raises(AddonMismatchError, match="NFE 5"):
        amed_solver(mixture, x, predictor_sigmas(predictor), predictor, afs=False)     # NFE 6
    with pytest.raises(AddonMismatchError, match="grid"):
        amed_solver(mixture, x, get_sigmas("logsnr", 4, 0.002, 80.0), predictor)


# ----- guidance ---------------------------------------------------------------------------------
def test_fitting_through_cfg_on_a_labelled_mixture_beats_dpm2(mixture):
    guided = CFGDenoiser(mixture, w=1.0)
    labels = lambda generator, n: {"class_labels": torch.randint(0, 2, (n,), generator=generator)}  # noqa: E731
    config = AMEDConfig(nfe=5, M=3, trajectories=1024, batch_size=128)
    predictor = fit_amed(guided, config, shape=(2,), cond_sampler=labels).model
    assert predictor.base_model == fingerprint(guided) != fingerprint(mixture)
    x = 80.0 * torch.randn(256, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    cond = {"class_labels": torch.arange(256) % 2}
    reference = _fine_heun(guided, x, 0.002, 80.0, **cond)
    sigmas = predictor_sigmas(predictor)
    with torch.no_grad():
        err_fitted = _mean_l2(amed_solver(guided, x.float(), sigmas, predictor, **cond), reference)
    err_dpm2 = _mean_l2(amed_solver(guided, x, sigmas, ConstantPredictor(), **cond), reference)
    print(f"guided (w=1) mean L2 error at NFE 5: DPM-2 {err_dpm2:.3f}, AMED {err_fitted:.3f}")
    assert err_fitted < 0.5 * err_dpm2      # observed: DPM-2 5.69, AMED 1.06 (ratio 0.19)


def test_cfg_reads_the_conditional_half_of_the_feature():
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=16, depth=2, embed_dim=16, num_classes=2, zero_init_output=False)
    guided = CFGDenoiser(EDMDenoiser(net, sigma_data=1.0, data_shape=(2,)), w=2.0)
    x, labels = torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 0, 1])
    seen = []

    def predictor(feature, sigma_cur, sigma_next):
        seen.append(feature)
        return ConstantPredictor()(feature, sigma_cur, sigma_next)

    amed_step(guided, x, 2.0, 1.0, predictor, class_labels=labels)
    assert seen[0].shape == (6, 16)
    guided.denoiser(x, torch.full((6,), 2.0), class_labels=labels)      # the conditional half alone
    torch.testing.assert_close(seen[0], net.bottleneck)


# ----- the loop: exact resume -----------------------------------------------------------------
def test_an_interrupted_fit_resumes_to_the_same_predictor(mixture, tmp_path):
    config = AMEDConfig(checkpoint_every=4, nfe=5, M=1, trajectories=4 * 32, batch_size=32)
    kwargs = dict(shape=(2,), config=config)
    whole = fit_amed(mixture, **kwargs).model

    class Interrupt(Exception):
        pass

    def crash_at_batch_2(generator, n):     # batch 2 starts at step 6, after the checkpoint at step 4
        if crash_at_batch_2.calls == 2:
            raise Interrupt
        crash_at_batch_2.calls += 1
        return {}

    crash_at_batch_2.calls = 0
    with pytest.raises(Interrupt):
        fit_amed(mixture, **kwargs, out_dir=tmp_path, cond_sampler=crash_at_batch_2)
    resumed = fit_amed(mixture, **kwargs, out_dir=tmp_path).model   # resumes mid-batch (step 4 = batch 1, step 1)
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)   # same arithmetic, same order: bitwise
    assert (tmp_path / "predictor" / "config.json").is_file()
