"""`difflab sample` streams to disk a batch at a time: the output does not depend on the batch size,
equals the library's own `sample` on the same seeds, never holds more than a batch, and a run that
fails or is interrupted leaves no output file (nor a temporary one, nor a folder made for it)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import difflab.apps.cli.app as cli
import difflab.apps.cli.sample as sample_cli
from difflab import GaussianMixture, load
from difflab.core.io import NpyRows, npz_rows
from difflab.sampling import sample, seeded_noise, sigmas_for_nfe
from tests.apps.cli.helpers import run


@pytest.fixture(scope="module")
def mixture_folder(tmp_path_factory):
    """A float64 GaussianMixture on disk: exact, so equal seeds must give bit-equal samples."""
    folder = tmp_path_factory.mktemp("stream") / "gmm"
    GaussianMixture([[-2.0, 0.0], [2.0, 1.0], [0.0, -3.0]], stds=[[0.5, 0.3], [0.8, 0.6], [0.4, 0.9]],
                    weights=[0.3, 0.5, 0.2]).save(folder)
    return folder


def sample_args(model, out, batch_size, solver="heun", nfe=9, n=23, seed=7):
    return ["sample", "--model", model, "--solver", solver, "--nfe", nfe, "--n", n, "--seed", seed,
            "--batch-size", batch_size, "--out", out, "--device", "cpu"]


@pytest.mark.parametrize("solver", ["heun", "euler_maruyama"])   # deterministic, and with per-step noise
@pytest.mark.reliability("numerics")
def test_output_is_bit_identical_whatever_the_batch_size(mixture_folder, tmp_path, capsys, solver):
    outputs = []
    for batch_size in (23, 5, 1):                                  # one batch, uneven batches, one row each
        out = tmp_path / f"b{batch_size}.npz"
        code, _, err = run(sample_args(mixture_folder, out, batch_size, solver), capsys)
        assert code == 0, err
        outputs.append(np.load(out)["x"])
    assert outputs[0].shape == (23, 2) and outputs[0].dtype == np.float32
    for other in outputs[1:]:
        assert np.array_equal(outputs[0], other)


@pytest.mark.reliability("numerics")
def test_a_network_model_gives_bit_identical_rows_for_every_batch_size(tmp_path, capsys):
    """A float32 MLP: BLAS takes another path for a remainder of fewer than its block of rows (2.6e-6
    differences before the CLI evaluated whole blocks of 8)."""
    from difflab.core.wrappers import EDMDenoiser
    from difflab.nets import MLP

    torch.manual_seed(0)
    EDMDenoiser(MLP(dim=2, hidden=64, depth=3, zero_init_output=False), data_shape=(2,)).save(tmp_path / "mlp")
    outputs = []
    for batch_size in (23, 3, 2, 1):
        out = tmp_path / f"b{batch_size}.npz"
        code, _, err = run(sample_args(tmp_path / "mlp", out, batch_size, "dpmpp_2m"), capsys)
        assert code == 0, err
        outputs.append(np.load(out)["x"])
    for other in outputs[1:]:
        assert np.array_equal(outputs[0], other)


@pytest.mark.reliability("numerics")
def test_streamed_rows_are_the_librarys_samples_in_seed_order(mixture_folder, tmp_path, capsys):
    code, out, err = run(sample_args(mixture_folder, tmp_path / "s.npz", batch_size=4), capsys)
    assert code == 0, err
    assert json.loads(out)["n"] == 23
    model = load(mixture_folder)
    sigmas = sigmas_for_nfe("heun", 9, "karras", 0.002, 80.0, to_zero=True)   # the CLI's default range
    expected = sample(model, seeded_noise(range(7, 30), (2,), float(sigmas[0])), sigmas, solver="heun")
    assert np.array_equal(np.load(tmp_path / "s.npz")["x"], expected.numpy())


@pytest.mark.reliability("outputs")
def test_no_write_holds_more_than_one_batch(mixture_folder, tmp_path, capsys, monkeypatch):
    sizes = []
    original = NpyRows.write
    monkeypatch.setattr(NpyRows, "write", lambda self, rows: (sizes.append(len(rows)), original(self, rows))[1])
    code, _, err = run(sample_args(mixture_folder, tmp_path / "s.npz", batch_size=6), capsys)
    assert code == 0, err
    assert sizes == [6, 6, 6, 5]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("failure", [Interrupt, KeyboardInterrupt])
@pytest.mark.reliability("outputs")
def test_a_run_failing_mid_way_leaves_no_file_and_no_folder(mixture_folder, tmp_path, capsys, monkeypatch,
                                                             failure):
    make_runner, calls = sample_cli._solver_runner, []

    def failing_runner(*args, **kwargs):
        run_batch = make_runner(*args, **kwargs)

        def run_or_fail(seeds, *rest):
            calls.append(len(seeds))
            if len(calls) == 3:                                    # after two batches were written
                raise failure("stop")
            return run_batch(seeds, *rest)

        run_or_fail.nfe, run_or_fail.points = run_batch.nfe, run_batch.points
        return run_or_fail

    monkeypatch.setattr(sample_cli, "_solver_runner", failing_runner)
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["difflab", *map(str, sample_args(mixture_folder, tmp_path / "new" / "s.npz", 5))]
    sys.argv, old = argv, sys.argv
    try:
        if failure is Interrupt:          # a bug surfaces as its own exception
            with pytest.raises(Interrupt):
                cli.main()
        else:                             # Ctrl-C: typer turns it into exit status 130
            assert cli.app(standalone_mode=False) == 130
    finally:
        sys.argv = old
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == before     # no s.npz, no .s.npz.*.tmp, no new/


@pytest.mark.reliability("outputs")
def test_npz_rows_refuses_a_short_write_and_reads_back_like_savez(tmp_path):
    rows = np.arange(24, dtype=np.float64).reshape(4, 2, 3)
    with npz_rows(tmp_path / "a.npz", 4, (2, 3)) as writer:
        writer.write(rows[:3])
        writer.write(torch.from_numpy(rows[3:]))
    loaded = np.load(tmp_path / "a.npz")
    assert loaded.files == ["x"] and np.array_equal(loaded["x"], rows) and loaded["x"].dtype == np.float64
    with pytest.raises(ValueError, match="3 rows written of 4"), npz_rows(tmp_path / "b.npz", 4, (2, 3)) as writer:
        writer.write(rows[:3])
    with pytest.raises(ValueError, match="do not fit"), npz_rows(tmp_path / "c.npz", 4, (2, 3)) as writer:
        writer.write(rows[:, :, :2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]


@pytest.mark.reliability("numerics")
def test_a_model_returning_nan_ends_in_one_line_naming_solver_and_step_and_no_file(tmp_path, capsys):
    from difflab.core.wrappers import EDMDenoiser
    from difflab.nets import MLP

    network = MLP(dim=2, hidden=8, depth=1, zero_init_output=False)
    with torch.no_grad():
        next(network.parameters()).fill_(float("nan"))
    EDMDenoiser(network, data_shape=(2,)).save(tmp_path / "nan_model")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run(sample_args(tmp_path / "nan_model", tmp_path / "new" / "s.npz", batch_size=4, solver="dpm2"),
                         capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: solver 'dpm2' produced a non-finite state at step 0 (sigma 80 -> ")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
