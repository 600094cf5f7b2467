"""Run directories: the one lifecycle that creates or resumes them, and their config.json.

Layout (DESIGN.md): config.json, tokenizer.json, model.safetensors, metrics.jsonl, checkpoints/, eval/.
A run is complete only once model.safetensors exists; the trainer writes it last, atomically. Loading a
finished run back as a model needs its task, so `load` lives with the tasks (imagen/tasks/loading.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from imagen.errors import RunError
from imagen.config import EncoderConfig, TrainConfig, from_dict, to_dict
from imagen.data.tokenizer import Tokenizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"




# Training options that --resume may change (the run records the new value): how long to train and how to watch
# it, not what is trained. Any other change would make the run differ from what its config says it is.
RESUMABLE_TRAIN_OPTIONS = frozenset({"max_steps", "epochs", "eval_every", "early_stopping_patience", "checkpoint_every",
                                     "keep_checkpoints", "log_every", "progress", "report_to", "device", "num_workers",
                                     "compile"})

LOCK_NAME = ".lock"  # held (flock) by the process writing the run; the kernel releases it if the process dies


def check_new_run_dir(out: Path, error: type[Exception] = RunError,
                      when_taken: str = "choose a new directory or pass --resume to continue it") -> None:
    """Refuse an --out that would overwrite something: it must be absent or an empty folder we can write in (a lock
    file left by an earlier attempt does not count). `error` and `when_taken` let other writers (export) say it
    their way."""
    if out.exists() and not out.is_dir():
        raise error(f"--out {out} is a file; choose a directory path")
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise error(f"--out {out} already exists and is not empty; {when_taken}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise error(f"--out {out}: {parent} is a file, not a folder; choose another path")
            if not os.access(parent, os.W_OK):
                raise error(f"--out {out}: cannot write in {parent} (permission denied); choose a folder you can write to")
            break


def check_run_dir(out: Path, resume: bool) -> None:
    """What `open_run` checks before it creates anything: a resumed run holds a config.json, a new one has room."""
    if resume:
        if not (Path(out) / CONFIG_NAME).is_file():
            raise RunError(f"cannot resume: {out} is not a run directory (no {CONFIG_NAME}); start a new run without --resume")
    else:
        check_new_run_dir(Path(out))


def _lock(out: Path) -> int:
    """An exclusive lock on the run directory for this process, or a RunError naming the process that holds it."""
    try:
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunError(f"--out {out}: cannot write there ({e.strerror}); choose a folder you can write to") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunError(f"--out {out} is being written by another imagen process (pid {holder}); "
                       "wait for it to finish, or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def run_in_use(out: Path) -> bool:
    """Whether a live process holds `out`'s lock (the kernel drops the lock of a process that died, even by SIGKILL)."""
    try:
        fd = os.open(Path(out) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


class RunDir:
    """A run directory held by this process: `path`, and `commit()` once its setup is written."""

    def __init__(self, path: Path, created: bool):
        self.path = path
        self.created = created  # this process made the folder (else it existed, empty or as a run)
        self.committed = False

    def commit(self) -> None:
        """Setup is done (config.json written): from now on a failure keeps the run, to be resumed."""
        self.committed = True

    def discard_setup(self, resume: bool) -> None:
        """Remove what an unfinished setup made: the folder, or its contents when it was an empty folder given."""
        if resume:
            return
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for child in self.path.iterdir():
            if child.name == LOCK_NAME:
                continue
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() and not child.is_symlink() else child.unlink(missing_ok=True)


@contextmanager
def open_run(out: str | Path, resume: bool, writer: bool = True) -> Iterator[RunDir]:
    """The one lifecycle of a run directory, for every command that trains: check, then create, lock, set up, commit.

    A fresh run's `out` must be absent or empty, a resumed one must hold a run's config.json; both are checked
    before anything is created. The directory is locked for the whole block: a second process on the same `out`
    gets a RunError at once instead of interleaving its writes. Until `run.commit()` a failure (a bad option,
    unreadable data, no such device, Ctrl-C, SIGTERM) removes everything the block made, so a failed start never
    blocks the folder; after it, a failure keeps the run and its checkpoints for --resume.

    In a multi-process job only rank 0 is the `writer`; the other ranks get the path and touch nothing (their
    machine may not even have the folder).
    """
    out = Path(out)
    if not writer:
        yield RunDir(out, created=False)
        return
    check_run_dir(out, resume)
    if resume:
        created = False
    else:
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"--out {out}: cannot create it ({e.strerror}); choose a folder you can write to") from None
    try:
        fd = _lock(out)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    run = RunDir(out, created)
    try:
        if not resume:
            check_new_run_dir(out)  # another process may have filled it between the first check and the lock
        yield run
    except BaseException:
        if not run.committed:
            run.discard_setup(resume)
        raise
    finally:
        os.close(fd)  # releases the lock


