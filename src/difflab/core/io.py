"""Output files written in chunks, atomically: memory stays flat in the number of samples and a
failed run leaves no file behind (work goes to a hidden temporary file, renamed only on success)."""
from __future__ import annotations

import os
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path`; renamed to `path` if the block succeeds. If it fails, the
    temporary file and any folders made for it are removed."""
    path = Path(path)
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        for folder in made:                 # innermost first
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
        raise


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
