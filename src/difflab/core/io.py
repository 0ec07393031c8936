"""Everything difflab writes goes through here: one atomic write for files (`atomic_path`), one for
folders (`atomic_folder`), strict JSON (`write_json`, `dumps_strict`) and `npz_rows` for outputs
written in chunks, so memory stays flat in the number of samples.

The work goes to a hidden temporary beside the target (`.NAME.XXXXXXXX.tmp`), renamed into place
only if the block succeeds, so a failed run leaves nothing behind and a crash leaves either the old
output or the new one. Outputs get the permissions the umask gives (0644 / 0755 under the usual
022), not the 0600 / 0700 of `tempfile`. A writer holds an advisory lock on its temporary; the next
write of the same output removes the temporaries nobody holds (what a SIGKILL left) and the
`.NAME.old` of an interrupted folder swap.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from difflab.core.errors import NonFiniteError

try:
    import fcntl
except ImportError:            # Windows: no flock, so leftovers cannot be told from live writes and stay
    fcntl = None

TEMP_SUFFIX = ".tmp"
_RANDOM_PART = r"[a-z0-9_]{8}"       # tempfile's random names


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path`; renamed to `path` if the block succeeds. If it fails, the
    temporary file and any folders made for it are removed."""
    path = Path(path)
    made = _make_parents(path)
    try:
        remove_stale_temporaries(path)
        with _temporary(path, folder=False) as tmp:
            yield tmp
            _give_umask_permissions(tmp)
            os.replace(tmp, path)
    except BaseException:
        _remove_empty(made)
        raise


@contextmanager
def atomic_folder(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; if the block succeeds it takes the place of `path`
    (an existing `path` only when `overwrite`: FileExistsError otherwise). If it fails, the temporary
    folder and any parent folders made for it are removed and an existing `path` is left as it was."""
    path = Path(path)
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --force) to replace it")
    made = _make_parents(path)
    try:
        remove_stale_temporaries(path)
        with _temporary(path, folder=True) as tmp:
            yield tmp
            _give_umask_permissions(tmp)
            _swap_into_place(tmp, path)
    except BaseException:
        _remove_empty(made)
        raise


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
               default: Callable[[Any], Any] | None = None) -> Path:
    """Write `obj` as strict JSON (NonFiniteError for a NaN or an infinity), atomically. Returns the path."""
    text = dumps_strict(obj, indent=indent, sort_keys=sort_keys, default=default)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return Path(path)


def dumps_strict(obj: Any, **kwargs) -> str:
    """`json.dumps` that refuses NaN and ±inf (which `json.dumps` writes as invalid JSON), saying where."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError as err:
        if "JSON compliant" not in str(err):
            raise
        where = _nonfinite_key(obj)
        what = f"{where[0]} is {where[1]}" if where else "a value is NaN or infinite"
        raise NonFiniteError(f"{what}: JSON has no NaN or infinity, so difflab does not write it "
                             "(a diverged run or a degenerate metric)") from err


def _nonfinite_key(obj: Any, where: str = "") -> tuple[str, float] | None:
    """(where, value) of the first NaN / ±inf float in nested dicts and lists, e.g. ("losses[3][1]", nan)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "the value", obj
    if isinstance(obj, dict):
        children = ((f"{where}.{key}" if where else str(key), value) for key, value in obj.items())
    elif isinstance(obj, (list, tuple)):
        children = ((f"{where}[{i}]", value) for i, value in enumerate(obj))
    else:
        return None
    return next(filter(None, (_nonfinite_key(value, key) for key, value in children)), None)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove what killed writes of `path` left beside it: `.NAME.XXXXXXXX.tmp` files and folders that
    no live writer holds, and `.NAME.old` (the previous folder of an interrupted swap). Returns them."""
    path = Path(path)
    if fcntl is None or not path.parent.is_dir():
        return []
    temporary = re.compile(re.escape(f".{path.name}.") + _RANDOM_PART + rf"({re.escape(TEMP_SUFFIX)})?")
    removed = []
    for entry in os.scandir(path.parent):
        if entry.name == f".{path.name}.old" or (temporary.fullmatch(entry.name) and _nobody_holds(entry.path)):
            _remove(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


def _nobody_holds(temp: str) -> bool:
    """Whether no writer holds the lock on this temporary (a killed process's lock is gone with it)."""
    try:
        fd = os.open(temp, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)          # a writer that waited for this lock then sees its temporary gone, and retries


@contextmanager
def _temporary(path: Path, folder: bool) -> Iterator[Path]:
    """A new temporary file or folder beside `path`, locked while the block runs; removed after unless
    the block renamed it away."""
    fd, tmp = _create_held(path, folder)
    try:
        yield tmp
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)
        if fd >= 0:
            os.close(fd)


def _create_held(path: Path, folder: bool, tries: int = 5) -> tuple[int, Path]:
    """(descriptor holding the lock, path) of a new temporary (mode 0600 / 0700 until it is complete)."""
    for _ in range(tries):
        if folder:
            name = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY)
        else:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)      # waits only while a cleaner looks at it
        if os.fstat(fd).st_nlink > 0:           # 0: a cleaner removed it before we held it
            if fcntl is None:                   # nothing to hold, and Windows cannot rename an open file
                os.close(fd)
                fd = -1
            return fd, Path(name)
        os.close(fd)
    raise OSError(f"could not keep a temporary beside {path}: another process keeps removing them")


