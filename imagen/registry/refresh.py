"""`imagen refresh`: fine-tune the current version on new data, and promote the candidate only if it is not worse.

The tutorial this toolkit grew from says to "keep collecting new data and re-fine-tune the model periodically";
this is that loop, made safe to run unattended:
1. the candidate starts from the current version's weights (encoder and head) and trains on the new data mixed
   with `replay` (a share of the training examples) drawn back from the data the current version was trained on,
   so what the model knew is not forgotten;
2. current and candidate are scored on the same held-out data (the new data's test split unless `holdout` says
   otherwise), on one metric of the task (higher is better);
3. the candidate becomes current only when its score is at least the current one minus `tolerance`; otherwise it
   stays in versions/ unpromoted, and the reason is printed and recorded in history.jsonl.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from imagen.atomic import write_json
from imagen.config import DEFAULT_REFRESH_REPLAY, DEFAULT_REFRESH_TOLERANCE, TrainConfig, to_dict
from imagen.data import load_dataset
from imagen.data.registry import recorded_spec
from imagen.errors import ConfigError, DataError
from imagen.registry.store import Registry
from imagen.runs import CONFIG_NAME, TOKENIZER_NAME, open_run
from imagen.tasks.base import EvalData
from imagen.tasks.loading import load
from imagen.tasks.registry import get_task
from imagen.train import Trainer, seed_everything

log = logging.getLogger("imagen")

REFRESH_EVAL_NAME = "refresh-holdout.json"  # in the candidate's eval/: both scores, as `imagen report` shows them
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


def _check_options(replay: float, tolerance: float, train_options: dict[str, Any]) -> None:
    if not 0.0 <= replay < 1.0:
        raise ConfigError(f"--replay {replay} must be in [0, 1): the share of training examples drawn from the old data")
    if tolerance < 0:
        raise ConfigError(f"--tolerance {tolerance} must be at least 0")
    unknown = sorted(set(train_options) - TRAIN_KEYS)
    if unknown:
        raise ConfigError(f"unknown training option {unknown[0]!r}; refresh takes TrainConfig fields (max_steps, epochs, lr, ...)")


def _replayed(old: dict[str, Any], n_new: int, replay: float, task_cls, image_size: int, seed: int, on_bad_sample: str):
    """(images, meta) drawn from the current version's training data: replay / (1 - replay) examples per new one."""
    want = round(replay / (1.0 - replay) * n_new)
    if want == 0:
        return None, [], 0
    ds = load_dataset(old["spec"], "train", seed=old.get("seed", 0), label=old.get("label"), n=old.get("n"),
                      on_bad_sample=on_bad_sample)
    images, meta = task_cls.decode(ds, image_size)
    if want > len(meta):
        log.warning("replay %.2f asks for %d examples of the old data, which has %d; replaying all of them", replay, want, len(meta))
    pick = torch.randperm(len(meta), generator=torch.Generator().manual_seed(seed))[:want]
    return images[pick], [meta[int(i)] for i in pick], len(pick)


def _score(task_cls, rc, tokenizer, model, data: EvalData, metric: str) -> tuple[float | None, dict[str, Any], int]:
    score = task_cls(rc, tokenizer).evaluate_run(model, data, echo=lambda *a, **k: None)
    metrics = {k: (None if v is None or v != v else float(v)) for k, v in score.metrics.items()}
    return metrics.get(metric), metrics, score.n


