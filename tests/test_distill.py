"""Guidance distillation (`imagen distill`, Meng et al. 2023 stage 1) on tiny cascades: the student starts as the
teacher's conditional branch, learns its guided output, samples with one U-Net call per step, resumes exactly, and
refuses bad input before writing anything."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import assert_same_weights, interrupt_then_resume, one_line_error, run_cli as run
from imagen.diffusion import SamplingConfig, classifier_free_guidance, guidance_distillation_loss, min_snr_weight
from imagen.diffusion.schedules import NoiseSchedule
from imagen.models.text_to_image import StageConfig, TextToImageStage
from imagen.models.unet import UNetConfig, unet_preset
from imagen.pipelines import TextToImagePipeline
from imagen.data import load_dataset
from imagen.errors import GenerationError
from imagen.tasks.text_to_image import GuidanceDistillationTask, T2ISplit, student_stage
from imagen.tasks.text_to_image.cascade_run import load_stage
from imagen.tasks.text_to_image.distill import student_config

# A two-stage cascade small enough for a test: 8x8 base, 8 -> 16 super-resolution.
TINY = ["--batch-size", "8", "--no-progress", "--precision", "fp32"]  # distillation reads its data from the teacher run
TINY_CASCADE = ["--sizes", "8,16", "--n", "48", *TINY, "--set", "base.unet.dim=16", "--set", "base.unet.num_heads=2",
                "--set", "sr1.unet.dim=16", "--set", "sr1.unet.num_heads=2"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A finished tiny cascade, trained long enough that its conditional and guided outputs differ."""
    from imagen.cli import main

    out = tmp_path_factory.mktemp("distill") / "teacher"
    assert main(["train-t2i", "--data", "shapes", "--out", str(out), "--max-steps", "20", "--sr-max-steps", "2",
                 "--sample-every", "100", "--lr", "3e-3", *TINY_CASCADE]) == 0
    return out


