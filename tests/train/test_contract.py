"""The one fitting contract (train/contract.py) on the loop, train_denoiser, fit_amed and fit_deft: configs
that round-trip through JSON and refuse unknown or mistyped keys, callbacks that receive `Step`
records matching the returned history, the config recorded in what is saved, resume only of the same
run, and a stop with the step named on a non-finite loss."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

import difflab
from difflab.amed.fit import AMEDConfig, fit_amed
from difflab.condition import DEFTConfig, Inpaint, fit_deft
from difflab.core.errors import ConfigError, NonFiniteError
from difflab.core.mixture import GaussianMixture
from difflab.core.wrappers import EDMDenoiser
from difflab.nets import MLP
from difflab.train import FitResult, Step, TrainConfig, fit
from difflab.train.denoiser import DenoiserConfig, denoiser_loss, train_denoiser
from difflab.train.loop import CHECKPOINT_NAME

CONFIGS = [
    TrainConfig(train_steps=7, lr=1e-3, device="cpu"),
    DenoiserConfig(train_steps=5, batch_size=16, sigma_data=0.7, label_dropout=0.2, dataset="moons", seed=3),
    AMEDConfig(nfe=3, grid="logsnr", sigma_min=0.01, sigma_max=None, M=3, base_solver="ipndm", dtype="float64"),
    DEFTConfig(train_steps=9, nn1={"hidden": 16, "depth": 1}, nn1_class="CUNet", nn2_bias=0.02),
]
try:   # the distillation stages follow the same contract (distill/ is tested there too)
    from difflab.distill import GuidedDistillConfig, ProgressiveDistillConfig
    CONFIGS += [GuidedDistillConfig(train_steps=4, w_range=(0.5, 3.0)), ProgressiveDistillConfig()]
except ImportError:
    pass


def mixture() -> GaussianMixture:
    return GaussianMixture([[-2.0, 0.0], [2.0, 1.0]], stds=[0.5, 0.7], weights=[0.5, 0.5])


def data(n: int = 256, seed: int = 0) -> torch.Tensor:
    return mixture().sample(n, generator=torch.Generator().manual_seed(seed)).float()


def assert_steps_match(steps: list[Step], result: FitResult, total: int) -> None:
    """The callback's records: one per log point, step increasing to `total`, finite loss, = history."""
    assert [s.step for s in steps] == sorted({s.step for s in steps}) and steps[-1].step == total
    assert all(s.total == total and math.isfinite(s.loss) and s.lr > 0 and s.elapsed >= 0 for s in steps)
    assert [(s.step, s.loss) for s in steps] == result.history
    assert result.timings["total"] > 0


# ----- configs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
@pytest.mark.reliability("configs")
def test_every_config_round_trips_through_json(config):
    again = type(config).from_json(config.to_json())
    assert again == config and again.to_json() == config.to_json()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
@pytest.mark.reliability("configs")
def test_an_unknown_key_is_refused_and_named(config):
    with pytest.raises(ConfigError, match="stpes"):
        type(config).from_dict({**config.to_dict(), "stpes": 3})


@pytest.mark.reliability("configs")
def test_a_mistyped_value_is_refused_and_ints_pass_as_floats():
    with pytest.raises(ConfigError, match="train_steps"):
        DenoiserConfig.from_dict({"train_steps": "100"})
    with pytest.raises(ConfigError, match="afs"):
        AMEDConfig.from_dict({"afs": 1})             # a bool field takes no int
    assert DenoiserConfig.from_dict({"lr": 1, "sigma_data": None}).lr == 1.0


def test_amed_defaults_are_the_papers_recipe_on_the_loop():
    config = AMEDConfig()
    assert (config.lr, config.warmup_steps, config.ema_decay, config.grad_clip) == (5e-3, 0, 0.0, 0.0)
    assert (config.nfe, config.teacher_solver, config.M, config.base_solver) == (5, "heun", 1, "dpm2")


# ----- callbacks, history, timings and the saved config -------------------------------------------
def test_the_loop_calls_back_with_steps_that_match_the_history():
    torch.manual_seed(0)
    model = EDMDenoiser(MLP(dim=2, hidden=16, depth=1), sigma_data=1.0)
    steps: list[Step] = []
    config = TrainConfig(train_steps=10, log_every=4, warmup_steps=8, device="cpu")
    result = fit(model, denoiser_loss(data(), None, 32, 1.0), config, callback=steps.append, progress=False)
    assert_steps_match(steps, result, 10)
    assert [s.step for s in steps] == [4, 8, 10]
    # the lr of the record's last update: linear warm-up, 4/8 of lr at step 4, then lr
    assert [s.lr for s in steps] == pytest.approx([config.lr / 2, config.lr, config.lr])
    assert result.model is not result.raw_model                 # the EMA, and the trained model beside it


