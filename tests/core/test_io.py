"""core/io: the one atomic write (files and folders), strict JSON, the umask's permissions, and
the cleaning of what a killed write left behind."""
from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from difflab.core.errors import NonFiniteError
from difflab.core.io import atomic_folder, atomic_path, dumps_strict, remove_stale_temporaries, write_json
from difflab.core.serialization import write_model_folder


@pytest.fixture
def umask():
    """Set the process umask for a test and restore it after."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----- strict JSON ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.reliability("outputs")
def test_write_json_refuses_nan_and_infinity_and_says_where(tmp_path, value):
    target = tmp_path / "report.json"
    with pytest.raises(NonFiniteError, match=r"losses\[1\]\[1\]"):
        write_json(target, {"steps": 2, "losses": [[0, 0.5], [1, value]]})
    assert list(tmp_path.iterdir()) == []                     # neither the file nor a temporary


@pytest.mark.reliability("outputs")
def test_dumps_strict_is_json_dumps_for_finite_values():
    obj = {"b": [1, 2.5, None, "x"], "a": {"c": True}}
    assert dumps_strict(obj, sort_keys=True) == json.dumps(obj, sort_keys=True)


@pytest.mark.reliability("outputs")
def test_a_model_config_with_nan_is_refused_and_leaves_no_folder(tmp_path):
    with pytest.raises(NonFiniteError, match="sigma_data"):
        write_model_folder(tmp_path / "m", {"class": "X", "sigma_data": math.nan}, {"w": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.reliability("outputs")
def test_write_json_round_trips(tmp_path):
    obj = {"x": [1.0, -2.0], "name": "ω"}
    assert json.loads(write_json(tmp_path / "a" / "b.json", obj).read_text(encoding="utf-8")) == obj


# ----- permissions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                          (0o002, 0o664, 0o775)])
@pytest.mark.reliability("outputs")
def test_outputs_get_the_permissions_the_umask_gives(tmp_path, umask, mask, file_mode, folder_mode):
    umask(mask)
    with atomic_path(tmp_path / "x.npz") as tmp:
        tmp.write_bytes(b"data")
    write_json(tmp_path / "r.json", {"a": 1})
    write_model_folder(tmp_path / "m", {"class": "X"}, {"w": torch.zeros(2)})
    assert _mode(tmp_path / "x.npz") == file_mode and _mode(tmp_path / "r.json") == file_mode
    assert _mode(tmp_path / "m") == folder_mode
    assert {_mode(p) for p in (tmp_path / "m").iterdir()} == {file_mode}


@pytest.mark.reliability("outputs")
def test_a_replaced_folder_gets_the_umask_permissions_too(tmp_path, umask):
    write_model_folder(tmp_path / "m", {"class": "X"}, {"w": torch.zeros(2)})
    write_model_folder(tmp_path / "m", {"class": "Y"}, {"w": torch.ones(2)}, overwrite=True)
    assert _mode(tmp_path / "m") == 0o755
    assert json.loads((tmp_path / "m" / "config.json").read_text())["class"] == "Y"
    assert _hidden(tmp_path) == []


# ----- atomicity -----------------------------------------------------------------------------------
@pytest.mark.reliability("outputs")
def test_a_failed_write_keeps_the_old_output_and_leaves_no_temporary(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "x.npz") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    write_model_folder(tmp_path / "m", {"class": "X"}, {"w": torch.zeros(2)})
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "m", overwrite=True) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("interrupted")
    assert (tmp_path / "x.npz").read_bytes() == b"old"
    assert json.loads((tmp_path / "m" / "config.json").read_text())["class"] == "X"
    assert _hidden(tmp_path) == []


@pytest.mark.reliability("outputs")
def test_atomic_folder_refuses_an_existing_folder_without_overwrite(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"), atomic_folder(tmp_path / "m"):
        pass


# ----- what a killed write leaves behind -----------------------------------------------------------
KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from difflab.core.io import atomic_folder, atomic_path
    target = sys.argv[1]
    cm = atomic_folder(target, overwrite=True) if sys.argv[2] == "folder" else atomic_path(target)
    tmp = cm.__enter__()
    if sys.argv[2] == "folder":
        (tmp / "config.json").write_text("half")
    else:
        tmp.write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _kill_a_writer(target: Path, kind: str) -> None:
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target), kind], capture_output=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == -9, done.stderr.decode()[-2000:]


@pytest.mark.reliability("outputs")
def test_the_next_write_removes_what_a_sigkill_left(tmp_path):
    _kill_a_writer(tmp_path / "x.npz", "file")
    _kill_a_writer(tmp_path / "m", "folder")
    left = _hidden(tmp_path)
    assert len(left) == 2 and all(name.endswith(".tmp") for name in left)
    with atomic_path(tmp_path / "x.npz") as tmp:
        tmp.write_bytes(b"whole")
    write_model_folder(tmp_path / "m", {"class": "X"}, {"w": torch.zeros(2)})
    assert _hidden(tmp_path) == []
    assert (tmp_path / "x.npz").read_bytes() == b"whole"


@pytest.mark.reliability("outputs")
def test_an_interrupted_swap_and_old_style_temporaries_are_removed(tmp_path):
    (tmp_path / ".m.old").mkdir()                             # killed between the two renames of a swap
    (tmp_path / ".m.old" / "config.json").write_text("{}")
    (tmp_path / ".m.ab12cd_3").mkdir()                        # a temp folder of an earlier difflab
    (tmp_path / ".x.png.k9x2m4q1").write_bytes(b"")           # a figure temporary of an earlier difflab
    write_model_folder(tmp_path / "m", {"class": "X"}, {"w": torch.zeros(2)})
    with atomic_path(tmp_path / "x.png") as tmp:
        tmp.write_bytes(b"png")
    assert _hidden(tmp_path) == []


@pytest.mark.reliability("concurrency")
def test_a_live_temporary_and_unrelated_files_are_kept(tmp_path):
    live = tmp_path / ".x.npz.abcd1234.tmp"
    live.write_bytes(b"another process is writing this")
    keep = [tmp_path / ".x.npz.lock", tmp_path / ".x.npz.notes", tmp_path / ".y.npz.abcd1234.tmp",
            tmp_path / "x.npz.abcd1234.tmp"]
    for path in keep:
        path.write_bytes(b"")
    with open(live, "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)                    # what a live writer holds
        assert remove_stale_temporaries(tmp_path / "x.npz") == []
    assert all(path.exists() for path in [live, *keep])
    assert remove_stale_temporaries(tmp_path / "x.npz") == [live]


@pytest.mark.reliability("concurrency")
def test_a_temporary_removed_by_a_cleaner_before_it_was_held_is_made_again(tmp_path, monkeypatch):
    import difflab.core.io as io

    made = []
    real_flock = fcntl.flock

    def flock_after_a_cleaner(fd, operation):
        if not made:                                          # a cleaner got there first and removed it
            made.append(os.readlink(f"/proc/self/fd/{fd}"))
            os.unlink(made[0])
        return real_flock(fd, operation)

    monkeypatch.setattr(io.fcntl, "flock", flock_after_a_cleaner)
    with atomic_path(tmp_path / "x.npz") as tmp:
        tmp.write_bytes(b"data")
    assert made and str(tmp) != made[0] and (tmp_path / "x.npz").read_bytes() == b"data"