def _randomised(stage: TextToImageStage, seed: int = 0) -> TextToImageStage:
    """Every weight perturbed, so zero-initialised layers (residual convs) do not hide a difference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stage.ema_unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return stage


def _condition(B: int, length: int, dim: int, g):
    mask = torch.arange(length)[None] < torch.randint(1, length + 1, (B,), generator=g)[:, None]
    return {"text_states": torch.randn(B, length, dim, generator=g), "text_mask": mask,
            "text_embed": torch.randn(B, dim, generator=g)}


@pytest.mark.parametrize("sr", [False, True])
def test_student_starts_as_the_teachers_conditional_branch_exactly(sr):
    unet = unet_preset("tiny", image_size=8, lowres_cond=sr)
    teacher = _randomised(TextToImageStage(StageConfig(name="sr1" if sr else "base", unet=unet, lowres_size=4 if sr else None)))
    student = student_stage(teacher, (1.0, 6.0))
    assert student.config.guidance_distilled and student.config.unet.guidance_cond
    g = torch.Generator().manual_seed(1)
    B = 3
    x_t = torch.randn(B, 3, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    cond = _condition(B, 5, unet.text_dim, g)
    extra = {"lowres_image": torch.randn(B, 3, 8, 8, generator=g), "lowres_noise_level": torch.rand(B, generator=g)} if sr else {}
    with torch.no_grad():
        want = teacher.ema_unet(x_t, t, **cond, **extra)
        for w in (0.0, 1.0, 3.0, torch.tensor([1.0, 4.5, 6.0])):
            for unet_ in (student.unet, student.ema_unet):
                assert torch.equal(unet_(x_t, t, **cond, **extra, guidance=w), want)
    # The guidance embedding is not dead: its zero-initialised last layer gets a gradient from the first step.
    student.unet(x_t, t, **cond, **extra, guidance=torch.tensor([1.0, 3.0, 6.0])).square().mean().backward()
    assert student.unet.guidance_mlp[-1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs the guidance scale"):
        student.unet(x_t, t, **cond, **extra)
    with pytest.raises(ValueError, match="guidance_cond=False"):
        teacher.unet(x_t, t, **cond, **extra, guidance=3.0)


def test_a_student_records_no_grounding_loss():
    # A student learns from its teacher's outputs; a teacher's grounding weight would be a setting it never used.
    teacher = StageConfig(unet=unet_preset("tiny"), grounding_weight=0.5)
    student = student_config(teacher, (1.0, 6.0), steps=8)
    assert student.grounding_weight == 0.0 and student.guidance_distilled and student.distilled_steps == 8
    assert teacher.grounding_weight == 0.5


def test_a_unet_without_the_option_is_unchanged():
    # Old configs have no guidance_cond key; the default builds the same modules (same state-dict keys) as before.
    assert UNetConfig(**{k: v for k, v in vars(unet_preset("tiny")).items() if k != "guidance_cond"}).guidance_cond is False
    stage = TextToImageStage(StageConfig(unet=unet_preset("tiny")))
    assert not any("guidance" in k for k in stage.state_dict())
    assert StageConfig(unet=unet_preset("tiny")).guidance_distilled is False


def test_distillation_loss_follows_the_formula():
    # Stand-in networks whose conditional and unconditional outputs differ: the target is
    # uncond + w (cond - uncond) at x_t = alpha x0 + sigma eps, the loss its Min-SNR-weighted squared error.
    schedule = NoiseSchedule.from_name("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t, w = torch.tensor([10, 700]), torch.tensor([1.5, 5.0])
    cond = {"text_embed": torch.tensor([[1.0], [2.0]])}
    null = {"text_embed": torch.zeros(2, 1)}

    def teacher(x_t, t, text_embed):
        return 0.5 * x_t + text_embed[:, :, None, None]

    def student(x_t, t, text_embed, guidance):
        return 0.3 * x_t + guidance[:, None, None, None]

    loss = guidance_distillation_loss(student, teacher, x0, t, cond, null, w, schedule=schedule, objective="v",
                                      min_snr_gamma=5.0, snr_floor=1.0, noise=noise)
    a = schedule.sqrt_alphas_cumprod[t][:, None, None, None].float()
    s = schedule.sqrt_one_minus_alphas_cumprod[t][:, None, None, None].float()
    x_t = a * x0 + s * noise
    target = 0.5 * x_t + w[:, None, None, None] * cond["text_embed"][:, :, None, None]  # uncond 0.5 x_t, cond adds embed
    per_sample = ((0.3 * x_t + w[:, None, None, None] - target) ** 2).flatten(1).mean(1)
    weight = min_snr_weight(schedule.log_snr[t].exp(), 5.0, "v", 1.0).float()
    torch.testing.assert_close(loss, (per_sample * weight).mean(), rtol=1e-5, atol=0)
    # The teacher's guided target is classifier_free_guidance's, one scale per sample.
    guided = classifier_free_guidance(teacher, null, scale=w[:, None, None, None])(x_t, t, **cond)
    torch.testing.assert_close(guided, target)


@pytest.fixture(scope="module")
def student(teacher):
    """The teacher's base stage distilled for 20 steps (its sr1 stage copied)."""
    from imagen.cli import main

    out = teacher.parent / "student"
    assert main(["distill", str(teacher), "--out", str(out), "--max-steps", "20", "--lr", "5e-4", "--sample-every", "10",
                 *TINY]) == 0
    return out