def test_train_denoiser_returns_the_ema_and_saves_its_config_under_fit(tmp_path):
    steps: list[Step] = []
    config = DenoiserConfig(train_steps=6, log_every=2, batch_size=32, dataset="gmm", device="cpu")
    result = train_denoiser(MLP(dim=2, hidden=16, depth=1), data(), config=config, callback=steps.append,
                            progress=False)
    assert_steps_match(steps, result, 6)
    assert not any(p.requires_grad for p in result.model.parameters())
    result.model.save(tmp_path / "m")
    loaded = difflab.load(tmp_path / "m")
    assert DenoiserConfig.from_dict(loaded.config()["fit"]) == config
    assert difflab.fingerprint(loaded) == difflab.fingerprint(result.model)


def test_fit_amed_reports_teacher_time_and_records_its_resolved_config(tmp_path):
    steps: list[Step] = []
    config = AMEDConfig(nfe=3, trajectories=64, batch_size=32, log_every=1)
    result = fit_amed(mixture(), config, shape=(2,), callback=steps.append, out_dir=tmp_path)
    assert_steps_match(steps, result, 2 * 2)                     # 2 batches × (N − 1 = 2) intervals
    assert 0 < result.timings["teacher"] < result.timings["total"]
    saved = AMEDConfig.from_dict(difflab.load(tmp_path / "predictor").config()["fit"])
    assert saved.train_steps == 4 and saved.nfe == 3 and saved.device == "cpu"   # resolved: derived steps


def test_fit_deft_calls_back_and_records_its_config(tmp_path):
    operator = Inpaint(torch.tensor([1.0, 0.0]), sigma_y=0.1, kind="coords")
    steps: list[Step] = []
    config = DEFTConfig(train_steps=4, log_every=2, batch_size=16, nn1={"hidden": 16, "depth": 1}, device="cpu")
    result = fit_deft(mixture(), operator, data(), config, callback=steps.append)
    assert_steps_match(steps, result, 4)
    result.model.save(tmp_path / "h")
    assert DEFTConfig.from_dict(difflab.load(tmp_path / "h").config()["fit"]) == config


# ----- resume only the same run ---------------------------------------------------------------------
@pytest.mark.reliability("checkpoints")
def test_resume_of_another_run_is_refused_naming_the_fields(tmp_path):
    config = DenoiserConfig(train_steps=2, batch_size=16, device="cpu")
    train_denoiser(MLP(dim=2, hidden=16, depth=1), data(), config=config, out_dir=tmp_path, progress=False)
    longer = DenoiserConfig(train_steps=4, batch_size=16, device="cpu", checkpoint_every=3)
    resumed = train_denoiser(MLP(dim=2, hidden=16, depth=1), data(), config=longer, out_dir=tmp_path, progress=False)
    assert [step for step, _ in resumed.history] == [2, 4]       # more steps: the same run, continued
    with pytest.raises(ConfigError, match=r"config\.lr.*config\.warmup_steps"):
        train_denoiser(MLP(dim=2, hidden=16, depth=1), data(), out_dir=tmp_path, progress=False,
                       config=DenoiserConfig(train_steps=6, batch_size=16, lr=1e-3, warmup_steps=5, device="cpu"))
    with pytest.raises(ConfigError, match=r"data\.fingerprint"):
        train_denoiser(MLP(dim=2, hidden=16, depth=1), data(seed=1), config=longer, out_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"model\.network\.args\.hidden"):
        train_denoiser(MLP(dim=2, hidden=8, depth=1), data(), config=longer, out_dir=tmp_path, progress=False)
    fresh = train_denoiser(MLP(dim=2, hidden=16, depth=1), data(seed=1), config=longer, out_dir=tmp_path,
                           progress=False, resume=False)
    assert [step for step, _ in fresh.history] == [4]            # started afresh, and overwrote the checkpoint


@pytest.mark.reliability("checkpoints")
def test_an_amed_checkpoint_for_another_base_model_is_refused(tmp_path):
    config = AMEDConfig(nfe=3, trajectories=32, batch_size=32)
    fit_amed(mixture(), config, shape=(2,), out_dir=tmp_path)
    other = GaussianMixture([[-2.0, 0.0], [2.0, 1.5]], stds=[0.5, 0.7], weights=[0.5, 0.5])
    with pytest.raises(ConfigError, match=r"model\.base_model"):
        fit_amed(other, config, shape=(2,), out_dir=tmp_path)


# ----- a non-finite loss ------------------------------------------------------------------------------
@pytest.mark.reliability("numerics")
def test_a_non_finite_loss_stops_the_fit_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = EDMDenoiser(MLP(dim=2, hidden=16, depth=1), sigma_data=1.0)
    loss = denoiser_loss(data(), None, 32, 1.0)

    def nan_at_step_7(m, generator, step, micro):
        value = loss(m, generator, step, micro)
        return value * float("nan") if step == 6 else value

    config = TrainConfig(train_steps=10, checkpoint_every=4, device="cpu")
    with pytest.raises(NonFiniteError, match="step 7"):
        fit(model, nan_at_step_7, config, out_dir=tmp_path, progress=False)
    with safe_open(tmp_path / CHECKPOINT_NAME, "pt") as f:
        assert f.metadata()["step"] == "4"
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())   # noqa: SIM118 (safe_open has no __iter__)
    assert all(torch.isfinite(p).all() for p in model.parameters())   # stopped before the update
