"""Atomic file and folder writes: build beside the target, then rename, so a crash never leaves half a file.

Every file the toolkit writes that someone may read later (configs, weights, checkpoints, datasets, images,
metrics) goes through these helpers; readers then see the old content or the new, never a torn one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# Temporary files are created private (0600, 0700); what they become gets the modes of any other file the
# process writes, so config.json and weights are as readable as metrics.jsonl.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; write it inside the block, and it replaces `path` on success.

    On any exception (Ctrl-C included) the temporary file is removed and `path` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; fill it inside the block, and it becomes `path` on success.

    An existing `path` must be empty unless `replace` is set (then it is swapped out and deleted).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        if path.exists():
            if replace:
                trash = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.trash-"))
                os.replace(path, trash / path.name)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                path.rmdir()  # rename cannot replace a directory on every platform
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON (indented, UTF-8, trailing newline) atomically."""
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_json_lines(path: str | os.PathLike, rows: list[Any]) -> Path:
    """Write one JSON object per line atomically."""
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
