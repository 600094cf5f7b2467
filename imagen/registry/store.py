"""A model registry on disk: numbered versions (ordinary run directories), which one is current, and its history.

    models/NAME/
      versions/0001/    the run a registry starts from (a copy, without its training checkpoints)
      versions/0002/    each refresh's candidate, trained here, promoted or not
      current           a symbolic link to versions/NNNN: the version that serves
      history.jsonl     one JSON object per event (init, refresh): data, metrics of both, decision, time
      .lock             held (flock) by the process changing the registry

`current` only ever changes by `os.replace` of a fresh link onto it, which is atomic: a reader (or a crash) sees
the old version or the new one, never a half-written one, and a version is finished before it can be pointed at.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from imagen.atomic import atomic_dir
from imagen.errors import ConfigError, RunError
from imagen.runs import CONFIG_NAME, LOCK_NAME, WEIGHTS_NAME
from imagen.tasks.registry import FINETUNE_TASKS

VERSIONS = "versions"
CURRENT = "current"
HISTORY = "history.jsonl"
VERSION_NAME = re.compile(r"^\d{4,}$")
# What a copied run leaves behind: its resumable training state and the lock of the process that wrote it.
NOT_COPIED = ("checkpoints", LOCK_NAME)


def version_name(number: int) -> str:
    return f"{number:04d}"


def _run_task(run: Path) -> str:
    """The task of a finished run directory, or a RunError saying why it cannot seed a registry."""
    if not run.is_dir():
        raise RunError(f"run directory {run} does not exist")
    try:
        config = json.loads((run / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise RunError(f"{run} is not a run directory (no {CONFIG_NAME}); pass the --out folder of `imagen finetune`") from None
    except ValueError as e:
        raise RunError(f"{run / CONFIG_NAME} is damaged ({e}); train the run again") from None
    task = config.get("task") if isinstance(config, dict) else None
    if task not in FINETUNE_TASKS:
        raise RunError(f"{run} is a {task!r} run; a registry keeps fine-tuned runs ({', '.join(FINETUNE_TASKS)}), "
                       "which `imagen refresh` can fine-tune further")
    if not (run / WEIGHTS_NAME).is_file():
        raise RunError(f"{run} is not a finished run (no {WEIGHTS_NAME}); finish it with --resume first")
    return task


class Registry:
    """A registry folder: its versions, the current one, its history."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def versions_dir(self) -> Path:
        return self.path / VERSIONS

    @property
    def history_path(self) -> Path:
        return self.path / HISTORY

    @classmethod
    def open(cls, path: str | Path) -> "Registry":
        """An existing registry, or a RunError naming what is missing."""
        reg = cls(path)
        if not reg.path.is_dir():
            raise RunError(f"registry {reg.path} does not exist; create it with `imagen registry init {reg.path} --run RUN`")
        if not (reg.path / CURRENT).is_symlink() or not reg.versions_dir.is_dir():
            raise RunError(f"{reg.path} is not a model registry (no {CURRENT} link or {VERSIONS}/ folder); "
                           f"create one with `imagen registry init NEW_PATH --run RUN`")
        return reg

    def versions(self) -> list[str]:
        return sorted(p.name for p in self.versions_dir.iterdir() if VERSION_NAME.match(p.name)) if self.versions_dir.is_dir() else []

    def current(self) -> str:
        """The name of the current version (its folder under versions/)."""
        target = Path(os.readlink(self.path / CURRENT))
        return target.name

    def current_path(self) -> Path:
        return self.versions_dir / self.current()

    def next_version(self) -> str:
        existing = self.versions()
        return version_name(int(existing[-1]) + 1 if existing else 1)

    def point_current(self, version: str) -> None:
        """Make `version` (finished) the current one: a new link beside `current`, renamed onto it (atomic)."""
        if not (self.versions_dir / version / WEIGHTS_NAME).is_file():
            raise RunError(f"version {version} of {self.path} is not finished; it cannot become current")
        tmp = self.path / f".{CURRENT}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(Path(VERSIONS) / version, tmp)  # relative: the registry folder can be moved or copied whole
        try:
            os.replace(tmp, self.path / CURRENT)
        finally:
            tmp.unlink(missing_ok=True)

    def append_history(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Append one event as one line, written whole by one write() on a file opened for appending."""
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry}
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.history_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return entry

    def history(self) -> list[dict[str, Any]]:
        if not self.history_path.is_file():
            return []
        return [json.loads(line) for line in self.history_path.read_text(encoding="utf-8").splitlines() if line.strip()]

    @contextmanager
    def locked(self) -> Iterator["Registry"]:
        """Hold the registry's lock, so two refreshes never number or promote versions at the same time."""
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise RunError(f"registry {self.path} is being changed by another imagen process (pid {holder}); "
                               "wait for it to finish") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield self
        finally:
            os.close(fd)


def init_registry(path: str | Path, run: str | Path, echo=print) -> Registry:
    """Create a registry at `path` (absent or empty) whose version 0001, current, is a copy of the finished `run`."""
    path, run = Path(path), Path(run)
    task = _run_task(run)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{path} already exists and is not an empty folder; choose a new registry path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir() or not os.access(parent, os.W_OK):
                raise ConfigError(f"cannot create {path}: {parent} is not a folder you can write to")
            break
    first = version_name(1)
    with atomic_dir(path) as tmp:  # the whole registry appears at once, or not at all
        shutil.copytree(run, tmp / VERSIONS / first, ignore=shutil.ignore_patterns(*NOT_COPIED), symlinks=True)
        os.symlink(Path(VERSIONS) / first, tmp / CURRENT)
        reg = Registry(tmp)
        reg.append_history({"event": "init", "version": first, "run": str(run.resolve()), "task": task, "decision": "current",
                            "reason": "the registry's first version"})
    echo(f"created registry {path}: version {first} (a copy of {run}) is current")
    return Registry(path)