def _give_umask_permissions(tmp: Path) -> None:
    """0666 / 0777 less the umask for the temporary and everything in it: tempfile makes 0600 / 0700,
    and writers that rename their own temporary into place (safetensors) leave 0600."""
    mask = _umask()
    os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~mask)
    for root, folders, files in os.walk(tmp) if tmp.is_dir() else ():
        for names, mode in ((folders, 0o777), (files, 0o666)):
            for name in names:
                if not os.path.islink(entry := os.path.join(root, name)):     # never a file outside
                    os.chmod(entry, mode & ~mask)


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask must set it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _swap_into_place(tmp: Path, path: Path) -> None:
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old")
    _remove(old)
    os.replace(path, old)
    os.replace(tmp, path)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _make_parents(path: Path) -> list[Path]:
    """Create the missing parent folders of `path`; returns them, innermost first."""
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return made


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:                 # innermost first
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


class NpyRows:
    """The rows of one array [n, *row_shape] streamed into an open zip entry `key.npy`.

    The .npy header (shape, and the dtype of the first rows) goes first, then each chunk's bytes
    in C order, so only one chunk is ever in memory.
    """

    def __init__(self, archive: zipfile.ZipFile, key: str, shape: tuple[int, ...]):
        self.archive, self.key, self.shape = archive, key, shape
        self.written, self.dtype, self._entry = 0, None, None

    def write(self, rows) -> None:
        """Append rows [m, *row_shape] (a numpy array or a CPU tensor)."""
        rows = np.ascontiguousarray(rows.numpy() if hasattr(rows, "numpy") else rows)
        if tuple(rows.shape[1:]) != self.shape[1:] or self.written + len(rows) > self.shape[0]:
            raise ValueError(f"rows {tuple(rows.shape)} do not fit the array {self.shape} after {self.written} rows")
        if self._entry is None:
            self.dtype = rows.dtype
            self._entry = self.archive.open(f"{self.key}.npy", "w", force_zip64=True)
            np.lib.format.write_array_header_1_0(self._entry, {
                "descr": np.lib.format.dtype_to_descr(rows.dtype), "fortran_order": False, "shape": self.shape})
        elif rows.dtype != self.dtype:
            raise ValueError(f"rows of dtype {rows.dtype} after rows of dtype {self.dtype}")
        self._entry.write(memoryview(rows).cast("B"))
        self.written += len(rows)

    def close(self) -> None:
        if self._entry is not None:
            self._entry.close()


@contextmanager
def npz_rows(path: str | Path, n: int, row_shape: Sequence[int], key: str = "x") -> Iterator[NpyRows]:
    """Write an .npz holding one array `key` [n, *row_shape], a chunk of rows at a time.

    `np.load(path)[key]` reads it like any `np.savez` output. The file appears (atomically) only if
    the block succeeds and exactly n rows were written; otherwise nothing is left behind.
    """
    shape = (int(n), *(int(d) for d in row_shape))
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        rows = NpyRows(archive, key, shape)
        try:
            yield rows
        finally:
            rows.close()
        if rows.written != shape[0]:
            raise ValueError(f"{path}: {rows.written} rows written of {shape[0]}; not saving a partial file")
