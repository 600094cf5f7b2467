"""Atomic file and folder writes: build beside the target, then rename, so a crash never leaves half a file.

Every file the toolkit writes that someone may read later (configs, weights, checkpoints, datasets, images,
metrics) goes through these helpers; readers then see the old content or the new, never a torn one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from imagen.errors import OutputError

# Temporary files are created private (0600, 0700); what they become gets the modes of any other file the
# process writes, so config.json and weights are as readable as metrics.jsonl.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def _hint(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space or write elsewhere"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "choose a folder you can write to"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a file is in the way of a folder on that path; choose another path"
    if exc.errno == errno.EISDIR:
        return "it is a folder; name a file inside it"
    return "check the path"


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failed write of `path` into one OutputError line: what, where, and what to do."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}; {_hint(exc)}") from None
    except Exception as exc:
        # torch.save and safetensors report a full disk as their own errors ("PytorchStreamWriter failed writing
        # file", "SafetensorError: ... No space left on device (os error 28)").
        text = str(exc)
        if not any(s in text for s in ("No space left", "os error 28", "PytorchStreamWriter", "file write failed")):
            raise
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        raise OutputError(f"cannot write {path}: the write failed with {free / 2**20:.0f} MiB free on its disk; "
                          "free some space or write elsewhere") from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; write it inside the block, and it replaces `path` on success.

    On any exception (Ctrl-C included) the temporary file is removed and `path` keeps its old content.
    """
    path = Path(path)
    with _writing(path):
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
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
    with _writing(path):
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
