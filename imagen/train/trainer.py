"""The task-agnostic training loop: accumulation, clipping, schedule, validation, early stopping, exact resume.

The trainer knows nothing about models or tasks. A task is any object with
`training_step(model, batch) -> {"loss": tensor, ...scalars}`, `validation_step(model, batch) -> {...tensors}`,
`compute_metrics(outputs) -> {name: float}`, `monitor = (metric name, "max" | "min")` and optionally `collate`,
`on_optimizer_step(model, step)` (called after every update, e.g. for EMA weights; it may return
{tag: (H, W, 3) uint8 array}, logged as image summaries), `find_unused_parameters` and `compile_targets(model)`
(the modules `cfg.compile` compiles; default: the whole model).

Under torchrun (imagen/train/distributed.py) the same loop runs on every rank: the model is wrapped in
DistributedDataParallel around the task's whole training step, `cfg.batch_size` is the global batch (each rank
takes its share of every batch of the seeded permutation), each rank's loss is weighted by its share so the
averaged gradient is that of the global batch, validation outputs are gathered so every rank computes the same
metrics and early-stopping decision, and rank 0 alone writes logs, checkpoints (with every rank's RNG state) and
the final weights. A stop signal on any rank stops every rank at the same step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from imagen.errors import TrainingError
from imagen.config import TrainConfig, to_dict

from . import distributed
from .batching import check_shares, make_loader, num_batches
from .checkpoint import (CheckpointError, best_weights_path, check_world_size, latest_checkpoint, load_checkpoint,
                         load_weights, save_best, save_checkpoint, save_weights)
from .device import (LEGACY_CPU_BF16_MIN_PARAMS, autocast_context, batch_size_of, channels_last_pays, move_to_device,
                     peak_memory_mb, resolve_device, resolve_precision)
from .loggers import MetricsLogger, NullLogger
from .optim import build_optimizer, build_scheduler, load_optimizer_state
from .rng import get_rng_state, seed_everything, set_rng_state
from .signals import StopRequested, pending_stop, stop_signals_deferred, stop_signals_handled

MAX_NONFINITE_STEPS = 3




@dataclass
class TrainResult:
    """How `Trainer.fit` ended."""

    status: str  # "completed" | "early_stopped" | "interrupted"
    step: int
    best_metric: float | None
    best_step: int | None
    metrics: dict[str, float]  # the last validation metrics ({} when no validation ran)
    peak_mem_mb: float = 0.0
    stopped_by: str | None = None  # "SIGINT" / "SIGTERM" when a signal interrupted the run


@dataclass
class LoopState:
    """The loop's position and history, saved as trainer_state.json so a resume continues exactly."""

    step: int = 0  # optimiser steps taken
    epoch: int = 0
    batch: int = 0  # batches of `epoch` consumed
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last improvement
    last_eval_step: int = 0
    nonfinite_steps: int = 0  # consecutive skipped optimiser steps
    window_sums: dict[str, float] = field(default_factory=dict)  # train scalars since the last log line
    window_counts: dict[str, int] = field(default_factory=dict)
    val_metrics: dict[str, float] = field(default_factory=dict)
    world_size: int = 1  # processes that trained it; a resume needs as many (each has its own RNG stream)
    precision: str | None = None  # what "auto" resolved to when the run started; a resume keeps it


