"""Text-to-image end to end on tiny cascades: train-t2i, generate (grid, files, img2img, inpainting), resume, bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cli_helpers import assert_same_weights, interrupt_then_resume, one_line_error, run_cli as run
from imagen.cli import main
from imagen.config import DEFAULT_T2I_CAPTIONS
from imagen.models.text_to_image import StageConfig, TextToImageStage
from imagen.models.unet import UNET_PRESETS, UNetConfig

# A two-stage cascade small enough for a test: 8x8 base, 8 -> 16 super-resolution.
TINY = ["--sizes", "8,16", "--n", "48", "--batch-size", "8", "--no-progress", "--precision", "fp32",
        "--set", "base.unet.dim=16", "--set", "base.unet.num_heads=2", "--set", "sr1.unet.dim=16", "--set", "sr1.unet.num_heads=2"]



@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i") / "run"
    assert main(["train-t2i", "--data", "shapes", "--out", str(out), "--max-steps", "3", *TINY]) == 0
    return out


def test_train_t2i_writes_every_stage(t2i_run):
    config = json.loads((t2i_run / "config.json").read_text())
    assert config["text_encoder"] == {"kind": "hf", "path": "minilm", "max_length": 32}  # the default: frozen MiniLM
    assert config["task"] == "text-to-image" and config["stages"] == ["base", "sr1"]
    assert config["data"]["captions"] == DEFAULT_T2I_CAPTIONS
    for stage in ("base", "sr1"):
        assert (t2i_run / stage / "model.safetensors").is_file()
        assert sorted((t2i_run / stage / "samples").glob("*.png")), "sample grids are written as training goes"
        weights = load_file(t2i_run / stage / "model.safetensors")
        # A frozen text encoder stays out of the run's weights; it is rebuilt from the config's spec.
        assert any(k.startswith("ema_unet.") for k in weights) and not any(k.startswith("text_encoder.") for k in weights)


def test_generate_is_deterministic_by_seed(capsys, t2i_run, tmp_path):
    for name in ("a.png", "b.png"):
        code, _, err = run(capsys, "generate", "--run", t2i_run, "a red circle", "--n", "2", "--steps", "3", "--seed", "7", "--out", tmp_path / name)
        assert code == 0, err
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png"))
    assert a.shape == (2 + 1 * (16 + 2), 2 + 2 * (16 + 2), 3)  # one row of two 16x16 samples, 2 px padding
    assert (a == b).all()
    run(capsys, "generate", "--run", t2i_run, "a red circle", "--n", "2", "--steps", "3", "--seed", "8", "--out", tmp_path / "c.png")
    assert not (np.asarray(Image.open(tmp_path / "c.png")) == a).all()


def test_generate_prompt_file_to_folder(capsys, t2i_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  \na blue square to the left of a green triangle\n")
    code, _, err = run(capsys, "generate", "--run", t2i_run, "--prompts", prompts, "--n", "2", "--steps", "2",
                       "--sampler", "ddim", "--guidance", "3", "--negative", "a yellow square", "--out-dir", tmp_path / "out")
    assert code == 0, err
    rows = [json.loads(l) for l in (tmp_path / "out" / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red circle"] * 2 + ["a blue square to the left of a green triangle"] * 2
    for r in rows:
        assert Image.open(tmp_path / "out" / r["file"]).size == (16, 16) and r["seed"] == 0


def test_inpainting_keeps_the_known_region(capsys, t2i_run, tmp_path):
    init = np.zeros((16, 16, 3), dtype=np.uint8)
    init[:, :8] = (220, 40, 40)
    Image.fromarray(init).save(tmp_path / "init.png")
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, 8:] = 255  # regenerate the right half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code, _, err = run(capsys, "generate", "--run", t2i_run, "a red circle", "--n", "1", "--steps", "4",
                       "--init-image", tmp_path / "init.png", "--mask", tmp_path / "mask.png", "--out-dir", tmp_path / "inp")
    assert code == 0, err
    out = np.asarray(Image.open(tmp_path / "inp" / "0000-00.png")).astype(int)
    assert np.abs(out[:, :8] - init[:, :8]).max() <= 1  # kept exactly (up to uint8 rounding)
    code, _, err = run(capsys, "generate", "--run", t2i_run, "a red circle", "--n", "1", "--steps", "4",
                       "--init-image", tmp_path / "init.png", "--strength", "0.5", "--out", tmp_path / "i2i.png")
    assert code == 0, err


def test_evaluate_t2i_scores_a_16px_run_at_the_evaluators_32px(t2i_run, monkeypatch):
    from imagen.eval import evaluator as evaluator_mod
    from imagen.pipelines import SamplingConfig, evaluate_t2i

    tiny = evaluator_mod.train_evaluator(size=32, steps=3, batch_size=8)
    seen = []

    def fake_get_evaluator(size, device="cpu"):
        assert size == 32
        return tiny

    original_predict = tiny.predict
    monkeypatch.setattr(tiny, "predict", lambda images: seen.append(tuple(images.shape)) or original_predict(images))
    monkeypatch.setattr(evaluator_mod, "get_evaluator", fake_get_evaluator)
    r = evaluate_t2i(t2i_run, "shapes", SamplingConfig(steps=2), n_per_category=2, fid_samples=8, batch_size=8, echo=lambda *a: None)
    assert r["image_size"] == 16 and r["n"] == 8 and r["fid_samples"] == 8  # 2 prompts in each of 4 categories
    assert seen[0] == (8, 3, 32, 32)  # the cascade's 16x16 pictures were upscaled to the evaluator's canvas
    assert 0.0 <= r["compositional_accuracy"] <= 1.0 and r["fid"] >= 0.0
    # The same pictures read by the non-learned pixel check too, and what each stage ran is on record.
    assert r["pixel_n"] == 8 and 0.0 <= r["pixel_and_accuracy"] <= 1.0 and 0.0 <= r["pixel_agreement"] <= 1.0
    assert [(s["stage"], s["steps"], s["unet_calls"]) for s in r["stages"]] == [("base", 2, 4), ("sr1", 2, 4)]
    saved = json.loads((t2i_run / "eval" / "t2i-shapes.json").read_text())
    assert saved["compositional_accuracy"] == r["compositional_accuracy"]
    rows = [json.loads(line) for line in (t2i_run / "eval" / "t2i-shapes-prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {row["category"] for row in rows} == {"single", "relation", "count", "and"}
    assert sum(row["pixel"]["correct"] for row in rows) == round(r["pixel_compositional_accuracy"] * 8)
    assert sum(sum(kinds.values()) for kinds in r["failures"].values()) == 8


def test_ema_update_follows_the_formula():
    cfg = StageConfig(unet=UNetConfig(**dict(UNET_PRESETS["tiny"], image_size=8, text_dim=16)), ema_decay=0.9)
    stage = TextToImageStage(cfg, text_encoder=None)
    before = {k: v.clone() for k, v in stage.ema_unet.state_dict().items()}
    with torch.no_grad():
        for p in stage.unet.parameters():
            p.add_(1.0)
    stage.update_ema()
    online = stage.unet.state_dict()
    for name, p in stage.ema_unet.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * online[name])
    # Warm-up: at step 2 the decay is min(0.9, 3 / 12) = 0.25.
    before = {k: v.clone() for k, v in stage.ema_unet.state_dict().items()}
    stage.update_ema(step=2)
    for name, p in stage.ema_unet.named_parameters():
        torch.testing.assert_close(p, 0.25 * before[name] + 0.75 * online[name])


def test_text_dropout_gives_the_null_condition():
    cond = {"text_states": torch.randn(4, 5, 8), "text_mask": torch.ones(4, 5, dtype=torch.bool), "text_embed": torch.randn(4, 8)}
    drop = torch.tensor([True, False, True, False])
    out = TextToImageStage.drop_condition(cond, drop)
    assert not out["text_mask"][drop].any() and out["text_mask"][~drop].all()
    assert (out["text_embed"][drop] == 0).all()
    torch.testing.assert_close(out["text_embed"][~drop], cond["text_embed"][~drop])


def test_stage_overrides_set_loss_weighting_and_none():
    from imagen.config import ConfigError, apply_overrides

    stages = {"base": StageConfig()}
    apply_overrides(stages, ["base.min_snr_gamma=none", "base.snr_floor=0.5"])
    assert stages["base"].min_snr_gamma is None and stages["base"].snr_floor == 0.5
    with pytest.raises(ConfigError, match="bad value 'none' for base.ema_decay"):  # not an optional field
        apply_overrides(stages, ["base.ema_decay=none"])
    with pytest.raises(ConfigError, match=r"snr_floor 9.0 must be in \(0, min_snr_gamma=5.0\]"):
        StageConfig(snr_floor=9.0)
    # An optional tuple field takes comma-separated items.
    apply_overrides(stages, ["base.unet.cross_attn_levels=true,false,false"])
    assert stages["base"].unet.cross_attn_levels == (True, False, False)
    assert [stages["base"].unet.attention_kind(i) for i in range(3)] == ["cross", "full", "full"]


@pytest.mark.parametrize("stage, at", [("base", 4), ("sr1", 5 + 3)])  # each stage runs 5 steps, base first
def test_interrupted_and_resumed_t2i_equals_uninterrupted(stage, at, capsys, tmp_path, monkeypatch, one_thread):
    # The trainable text encoder: its weights train with the U-Net, so they too must resume exactly.
    # --captions all: each visit draws one of a scene's captions, and the resumed run must draw the same ones.
    # Inside the super-resolution stage the low-res input's noise-augmentation levels are random draws as well.
    # Sample grids (own generator) at steps 2 and 4, on both sides of the interruption, must not shift the training draws.
    args = ["train-t2i", "--data", "shapes", "--max-steps", "5", "--checkpoint-every", "2", "--text-encoder", "trainable",
            "--captions", "all", "--sample-every", "2", *TINY]
    assert run(capsys, *args, "--out", tmp_path / "straight")[0] == 0
    from imagen.tasks.text_to_image import TextToImageTask

    interrupt_then_resume(capsys, monkeypatch, TextToImageTask, args, tmp_path / "resumed", at, unfinished="sr1/model.safetensors")
    for name in ("base", "sr1"):
        assert_same_weights(tmp_path / "straight" / name / "model.safetensors", tmp_path / "resumed" / name / "model.safetensors")


def _one_line_error(code, err):
    return one_line_error(code, err, ignore_logs=True)


def test_generate_bad_input(capsys, t2i_run, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n")
    cases = [
        (["generate", "--run", t2i_run, "   ", "--out", tmp_path / "x.png"], "empty"),
        (["generate", "--run", t2i_run, "--prompts", blank, "--out", tmp_path / "x.png"], "no prompts"),
        (["generate", "--run", t2i_run, "--prompts", tmp_path / "none.txt", "--out", tmp_path / "x.png"], "does not exist"),
        (["generate", "--run", t2i_run, "--prompts", tmp_path, "--out", tmp_path / "x.png"], "is a folder"),
        (["generate", "--run", t2i_run, "a red circle", "--sampler", "euler", "--out", tmp_path / "x.png"], "dpmpp2m"),
        (["generate", "--run", t2i_run, "a red circle", "--steps", "0", "--out", tmp_path / "x.png"], "positive"),
        (["generate", "--run", t2i_run, "a red circle", "--guidance", "-1", "--out", tmp_path / "x.png"], "guidance"),
        (["generate", "--run", t2i_run, "a red circle", "--stage", "sr5", "--out", tmp_path / "x.png"], "sr5"),
        (["generate", "--run", t2i_run, "AND a red circle", "--compose", "--out", tmp_path / "x.png"], "empty part"),
        (["generate", "--run", tmp_path, "a red circle", "--out", tmp_path / "x.png"], "not a run"),
        (["train-t2i", "--data", "shapes", "--out", tmp_path / "t", "--text-encoder", tmp_path / "nowhere", "--max-steps", "1"], "nowhere"),
    ]
    for argv, needle in cases:
        line = _one_line_error(*run(capsys, *argv)[::2])
        assert needle in line, (argv, line)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "t").exists()


def test_generate_refuses_a_classification_run(capsys, tmp_path):
    cls = tmp_path / "cls"
    assert main(["finetune", "--task", "classify", "--data", "shapes", "--n", "32", "--out", str(cls), "--max-steps", "1", "--no-progress"]) == 0
    line = _one_line_error(*run(capsys, "generate", "--run", cls, "a red circle", "--out", tmp_path / "x.png")[::2])
    assert "not a text-to-image run" in line


def test_prompts_come_from_a_pipe_or_standard_input(tmp_path, monkeypatch):
    import io
    import os
    import threading

    from imagen.pipelines import read_prompts

    fifo = tmp_path / "prompts.fifo"  # what bash's --prompts <(...) hands over: a pipe, not a regular file
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("a red circle\n\ntwo blue squares\n"))
    writer.start()
    assert read_prompts(None, fifo) == ["a red circle", "two blue squares"]
    writer.join()
    monkeypatch.setattr("sys.stdin", io.StringIO("a green triangle\n  \n"))
    assert read_prompts(None, "-") == ["a green triangle"]


def test_a_sampling_option_set_on_the_cli_reaches_the_sampler(capsys, t2i_run, tmp_path, monkeypatch):
    import imagen.diffusion.samplers as samplers

    seen = []
    original = samplers.apply_threshold
    monkeypatch.setattr(samplers, "apply_threshold", lambda x0, mode, p: seen.append((mode, p)) or original(x0, mode, p))
    code, _, err = run(capsys, "generate", "--run", t2i_run, "a red circle", "--n", "1", "--steps", "2", "--percentile", "0.9",
                       "--out", tmp_path / "p.png")
    assert code == 0, err
    assert seen == [("dynamic", 0.9)] * 4  # two stages, two steps each
    line = _one_line_error(*run(capsys, "generate", "--run", t2i_run, "a red circle", "--percentile", "1.5", "--out", tmp_path / "q.png")[::2])
    assert "percentile must be in (0, 1]" in line


def test_pipeline_batched_equals_unbatched(t2i_run):
    from imagen.pipelines import SamplingConfig, TextToImagePipeline

    pipe = TextToImagePipeline.from_run(t2i_run, stages=["base"])
    config = SamplingConfig(steps=3, seed=5, n=1)
    both = pipe.generate(["a red circle", "a blue square to the left of a green triangle"], config)
    alone = pipe.generate(["a red circle"], config)
    assert both.shape == (2, 3, 8, 8)
    # The first prompt's noise is the generator's first draw either way; padding to the longer prompt changes nothing.
    torch.testing.assert_close(both[:1], alone, rtol=0, atol=1e-4)
    assert pipe.generate(["a red circle"], SamplingConfig(steps=3, seed=5, n=2)).shape == (2, 3, 8, 8)


def test_composed_prompts_sample_their_conjunction(t2i_run):
    from imagen.pipelines import SamplingConfig, TextToImagePipeline

    pipe = TextToImagePipeline.from_run(t2i_run, stages=["base"])
    plain, composed = SamplingConfig(steps=3, seed=5), SamplingConfig(steps=3, seed=5, compose=True)
    prompts = ["a red circle", "a blue square AND a green triangle", "a red circle AND a blue square AND a red circle"]
    together = pipe.generate(prompts, composed)
    # A prompt of one part is classifier-free guidance, bit for bit.
    assert torch.equal(pipe.generate(prompts[:1], composed), pipe.generate(prompts[:1], plain))
    # Each picture is its own prompt's, whatever the others' part counts (the padded parts weigh nothing).
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(together[i:i + 1], pipe.generate([prompt], composed), rtol=0, atol=1e-4)
    # The conjunction is not the sentence: "X AND Y" read as one caption draws otherwise.
    assert (together[1] - pipe.generate(prompts[1:2], plain)[0]).abs().max() > 1e-3
    from imagen.errors import GenerationError
    for bad, words in (("a red circle AND", "empty part"), (" AND ".join(["a red circle"] * 9), "at most 8")):
        with pytest.raises(GenerationError, match=words):
            pipe.generate([bad], composed)


def test_generate_chunked_equals_unchunked(t2i_run):
    from imagen.pipelines import SamplingConfig, TextToImagePipeline

    pipe = TextToImagePipeline.from_run(t2i_run)
    prompts = ["a red circle", "a blue square to the left of a green triangle"]
    for sampler in ("dpmpp2m", "ddpm", "dpmpp3m", "unipc"):  # ddpm draws fresh noise at every step; the last two keep history
        config = SamplingConfig(steps=3, seed=5, n=3, sampler=sampler, batch_size=64)
        whole = pipe.generate(prompts, config)
        assert whole.shape == (6, 3, 16, 16)
        for batch_size in (1, 4):
            chunked = pipe.generate(prompts, SamplingConfig(steps=3, seed=5, n=3, sampler=sampler, batch_size=batch_size))
            torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-4)
        # A sample's picture depends on its prompt, seed and sample number only, not on the other prompts.
        torch.testing.assert_close(pipe.generate(prompts[1:], config), whole[3:], rtol=0, atol=1e-4)


def test_generate_bounds_and_outputs(capsys, t2i_run, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (["--n", "100000", "--out-dir", tmp_path / "many"], "n (samples per prompt) must be a positive integer, at most 10000, got 100000"),
        (["--steps", "5000", "--out", tmp_path / "x.png"], "steps must be in [1, 1000] for stage base (1000 timesteps), got 5000"),
        (["--n", "2000", "--out", tmp_path / "x.png"], "use --out-dir"),
        (["--out", folder], "is a folder"),
        (["--out", a_file / "x.png"], "is a file, not a folder"),
        (["--out-dir", a_file], "is a file"),
    ]
    for extra, needle in cases:
        line = _one_line_error(*run(capsys, "generate", "--run", t2i_run, "a red circle", *extra)[::2])
        assert needle in line, (extra, line)
    assert list(folder.iterdir()) == [] and not (tmp_path / "x.png").exists()


def test_generate_out_dir_reused_keeps_only_listed_files(capsys, t2i_run, tmp_path):
    out = tmp_path / "samples"
    (out).mkdir()
    (out / "mine.png").write_bytes(b"not ours")
    assert run(capsys, "generate", "--run", t2i_run, "a red circle", "--n", "3", "--steps", "1", "--out-dir", out)[0] == 0
    assert run(capsys, "generate", "--run", t2i_run, "a red circle", "--n", "1", "--steps", "1", "--out-dir", out)[0] == 0
    listed = [json.loads(l)["file"] for l in (out / "index.jsonl").read_text().splitlines()]
    assert listed == ["0000-00.png"]
    assert sorted(p.name for p in out.iterdir()) == ["0000-00.png", "index.jsonl", "mine.png"]


def test_generate_mask_of_another_size(capsys, t2i_run, tmp_path):
    Image.new("RGB", (20, 20), "red").save(tmp_path / "init.png")
    Image.new("RGB", (10, 20), "white").save(tmp_path / "mask.png")
    line = _one_line_error(*run(capsys, "generate", "--run", t2i_run, "a red circle", "--init-image", tmp_path / "init.png",
                                "--mask", tmp_path / "mask.png", "--out", tmp_path / "x.png")[::2])
    assert line.endswith("--mask %s is 10x20 but --init-image %s is 20x20; give a mask of the image's size"
                         % (tmp_path / "mask.png", tmp_path / "init.png")), line


@pytest.mark.slow  # inductor compiles the U-Net's forward and backward: about 2 minutes on 2 CPU cores
def test_a_compiled_unet_trains_like_the_eager_one(capsys, tmp_path, one_thread):
    # --compile: whole padded captions (one input shape), the U-Net compiled in place; the same updates to float
    # rounding and the same weight names as an eager run.
    args = ["train-t2i", "--data", "shapes", "--max-steps", "3", "--sizes", "8", "--n", "48", "--batch-size", "8",
            "--no-progress", "--precision", "fp32", "--set", "base.unet.dim=16", "--set", "base.unet.num_heads=2"]
    assert run(capsys, *args, "--out", tmp_path / "eager")[0] == 0
    assert run(capsys, *args, "--compile", "default", "--out", tmp_path / "compiled")[0] == 0
    a, b = (load_file(str(tmp_path / name / "base" / "model.safetensors")) for name in ("eager", "compiled"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("native_bf16", [False, True])
def test_pipeline_samples_channels_last_where_training_would(t2i_run, monkeypatch, native_bf16):
    # fp32 on a CPU without native bf16: convolution weights channels-last (faster there), same pictures to rounding.
    import imagen.train.device as device
    from imagen.pipelines import SamplingConfig, TextToImagePipeline

    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: native_bf16)
    pipe = TextToImagePipeline.from_run(t2i_run)
    convs = [m.weight for s in pipe.stages for m in s.modules() if isinstance(m, torch.nn.Conv2d)]
    layout = torch.contiguous_format if native_bf16 else torch.channels_last
    assert convs and all(w.is_contiguous(memory_format=layout) for w in convs)
    assert any(not w.is_contiguous() for w in convs) != native_bf16  # 3x3 kernels: the two layouts differ
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    default_layout = TextToImagePipeline.from_run(t2i_run)
    config = SamplingConfig(steps=3, seed=0)
    torch.testing.assert_close(pipe.generate(["a red circle"], config), default_layout.generate(["a red circle"], config),
                               rtol=1e-4, atol=1e-4)
