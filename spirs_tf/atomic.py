"""Atomic file output: write to a temporary file in the destination folder, then rename.

A reader never sees a half-written file, and an exception (or a kill) during the write leaves the
destination as it was. Outputs are never allowed to overwrite one of the run's inputs.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Iterator

import numpy as np

from spirs_tf.errors import SpirsInputError

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _suffix(path: str) -> str:
    name = os.path.basename(path)
    for double in (".nii.gz", ".seg.nrrd", ".weights.h5", ".tar.gz"):
        if name.endswith(double):
            return double
    return os.path.splitext(name)[1]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, protect: tuple = ()) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    The temporary name keeps the extension (so writers that dispatch on it work). ``protect`` lists
    input files that must never be overwritten; naming one of them is an error.
    """
    path = os.fspath(path)
    for p in protect:
        if p is not None and os.path.exists(path) and os.path.exists(p) and os.path.samefile(path, p):
            raise SpirsInputError("refusing to overwrite an input file", path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=_suffix(path), dir=folder)
    os.close(fd)
    try:
        yield tmp
        if os.path.isfile(tmp):  # mkstemp makes 0600 files; give outputs the usual permissions
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(x):
    """Nested structure → JSON-safe, the one rule of every JSON file spirs-tf writes: NumPy scalars
    and arrays to Python, NaN to ``null``, ±infinity to the strings ``"inf"``/``"-inf"`` (as in the
    CSV tables; e.g. the HD95 of a missed lesion), dict keys to strings."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return None if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else v)
    return x.item() if isinstance(x, np.generic) else x


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write :func:`json_safe` ``(obj)`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")
