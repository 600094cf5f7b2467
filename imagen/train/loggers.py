"""Experiment logs: RUN/metrics.jsonl always, TensorBoard and offline wandb when asked for."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from imagen.atomic import write_text

METRICS_FILE = "metrics.jsonl"


def _plain(value):
    """A JSON-safe scalar: tensors become floats, NaN / inf become None (JSON has no NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Writes one JSON object per logged step to RUN/metrics.jsonl, mirrored to TensorBoard / wandb."""

    def __init__(self, run_dir, report_to=("jsonl",), config_dict: dict | None = None, *,
                 resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume_step is None:
            self.path.write_text("")  # a fresh run starts a fresh log
        else:
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tensorboard = self._open_tensorboard(resume_step) if "tensorboard" in report_to else None
        self._wandb = self._open_wandb(config_dict or {}, resume_step) if "wandb" in report_to else None

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after `step`, so a resumed run's log matches an uninterrupted one."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line torn by the crash
        write_text(self.path, "".join(kept))

    def _open_tensorboard(self, resume_step):
        """A SummaryWriter under RUN/tensorboard, or None when tensorboard is not installed."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        # purge_step hides events a crashed run wrote after the checkpoint we resume from.
        purge = None if resume_step is None else resume_step + 1
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)

    def _open_wandb(self, config_dict, resume_step):
        """An offline wandb run stored under RUN/wandb."""
        try:
            import wandb
        except ImportError:
            raise RuntimeError(
                "report_to includes 'wandb' but wandb is not installed; "
                "run `pip install wandb` or drop wandb from train.report_to"
            ) from None
        os.environ["WANDB_MODE"] = "offline"  # never reach the network from training
        return wandb.init(
            project="imagen", dir=str(self.run_dir), config=config_dict, mode="offline",
            name=self.run_dir.name, resume="allow" if resume_step is not None else None,
        )

    def log(self, step: int, epoch: float, split: str, values: dict) -> None:
        """Append one record {step, epoch, split, **values} to every backend."""
        values = {k: _plain(v) for k, v in values.items()}
        record = {"step": step, "epoch": epoch, "split": split, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a crash loses at most the line being written
        scalars = {f"{split}/{k}": v for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tensorboard is not None:
            for tag, value in scalars.items():
                self._tensorboard.add_scalar(tag, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def log_images(self, step: int, images: dict) -> None:
        """Image summaries {tag: (H, W, 3) uint8 array} (sample grids) to TensorBoard and wandb; metrics.jsonl
        holds scalars only (the task keeps its own image files)."""
        if self._tensorboard is not None:
            for tag, image in images.items():
                self._tensorboard.add_image(tag, image, step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(image) for tag, image in images.items()}, step=step)

    def close(self) -> None:
        """Flush and close every backend."""
        if not self._file.closed:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class NullLogger:
    """What ranks other than 0 of a multi-process job log to: nothing (rank 0 writes the run's logs)."""

    def log(self, *args, **kwargs) -> None:
        pass

    def log_images(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass
