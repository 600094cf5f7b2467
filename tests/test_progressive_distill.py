"""Progressive distillation (`imagen distill --steps N`, Salimans & Ho 2022): the target is exact (one student DDIM
step lands where the teacher's two do), the student samples on the grid it was distilled on, and the command halves
the steps phase by phase into a run usable after every phase."""

import json

import pytest
import torch

from cli_helpers import assert_same_weights, one_line_error, run_cli as run
from imagen.diffusion import (DDIMSampler, SamplingConfig, NoiseSchedule, model_output_to_x0_eps, progressive_distillation_loss,
                              progressive_distillation_target, progressive_timesteps, spaced_timesteps)
from imagen.diffusion.process import min_snr_weight
from imagen.errors import GenerationError


def _teacher(x_t, t, text_embed):
    # A fixed stand-in network: affine in x_t, varying with t and the condition, large enough to be thresholded.
    return 1.7 * x_t + (t.float() / 1000)[:, None, None, None] + text_embed[:, :, None, None]


def _teacher_two_steps_with_the_sampler(x_t, grid, i, cond, schedule, objective, threshold):
    """The teacher's steps grid[2i] -> grid[2i+1] -> grid[2i+2], one sample at a time, as `sample` takes them."""
    ddim, x = DDIMSampler(schedule), x_t
    for t, t_prev in ((grid[2 * i], grid[2 * i + 1]), (grid[2 * i + 1], grid[2 * i + 2])):
        tb = torch.tensor([t])
        pred_x0, eps = model_output_to_x0_eps(schedule, _teacher(x, tb, **cond), x, tb, objective, threshold, 0.995)
        x = ddim.step(pred_x0, eps, t, t_prev, x)
    return x


@pytest.mark.parametrize("objective", ["v", "eps", "x0"])
@pytest.mark.parametrize("threshold", ["dynamic", "static", "none"])
def test_one_student_step_with_the_target_lands_on_the_teachers_two(objective, threshold):
    schedule = NoiseSchedule.from_name("cosine", 1000)
    N = 4
    grid, student_grid = progressive_timesteps(1000, 2 * N), progressive_timesteps(1000, N)
    assert grid == spaced_timesteps(1000, 2 * N) + [-1] and student_grid == grid[::2]
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(N, 3, 4, 4, generator=g, dtype=torch.float64)
    cond = {"text_embed": torch.randn(N, 3, generator=g, dtype=torch.float64) * 0.3}
    step = torch.arange(N)  # every student step, the last one onto clean data included
    t, t_mid, t_next = (torch.tensor(grid)[2 * step + k] for k in range(3))
    target = progressive_distillation_target(_teacher, x_t, t, t_mid, t_next, cond, schedule=schedule,
                                             objective=objective, threshold=threshold, percentile=0.995)
    for i in range(N):
        want = _teacher_two_steps_with_the_sampler(x_t[i:i + 1], grid, i, {"text_embed": cond["text_embed"][i:i + 1]},
                                                   schedule, objective, threshold)
        tb = torch.tensor([student_grid[i]])
        pred_x0, eps = model_output_to_x0_eps(schedule, target[i:i + 1], x_t[i:i + 1], tb, objective, "none")
        got = DDIMSampler(schedule).step(pred_x0, eps, student_grid[i], student_grid[i + 1], x_t[i:i + 1])
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        if i == N - 1:  # the last step lands on clean data: the target's x0 is the teacher's result itself
            torch.testing.assert_close(pred_x0, want, rtol=1e-9, atol=1e-9)