def check_resume_changes(changes: list[tuple[str, Any, Any]], where: Path) -> None:
    """Refuse --resume when settings other than RESUMABLE_TRAIN_OPTIONS differ from the run's ("train.lr", old, new)."""
    refused = [c for c in changes if not (c[0].startswith("train.") and c[0][len("train."):] in RESUMABLE_TRAIN_OPTIONS)]
    if refused:
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in refused)
        raise RunError(f"--resume continues {where} as it was configured, but these differ: {listed}; drop them to "
                       f"resume, or start a new run (only {', '.join(sorted(RESUMABLE_TRAIN_OPTIONS))} may change)")


def read_config(run: str | Path) -> dict[str, Any]:
    """The parsed config.json of a run directory, with one-line errors for anything wrong."""
    run = Path(run)
    if not run.exists():
        raise RunError(f"run directory {run} does not exist")
    path = run / CONFIG_NAME
    if not path.is_file():
        raise RunError(f"{run} is not a run directory (no {CONFIG_NAME}); pass the --out folder of an imagen pretrain/finetune run")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is damaged ({e.msg if hasattr(e, 'msg') else e}); re-run training to recreate it") from None
    if isinstance(config, dict) and config.get("task") == "text-to-image":
        raise RunError(f"{run} is a text-to-image run; use `imagen generate` or `imagen evaluate-t2i` with it")
    if not isinstance(config, dict) or "task" not in config or "model" not in config:
        raise RunError(f"{path} is not an imagen run config (missing 'task' or 'model')")
    return config


@dataclass
class RunConfig:
    """Everything config.json holds: which task, the model, the training setup, the task's options and the data.

    The task's options (its `Config` dataclass) are kept as a dict under "task_config"; the task turns them back
    into its dataclass. Runs written before every task spoke one contract kept them under the task's own name
    ("classify", "pretrain"), which `from_json` still reads.
    """

    task: str
    model: EncoderConfig
    train: TrainConfig
    task_config: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    freeze: str = "none"

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "model": to_dict(self.model), "train": to_dict(self.train),
                "task_config": self.task_config, "class_names": self.class_names, "data": self.data,
                "init_from": self.init_from, "freeze": self.freeze}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunConfig":
        try:
            options = data.get("task_config")
            if options is None:
                options = data.get(data["task"])  # the earlier place: a section named after the task
            return cls(
                task=data["task"],
                model=from_dict(EncoderConfig, data["model"]),
                train=from_dict(TrainConfig, data.get("train", {})),
                task_config=dict(options or {}),
                class_names=data.get("class_names"),
                data=data.get("data", {}),
                init_from=data.get("init_from"),
                freeze=data.get("freeze", "none"),
            )
        except (TypeError, ValueError, KeyError) as e:
            raise RunError(f"config.json does not describe a valid run: {e}") from None


def load_tokenizer(run: str | Path) -> Tokenizer | None:
    """The run's tokenizer.json, or None for a run without text (image-only)."""
    path = Path(run) / TOKENIZER_NAME
    return Tokenizer.load(path) if path.is_file() else None
