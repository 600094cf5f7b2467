"""Weights files and checkpoints: atomic writes, damaged files, restoring every state."""

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

import imagen.train.checkpoint as checkpoint
from imagen.config import TrainConfig
from imagen.train import (CheckpointError, Trainer, build_optimizer, build_scheduler, latest_checkpoint,
                          load_checkpoint, load_weights, save_checkpoint, save_weights, seed_everything)
from imagen.train.rng import get_rng_state, set_rng_state


class Regress:
    """A toy mean-squared-error task."""

    monitor = ("loss", "min")

    def training_step(self, model, batch):
        x, y = batch
        return {"loss": nn.functional.mse_loss(model(x), y)}

    def validation_step(self, model, batch):
        x, y = batch
        return {"sq": ((model(x) - y) ** 2).sum(1)}

    def compute_metrics(self, outputs):
        return {"loss": torch.cat([o["sq"] for o in outputs]).mean().item()}


def regression_data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return torch.utils.data.TensorDataset(x, x @ torch.randn(5, 2, generator=g))


def tiny_cfg(**overrides):
    base = dict(lr=1e-2, batch_size=4, max_steps=6, warmup_steps=1, log_every=2, seed=1, device="cpu",
                precision="fp32", report_to=("jsonl",), progress=False)
    return TrainConfig(**{**base, **overrides})


def test_weights_round_trip_with_tied_parameters(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7))
    model[1].weight = model[0].weight  # tied, as in language models
    save_weights(tmp_path / "w.safetensors", model)
    other = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7))
    other[1].weight = other[0].weight
    load_weights(tmp_path / "w.safetensors", other)
    assert torch.equal(other[0].weight, model[0].weight) and other[1].weight is other[0].weight
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_weights_raise_one_line_error(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    model = nn.Linear(8, 8)
    save_weights(path, model)
    data = path.read_bytes()
    path.write_bytes(b"\x00garbage" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_weights(path, model)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "is damaged or not a safetensors file" in message


def test_mismatched_weights_raise_one_line_error(tmp_path):
    save_weights(tmp_path / "m.safetensors", nn.Linear(4, 3))
    with pytest.raises(CheckpointError, match="shape mismatch") as info:
        load_weights(tmp_path / "m.safetensors", nn.Linear(4, 5))
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="missing"):
        load_weights(tmp_path / "m.safetensors", nn.Sequential(nn.Linear(4, 3)))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "absent.safetensors", nn.Linear(4, 3))


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path):
    seed_everything(5)
    torch.save(get_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(3)  # move every stream on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_checkpoint_round_trip_and_pruning(tmp_path):
    model = nn.Linear(3, 2)
    cfg = tiny_cfg()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, 10, cfg)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model, opt, sched, {"step": step}, get_rng_state(), keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000003"]
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    model2 = nn.Linear(3, 2)
    opt2 = build_optimizer(model2, cfg)
    sched2 = build_scheduler(opt2, 10, cfg)
    state, (rng,) = load_checkpoint(latest_checkpoint(tmp_path), model2, opt2, sched2)
    assert state == {"step": 3} and torch.equal(model2.weight, model.weight)
    assert sched2.last_epoch == 1 and opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_failure_mid_save_leaves_no_complete_checkpoint(tmp_path, monkeypatch):
    real_save, calls = checkpoint.save_file, []

    def flaky_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", flaky_save)
    trainer = Trainer(nn.Linear(5, 2), Regress(), regression_data(), None, tiny_cfg(checkpoint_every=2), tmp_path)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit()
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]  # no temp or half dirs
    assert json.loads((latest_checkpoint(tmp_path) / "trainer_state.json").read_text())["step"] == 2
    assert not (tmp_path / "model.safetensors").exists()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    trainer = Trainer(nn.Linear(5, 2), Regress(), regression_data(), None, tiny_cfg(), tmp_path)
    with pytest.raises(CheckpointError, match="no complete checkpoint") as info:
        trainer.fit(resume=True)
    assert "\n" not in str(info.value)