def test_the_loss_is_the_truncated_snr_weighted_error_against_the_target():
    schedule = NoiseSchedule.from_name("cosine", 1000)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    cond = {"text_embed": torch.randn(3, 3, generator=g)}
    step = torch.tensor([0, 2, 3])

    def student(x_t, t, text_embed):
        return 0.2 * x_t

    loss = progressive_distillation_loss(student, _teacher, x0, step, cond, steps=4, schedule=schedule, objective="v",
                                         threshold="dynamic", percentile=0.995, noise=noise)
    grid = torch.tensor(progressive_timesteps(1000, 8))
    t = grid[2 * step]
    assert t.tolist() == [999, 499, 249]
    x_t = schedule.sqrt_alphas_cumprod[t][:, None, None, None].float() * x0 + \
        schedule.sqrt_one_minus_alphas_cumprod[t][:, None, None, None].float() * noise
    target = progressive_distillation_target(_teacher, x_t, t, grid[2 * step + 1], grid[2 * step + 2], cond,
                                             schedule=schedule, objective="v", threshold="dynamic", percentile=0.995)
    snr = schedule.log_snr[t].exp()
    weight = (snr.clamp(min=1) / (snr + 1)).float()  # max(SNR, 1) in x0 terms, as a v-loss weight
    torch.testing.assert_close(weight, min_snr_weight(snr, None, "v", 1.0).float())
    per_sample = ((0.2 * x_t - target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, (per_sample * weight).mean(), rtol=1e-5, atol=0)


# A two-stage cascade small enough for a test: 8x8 base, 8 -> 16 super-resolution (as tests/test_distill.py builds it).
TINY = ["--batch-size", "8", "--no-progress", "--precision", "fp32"]
TINY_CASCADE = ["--sizes", "8,16", "--n", "48", *TINY, "--set", "base.unet.dim=16", "--set", "base.unet.num_heads=2",
                "--set", "sr1.unet.dim=16", "--set", "sr1.unet.num_heads=2"]
# Two halvings, 8 -> 4 -> 2 DDIM steps, 3 optimiser steps each.
PROGRESSIVE = ["--steps", "2", "--from-steps", "8", "--max-steps", "3", "--checkpoint-every", "2", "--sample-every", "3", *TINY]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A finished tiny cascade (not guidance-distilled: its phases' teachers guide with two branches)."""
    from imagen.cli import main

    out = tmp_path_factory.mktemp("progressive") / "teacher"
    assert main(["train-t2i", "--data", "shapes", "--out", str(out), "--max-steps", "4", "--sr-max-steps", "2",
                 "--sample-every", "100", *TINY_CASCADE]) == 0
    return out


@pytest.fixture(scope="module")
def student(teacher):
    """The uninterrupted distillation, in one thread as the tests that compare with it (a module fixture is set up
    before their function-scoped `one_thread`, and another thread count gives other floating-point sums)."""
    from imagen.cli import main

    out = teacher.parent / "student"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["distill", str(teacher), "--out", str(out), *PROGRESSIVE]) == 0
    finally:
        torch.set_num_threads(previous)
    return out


def _count_calls(pipe, name):
    calls = []
    unet = pipe.stages[pipe.stage_names.index(name)].ema_unet
    forward = unet.forward

    def counted(x_t, t, **kw):
        calls.append((x_t.shape[0], int(t[0])))
        return forward(x_t, t, **kw)

    unet.forward = counted
    return calls


def test_a_progressively_distilled_stage_samples_on_its_grid_with_one_call_per_step(teacher, student, one_thread):
    from imagen.pipelines import TextToImagePipeline

    config = json.loads((student / "config.json").read_text())
    base = config["stage_configs"]["base"]
    assert (base["distilled_steps"], base["distilled_sampler"], base["guidance_distilled"]) == (2, "ddim", True)
    assert config["distillation"]["steps"] == 2 and config["distillation"]["stages"] == ["base"]
    assert sorted(p.name for p in (student / "base").glob("phase-*")) == ["phase-2", "phase-4"]
    prompts = ["a red circle", "a blue square"]
    pipe = TextToImagePipeline.from_run(student)
    calls = {name: _count_calls(pipe, name) for name in ("base", "sr1")}
    # The request's 3 dpmpp2m steps apply to the copied sr1 stage (two guidance branches per call); the distilled
    # base stage takes its own 2 DDIM steps, one branch, on the grid it was distilled on (trailing, 1000 timesteps).
    images = pipe.generate(prompts, SamplingConfig(steps=3, guidance=3.0))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert calls["base"] == [(2, 999), (2, 499)]
    assert [b for b, _ in calls["sr1"]] == [4] * 3
    # What evaluate-t2i records: each stage's own sampler, steps and U-Net evaluations per image.
    assert pipe.sampling_plan(SamplingConfig(steps=3, guidance=3.0)) == [
        {"stage": "base", "sampler": "ddim", "steps": 2, "unet_calls": 2},
        {"stage": "sr1", "sampler": "dpmpp2m", "steps": 3, "unet_calls": 6}]
    # Per-stage steps: naming its own count is the same request; another count is refused, not silently ignored.
    assert pipe.sampling_plan(SamplingConfig(steps=3, stage_steps={"base": 2}, guidance=3.0))[0]["steps"] == 2
    with pytest.raises(GenerationError, match="progressively distilled to 2 DDIM steps.*drop base=8"):
        pipe.check_config(SamplingConfig(steps=3, stage_steps={"base": 8}, guidance=3.0))
    # An exported step graph says which grid it was distilled for (only that grid makes good pictures).
    from imagen.export.onnx import graph_for_stage
    info = graph_for_stage(pipe.stages[0], text_len=4).info
    assert (info["distilled_steps"], info["distilled_sampler"]) == (2, "ddim")
    assert "distilled_steps" not in graph_for_stage(pipe.stages[1], text_len=4).info
    # It is DDIM on that grid: the same pictures as the stage sampled as an ordinary DDIM 2-step stage.
    assert torch.equal(pipe.generate(prompts, SamplingConfig(steps=2, sampler="ddim", guidance=3.0), stop_at="base"),
                       pipe.generate(prompts, SamplingConfig(steps=7, guidance=3.0), stop_at="base"))


def test_bad_steps_are_refused_before_anything_is_written(capsys, teacher, student, tmp_path):
    out = tmp_path / "out"
    for args, expect in ((["--steps", "3"], "--steps 3: stage base starts from 64 DDIM steps"),
                         (["--steps", "64"], "must be one of 32, 16, 8, 4, 2, 1"),
                         (["--steps", "2", "--from-steps", "12"], "starts from 12 DDIM steps and each phase halves them, so "
                                                                  "--steps must be one of 6, 3"),
                         (["--from-steps", "8"], "give --steps N as well")):
        code, _, err = run(capsys, "distill", teacher, "--out", out, *args)
        assert expect in one_line_error(code, err, ignore_logs=True)
        assert not out.exists()
    # A progressive run continues from its own count (2): it halves to 1 only.
    code, _, err = run(capsys, "distill", student, "--out", out, "--steps", "4")
    assert "starts from 2 DDIM steps" in one_line_error(code, err, ignore_logs=True) and not out.exists()
    code, _, err = run(capsys, "distill", student, "--out", out, "--steps", "1", "--guidance-range", "0,7")
    assert "outside stage base's guidance range 1,6" in one_line_error(code, err, ignore_logs=True) and not out.exists()
    code, _, err = run(capsys, "distill", student, "--out", out, "--steps", "1", "--from-steps", "8")
    assert "is distilled to 2 steps" in one_line_error(code, err, ignore_logs=True) and not out.exists()
    code, _, err = run(capsys, "distill", teacher, "--out", student, "--steps", "4", "--from-steps", "8", "--resume")
    assert "as it was started (--steps 2)" in one_line_error(code, err, ignore_logs=True)
    code, _, err = run(capsys, "distill", teacher, "--out", student, "--resume")  # not as a guidance distillation
    assert "continue it with the same --steps 2 --resume" in one_line_error(code, err, ignore_logs=True)
    code, _, err = run(capsys, "distill", teacher, "--out", out, "--steps", "2", "--guidance-range", "1,x")
    assert "comma-separated numbers" in one_line_error(code, err, ignore_logs=True) and not out.exists()


def test_interrupted_in_the_second_phase_the_run_samples_at_the_first_and_resumes_exactly(
        capsys, teacher, student, tmp_path, monkeypatch, one_thread):
    from imagen.pipelines import TextToImagePipeline
    from imagen.tasks.text_to_image import ProgressiveDistillationTask

    out = tmp_path / "resumed"
    original = ProgressiveDistillationTask.training_step
    calls = {"n": 0}

    def interrupt(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 6:  # the third step of the second phase, after its checkpoint at step 2
            raise KeyboardInterrupt
        return original(self, model, batch)

    monkeypatch.setattr(ProgressiveDistillationTask, "training_step", interrupt)
    code, _, err = run(capsys, "distill", teacher, "--out", out, *PROGRESSIVE)
    assert code == 130 and "--steps 2 --from-steps 8 --resume" in err, err
    # The first phase is finished: the run samples its base stage at 4 DDIM steps.
    pipe = TextToImagePipeline.from_run(out)
    assert pipe.stages[0].config.distilled_steps == 4 and not (out / "base" / "phase-2" / "model.safetensors").exists()
    base_calls = _count_calls(pipe, "base")
    pipe.generate(["a red circle"], SamplingConfig(steps=3), stop_at="base")
    assert [t for _, t in base_calls] == [999, 749, 499, 249]
    monkeypatch.setattr(ProgressiveDistillationTask, "training_step", original)
    code, _, err = run(capsys, "distill", teacher, "--out", out, *PROGRESSIVE, "--resume")
    assert code == 0, err
    for path in ("base/phase-4/model.safetensors", "base/phase-2/model.safetensors", "base/model.safetensors"):
        assert_same_weights(student / path, out / path)
    assert json.loads((out / "config.json").read_text())["stage_configs"] == \
        json.loads((student / "config.json").read_text())["stage_configs"]


@pytest.mark.parametrize("guidance_cond", [False, True])
def test_the_teacher_takes_its_steps_guided_either_way(guidance_cond):
    # A guidance-distilled teacher gets the drawn scale as its input (one branch per call); an undistilled one runs
    # classifier-free guidance at that scale (two branches per call). Two teacher steps, one student call.
    from imagen.models.text_to_image import StageConfig, TextToImageStage
    from imagen.models.unet import unet_preset
    from imagen.tasks.text_to_image import ProgressiveDistillationTask, student_stage

    teacher = TextToImageStage(StageConfig(unet=unet_preset("tiny", image_size=8)))
    if guidance_cond:
        teacher = student_stage(teacher, (2.0, 4.0))
    student = student_stage(teacher, (2.0, 4.0), steps=4)
    assert student.config.distilled_steps == 4 and student.config.distilled_sampler == "ddim"
    seen = []
    forward = teacher.ema_unet.forward

    def counted(x_t, t, **kw):
        seen.append((x_t.shape[0], kw.get("guidance")))
        return forward(x_t, t, **kw)

    teacher.ema_unet.forward = counted
    g = torch.Generator().manual_seed(0)
    B, dim = 3, teacher.config.unet.text_dim
    batch = {"images": torch.randint(0, 256, (B, 3, 8, 8), dtype=torch.uint8, generator=g),
             "sample_seeds": torch.tensor([1, 2, 3]), "text_states": torch.randn(B, 4, dim, generator=g),
             "text_mask": torch.ones(B, 4, dtype=torch.bool), "text_embed": torch.randn(B, dim, generator=g)}
    loss = ProgressiveDistillationTask(teacher, 4, (2.0, 4.0))._loss(student, batch)
    assert torch.isfinite(loss) and loss > 0
    assert [b for b, _ in seen] == ([B] * 2 if guidance_cond else [2 * B] * 2)
    if guidance_cond:
        w = seen[0][1]
        assert w.shape == (B,) and bool(((w >= 2.0) & (w <= 4.0)).all()) and torch.equal(seen[1][1], w)
    else:
        assert seen[0][1] is None
