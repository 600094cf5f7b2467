"""Captioning and instruction tuning: rows, the mixture, learned results, prediction and bad input."""

import json

import pytest

import imagen
from imagen.config import ConfigError, TrainConfig, encoder_config
from imagen.runs import RunConfig
from imagen.tasks.instruct import DESCRIBE, InstructTask, instruction_rows, parse_mixture

from cli_helpers import one_line_error, run_cli

QUIET = dict(precision="fp32", progress=False, report_to=("jsonl",))


def test_mixture_parsing_and_errors():
    assert parse_mixture("describe=2, count=0.5") == {"describe": 2.0, "count": 0.5}
    for bad in ("describe", "describe=-1", "count=x", "describe=0"):
        with pytest.raises(ConfigError):
            parse_mixture(bad)


def test_mixture_weights_set_how_many_rows_each_kind_gets():
    world = imagen.data.ShapesWorld(seed=0)
    meta = [{k: v for k, v in world.sample(i).items() if k != "image"} for i in range(50)]
    tok = imagen.data.Tokenizer.train([m["text"] for m in meta], vocab_size=300)
    rc = RunConfig(task="instruct", model=encoder_config("tiny"), train=TrainConfig(),
                   task_config={"mixture": "describe=2,count=1,color=0"})
    rows = InstructTask(rc, tok).rows(meta, train=True)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("describe") == 100 and kinds.count("count") == 50 and "color" not in kinds
    assert kinds.count("shape") == 50  # kinds the mixture does not name keep weight 1
    assert all(r["prompt"] == DESCRIBE and r["target"] == meta[r["image"]]["text"] for r in rows if r["kind"] == "describe")


def test_shapes_instructions_are_true():
    world = imagen.data.ShapesWorld(seed=1)
    rng = __import__("numpy").random.default_rng(0)
    for i in range(100):
        m = world.sample(i)
        for r in instruction_rows(i, m, rng):
            if r["prompt"].startswith("How many") and r["prompt"] != "How many objects are there?":
                shape = r["prompt"].split()[2][:-1]
                assert int(r["target"]) == sum(o["shape"] == shape for o in m["objects"])
            if r["prompt"].startswith("What color is the "):
                shape = r["prompt"][len("What color is the "):-1]
                assert [o["color"] for o in m["objects"] if o["shape"] == shape] == [r["target"]]


def test_caption_learns_on_shapes(tmp_path):
    """A learned result: a short run writes captions sharing n-grams with the references (untrained: 0)."""
    result = imagen.finetune("caption", "shapes", tmp_path / "cap", n=400, max_steps=200, lr=2e-3, **QUIET)
    assert result.status == "completed"
    report = imagen.evaluate(tmp_path / "cap", "shapes", n=400, echo=lambda *a, **k: None)
    assert report["bleu4"] > 0.1, report
    assert 0.0 <= report["fact_accuracy"] <= 1.0


def test_instruct_user_rows_predict_and_bad_input(tmp_path, capsys):
    from PIL import Image

    rows = []
    for i, color in enumerate(["red", "blue"] * 6):
        Image.new("RGB", (16, 16), (220, 40, 40) if color == "red" else (40, 80, 220)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "instruction": "Name the colour.", "response": color, "task": "colour"})
    data = tmp_path / "inst.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    code, out, err = run_cli(capsys, "finetune", "--task", "instruct", "--data", data, "--out", tmp_path / "run",
                             "--max-steps", "60", "--lr", "3e-3", "--no-progress", "--precision", "fp32", "--report-to", "jsonl")
    assert code == 0, err
    code, out, err = run_cli(capsys, "evaluate", "--run", tmp_path / "run", "--split", "train", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["colour_accuracy"] == 1.0  # learned on its own rows
    code, out, err = run_cli(capsys, "predict", "--run", tmp_path / "run", "--instruction", "Name the colour.", "--json",
                             tmp_path / "0.png", tmp_path / "1.png")
    assert code == 0, err
    assert [json.loads(l)["text"] for l in out.strip().splitlines()] == ["red", "blue"]
    line = one_line_error(*run_cli(capsys, "predict", "--run", tmp_path / "run", tmp_path / "0.png")[::2])
    assert "--instruction" in line
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "0.png", "instruction": "", "response": "red"}) + "\n")
    line = one_line_error(*run_cli(capsys, "finetune", "--task", "instruct", "--data", bad, "--out", tmp_path / "bad")[::2], ignore_logs=True)
    assert "instruction is empty" in line and not (tmp_path / "bad").exists()
    line = one_line_error(*run_cli(capsys, "finetune", "--task", "instruct", "--data", data, "--out", tmp_path / "bad",
                                   "--set", "instruct.mixture=colour=zero")[::2], ignore_logs=True)
    assert "kind=weight" in line and not (tmp_path / "bad").exists()


def test_unknown_task_is_one_line(tmp_path, capsys):
    line = one_line_error(*run_cli(capsys, "finetune", "--task", "segment", "--out", tmp_path / "x")[::2])
    assert "unknown task 'segment'" in line and "vqa" in line and not (tmp_path / "x").exists()
