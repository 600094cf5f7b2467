"""Optimiser groups, the warmup + cosine schedule, device helpers and the metrics logger."""

import json
import math

import pytest
import torch
from torch import nn

from imagen.config import ConfigError, TrainConfig
from imagen.train import (MetricsLogger, autocast_context, build_optimizer, build_scheduler, lr_lambda,
                          move_to_device, resolve_device, resolve_precision)
from imagen.train.device import batch_size_of, cpu_has_fast_bf16


class Tagger(nn.Module):
    """Has every kind of parameter the weight-decay rule distinguishes."""

    def __init__(self):
        super().__init__()
        self.token_embed = nn.Embedding(11, 6)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 6))
        self.proj = nn.Linear(6, 7)
        self.norm = nn.LayerNorm(7)
        self.conv = nn.Conv1d(7, 3, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def test_weight_decay_groups():
    model = Tagger()
    cfg = TrainConfig(weight_decay=0.07)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd_of[id(model.proj.weight)] == 0.07
    assert wd_of[id(model.conv.weight)] == 0.07
    for p in (model.proj.bias, model.conv.bias, model.norm.weight, model.norm.bias,
              model.token_embed.weight, model.pos_embed):
        assert wd_of[id(p)] == 0.0
    assert id(model.frozen.weight) not in wd_of and id(model.frozen.bias) not in wd_of


def test_sgd_is_nesterov():
    opt = build_optimizer(Tagger(), TrainConfig(optimizer="sgd", momentum=0.8, lr=0.1))
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.8


def test_no_trainable_parameters_is_an_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, TrainConfig())


def test_lr_lambda_exact_numbers():
    # warmup 4, total 14, floor 0.1: (s+1)/4 for s < 4, then 0.1 + 0.9 * (1 + cos(pi * (s-4)/10)) / 2
    assert [lr_lambda(s, 4, 14, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_lambda(4, 4, 14, 0.1) == 1.0
    assert lr_lambda(9, 4, 14, 0.1) == pytest.approx(0.55, abs=1e-12)
    assert lr_lambda(6, 4, 14, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.2)), abs=1e-12)
    assert lr_lambda(14, 4, 14, 0.1) == pytest.approx(0.1, abs=1e-12)
    assert lr_lambda(99, 4, 14, 0.1) == pytest.approx(0.1, abs=1e-12)
    assert lr_lambda(0, 0, 10, 0.0) == 1.0  # no warmup starts at the peak


def test_scheduler_drives_the_optimizer():
    model = nn.Linear(3, 3)
    cfg = TrainConfig(lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, 14, cfg)
    seen = []
    for _ in range(14):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.25e-3) and seen[3] == pytest.approx(1e-3)
    assert seen[9] == pytest.approx(0.55e-3)
    assert len({g["lr"] for g in opt.param_groups}) == 1  # every group follows the same schedule
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1e-3)


