"""The `imagen` command end to end: data -> pretrain -> finetune -> evaluate -> predict, and bad input."""

import json

import pytest


from cli_helpers import TINY, assert_same_weights, interrupt_then_resume
from cli_helpers import one_line_error as _one_line_error
from cli_helpers import run_cli as run




def test_pretrain_writes_a_complete_run(pretrained):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl"):
        assert (pretrained / name).is_file(), name
    config = json.loads((pretrained / "config.json").read_text())
    assert config["task"] == "pretrain" and config["model"]["dim"] == 32
    rows = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert train_rows and {"mim", "itc", "mlm", "itm"} <= set(train_rows[-1])


def test_finetune_evaluate_predict(capsys, shapes_dir, pretrained, tmp_path):
    out = tmp_path / "cls"
    code, _, err = run(capsys, "finetune", "--task", "classify", "--data", shapes_dir, "--label", "shape", "--init-from", pretrained,
                       "--out", out, "--max-steps", "3", "--no-progress", "--batch-size", "16")
    assert code == 0, err
    assert set(json.loads((out / "config.json").read_text())["class_names"]) == {"circle", "square", "triangle"}

    code, stdout, err = run(capsys, "evaluate", "--run", out, "--split", "test", "--json")
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert 0.0 <= result["accuracy"] <= 1.0 and "macro_f1" in result
    # The before/after table includes the --init-from run, scored with a linear probe.
    assert [r["role"] for r in result["comparison"]] == ["this run", "init (before fine-tuning)"]
    assert result["comparison"][1]["method"] == "linear-probe"
    assert (out / "eval" / "shapes-test-confusion.png").stat().st_size > 1000

    images = sorted((shapes_dir / "images").glob("*.png"))[:2]
    code, stdout, err = run(capsys, "predict", "--run", out, *images)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 2
    name, label, prob = lines[0].split("\t")
    assert name == str(images[0]) and label in {"circle", "square", "triangle"} and 0 < float(prob) <= 1


def test_finetune_at_another_resolution_than_pretraining(capsys, shapes_dir, pretrained, tmp_path):
    out = tmp_path / "cls64"
    code, _, err = run(capsys, "finetune", "--task", "classify", "--data", shapes_dir, "--label", "shape", "--init-from", pretrained,
                       "--image-size", "64", "--out", out, "--max-steps", "2", "--no-progress", "--batch-size", "8")
    assert code == 0, err
    pre = json.loads((pretrained / "config.json").read_text())["model"]
    model = json.loads((out / "config.json").read_text())["model"]
    assert pre["image_size"] == 32 and model["image_size"] == 64
    assert {k: v for k, v in model.items() if k != "image_size"} == {k: v for k, v in pre.items() if k != "image_size"}
    code, stdout, err = run(capsys, "predict", "--run", out, sorted((shapes_dir / "images").glob("*.png"))[0])
    assert code == 0, err
    # The architecture is still fixed by the run fine-tuned from.
    code, _, err = run(capsys, "finetune", "--task", "classify", "--data", shapes_dir, "--label", "shape", "--init-from",
                       pretrained, "--set", "model.dim=48", "--out", tmp_path / "bad", "--max-steps", "1")
    assert code != 0 and "fixes the model architecture" in err and not (tmp_path / "bad").exists()
    code, _, err = run(capsys, "finetune", "--task", "classify", "--data", shapes_dir, "--label", "shape", "--init-from",
                       pretrained, "--preset", "small", "--out", tmp_path / "bad", "--max-steps", "1")
    assert code != 0 and "drop --preset small" in err and not (tmp_path / "bad").exists()


