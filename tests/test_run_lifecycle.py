"""What every training command shares through the one run lifecycle: refusing before creating, resuming only what
can be resumed, and never saving a broken model as finished."""

import json

from safetensors.torch import load_file

from cli_helpers import TINY, one_line_error, run_cli

CLASSIFY = ["finetune", "--task", "classify", "--data", "shapes", "--n", "64", "--label", "shape", "--precision", "fp32",
            "--report-to", "jsonl", *TINY]


def test_a_bad_option_creates_nothing(capsys, tmp_path):
    for bad in (["--lr", "inf"], ["--lr", "nan"], ["--set", "train.weight_decay=-1"]):
        code, _, err = run_cli(capsys, *CLASSIFY, "--out", tmp_path / "run", "--max-steps", "2", *bad)
        line = one_line_error(code, err, ignore_logs=True)
        assert "error" in line and not (tmp_path / "run").exists(), (bad, line)


def test_non_finite_training_stops_with_one_line_and_keeps_the_last_good_checkpoint(capsys, tmp_path, monkeypatch):
    from imagen.tasks.classify import ClassifyTask

    step = {"n": 0}
    original = ClassifyTask.training_step

    def diverging(self, model, batch):  # the loss turns NaN after four good steps, as a too-high lr makes it
        out = original(self, model, batch)
        step["n"] += 1
        return {**out, "loss": out["loss"] * float("nan")} if step["n"] > 4 else out

    monkeypatch.setattr(ClassifyTask, "training_step", diverging)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *CLASSIFY, "--out", out, "--max-steps", "12", "--checkpoint-every", "2")
    line = one_line_error(code, err, ignore_logs=True)
    assert "non-finite loss" in line and "lower the learning rate" in line, line
    assert not (out / "model.safetensors").exists()
    latest = max((out / "checkpoints").glob("step-*"))  # skipped steps left the weights as they were: still good
    assert all(t.isfinite().all() for t in load_file(latest / "model.safetensors").values())


def test_resume_refuses_changed_settings_and_records_allowed_ones(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *CLASSIFY, "--out", out, "--max-steps", "4", "--checkpoint-every", "2")
    assert code == 0, err
    (out / "model.safetensors").unlink()  # as if it had stopped after its last checkpoint
    code, _, err = run_cli(capsys, *CLASSIFY, "--out", out, "--resume", "--lr", "0.5", "--label-smoothing", "0.1")
    line = one_line_error(code, err, ignore_logs=True)
    assert "train.lr 0.001 -> 0.5" in line and "classify.label_smoothing 0.0 -> 0.1" in line, line
    code, _, err = run_cli(capsys, *CLASSIFY, "--out", out, "--resume", "--max-steps", "6")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 6
    assert max(json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()) == 6
    code, _, err = run_cli(capsys, *CLASSIFY, "--out", out, "--resume")
    assert "already finished" in one_line_error(code, err, ignore_logs=True)


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_its_config(capsys, tmp_path):
    code, _, err = run_cli(capsys, *CLASSIFY, "--out", tmp_path / "a", "--max-steps", "3")
    assert code == 0, err
    code, _, err = run_cli(capsys, *CLASSIFY, "--out", tmp_path / "b", "--max-steps", "3")
    (tmp_path / "b" / "model.safetensors").unlink()
    for p in (tmp_path / "b" / "checkpoints").iterdir():
        __import__("shutil").rmtree(p)
    code, _, err = run_cli(capsys, *CLASSIFY, "--out", tmp_path / "b", "--resume")
    assert code == 0, err
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_a_run_records_its_data_as_an_absolute_path(capsys, tmp_path, shapes_dir, monkeypatch):
    (tmp_path / "pictures").symlink_to(shapes_dir)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "finetune", "--task", "classify", "--data", "pictures", "--label", "shape",
                           "--out", tmp_path / "run", "--max-steps", "2", *TINY)
    assert code == 0, err
    spec = json.loads((tmp_path / "run" / "config.json").read_text())["data"]["spec"]
    assert spec == str(shapes_dir.resolve())
    assert (tmp_path / "run" / "config.json").stat().st_mode & 0o044 == (tmp_path / "run" / "metrics.jsonl").stat().st_mode & 0o044