def test_warmup_ratio_is_used_when_steps_are_zero():
    model = nn.Linear(3, 3)
    cfg = TrainConfig(lr=1.0, warmup_steps=0, warmup_ratio=0.1)
    opt = build_optimizer(model, cfg)
    build_scheduler(opt, 20, cfg)  # warmup = round(0.1 * 20) = 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_device_helpers():
    assert resolve_device("cpu") == torch.device("cpu")
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_precision("auto", cpu, num_params=3_000_000) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_precision("auto", cpu, num_params=710_000) == ("bf16" if cpu_has_fast_bf16() else "fp32")  # mini
    assert resolve_precision("auto", cpu, num_params=170_000) == "fp32"  # tiny models run faster in fp32 on CPU
    assert resolve_precision("bf16", cpu, num_params=170_000) == "bf16"  # an explicit choice is kept
    with autocast_context(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    batch = {"x": torch.ones(3, 2), "pair": (torch.zeros(3), [torch.zeros(1)]), "name": "a"}
    moved = move_to_device(batch, "cpu")
    assert moved["name"] == "a" and isinstance(moved["pair"], tuple) and isinstance(moved["pair"][1], list)
    assert batch_size_of(batch) == 3 and batch_size_of(["text", (torch.zeros(5, 1),)]) == 5


def test_metrics_logger_resume_drops_later_steps(tmp_path):
    with MetricsLogger(tmp_path, ("jsonl",)) as logger:
        for step in (1, 2, 3, 4):
            logger.log(step, 0.0, "train", {"loss": torch.tensor(float(step)), "bad": math.nan})
    with MetricsLogger(tmp_path, ("jsonl",), resume_step=2) as logger:
        logger.log(3, 0.0, "val", {"accuracy": 0.5})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train"), (3, "val")]
    assert rows[0]["loss"] == 1.0 and rows[0]["bad"] is None


def test_wandb_missing_is_a_one_line_error(tmp_path):
    try:  # wandb is optional; the message is only checked where it is absent
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install wandb") as info:
            MetricsLogger(tmp_path, ("jsonl", "wandb"))
        assert "\n" not in str(info.value)
    else:
        pytest.skip("wandb is installed")


class TinyEncoderModel(nn.Module):
    """Named like an encoder with two blocks and a head: what layer-wise lr decay reads depths from."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.patch_embed = nn.Linear(4, 6)
        self.encoder.image_pos_embed = nn.Parameter(torch.zeros(1, 3, 6))
        self.encoder.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))
        self.encoder.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 2)


def test_layer_decay_scales_each_depth_exactly():
    model = TinyEncoderModel()
    opt = build_optimizer(model, TrainConfig(lr=0.1, weight_decay=0.05, layer_decay=0.5))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    # L = 2 blocks: embeddings at depth 0 get 0.5^3, block i 0.5^(2 - i), the final norm and head the full lr.
    assert lr_of[id(model.encoder.patch_embed.weight)] == pytest.approx(0.1 * 0.5 ** 3)
    assert lr_of[id(model.encoder.image_pos_embed)] == pytest.approx(0.1 * 0.5 ** 3)
    assert lr_of[id(model.encoder.blocks[0].weight)] == pytest.approx(0.1 * 0.5 ** 2)
    assert lr_of[id(model.encoder.blocks[1].bias)] == pytest.approx(0.1 * 0.5)
    assert lr_of[id(model.encoder.norm.weight)] == lr_of[id(model.head.weight)] == pytest.approx(0.1)
    assert wd_of[id(model.encoder.blocks[0].weight)] == 0.05 and wd_of[id(model.encoder.blocks[0].bias)] == 0.0
    sched = build_scheduler(opt, 10, TrainConfig(warmup_steps=2))  # the schedule multiplies every group's own lr
    opt.step()
    sched.step()
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(model.head.weight)] == pytest.approx(0.1 * lr_lambda(1, 2, 10, 0.0))
    assert lrs[id(model.encoder.patch_embed.weight)] == pytest.approx(0.1 * 0.5 ** 3 * lr_lambda(1, 2, 10, 0.0))


def test_layer_decay_off_keeps_two_groups_and_needs_blocks():
    opt = build_optimizer(TinyEncoderModel(), TrainConfig(lr=0.1))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]  # the order old checkpoints' states follow
    assert all(g["lr"] == 0.1 for g in opt.param_groups)
    with pytest.raises(ConfigError, match="layer_decay"):
        build_optimizer(Tagger(), TrainConfig(layer_decay=0.75))
    with pytest.raises(ConfigError, match="layer_decay"):
        TrainConfig(layer_decay=1.5)


def test_loaded_optimizer_state_takes_each_parameters_layout():
    # Moments saved from contiguous weights, loaded for channels-last ones: the fused AdamW step must equal the one
    # taken in the original layout.
    from imagen.train.optim import load_optimizer_state

    torch.manual_seed(0)
    w, g1, g2 = torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3)
    p = nn.Parameter(w.clone())
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = g1.clone()
    opt.step()
    p.grad = g2.clone()
    opt.step()  # the reference second step, all contiguous

    q = nn.Parameter(w.clone())
    opt_q = torch.optim.AdamW([q], lr=0.1, fused=True)
    q.grad = g1.clone()
    opt_q.step()
    saved = opt_q.state_dict()
    q.data = q.data.contiguous(memory_format=torch.channels_last)  # this machine's layout
    opt_q = torch.optim.AdamW([q], lr=0.1, fused=True)
    load_optimizer_state(opt_q, saved)
    state = opt_q.state[q]
    assert state["exp_avg"].stride() == state["exp_avg_sq"].stride() == q.stride()
    q.grad = g2.clone().contiguous(memory_format=torch.channels_last)
    opt_q.step()
    torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=1e-6)