def test_distillation_moves_the_student_to_the_guided_teacher(teacher, student, one_thread):
    # The distillation loss (student's one call vs the teacher's guided output, at scales drawn in [1, 6]) on a fixed
    # batch of the run's own training data, at the student's start and after 20 steps.
    teacher_base = load_stage(teacher, "base")
    data = load_dataset("shapes", "train", seed=0, n=48)
    split = T2ISplit(data.fast_images(8), [c[:1] for c in data.caption_sets()], seed=7)
    split.precompute(teacher_base)
    batch = split.__getitems__(list(range(32)))
    task = GuidanceDistillationTask(teacher_base.ema_unet, (1.0, 6.0))
    with torch.no_grad():
        before = float(task._loss(student_stage(teacher_base, (1.0, 6.0)), batch))
        after = float(task._loss(load_stage(student, "base"), batch))
    assert after < 0.7 * before, (before, after)  # measured: 0.063 -> 0.028
    # A complete run: the config records the distilled stage, the other stage is the teacher's, unchanged.
    config = json.loads((student / "config.json").read_text())
    assert config["stage_configs"]["base"]["guidance_distilled"] is True
    assert config["stage_configs"]["sr1"]["guidance_distilled"] is False
    assert config["distillation"]["stages"] == ["base"] and config["distillation"]["guidance_range"] == [1.0, 6.0]
    assert_same_weights(teacher / "sr1" / "model.safetensors", student / "sr1" / "model.safetensors")
    weights = load_file(student / "base" / "model.safetensors")
    assert any(k.startswith("ema_unet.guidance_mlp.") for k in weights)
    assert sorted(p.name for p in (student / "base" / "samples").glob("*.png")) == ["step-000010.png", "step-000020.png"]


def _count_calls(pipe, name):
    calls = []
    unet = pipe.stages[pipe.stage_names.index(name)].ema_unet
    forward = unet.forward

    def counted(x_t, t, **kw):
        calls.append(x_t.shape[0])
        return forward(x_t, t, **kw)

    unet.forward = counted
    return calls


def test_a_distilled_stage_samples_with_one_call_per_step(teacher, student, one_thread):
    prompts, config = ["a red circle", "a blue square"], SamplingConfig(steps=4, guidance=3.0)
    B = len(prompts)
    # The teacher runs both guidance branches in one batched call per step; the distilled base stage one branch
    # (its copied sr1 stage still guides with two).
    for run_dir, base_batch in ((teacher, 2 * B), (student, B)):
        pipe = TextToImagePipeline.from_run(run_dir)
        calls = {name: _count_calls(pipe, name) for name in ("base", "sr1")}
        images = pipe.generate(prompts, config)
        assert images.shape == (B, 3, 16, 16) and torch.isfinite(images).all()
        assert calls == {"base": [base_batch] * 4, "sr1": [2 * B] * 4}
    # Same seed, same pictures; batched equals unbatched.
    pipe = TextToImagePipeline.from_run(student)
    both = pipe.generate(prompts, config)
    one = torch.cat([pipe.generate([p], config) for p in prompts])
    torch.testing.assert_close(both, one, rtol=0, atol=1e-5)
    # Guidance is an input: another scale, other pictures.
    assert not torch.allclose(both, pipe.generate(prompts, SamplingConfig(steps=4, guidance=6.0)))


def test_per_stage_steps_sample_the_distilled_base_in_few_calls(capsys, student, tmp_path, one_thread):
    # The 8-call route of a cascade: the guidance-distilled base stage at few steps, the super-resolution stage at more.
    prompts, B = ["a red circle", "a blue square"], 2
    config = SamplingConfig(steps=5, stage_steps={"base": 2}, guidance=3.0)
    pipe = TextToImagePipeline.from_run(student)
    assert pipe.sampling_plan(config) == [{"stage": "base", "sampler": "dpmpp2m", "steps": 2, "unet_calls": 2},
                                          {"stage": "sr1", "sampler": "dpmpp2m", "steps": 5, "unet_calls": 10}]
    calls = {name: _count_calls(pipe, name) for name in ("base", "sr1")}
    images = pipe.generate(prompts, config)
    assert images.shape == (B, 3, 16, 16) and calls == {"base": [B] * 2, "sr1": [2 * B] * 5}
    # The base stage samples exactly as it does with 2 steps for every stage.
    torch.testing.assert_close(pipe.generate(prompts, config, stop_at="base"),
                               pipe.generate(prompts, SamplingConfig(steps=2, guidance=3.0), stop_at="base"), rtol=0, atol=0)
    with pytest.raises(GenerationError, match="has no stage 'sr2' to give its own steps; its stages are base, sr1"):
        pipe.check_config(SamplingConfig(stage_steps={"sr2": 3}))
    # From the command line: `--steps 5,base=2` is the same request; bad specs are one line, before anything is written.
    out = tmp_path / "grid.png"
    assert run(capsys, "generate", "--run", student, "a red circle", "--steps", "5,base=2", "--out", out)[0] == 0
    assert out.is_file()
    for steps, needle in [("base=2,base=3", "stage 'base' is named twice"), ("=3", "name the stage before '='"),
                          ("5,6", "one bare step count"), ("base=0", "must be a positive integer, got 0"),
                          ("sr3=4", "has no stage 'sr3'")]:
        line = one_line_error(*run(capsys, "generate", "--run", student, "a red circle", "--steps", steps,
                                   "--out", tmp_path / "bad.png")[::2])
        assert needle in line, (steps, line)
    assert not (tmp_path / "bad.png").exists()


