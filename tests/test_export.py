"""`imagen export`: ONNX graphs agree with PyTorch under onnxruntime; Hugging Face folders load back; bad input is
one line and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import imagen
from cli_helpers import one_line_error, run_cli
from imagen.cli import main
from imagen.export import ImagenModel
from imagen.tasks.text_to_image import load_stage

ort = pytest.importorskip("onnxruntime")

RUNS = Path(__file__).resolve().parent / "fixtures" / "runs"
INPUTS = Path(__file__).resolve().parent / "fixtures" / "inputs"
TOL = 1e-4


@pytest.fixture(autouse=True)
def _offline(monkeypatch, one_thread):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _export(capsys, run, fmt, out):
    code, stdout, err = run_cli(capsys, "export", run, "--format", fmt, "--out", out)
    assert code == 0, err
    assert f"to {out}" in stdout
    return out


@pytest.fixture(scope="module")
def classifier_onnx(tmp_path_factory):
    """The fixture classifier exported once for the tests that read it."""
    out = tmp_path_factory.mktemp("export") / "cls"
    assert main(["export", str(RUNS / "classify"), "--format", "onnx", "--out", str(out)]) == 0
    return out


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_classifier_matches_pytorch(classifier_onnx):
    out = classifier_onnx
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["graphs"]["model"]["inputs"]["images"]["shape"][0] == "batch"
    run = imagen.load(RUNS / "classify")
    size = run.config.model.image_size
    images = torch.rand(5, 3, size, size) * 2 - 1  # another batch size than the export's
    got = _session(out / "model.onnx").run(["logits"], {"images": images.numpy()})[0]
    with torch.no_grad():
        want = run.model(images=images).logits.numpy()
    assert got.shape == (5, len(run.class_names))
    assert np.abs(got - want).max() <= TOL


def test_onnx_classifier_with_onnxruntime_alone(classifier_onnx):
    """The README's recipe: Pillow + numpy preprocessing, onnxruntime, the class names from export.json."""
    out = classifier_onnx
    manifest = json.loads((out / "export.json").read_text())
    size, names = manifest["image_size"], manifest["class_names"]
    files = sorted(INPUTS.glob("*.png"))
    batch = []
    for f in files:
        img = Image.open(f).convert("RGB")
        scale = size / min(img.size)
        img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
        batch.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
    logits = _session(out / "model.onnx").run(None, {"images": np.stack(batch)})[0]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    expected = imagen.predict(RUNS / "classify", files)
    for p, e in zip(probs, expected):
        assert names[int(p.argmax())] == e["label"]
        assert abs(float(p.max()) - e["probability"]) <= TOL


def test_onnx_retrieval_embeddings_match_pytorch(tmp_path, capsys):
    out = _export(capsys, RUNS / "retrieval", "onnx", tmp_path / "ret")
    assert (out / "tokenizer.json").is_file()
    run = imagen.load(RUNS / "retrieval")
    size = run.config.model.image_size
    images = torch.rand(4, 3, size, size) * 2 - 1
    ids, mask = run.tokenizer.encode(["a red circle", "two blue squares to the left of a green triangle", "a"],
                                     max_length=run.config.model.max_text_len, pad_to_max=False)
    with torch.no_grad():
        want_img = run.model.embed_images(images).numpy()
        want_txt = run.model.embed_texts(ids, mask.bool()).numpy()
    got_img = _session(out / "image_encoder.onnx").run(None, {"images": images.numpy()})[0]
    got_txt = _session(out / "text_encoder.onnx").run(None, {"input_ids": ids.numpy().astype(np.int64),
                                                              "attention_mask": mask.numpy().astype(np.int64)})[0]
    assert np.abs(got_img - want_img).max() <= TOL
    assert np.abs(got_txt - want_txt).max() <= TOL