# Each case draws random numbers its own way: dropout; MIM / MLM masks and ITM's sampled negatives; a partly frozen
# encoder (its optimiser holds only some parameters); batch augmentation.
RESUME_CASES = {
    "classify-dropout": (["finetune", "--task", "classify", "--label", "shape", "--dropout", "0.1"], "classify"),
    "pretrain": (["pretrain"], "pretrain"),
    "freeze": (["finetune", "--task", "classify", "--label", "shape", "--freeze", "all-but-last-1", "--init-from", "PRETRAINED"], "classify"),
    "augment": (["finetune", "--task", "classify", "--label", "shape", "--augment", "shift-flip"], "classify"),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_interrupted_and_resumed_run_equals_uninterrupted(case, capsys, shapes_dir, tmp_path, monkeypatch, request, one_thread):
    from imagen.tasks.classify import ClassifyTask
    from imagen.tasks.pretrain import PretrainTask

    command, task = RESUME_CASES[case]
    if "PRETRAINED" in command:
        command = [request.getfixturevalue("pretrained") if a == "PRETRAINED" else a for a in command]
    # Ctrl-C at the 4th step of 4: resumed from the checkpoint Ctrl-C writes after step 3, off the every-2 cycle.
    args = [*command, "--data", shapes_dir, "--max-steps", "4", "--checkpoint-every", "2", *TINY]
    assert run(capsys, *args, "--out", tmp_path / "straight")[0] == 0
    task_cls = {"classify": ClassifyTask, "pretrain": PretrainTask}[task]
    interrupt_then_resume(capsys, monkeypatch, task_cls, args, tmp_path / "resumed", at=4)
    assert_same_weights(tmp_path / "straight" / "model.safetensors", tmp_path / "resumed" / "model.safetensors")


def test_demo_fast_runs_end_to_end(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "--fast", "--out", tmp_path / "demo")
    assert code == 0, err
    assert "demo finished" in out
    for sub in ("pretrain", "classify", "classify-scratch"):
        assert (tmp_path / "demo" / sub / "model.safetensors").is_file()
    report = tmp_path / "demo" / "report.html"  # the demo ends with its report, and says where it is
    assert report.is_file() and out.strip().splitlines()[-1].endswith(str(report))


# ---- bad input: one line, non-zero exit, nothing half-written ----------------------------------------


def test_missing_data_path(capsys, tmp_path):
    code, _, err = run(capsys, "pretrain", "--data", tmp_path / "nope", "--out", tmp_path / "run", "--max-steps", "1")
    line = _one_line_error(code, err)
    assert "nope" in line
    assert not (tmp_path / "run").exists()


def test_unknown_task_and_unknown_key_and_bad_steps(capsys, shapes_dir, tmp_path):
    line = _one_line_error(*run(capsys, "finetune", "--task", "juggle", "--data", shapes_dir, "--out", tmp_path / "a")[::2])
    assert "juggle" in line and "classify" in line
    line = _one_line_error(*run(capsys, "pretrain", "--data", shapes_dir, "--out", tmp_path / "b", "--set", "model.wings=2")[::2])
    assert "model.wings" in line
    line = _one_line_error(*run(capsys, "pretrain", "--data", shapes_dir, "--out", tmp_path / "c", "--max-steps", "0")[::2])
    assert "positive" in line
    line = _one_line_error(*run(capsys, "pretrain", "--data", shapes_dir, "--out", tmp_path / "d", "--bogus")[::2])
    assert "--bogus" in line
    for name in "abcd":
        assert not (tmp_path / name).exists()


def test_not_a_run_and_damaged_weights(capsys, tmp_path, pretrained):
    line = _one_line_error(*run(capsys, "evaluate", "--run", tmp_path)[::2])
    assert "not a run" in line
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (damaged / name).write_bytes((pretrained / name).read_bytes())
    (damaged / "model.safetensors").write_bytes(b"\x00garbage")
    line = _one_line_error(*run(capsys, "evaluate", "--run", damaged, "--data", "shapes")[::2])
    assert "model.safetensors" in line


def test_existing_output_is_never_overwritten(capsys, pretrained, shapes_dir):
    before = (pretrained / "model.safetensors").read_bytes()
    line = _one_line_error(*run(capsys, "pretrain", "--data", shapes_dir, "--out", pretrained, "--max-steps", "1")[::2])
    assert "--resume" in line
    assert (pretrained / "model.safetensors").read_bytes() == before


def test_jsonl_with_broken_line(capsys, shapes_dir, tmp_path):
    rows = (shapes_dir / "annotations.jsonl").read_text().splitlines()[:20]
    rows[7] = rows[7][:-5]
    bad = shapes_dir / "broken.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    try:
        line = _one_line_error(*run(capsys, "pretrain", "--data", bad, "--out", tmp_path / "r", "--max-steps", "1")[::2])
        assert "line 8" in line
    finally:
        bad.unlink()
    assert not (tmp_path / "r").exists()


def test_user_mistakes_in_finetune_are_one_line(capsys, shapes_dir, tmp_path):
    import shutil

    one = tmp_path / "one" / "red"
    one.mkdir(parents=True)
    for p in sorted((shapes_dir / "images").iterdir())[:6]:
        shutil.copy(p, one / p.name)
    rows = [json.loads(l) for l in (shapes_dir / "annotations.jsonl").read_text().splitlines()][:30]
    part = tmp_path / "part.jsonl"
    part.write_text("".join(json.dumps({"image": str(shapes_dir / r["image"]), **({"label": r["labels"]["shape"]} if i % 3 else {})}) + "\n"
                            for i, r in enumerate(rows)))
    base = ["finetune", "--task", "classify", "--max-steps", "1", *TINY]
    cases = [
        ([base, "--data", shapes_dir, "--label", "shape", "--device", "cuda:7"], "device 'cuda:7' was asked for but"),
        ([base, "--data", shapes_dir, "--label", "shape", "--device", "gpu"], "unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps"),
        ([base, "--data", shapes_dir, "--label", "shape", "--freeze", "sometimes"], "unknown freeze mode 'sometimes' (--freeze); use none, encoder or all-but-last-N"),
        ([base, "--data", shapes_dir], "or name its label field with --label (a folder from `imagen data shapes`: --label shape, color"),
        ([base, "--data", tmp_path / "one"], "has one class only ('red'); classification needs at least two"),
        ([base, "--data", part], "training samples of"),
        ([base, "--data", "/dev/zero"], "data path /dev/zero is neither a folder nor a regular file"),
        ([base, "--data", shapes_dir, "--label", "shape", "--set", "model.num_layers=1000000000"], "model.num_layers must be in [1, 256], got 1000000000"),
    ]
    for argv, needle in cases:
        argv = [a for part_ in argv for a in (part_ if isinstance(part_, list) else [part_])]
        line = _one_line_error(*run(capsys, *argv, "--out", tmp_path / "run")[::2], ignore_logs=True)
        assert line.startswith("imagen finetune: error: ") and needle in line, (argv, line)
    code, _, err = run(capsys, "data", "shapes", "--out", tmp_path / "big", "--size", "100000")
    assert _one_line_error(code, err) == "imagen data: error: Shapes canvas size 100000 is out of range; use 8 to 1024 pixels"


def test_failed_writes_are_one_line(capsys, tmp_path, monkeypatch):
    import errno
    import tempfile

    from PIL import Image

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:  # what a read-only folder gives even to root (chmod 555 does not stop root)
        m.setattr(tempfile, "mkdtemp", read_only)
        code, _, err = run(capsys, "data", "shapes", "--out", tmp_path / "ro", "--n", "4")
    assert _one_line_error(code, err) == f"imagen data: error: cannot write {tmp_path / 'ro'}: Read-only file system; choose a folder you can write to"

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", disk_full)
        code, _, err = run(capsys, "data", "shapes", "--out", tmp_path / "full", "--n", "4")
    assert _one_line_error(code, err).endswith(": No space left on device; free some space or write elsewhere")
    (tmp_path / "afile").write_text("x")
    code, _, err = run(capsys, "data", "shapes", "--out", tmp_path / "afile" / "x", "--n", "4")
    assert "a file is in the way of a folder on that path" in _one_line_error(code, err)
    assert not (tmp_path / "full").exists() and not (tmp_path / "ro").exists()


def test_predict_on_a_folder_and_token_ids_outside_the_vocabulary(capsys, shapes_dir):
    import torch

    from imagen.config import EncoderConfig
    from imagen.errors import DataError
    from imagen.models.encoder import MultimodalEncoder

    code, _, err = run(capsys, "predict", "--run", "tests/fixtures/runs/classify", shapes_dir)
    assert f"{shapes_dir} is a folder, not an image file; give the image files in it" in _one_line_error(code, err)
    encoder = MultimodalEncoder(EncoderConfig(dim=16, num_layers=1, num_heads=2, vocab_size=10))
    with pytest.raises(DataError, match="token id 12 is outside the model's vocabulary of 10"):
        encoder(input_ids=torch.tensor([[1, 12]]))