def test_distill_ends_with_a_command_that_samples_the_few_step_route(capsys, teacher, tmp_path, one_thread):
    out = tmp_path / "both"
    code, stdout, _ = run(capsys, "distill", teacher, "--stages", "base,sr1", "--out", out, "--max-steps", "1",
                          "--sample-every", "100", *TINY)
    assert code == 0
    command = stdout.strip().splitlines()[-1].split(": ", 1)[1]
    assert command == f'imagen generate --run {out} --steps 25,base=8,sr1=8 "PROMPT" --out grid.png'
    steps = command.split("--steps ")[1].split()[0]
    assert run(capsys, "generate", "--run", out, "a red circle", "--steps", steps, "--out", tmp_path / "g.png")[0] == 0
    assert (tmp_path / "g.png").is_file()


# Each stage runs 5 steps, base first: stopped in the base stage, or (slow) in the super-resolution stage.
@pytest.mark.parametrize("at", [3, pytest.param(5 + 2, marks=pytest.mark.slow)])
def test_interrupted_and_resumed_distillation_equals_uninterrupted(at, capsys, teacher, tmp_path, monkeypatch, one_thread):
    args = ["distill", str(teacher), "--stages", "base,sr1", "--max-steps", "5", "--checkpoint-every", "2", "--sample-every", "2",
            *TINY]
    assert run(capsys, *args, "--out", tmp_path / "straight")[0] == 0
    interrupt_then_resume(capsys, monkeypatch, GuidanceDistillationTask, args, tmp_path / "resumed", at,
                          unfinished="sr1/model.safetensors")
    for name in ("base", "sr1"):
        assert_same_weights(tmp_path / "straight" / name / "model.safetensors", tmp_path / "resumed" / name / "model.safetensors")


def test_bad_input_is_refused_before_anything_is_written(capsys, teacher, tmp_path):
    out = tmp_path / "out"

    def refused(*args, expect):
        code, _, err = run(capsys, "distill", *args)
        line = one_line_error(code, err, ignore_logs=True)
        assert expect in line, line
        assert not out.exists()

    refused(tmp_path / "missing", "--out", out, expect="does not exist")
    (tmp_path / "not-a-run").mkdir()
    refused(tmp_path / "not-a-run", "--out", out, expect="not a run directory")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(teacher, unfinished)
    (unfinished / "sr1" / "model.safetensors").unlink()
    refused(unfinished, "--out", out, expect="is not a finished run (stage sr1")
    refused(teacher, "--out", out, "--stages", "base,sr9", expect="no stage 'sr9'")
    refused(teacher, "--out", out, "--guidance-range", "6,1", expect="--guidance-range 6,1")
    refused(teacher, "--out", out, "--guidance-range", "1,x", expect="comma-separated numbers")
    code, _, err = run(capsys, "distill", teacher, "--out", out, "--set", "base.unet.dim=8")  # the student is the teacher's model
    assert "unrecognized arguments: --set" in one_line_error(code, err) and not out.exists()
    refused(teacher, "--out", teacher, expect="teacher run itself")
    refused(teacher, "--out", out, "--resume", expect="cannot resume")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file.txt").write_text("x")
    code, _, err = run(capsys, "distill", teacher, "--out", taken)
    assert "already exists and is not empty" in one_line_error(code, err, ignore_logs=True)
    assert sorted(p.name for p in taken.iterdir()) == ["file.txt"]