def test_onnx_unet_steps_match_pytorch(tmp_path, capsys):
    out = _export(capsys, RUNS / "t2i", "onnx", tmp_path / "t2i")
    manifest = json.loads((out / "export.json").read_text())
    assert set(manifest["graphs"]) == {"unet_base", "unet_sr1"}
    g = torch.Generator().manual_seed(5)
    for name in ("base", "sr1"):
        stage = load_stage(RUNS / "t2i", name)
        u = stage.config.unet
        with torch.no_grad():
            stage_text = stage.encode_text(["a red circle", "a blue square above a green triangle", "", "a"])
        cond = stage.drop_condition(stage_text, torch.tensor([False, False, True, False]))  # row 2: unconditional
        inputs = {"x_t": torch.randn(4, 3, u.image_size, u.image_size, generator=g), "t": torch.tensor([0, 250, 500, 999]),
                  "text_states": cond["text_states"], "text_mask": cond["text_mask"].long(), "text_embed": cond["text_embed"]}
        if stage.config.is_sr:
            inputs["lowres_image"] = torch.randn(4, 3, u.image_size, u.image_size, generator=g)
            inputs["lowres_noise_level"] = torch.rand(4, generator=g)
        with torch.no_grad():
            extra = {k: inputs[k] for k in ("lowres_image", "lowres_noise_level") if k in inputs}
            want = stage.ema_unet(inputs["x_t"], inputs["t"], text_states=cond["text_states"], text_mask=cond["text_mask"],
                                  text_embed=cond["text_embed"], **extra).numpy()
        got = _session(out / f"unet_{name}.onnx").run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= TOL, name


def test_hf_folder_loads_back(tmp_path, capsys):
    out = _export(capsys, RUNS / "classify", "hf", tmp_path / "cls-hf")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "README.md", "tokenizer.json"}
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: imagen" in card and "pipeline_tag: image-classification" in card
    files = sorted(INPUTS.glob("*.png"))
    expected = imagen.predict(RUNS / "classify", files)
    assert imagen.predict(out, files) == [{**e, "file": e["file"]} for e in expected]  # imagen.load reads it
    hub = ImagenModel.from_pretrained(str(out))  # huggingface_hub's mixin, offline
    assert hub.task == "classify" and isinstance(hub.model, torch.nn.Module)
    original = imagen.load(RUNS / "classify").model.state_dict()
    for k, v in hub.model.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_hf_folder_of_text_to_image_run(tmp_path, capsys):
    out = _export(capsys, RUNS / "t2i", "hf", tmp_path / "t2i-hf")
    assert (out / "base" / "model.safetensors").is_file() and (out / "sr1" / "config.json").is_file()
    assert "pipeline_tag: text-to-image" in (out / "README.md").read_text()
    hub = ImagenModel.from_pretrained(str(out))
    assert hub.task == "text-to-image"
    from imagen.api import SamplingConfig, TextToImagePipeline

    cfg = SamplingConfig(n=1, steps=3, seed=0)
    got = hub.model.generate(["a red circle"], cfg)
    want = TextToImagePipeline.from_run(RUNS / "t2i").generate(["a red circle"], cfg)
    assert torch.equal(got, want)


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(RUNS / "classify", unfinished)
    (unfinished / "model.safetensors").unlink()
    code, _, err = run_cli(capsys, "export", unfinished, "--format", "onnx", "--out", tmp_path / "a")
    assert "not a finished run" in one_line_error(code, err)
    code, _, err = run_cli(capsys, "export", RUNS / "classify", "--format", "tflite", "--out", tmp_path / "b")
    assert "unknown export format 'tflite'" in one_line_error(code, err)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "export", RUNS / "classify", "--format", "hf", "--out", blocker / "sub")
    assert "is a file" in one_line_error(code, err)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    code, _, err = run_cli(capsys, "export", RUNS / "classify", "--format", "hf", "--out", full)
    assert "not empty" in one_line_error(code, err)
    code, _, err = run_cli(capsys, "export", RUNS / "vqa", "--format", "onnx", "--out", tmp_path / "c")
    assert "--format hf" in one_line_error(code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full", "unfinished"]


def test_failed_export_leaves_no_folder(tmp_path, capsys, monkeypatch):
    import imagen.export.onnx as onnx_export

    def broken(graph, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "check_graph", broken)
    with pytest.raises(KeyboardInterrupt):
        imagen.api.export_run(RUNS / "classify", "onnx", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
