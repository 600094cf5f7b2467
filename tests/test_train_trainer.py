"""The training loop: exact resume, Ctrl-C, early stopping, accumulation, freezing, and that it learns."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from imagen.config import TrainConfig
from imagen.errors import ConfigError
from imagen.train import CheckpointError, Trainer, TrainingError, latest_checkpoint

TIME_KEYS = {"samples_per_s"}  # wall-clock dependent, so excluded from equality checks


class Classify:
    """A toy classification task: cross-entropy, accuracy as the monitored metric."""

    monitor = ("accuracy", "max")

    def training_step(self, model, batch):
        x, y = batch
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y), "train_acc": (logits.argmax(-1) == y).float().mean()}

    def validation_step(self, model, batch):
        x, y = batch
        logits = model(x)
        return {"preds": logits.argmax(-1), "targets": y, "loss": F.cross_entropy(logits, y, reduction="sum")}

    def compute_metrics(self, outputs):
        preds = torch.cat([o["preds"] for o in outputs])
        targets = torch.cat([o["targets"] for o in outputs])
        loss = sum(o["loss"] for o in outputs) / len(targets)
        return {"accuracy": (preds == targets).float().mean().item(), "loss": float(loss)}


class Crashing(Classify):
    """Raises `error` on the `at`-th call of training_step (1-based)."""

    def __init__(self, at, error):
        self.at, self.error, self.calls = at, error, 0

    def training_step(self, model, batch):
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return super().training_step(model, batch)


class Scripted(Classify):
    """Reports a scripted sequence of validation accuracies."""

    def __init__(self, values):
        self.values = list(values)

    def compute_metrics(self, outputs):
        return {**super().compute_metrics(outputs), "accuracy": self.values.pop(0)}


class Regress:
    """Mean-squared-error regression, mean-reduced so accumulation can match a bigger batch."""

    monitor = ("loss", "min")

    def training_step(self, model, batch):
        x, y = batch
        return {"loss": F.mse_loss(model(x), y)}

    def validation_step(self, model, batch):
        x, y = batch
        return {"sq": ((model(x) - y) ** 2).mean(1)}

    def compute_metrics(self, outputs):
        return {"loss": torch.cat([o["sq"] for o in outputs]).mean().item()}


def classifier(seed, dropout=0.2, dim=8, classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 32), nn.LayerNorm(32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, classes))


def class_data(n, seed=0, dim=8, classes=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    return torch.utils.data.TensorDataset(x, torch.randint(0, classes, (n,), generator=g))


def cfg(**overrides):
    base = dict(lr=1e-2, batch_size=4, grad_accum=2, epochs=3, max_steps=12, warmup_steps=2, eval_every=4,
                checkpoint_every=3, log_every=5, seed=3, device="cpu", precision="fp32", report_to=("jsonl",),
                progress=False)
    return TrainConfig(**{**base, **overrides})


def weights(path):
    return load_file(str(path))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def metric_rows(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in rows]


def test_crash_and_resume_equals_a_straight_run(tmp_path):
    # 38 samples / batch 4 -> 10 batches (last one partial) -> 5 optimiser steps per epoch with grad_accum 2.
    train, val = class_data(38), class_data(12, seed=1)
    straight = Trainer(classifier(0), Classify(), train, val, cfg(), tmp_path / "a").fit()
    assert straight.status == "completed" and straight.step == 12

    # Crash in step 11 (22 micro-batches): the step-9 checkpoint sits mid-epoch, after metrics for step 10.
    crashing = Trainer(classifier(0), Crashing(21, RuntimeError("simulated crash")), train, val, cfg(), tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.fit()
    ckpt = latest_checkpoint(tmp_path / "b")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (ckpt.name, state["epoch"], state["batch"]) == ("step-00000009", 1, 8)
    assert not (tmp_path / "b" / "model.safetensors").exists()

    # A differently initialised model: everything must come from the checkpoint.
    resumed = Trainer(classifier(123), Classify(), train, val, cfg(), tmp_path / "b").fit(resume=True)
    assert resumed.status == "completed" and resumed.step == 12
    assert (resumed.best_metric, resumed.best_step, resumed.metrics) == (
        straight.best_metric, straight.best_step, straight.metrics)
    assert_same_weights(weights(tmp_path / "a" / "model.safetensors"), weights(tmp_path / "b" / "model.safetensors"))
    last = "checkpoints/step-00000012/model.safetensors"  # the last (not best) weights
    assert_same_weights(weights(tmp_path / "a" / last), weights(tmp_path / "b" / last))
    assert metric_rows(tmp_path / "a") == metric_rows(tmp_path / "b")
    assert [(r["step"], r["split"]) for r in metric_rows(tmp_path / "a")] == [
        (4, "val"), (5, "train"), (8, "val"), (10, "train"), (12, "train"), (12, "val")]


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path):
    train = class_data(38)
    config = cfg(checkpoint_every=None, eval_every=None)
    straight = Trainer(classifier(0), Classify(), train, None, config, tmp_path / "a").fit()
    assert straight.status == "completed"
    # Ctrl-C in the second micro-batch of step 4: the checkpoint holds the 3 finished steps.
    trainer = Trainer(classifier(0), Crashing(8, KeyboardInterrupt()), train, None, config, tmp_path / "b")
    result = trainer.fit()
    assert result.status == "interrupted" and result.step == 3
    assert latest_checkpoint(tmp_path / "b").name == "step-00000003"
    assert not (tmp_path / "b" / "model.safetensors").exists()
    resumed = Trainer(classifier(7), Classify(), train, None, config, tmp_path / "b").fit(resume=True)
    assert resumed.status == "completed" and (tmp_path / "b" / "model.safetensors").exists()
    assert_same_weights(weights(tmp_path / "a" / "model.safetensors"), weights(tmp_path / "b" / "model.safetensors"))


def test_early_stopping_keeps_the_best_weights(tmp_path):
    config = cfg(max_steps=40, eval_every=2, checkpoint_every=2, keep_checkpoints=10, early_stopping_patience=2)
    task = Scripted([0.5, 0.7, 0.6, 0.65, 0.9])
    result = Trainer(classifier(0), task, class_data(38), class_data(8, seed=1), config, tmp_path).fit()
    # Evaluations at steps 2, 4, 6, 8: best at 4, then two without improvement.
    assert (result.status, result.step, result.best_step, result.best_metric) == ("early_stopped", 8, 4, 0.7)
    final = weights(tmp_path / "model.safetensors")
    assert_same_weights(final, weights(tmp_path / "checkpoints" / "best" / "model.safetensors"))
    assert_same_weights(final, weights(tmp_path / "checkpoints" / "step-00000004" / "model.safetensors"))
    last = weights(tmp_path / "checkpoints" / "step-00000008" / "model.safetensors")
    assert not torch.equal(final["0.weight"], last["0.weight"])


def test_grad_accumulation_matches_a_bigger_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g)
    data = torch.utils.data.TensorDataset(x, x @ torch.randn(6, 3, generator=g))
    finals = []
    for name, batch, accum in (("big", 8, 1), ("accum", 4, 2)):
        torch.manual_seed(0)
        model = nn.Linear(6, 3)
        config = cfg(optimizer="sgd", lr=0.05, batch_size=batch, grad_accum=accum, epochs=2, max_steps=None,
                     checkpoint_every=None, eval_every=None)
        trainer = Trainer(model, Regress(), data, None, config, tmp_path / name)
        assert trainer.total_steps == 8
        trainer.fit()
        finals.append(model.state_dict())
    for name in finals[0]:
        torch.testing.assert_close(finals[0][name], finals[1][name], rtol=1e-5, atol=1e-6)


def test_frozen_parameters_stay_unchanged(tmp_path):
    model = classifier(0)
    model[0].requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(model, Classify(), class_data(16), None, cfg(weight_decay=0.5, checkpoint_every=None, eval_every=None),
            tmp_path).fit()
    after = model.state_dict()
    assert torch.equal(before["0.weight"], after["0.weight"]) and torch.equal(before["0.bias"], after["0.bias"])
    assert not torch.equal(before["4.weight"], after["4.weight"])


def test_overfits_a_small_classification_set(tmp_path):
    data = class_data(64, seed=5)
    config = cfg(lr=1e-2, batch_size=16, grad_accum=1, max_steps=None, epochs=60, warmup_steps=5, weight_decay=0.0,
                 checkpoint_every=None, eval_every=None, log_every=20)
    trainer = Trainer(classifier(0, dropout=0.0, classes=4), Classify(), data, None, config, tmp_path)
    assert trainer.fit().status == "completed"
    assert trainer.evaluate(data)["accuracy"] >= 0.95
    rows = metric_rows(tmp_path)
    assert rows[-1]["loss"] < rows[0]["loss"] and {"lr", "grad_norm", "train_acc"} <= rows[0].keys()


def test_nonfinite_losses_skip_steps_then_fail(tmp_path):
    class Exploding(Classify):
        def training_step(self, model, batch):
            return {"loss": super().training_step(model, batch)["loss"] * float("nan")}

    model = classifier(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, Exploding(), class_data(38), None, cfg(checkpoint_every=None, eval_every=None), tmp_path)
    with pytest.warns(RuntimeWarning, match="non-finite loss"), pytest.raises(TrainingError, match="3 optimiser steps"):
        trainer.fit()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fresh_run_refuses_an_earlier_runs_checkpoints(tmp_path):
    Trainer(classifier(0), Classify(), class_data(16), None, cfg(max_steps=3), tmp_path).fit()
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        Trainer(classifier(0), Classify(), class_data(16), None, cfg(max_steps=3), tmp_path).fit()


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("at_start_up", ["default", "ignored"])
def test_a_stop_signal_during_an_update_is_held_until_the_snapshot(signum, at_start_up):
    """Whatever handler the process started with (background jobs start with SIGINT ignored), a stop signal inside
    the block is held to its end, then raised; the earlier handler is back afterwards."""
    import os
    import signal

    from imagen.train.trainer import StopRequested, stop_signals_deferred

    sig = getattr(signal, signum)
    before = signal.getsignal(sig)
    signal.signal(sig, signal.SIG_IGN if at_start_up == "ignored" else before)
    started_with = signal.getsignal(sig)
    try:
        done = []
        with pytest.raises(StopRequested, match=signum):
            with stop_signals_deferred():
                os.kill(os.getpid(), sig)
                done.append("the block ran to its end")
        assert done and signal.getsignal(sig) == started_with
    finally:
        signal.signal(sig, before)


def test_ctrl_c_during_validation_reruns_it_on_resume(tmp_path):
    class InterruptedEval(Classify):
        def validation_step(self, model, batch):
            raise KeyboardInterrupt

    train, val = class_data(38), class_data(12, seed=1)
    config = cfg(checkpoint_every=None)
    Trainer(classifier(0), Classify(), train, val, config, tmp_path / "a").fit()
    result = Trainer(classifier(0), InterruptedEval(), train, val, config, tmp_path / "b").fit()
    assert (result.status, result.step, result.metrics) == ("interrupted", 4, {})
    Trainer(classifier(5), Classify(), train, val, config, tmp_path / "b").fit(resume=True)
    assert_same_weights(weights(tmp_path / "a" / "model.safetensors"), weights(tmp_path / "b" / "model.safetensors"))
    assert metric_rows(tmp_path / "a") == metric_rows(tmp_path / "b")


def test_a_resumed_run_keeps_the_precision_it_started_in(tmp_path, monkeypatch):
    # `auto` is resolved once, when a run starts, and recorded in its checkpoints: a rule that now resolves
    # differently (another release, another threshold) must not change the precision of a resumed run.
    import imagen.train.trainer as trainer_module

    train, val = class_data(38), class_data(12, seed=1)
    crashing = Trainer(classifier(0), Crashing(21, RuntimeError("crash")), train, val, cfg(precision="auto"), tmp_path / "b")
    with pytest.raises(RuntimeError):
        crashing.fit()
    state = json.loads((latest_checkpoint(tmp_path / "b") / "trainer_state.json").read_text())
    assert state["precision"] == crashing.precision == "fp32"  # a toy model resolves to fp32 on every device here
    monkeypatch.setattr(trainer_module, "resolve_precision", lambda *a, **k: "bf16")  # the rule has changed
    resumed = Trainer(classifier(0), Classify(), train, val, cfg(precision="auto"), tmp_path / "b")
    assert resumed.precision == "bf16"  # what a new run would use...
    resumed.fit(resume=True)
    assert resumed.precision == "fp32"  # ...but the resumed one keeps its own
    fresh = Trainer(classifier(0), Classify(), train, val, cfg(precision="auto"), tmp_path / "c")
    fresh.fit()
    assert fresh.precision == "bf16" and json.loads(
        (latest_checkpoint(tmp_path / "c") / "trainer_state.json").read_text())["precision"] == "bf16"


def conv_classifier(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.GELU(), nn.Conv2d(6, 4, 3, stride=2), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 4))


def image_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 2, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


@pytest.mark.parametrize("native_bf16", [False, True])
def test_fp32_on_a_cpu_without_native_bf16_trains_channels_last(tmp_path, monkeypatch, native_bf16):
    import imagen.train.device as device

    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: native_bf16)
    trainer = Trainer(conv_classifier(0), Classify(), image_data(16), None, cfg(max_steps=2), tmp_path)
    conv = trainer.model[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == (not native_bf16)
    assert trainer.model[4].weight.is_contiguous()  # 2-D weights keep their layout
    trainer.fit()
    assert torch.isfinite(conv).all()


def test_a_checkpoint_resumes_in_the_other_weight_layout(tmp_path, monkeypatch):
    # A run checkpointed where weights train channels-last, resumed where they do not (another machine): the
    # optimiser's moments must follow the parameters' layout, or fused AdamW updates them from the wrong elements.
    import imagen.train.device as device

    train, val = image_data(38), image_data(12, seed=1)
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)  # default layout
    Trainer(conv_classifier(0), Classify(), train, val, cfg(), tmp_path / "a").fit()
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)  # channels-last
    with pytest.raises(RuntimeError, match="crash"):
        Trainer(conv_classifier(0), Crashing(21, RuntimeError("crash")), train, val, cfg(), tmp_path / "b").fit()
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    Trainer(conv_classifier(5), Classify(), train, val, cfg(), tmp_path / "b").fit(resume=True)
    last = "checkpoints/step-00000012/model.safetensors"  # the last weights (model.safetensors is the best, earlier)
    a, b = weights(tmp_path / "a" / last), weights(tmp_path / "b" / last)
    for name in a:  # the layouts sum in different orders: equal to float32 rounding, not bit for bit
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


class CompileOnlyTheHead(Classify):
    """Names the modules `cfg.compile` compiles: here only the last layer."""

    def compile_targets(self, model):
        return [model[4]]


def test_compiled_training_matches_eager_and_keeps_weight_names(tmp_path):
    # torch.compile (inductor on this CPU) in place: the same updates to float rounding, the same checkpoint keys.
    train = class_data(32)
    Trainer(classifier(0, dropout=0.0), Classify(), train, None, cfg(max_steps=4), tmp_path / "eager").fit()
    trainer = Trainer(classifier(0, dropout=0.0), Classify(), train, None, cfg(max_steps=4, compile="default"),
                      tmp_path / "compiled")
    assert trainer.model._compiled_call_impl is not None
    trainer.fit()
    a, b = weights(tmp_path / "eager" / "model.safetensors"), weights(tmp_path / "compiled" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_compile_targets_the_modules_the_task_names(tmp_path):
    trainer = Trainer(classifier(0), CompileOnlyTheHead(), class_data(8), None, cfg(compile="reduce-overhead"), tmp_path)
    assert trainer.model[4]._compiled_call_impl is not None
    assert trainer.model._compiled_call_impl is None and trainer.model[0]._compiled_call_impl is None


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ConfigError, match="unknown compile mode 'fast'.*off, default, reduce-overhead, max-autotune"):
        cfg(compile="fast")