class Trainer:
    """Trains `model` on `train_data` with `task`'s loss, validating on `val_data` (may be None)."""

    def __init__(self, model, task, train_data, val_data, cfg: TrainConfig, run_dir, *, collate_fn=None,
                 on_evaluate=None):
        """`on_evaluate(step, metrics)`, when given, is called after every validation on every rank (e.g. to report a
        hyperparameter-search trial's progress); whatever it raises ends `fit` with that exception."""
        if len(train_data) == 0:
            raise ValueError("the training data is empty")
        self.cfg = cfg
        self.task = task
        self.train_data = train_data
        self.val_data = val_data
        self.run_dir = Path(run_dir)
        self.on_evaluate = on_evaluate
        self.dist = distributed.current()
        world = self.dist.world_size
        # Checked by rank 0 and raised on every rank (so the job reports it once and no rank waits for the others).
        distributed.from_main(check_shares, len(train_data), cfg.batch_size, world)
        self.device = distributed.rank_device(resolve_device(cfg.device))
        self.precision = resolve_precision(cfg.precision, self.device, sum(p.numel() for p in model.parameters()))
        self.model = model.to(self.device)
        if channels_last_pays(self.device, self.precision):
            self.model.to(memory_format=torch.channels_last)  # 4-D weights only: the same model, faster steps
        if cfg.compile != "off":
            # In place (nn.Module.compile): parameter names, checkpoints and the EMA copy are unchanged. Static
            # shapes: an epoch's partial last batch gets a graph of its own rather than one dynamic graph for both.
            targets = task.compile_targets(self.model) if hasattr(task, "compile_targets") else [self.model]
            for module in targets:
                module.compile(mode=None if cfg.compile == "default" else cfg.compile, dynamic=False)
        self.collate_fn = collate_fn or getattr(task, "collate", None) or default_collate
        if val_data is not None:
            _, mode = task.monitor
            if mode not in ("max", "min"):
                raise ValueError(f"task.monitor mode {mode!r} must be 'max' or 'min'")
        self.batches_per_epoch = num_batches(len(train_data), cfg.batch_size, world)
        # A trailing partial accumulation group still makes an optimiser step, hence the ceil.
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # Optional task hook run after every optimiser step: `task.on_optimizer_step(model, step)`.
        self._step_hook = getattr(task, "on_optimizer_step", None)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg)
        self._ddp = None
        if self.dist.distributed and self.trainable:
            # The task's whole training step runs inside DDP's forward, so a task may call any submodule (a U-Net,
            # a text encoder) and every gradient is still averaged. Heads and caption dropout may leave parameters
            # without a gradient in a step: tasks say whether that happens (default: assume it may).
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = torch.nn.parallel.DistributedDataParallel(
                distributed.TrainingStep(self.model, task), device_ids=device_ids, find_unused_parameters=getattr(task, "find_unused_parameters", True))

    # ------------------------------------------------------------------------------------------
    # Public entry points

    def fit(self, resume: bool = False) -> TrainResult:
        """Train to the end (or early stop / Ctrl-C); with `resume`, continue from the latest checkpoint."""
        state = self._restore() if resume else self._start()
        self._keep_precision(state)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._snapshot = self._capture(state)
        self._reset_window()
        self._last_lr = self._top_lr()
        main = self.dist.is_main
        logger = (MetricsLogger(self.run_dir, self.cfg.report_to, to_dict(self.cfg),
                                resume_step=state.step if resume else None) if main else NullLogger())
        bar = tqdm(total=self.total_steps, initial=state.step, desc="train", disable=not (self.cfg.progress and main),
                   dynamic_ncols=True)
        self.model.train()
        status, stopped_by = "interrupted", None
        try:
            # Several ranks must stop at the same step: a signal is only noted, and the ranks agree after each step.
            held = stop_signals_deferred() if self.dist.distributed else stop_signals_handled()
            with held:
                status = self._loop(state, logger, bar)
                if self.dist.distributed:
                    pending_stop(clear=True)  # a signal after the ranks last agreed: the run is complete all the same
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGINT / SIGTERM (StopRequested)
            # Weights, optimiser and schedule are still those of the last finished step; the snapshot matches them.
            stopped_by = e.signal_name if isinstance(e, StopRequested) else "SIGINT"
            self._save_snapshot()
        finally:
            bar.close()
            logger.close()
        if status == "interrupted":
            state = LoopState(**self._snapshot[0])  # what the checkpoint holds, not a half-finished step
        elif main:
            self._write_final_model(state)
        distributed.barrier()  # the job ends when rank 0 has written the run
        return TrainResult(status, state.step, state.best_metric, state.best_step, dict(state.val_metrics),
                           peak_memory_mb(self.device), stopped_by)

    @torch.no_grad()
    def evaluate(self, data) -> dict[str, float]:
        """Run the task's validation over `data` and return its metrics (the model's train/eval mode is kept)."""
        world, batch_size = self.dist.world_size, self.cfg.batch_size // self.dist.world_size
        if world > 1:  # each rank validates its contiguous share; the outputs are gathered in rank order below
            data = torch.utils.data.Subset(data, distributed.shard_range(len(data), self.dist.rank, world))
        loader = make_loader(data, batch_size, shuffle=False, collate_fn=self.collate_fn,
                             num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda")
        was_training = self.model.training
        self.model.eval()
        outputs = []
        try:
            for batch in loader:
                batch = move_to_device(batch, self.device)
                with autocast_context(self.device, self.precision):
                    out = self.task.validation_step(self.model, batch)
                outputs.append(move_to_device(out, "cpu"))  # keep accelerator memory flat over long evals
        finally:
            self.model.train(was_training)
        if world > 1:
            outputs = [out for shard in distributed.gather_objects(outputs) for out in shard]
        return {name: float(value) for name, value in self.task.compute_metrics(outputs).items()}

    # ------------------------------------------------------------------------------------------
    # Start / resume

    def _start(self) -> LoopState:
        """A fresh run: refuse to mix with an earlier run's checkpoints, seed everything."""
        error = None
        if self.dist.is_main and latest_checkpoint(self.run_dir) is not None:
            error = f"{self.run_dir} already holds checkpoints of an earlier run; resume it or choose a new run directory"
        error = distributed.broadcast_object(error)
        if error:
            raise CheckpointError(error)
        # Rank 0 keeps the run's seed (one process trains as before); other ranks draw their own dropout and
        # augmentation. DDP gave every rank rank 0's initial weights.
        seed_everything(distributed.rank_seed(self.cfg.seed, self.dist.rank))
        return LoopState(world_size=self.dist.world_size)

    def _keep_precision(self, state: LoopState) -> None:
        """A resumed run trains in the precision it started in, even where `auto` now resolves otherwise (exact
        resume); checkpoints from before the precision was recorded resolved `auto` by the earlier rule."""
        if self.cfg.precision == "auto" and state.step > 0:
            num_params = sum(p.numel() for p in self.model.parameters())
            self.precision = state.precision or resolve_precision(
                "auto", self.device, num_params, cpu_min_params=LEGACY_CPU_BF16_MIN_PARAMS)
        state.precision = self.precision

    def _restore(self) -> LoopState:
        """Load the latest complete checkpoint into model, optimiser, schedule and RNGs."""
        if not self.dist.distributed:
            path = latest_checkpoint(self.run_dir)
            if path is None:
                raise CheckpointError(
                    f"no complete checkpoint under {self.run_dir / 'checkpoints'} to resume from; "
                    "start the run without resume"
                )
            trainer_state, rng_states = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
            check_world_size(trainer_state, rng_states, 1, path)
            set_rng_state(rng_states[0])
            return LoopState(**trainer_state)
        # Rank 0 reads the checkpoint from its disk and hands every rank its part: nothing assumes a shared disk.
        shared = None
        if self.dist.is_main:
            try:
                path = latest_checkpoint(self.run_dir)
                if path is None:
                    raise CheckpointError(f"no complete checkpoint under {self.run_dir / 'checkpoints'} to resume from; "
                                          "start the run without resume")
                trainer_state, rng_states = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
                check_world_size(trainer_state, rng_states, self.dist.world_size, path)
                shared = {"trainer_state": trainer_state, "rng": rng_states,
                          "optimizer": move_to_device(self.optimizer.state_dict(), "cpu"),
                          "scheduler": self.scheduler.state_dict()}
            except CheckpointError as e:
                shared = {"error": str(e)}
        shared = distributed.broadcast_object(shared)
        if "error" in shared:
            raise CheckpointError(shared["error"])
        if not self.dist.is_main:
            load_optimizer_state(self.optimizer, shared["optimizer"])
            self.scheduler.load_state_dict(shared["scheduler"])
        distributed.broadcast_module(self.model)
        set_rng_state(shared["rng"][self.dist.rank])
        return LoopState(**shared["trainer_state"])

    # ------------------------------------------------------------------------------------------
    # The loop

    def _loop(self, state: LoopState, logger: MetricsLogger, bar) -> str:
        """Run optimiser steps until the total, or an early stop; return the status."""
        if self._eval_due(state):  # resumed from a checkpoint taken while its evaluation was running
            if self._evaluate_and_track(state, logger):
                return "early_stopped"
        while state.step < self.total_steps:
            if state.batch >= self.batches_per_epoch:
                state.epoch, state.batch = state.epoch + 1, 0
            loader = make_loader(self.train_data, self.cfg.batch_size, shuffle=True, seed=self.cfg.seed,
                                 epoch=state.epoch, start_batch=state.batch, collate_fn=self.collate_fn,
                                 num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                                 rank=self.dist.rank, world_size=self.dist.world_size)
            for batch in loader:
                if not self._micro_step(batch, state):
                    continue  # the accumulation group is not complete yet
                with stop_signals_deferred():  # so a Ctrl-C or SIGTERM never lands between an update and its snapshot
                    self._optimizer_step(state)
                    if self._step_hook is not None:  # e.g. EMA weights, sample grids
                        images = self._step_hook(self.model, state.step)
                        if images:  # {tag: (H, W, 3) uint8}: image summaries (TensorBoard, wandb)
                            logger.log_images(state.step, images)
                    bar.update(1)
                    if state.step % max(1, self.cfg.log_every) == 0 or state.step >= self.total_steps:
                        self._log_train(state, logger, bar)
                    self._snapshot = self._capture(state)
                if self._after_step(state, logger, bar):
                    return "early_stopped"
                if self.dist.distributed and distributed.any_rank(pending_stop() is not None):
                    raise StopRequested(pending_stop() or signal.SIGTERM)  # this rank, or another, was asked to stop
                if state.step >= self.total_steps:
                    break
        return "completed"

    def _micro_step(self, batch, state: LoopState) -> bool:
        """Forward + backward of one batch; True when it completes an accumulation group."""
        accum = self.cfg.grad_accum
        group_start = state.batch - state.batch % accum
        # The epoch's last group may be short: average over the batches it really has.
        group_size = min(accum, self.batches_per_epoch - group_start)
        if state.batch == group_start:
            self._group = {"sums": {}, "finite": True, "count": 0}
        batch = move_to_device(batch, self.device)
        completes_group = state.batch + 1 - group_start == group_size
        if self._ddp is None:
            self._window_samples += batch_size_of(batch)
            with autocast_context(self.device, self.precision):
                out = self.task.training_step(self.model, batch)
            loss = out["loss"]
            loss_value = float(loss.detach())  # one host sync per batch, to skip the backward of a NaN loss
            scalars = {"loss": loss_value, **{k: _scalar(v) for k, v in out.items() if k != "loss"}}
            if math.isfinite(loss_value):
                (loss / group_size).backward()
        else:
            # Gradients are averaged over the ranks only when the group completes (no_sync before that).
            with contextlib.nullcontext() if completes_group else self._ddp.no_sync():
                loss_value, scalars, weight = self._distributed_forward(batch)
                loss = self._last_loss
                # Every rank runs backward, even on a non-finite loss (DDP expects it); that group is skipped.
                (loss * weight / group_size if math.isfinite(loss_value) else loss * 0.0).backward()
        if math.isfinite(loss_value):
            for name, value in scalars.items():
                if value is not None:
                    self._group["sums"][name] = self._group["sums"].get(name, 0.0) + value
            self._group["count"] += 1
        else:
            self._group["finite"] = False  # skip the step: NaN grads would poison the whole group
            self._group["bad_loss"] = loss_value
        state.batch += 1
        return completes_group

    def _distributed_forward(self, batch):
        """One rank's forward: (the global batch's mean loss, its mean scalars, this rank's loss weight).

        DDP averages the ranks' gradients; weighting each rank's mean loss by n_rank * world / n_global makes that
        average the gradient of the global batch's mean loss even when the last batch splits unevenly.
        """
        n = batch_size_of(batch)
        with autocast_context(self.device, self.precision):
            out = self._ddp(batch)
        self._last_loss = out["loss"]
        local = {"loss": float(out["loss"].detach()), **{k: _scalar(v) for k, v in out.items() if k != "loss"}}
        names = sorted(k for k, v in local.items() if v is not None)
        totals = distributed.all_reduce_sum(torch.tensor([n] + [local[k] * n for k in names], dtype=torch.float64))
        n_global = float(totals[0])
        self._window_samples += int(n_global)
        scalars = {k: float(totals[i + 1]) / n_global for i, k in enumerate(names)}
        return scalars["loss"], scalars, n * self.dist.world_size / n_global

    def _top_lr(self) -> float:
        """The learning rate logged: the largest of the groups' (layer-wise decay gives lower ones to early layers)."""
        return max(g["lr"] for g in self.optimizer.param_groups)

    def _optimizer_step(self, state: LoopState) -> None:
        """Clip, step (unless the group went non-finite), advance the schedule, update the log window."""
        group = self._group
        self._last_lr = self._top_lr()
        grad_norm = None
        if group["finite"]:
            # With clipping off, max_norm=inf still returns the norm to log and scales the gradients by exactly 1.
            max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
        if group["finite"] and math.isfinite(grad_norm):
            self.optimizer.step()
            state.nonfinite_steps = 0
        else:
            state.nonfinite_steps += 1
            what = f"loss {group['bad_loss']}" if not group["finite"] else f"gradient norm {grad_norm}"
            if state.nonfinite_steps >= MAX_NONFINITE_STEPS:
                raise TrainingError(
                    f"non-finite {what} for {MAX_NONFINITE_STEPS} optimiser steps in a row (step {state.step + 1}); "
                    "lower the learning rate, enable grad clipping or check the data"
                )
            warnings.warn(f"step {state.step + 1}: non-finite {what}; skipped the optimiser step", RuntimeWarning)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # The schedule advances on skipped steps too (it counts steps, not updates); torch warns about that.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        state.step += 1
        if group["count"]:
            values = {name: total / group["count"] for name, total in group["sums"].items()}
            if grad_norm is not None and math.isfinite(grad_norm):
                values["grad_norm"] = grad_norm
            for name, value in values.items():
                state.window_sums[name] = state.window_sums.get(name, 0.0) + value
                state.window_counts[name] = state.window_counts.get(name, 0) + 1

    def _after_step(self, state: LoopState, logger: MetricsLogger, bar) -> bool:
        """Validate and checkpoint as due after an optimiser step (and its log line); True to stop early."""
        stop = self._eval_due(state) and self._evaluate_and_track(state, logger)
        if self.cfg.checkpoint_every and state.step % self.cfg.checkpoint_every == 0:
            self._save_snapshot()
        if stop and state.window_counts:
            self._log_train(state, logger, bar)  # the partial window before stopping
        return stop

    # ------------------------------------------------------------------------------------------
    # Validation and early stopping

    def _eval_due(self, state: LoopState) -> bool:
        """Validate every cfg.eval_every steps (else at each epoch end) and after the last step, once per step."""
        if self.val_data is None or state.step == 0 or state.last_eval_step >= state.step:
            return False
        if state.step >= self.total_steps:
            return True
        if self.cfg.eval_every:
            return state.step % self.cfg.eval_every == 0
        return state.batch >= self.batches_per_epoch

    def _evaluate_and_track(self, state: LoopState, logger: MetricsLogger) -> bool:
        """Validate, log, keep the best weights; True when early-stopping patience has run out."""
        metrics = self.evaluate(self.val_data)
        state.last_eval_step = state.step
        state.val_metrics = metrics
        logger.log(state.step, self._epoch_progress(state), "val", metrics)
        name, mode = self.task.monitor
        if name not in metrics:
            raise ValueError(f"task.monitor names metric {name!r} but compute_metrics returned {sorted(metrics)}")
        value, best = metrics[name], state.best_metric
        # NaN never counts as an improvement, so one bad evaluation cannot become the "best" model.
        if math.isfinite(value) and (best is None or (value > best if mode == "max" else value < best)):
            state.best_metric, state.best_step, state.bad_evals = value, state.step, 0
            if self.dist.is_main:
                save_best(self.run_dir, self.model, {"step": state.step, "metric": name, "value": value})
        else:
            state.bad_evals += 1
        self._snapshot = self._capture(state)
        if self.on_evaluate is not None:
            self.on_evaluate(state.step, dict(metrics))
        patience = self.cfg.early_stopping_patience
        return patience is not None and state.bad_evals >= patience

    # ------------------------------------------------------------------------------------------
    # Logging, snapshots, final weights

    def _reset_window(self) -> None:
        """Start a new throughput window (its samples and clock are not part of the saved state)."""
        self._window_samples = 0
        self._window_start = time.perf_counter()

    def _log_train(self, state: LoopState, logger: MetricsLogger, bar) -> None:
        """Write the window's mean train scalars, lr and samples/s; start a new window."""
        values = {name: state.window_sums[name] / state.window_counts[name] for name in state.window_sums}
        values["lr"] = self._last_lr
        elapsed = time.perf_counter() - self._window_start
        values["samples_per_s"] = self._window_samples / elapsed if elapsed > 0 else 0.0
        logger.log(state.step, self._epoch_progress(state), "train", values)
        bar.set_postfix(loss=f"{values.get('loss', math.nan):.4f}", lr=f"{values['lr']:.2e}",
                        samples_s=f"{values['samples_per_s']:.0f}", refresh=False)
        state.window_sums, state.window_counts = {}, {}
        self._reset_window()

    def _epoch_progress(self, state: LoopState) -> float:
        """Fractional epochs done, for the logs."""
        return round(state.epoch + state.batch / self.batches_per_epoch, 4)

    def _capture(self, state: LoopState):
        """A copy of the loop state (JSON round trip) and the RNG states, as of now."""
        return json.loads(json.dumps(dataclasses.asdict(state))), get_rng_state()

    def _save_snapshot(self) -> Path:
        """Checkpoint the model / optimiser / schedule with the last step-boundary snapshot."""
        trainer_state, rng_state = self._snapshot
        rng_states = distributed.gather_objects(rng_state)  # every rank's streams, for an exact resume
        if not self.dist.is_main:
            return None
        return save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler, trainer_state, rng_states,
                               keep=self.cfg.keep_checkpoints)

    def _write_final_model(self, state: LoopState) -> None:
        """Write RUN/model.safetensors: the best validated weights when validation ran, else the last weights."""
        if state.best_step is not None:
            load_weights(best_weights_path(self.run_dir), self.model)  # the model in memory matches the file
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:  # never save a "finished" model that predicts NaN
            raise TrainingError(f"the trained weights hold NaN or inf ({bad[0]} and {len(bad) - 1} more); the run is not "
                                "saved as finished: lower the learning rate or enable grad clipping, and train again")
        save_weights(self.run_dir / "model.safetensors", self.model)


def _scalar(value) -> float | None:
    """A loggable float from a task output, or None for anything that is not a scalar."""
    if isinstance(value, torch.Tensor):
        return float(value.detach()) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None