def test_a_distilled_run_refuses_what_it_cannot_do(capsys, teacher, student, tmp_path):
    for extra, expect in ((["--guidance", "7"], "guidance in [1, 6], got 7"), (["--negative", "a circle"], "no negative prompt"),
                          (["--compose"], "compose needs a conditional branch per part")):
        code, _, err = run(capsys, "generate", "--run", student, "a red circle", "--out", tmp_path / "g.png", "--steps", "2", *extra)
        assert expect in one_line_error(code, err, ignore_logs=True)
    # The server checks a request the same way before queueing it (a 422, not a failed batch).
    with pytest.raises(GenerationError, match="guidance-distilled for guidance in"):
        TextToImagePipeline.from_run(student).check_config(SamplingConfig(guidance=0.5))
    # A distilled stage is not distilled again: distil its teacher.
    code, _, err = run(capsys, "distill", student, "--out", tmp_path / "again")
    assert "already guidance-distilled" in one_line_error(code, err, ignore_logs=True)
    # --resume names the teacher it continues.
    code, _, err = run(capsys, "distill", tmp_path / "other", "--out", student, "--resume")
    assert "was distilled from" in one_line_error(code, err, ignore_logs=True)
    code, _, err = run(capsys, "distill", teacher, "--out", student, "--resume", "--guidance-range", "2,4")
    assert "as it was started (--guidance-range 1.0,6.0)" in one_line_error(code, err, ignore_logs=True)


def test_hf_export_of_a_distilled_run_samples_the_same(capsys, student, tmp_path):
    from imagen.export import ImagenModel

    out = tmp_path / "hf"
    assert run(capsys, "export", student, "--format", "hf", "--out", out)[0] == 0
    config = SamplingConfig(steps=3, guidance=4.0)
    got = ImagenModel.from_pretrained(str(out)).model.generate(["a red circle"], config)
    assert torch.equal(got, TextToImagePipeline.from_run(student).generate(["a red circle"], config))


@pytest.mark.slow
def test_onnx_graph_of_a_distilled_stage_takes_the_guidance_scale(capsys, student, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    assert run(capsys, "export", student, "--format", "onnx", "--out", out)[0] == 0
    graph = json.loads((out / "export.json").read_text())["graphs"]["unet_base"]
    assert graph["guidance_distilled"] is True and "guidance" in graph["inputs"]
    stage = load_stage(student, "base")
    g = torch.Generator().manual_seed(3)
    cond = _condition(3, 5, stage.config.unet.text_dim, g)
    inputs = {"x_t": torch.randn(3, 3, 8, 8, generator=g), "t": torch.tensor([0, 400, 999]), "text_states": cond["text_states"],
              "text_mask": cond["text_mask"].long(), "text_embed": cond["text_embed"], "guidance": torch.tensor([1.0, 3.0, 6.0])}
    with torch.no_grad():
        want = stage.ema_unet(inputs["x_t"], inputs["t"], text_states=cond["text_states"], text_mask=cond["text_mask"],
                              text_embed=cond["text_embed"], guidance=inputs["guidance"]).numpy()
    session = ort.InferenceSession(str(out / "unet_base.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    assert abs(got - want).max() < 1e-4


def test_check_config_checks_only_the_stages_that_will_run(student):
    # A super-resolution stage distilled for a narrower range than the base stage's: `--stage base` (stop_at) must
    # not be refused for a guidance only the later stage cannot take, and a whole-cascade request must be.
    pipe = TextToImagePipeline.from_run(student)
    sr = pipe.stages[1].config
    sr.guidance_distilled, sr.guidance_range = True, (1.0, 2.0)
    config = SamplingConfig(guidance=3.0)
    pipe.check_config(config, stop_at="base")
    with pytest.raises(GenerationError, match=f"stage {sr.name}.*guidance in \\[1, 2\\], got 3"):
        pipe.check_config(config)
    with pytest.raises(GenerationError, match="guidance in \\[1, 6\\], got 7"):
        pipe.check_config(SamplingConfig(guidance=7.0), stop_at="base")