def refresh(registry: str | Path, data: str, *, holdout: str | None = None, replay: float = DEFAULT_REFRESH_REPLAY,
            metric: str | None = None, tolerance: float = DEFAULT_REFRESH_TOLERANCE, on_bad_sample: str = "skip",
            echo=print, **train_options) -> dict[str, Any]:
    """Train a candidate version from the current one on `data` (+ replay), score both on the holdout, promote the
    candidate when it is not worse by more than `tolerance`; returns the history entry written."""
    _check_options(replay, tolerance, train_options)
    reg = Registry.open(registry)
    with reg.locked():
        current = reg.current()
        current_path = reg.current_path()
        loaded = load(current_path)
        rc = loaded.config
        task_cls = get_task(rc.task)
        metric = metric or task_cls.headline[0]
        if metric not in task_cls.headline:
            raise ConfigError(f"--metric {metric!r} is not a metric of the {rc.task} task; choose one of: {', '.join(task_cls.headline)}")
        if "epochs" in train_options and "max_steps" not in train_options:
            train_options = {**train_options, "max_steps": None}  # the epochs asked for, not the version's step count
        train_cfg = dataclasses.replace(rc.train, **train_options)
        task_cfg = task_cls.config_from(rc.task_config)
        label = task_cls.data_label(task_cfg, data) or rc.data.get("label")
        size = rc.model.image_size

        # Everything is read and checked before the candidate's folder is created.
        new_train = load_dataset(data, "train", seed=train_cfg.seed, label=label, on_bad_sample=on_bad_sample)
        task_cls.check_data(new_train, data)
        images, meta = task_cls.decode(new_train, size)
        n_new = len(meta)
        old_images, old_meta, n_old = _replayed(rc.data, n_new, replay, task_cls, size, train_cfg.seed, on_bad_sample)
        if n_old:
            images, meta = torch.cat([images, old_images]), meta + old_meta
        try:
            new_val = load_dataset(data, "val", seed=train_cfg.seed, label=label, on_bad_sample=on_bad_sample)
        except DataError:
            new_val = None
        holdout_spec = holdout if holdout is not None else data
        holdout_label = task_cls.data_label(task_cfg, holdout_spec) or rc.data.get("label")
        ev = EvalData(spec=str(holdout_spec), split="test", seed=train_cfg.seed, label=holdout_label,
                      on_bad_sample=on_bad_sample, class_names=rc.class_names)
        ev.load()  # a holdout that cannot be read fails now, not after training

        version = reg.next_version()
        out = reg.versions_dir / version
        candidate_rc = dataclasses.replace(
            rc, train=train_cfg, init_from=str(current_path.resolve()),
            data={"spec": recorded_spec(data), "seed": train_cfg.seed, "label": label, "n": None,
                  "replay": {"share": replay, "examples": n_old, "of": rc.data}})
        task = task_cls(candidate_rc, loaded.tokenizer)
        train_split = task.build_split(images, meta, train=True)  # labels outside the version's classes fail here
        val_split = None
        if new_val is not None and len(new_val):
            val_split = task.build_split(*task_cls.decode(new_val, size), train=False)
        echo(f"refreshing {reg.path}: version {version} from {current} on {n_new} new + {n_old} replayed examples")
        with open_run(out, resume=False) as run:
            seed_everything(train_cfg.seed)
            model = loaded.model
            model.encoder.freeze(rc.freeze)
            trainer = Trainer(model, task, train_split, val_split, train_cfg, out, collate_fn=task.collate)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save(out / TOKENIZER_NAME)
            write_json(out / CONFIG_NAME, candidate_rc.to_json())
            run.commit()
            result = trainer.fit()
        if result.status == "interrupted":
            shutil.rmtree(out, ignore_errors=True)  # a refresh is not resumable: the next one starts afresh
            raise KeyboardInterrupt(result.stopped_by or "SIGINT")

        cur_value, cur_metrics, n = _score(task_cls, rc, loaded.tokenizer, load(current_path).model, ev, metric)
        cand_value, cand_metrics, _ = _score(task_cls, candidate_rc, loaded.tokenizer, load(out).model, ev, metric)
        if cand_value is None or cur_value is None:
            promote = False
            reason = f"{metric} is undefined on the holdout (current {cur_value}, candidate {cand_value}); not promoted"
        elif cand_value >= cur_value - tolerance:
            promote = True
            reason = (f"{metric} {cand_value:.4f} vs current {cur_value:.4f}: not worse by more than the tolerance "
                      f"{tolerance:g}; promoted")
        else:
            promote = False
            reason = (f"{metric} {cand_value:.4f} is worse than current {cur_value:.4f} by {cur_value - cand_value:.4f}, "
                      f"more than the tolerance {tolerance:g}; version {version} kept, not promoted")
        write_json(out / "eval" / REFRESH_EVAL_NAME, {
            "run": str(out), "task": rc.task, "data": str(holdout_spec), "split": "test", "n": n, **cand_metrics,
            "comparison": [{"run": str(out), "role": "candidate", **cand_metrics},
                           {"run": str(current_path), "role": f"current (version {current})", **cur_metrics}]})
        entry = {"event": "refresh", "version": version, "previous": current, "data": recorded_spec(data),
                 "holdout": recorded_spec(holdout_spec), "replay": replay, "examples": {"new": n_new, "replayed": n_old},
                 "holdout_examples": n, "metric": metric, "tolerance": tolerance,
                 "metrics": {"current": cur_metrics, "candidate": cand_metrics},
                 "decision": "promoted" if promote else "not promoted", "reason": reason,
                 "current": version if promote else current, "steps": result.step, "train": to_dict(train_cfg)}
        if promote:
            reg.point_current(version)
        entry = reg.append_history(entry)
        echo(f"version {version}: {reason}")
        return entry
