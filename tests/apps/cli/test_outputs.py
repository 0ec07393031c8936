"""Output safety of every `difflab` command that writes: a bad --out is one line and exit status 2
before any work, --force replaces only what difflab wrote, and one writer at a time per output."""
from __future__ import annotations

import json

import numpy as np
import pytest

from difflab import GaussianMixture
from difflab.apps.cli.common import check_output, locked_output
from difflab.core.errors import ConfigError
from tests.apps.cli.helpers import run

LONG_NAME = "n" * 300                  # beyond any common file system's 255 bytes


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working folder with a model (`g`) and a plain file (`notes.txt`) in it."""
    GaussianMixture([[-4.0, 0.0], [3.0, 3.0]], stds=[0.5, 0.8]).save(tmp_path / "g")
    (tmp_path / "notes.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _sample(out, *extra) -> list:
    return ["sample", "--model", "g", "--solver", "euler", "--nfe", "3", "--n", "2", "--device", "cpu",
            "--out", out, *extra]


def _train(out, *extra) -> list:
    return ["train", "--data", "gmm", "--batch-size", "4", "--device", "cpu", "--out", out, *extra]


def _assert_refused(code: int, out: str, err: str, *words: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err and out == "", err
    assert all(word in err for word in words), err


@pytest.mark.parametrize("out, words", [
    ("", ['--out ""']),
    (f"{LONG_NAME}.npz", ["304 bytes", "allows"]),
    ("notes.txt/s.npz", ["notes.txt", "is a file"]),
    ("notes.txt/deeper/s.npz", ["notes.txt", "is a file"]),
    ("/proc/s.npz", ["cannot create"]),
    ("/proc/difflab-test/s.npz", ["cannot create"]),
])
@pytest.mark.reliability("outputs")
def test_a_bad_file_output_is_one_line_before_any_work(workdir, capsys, out, words):
    before = _listing(workdir)
    _assert_refused(*run(_sample(out), capsys), *words)
    assert _listing(workdir) == before


@pytest.mark.parametrize("out, words", [
    ("", ['--out ""']),
    (LONG_NAME, ["300 bytes", "allows"]),
    ("notes.txt/m", ["notes.txt", "is a file"]),
    ("/proc/difflab-test/m", ["cannot create"]),
    ("notes.txt", ["is a file", "model folder"]),
])
@pytest.mark.reliability("outputs")
def test_a_bad_folder_output_is_one_line_before_any_work(workdir, capsys, out, words):
    before = _listing(workdir)
    _assert_refused(*run(_train(out, "--force"), capsys), *words)
    assert _listing(workdir) == before and (workdir / "notes.txt").read_text() == "keep me"


@pytest.mark.reliability("outputs")
def test_a_folder_where_a_file_is_expected_is_refused_even_with_force(workdir, capsys):
    (workdir / "d.npz").mkdir()
    (workdir / "d.npz" / "data.bin").write_bytes(b"keep me")
    before = _listing(workdir)
    _assert_refused(*run(_sample("d.npz", "--force"), capsys), "not a file")
    assert _listing(workdir) == before


@pytest.mark.parametrize("contents", [{"a.txt": "mine"}, {"config.json": json.dumps({"class": "Spreadsheet"})},
                                      {"config.json": "not json"}])
@pytest.mark.reliability("outputs")
def test_force_does_not_replace_a_folder_difflab_did_not_write(workdir, capsys, contents):
    documents = workdir / "Documents"
    documents.mkdir()
    for name, text in contents.items():
        (documents / name).write_text(text)
    before = _listing(workdir)
    _assert_refused(*run(_train("Documents", "--force"), capsys), "not a difflab model folder")
    _assert_refused(*run(_train("Documents"), capsys), "not a difflab model folder")
    assert _listing(workdir) == before
    assert all((documents / name).read_text() == text for name, text in contents.items())


@pytest.mark.reliability("outputs")
def test_the_demo_refuses_a_folder_that_is_not_a_demo_folder(workdir, capsys):
    (workdir / "Documents").mkdir()
    (workdir / "Documents" / "a.txt").write_text("mine")
    before = _listing(workdir)
    _assert_refused(*run(["demo", "--quick", "--out", "Documents", "--device", "cpu"], capsys),
                    "not a difflab demo folder")
    assert _listing(workdir) == before


@pytest.mark.reliability("outputs")
def test_force_replaces_what_difflab_wrote(workdir):
    (workdir / "s.npz").write_bytes(b"old samples")
    check_output(workdir / "s.npz", force=True, suffixes=(".npz", ".png"))
    check_output(workdir / "g", force=True)                    # a difflab model folder
    (workdir / "empty").mkdir()
    check_output(workdir / "empty", force=True)                # nothing in it to lose
    with pytest.raises(ConfigError, match="--force"):
        check_output(workdir / "g", force=False)


@pytest.mark.reliability("outputs")
def test_sample_with_force_replaces_its_own_output_and_leaves_no_lock(workdir, capsys):
    assert run(_sample("s.npz"), capsys)[0] == 0
    code, _, err = run(_sample("s.npz", "--force"), capsys)
    assert code == 0, err
    assert np.load(workdir / "s.npz")["x"].shape == (2, 2)
    assert [p.name for p in workdir.iterdir() if p.name.startswith(".")] == []


@pytest.mark.reliability("concurrency")
def test_a_second_writer_of_the_same_output_fails_at_once(workdir, capsys):
    with locked_output(workdir / "s.npz"):
        assert (workdir / ".s.npz.lock").exists()
        _assert_refused(*run(_sample("s.npz"), capsys), "another difflab command is writing")
        _assert_refused(*run(_train("s.npz"), capsys), "another difflab command is writing")
        assert not (workdir / "s.npz").exists()
        assert run(_sample("other.npz"), capsys)[0] == 0    # another output is not locked
    assert not (workdir / ".s.npz.lock").exists()
    assert run(_sample("s.npz"), capsys)[0] == 0


@pytest.mark.reliability("concurrency")
def test_the_lock_of_an_output_in_a_new_folder_leaves_no_folder_when_refused(workdir, capsys):
    before = _listing(workdir)
    _assert_refused(*run(_sample("new/deeper/s.npz", "--solver", "nonsense"), capsys))
    assert _listing(workdir) == before


@pytest.mark.reliability("concurrency")
def test_only_the_main_process_takes_the_lock(workdir, monkeypatch):
    lock = workdir / ".s.npz.lock"
    with locked_output(workdir / "s.npz"):
        monkeypatch.setenv("RANK", "1")                       # another process of `accelerate launch`
        with locked_output(workdir / "s.npz"):                # would fail at once if rank 1 took the lock too
            assert lock.exists()
        assert lock.exists()                                  # rank 1 left rank 0's lock alone
    assert not lock.exists()
