"""What a report shows, read from finished run directories (nothing is trained or evaluated here).

An encoder run (pretrain, classify, ...) is one stage; a text-to-image run has one per cascade stage (base, sr1,
...), each with its own metrics.jsonl and sample grids. Evaluation results are what `imagen evaluate` and
`imagen evaluate-t2i` left in RUN/eval/ (JSON results, confusion matrices, sample grids).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagen.errors import RunError
from imagen.runs import CONFIG_NAME, WEIGHTS_NAME
from imagen.tasks.text_to_image import TASK as T2I_TASK
from imagen.train.loggers import METRICS_FILE

# metrics.jsonl bookkeeping fields, not curves; samples_per_s is throughput, not training progress.
NOT_CURVES = {"step", "epoch", "split", "samples_per_s"}
STEP_GRID = re.compile(r"step-(\d+)\.png$")


@dataclass
class StageRecord:
    """One trained network of a run: its logged records and its sample grids over training (step, PNG bytes)."""

    name: str  # "" for an encoder run, the stage name (base, sr1) for a cascade
    records: list[dict[str, Any]]
    grids: list[tuple[int, bytes]] = field(default_factory=list)
    finished: bool = True


@dataclass
class RunRecord:
    """Everything a report shows about one run."""

    path: Path
    task: str
    config: dict[str, Any]
    stages: list[StageRecord]
    evals: list[dict[str, Any]]  # eval/*.json results, each with "file": the JSON's name
    eval_images: list[tuple[str, bytes]]  # (file name, PNG bytes): confusion matrices, evaluation sample grids
    name: str = ""  # how the report names the run: its folder name (with its parent's when two runs share one)

    def __post_init__(self):
        self.name = self.name or self.path.name

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.stages)

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.config.get("data") or {})


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a torn last line, from a crash, is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _grids(folder: Path) -> list[tuple[int, bytes]]:
    found = [(int(m.group(1)), p) for p in folder.glob("step-*.png") if (m := STEP_GRID.search(p.name))]
    return [(step, p.read_bytes()) for step, p in sorted(found)]


def _evals(run: Path) -> tuple[list[dict[str, Any]], list[tuple[str, bytes]]]:
    folder = run / "eval"
    results = []
    for path in sorted(folder.glob("*.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(result, dict):
            results.append({"file": path.name, **result})
    images = [(p.name, p.read_bytes()) for p in sorted(folder.glob("*.png"))]
    return results, images


def read_run(path: str | Path) -> RunRecord:
    """A run directory's config, curves, sample grids and evaluation results; RunError when it is not a run."""
    run = Path(path)
    if not run.is_dir():
        raise RunError(f"run directory {run} does not exist")
    config_path = run / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{run} is not a run directory (no {CONFIG_NAME}); pass the --out folder of an imagen training command") from None
    except (OSError, ValueError) as e:
        raise RunError(f"{config_path} cannot be read ({e}); re-run training to recreate it") from None
    if not isinstance(config, dict) or "task" not in config:
        raise RunError(f"{config_path} is not an imagen run config (no 'task')")
    task = config["task"]
    if task == T2I_TASK:
        stages = [StageRecord(name, read_metrics(run / name / METRICS_FILE), _grids(run / name / "samples"),
                              (run / name / WEIGHTS_NAME).is_file()) for name in config.get("stages", [])]
    else:
        stages = [StageRecord("", read_metrics(run / METRICS_FILE), [], (run / WEIGHTS_NAME).is_file())]
    evals, images = _evals(run)
    return RunRecord(run, task, config, stages, evals, images)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config dicts as dotted keys ("model.dim": 64); lists of plain values stay one value."""
    if not isinstance(config, dict):
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def curve_keys(records: list[dict[str, Any]]) -> list[str]:
    """The numeric fields logged in `records`, loss first, then lr, then the rest in first-seen order."""
    keys: list[str] = []
    for r in records:
        for k, v in r.items():
            if k not in NOT_CURVES and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    order = {"loss": 0, "lr": 1}
    return sorted(keys, key=lambda k: (order.get(k, 2), keys.index(k)))
