"""VQA: the accuracy formula, answer normalisation, soft targets, a learned result and bad input."""

import json

import pytest
import torch

import imagen
from imagen.errors import DataError
from imagen.eval.vqa import answer_scores, normalize_answer, vqa_accuracy
from imagen.runs import RunConfig
from imagen.tasks.vqa import VQATask, qa_rows

from cli_helpers import one_line_error, run_cli

QUIET = dict(precision="fp32", progress=False, report_to=("jsonl",))


def test_answer_normalisation():
    assert normalize_answer("Two.") == "2"
    assert normalize_answer("  the Red circle! ") == "red circle"
    assert normalize_answer("top-left") == "top left"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("1,000") == "1000"


def test_vqa_accuracy_is_min_of_matches_over_three():
    ten = ["2"] * 2 + ["two"] + ["3"] * 7
    # 3 annotators said "2" (after normalisation): leaving out one of them leaves 2 matches (2/3), any other 3 (1).
    assert vqa_accuracy("2", ten) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert vqa_accuracy("3", ten) == 1.0
    assert vqa_accuracy("4", ten) == 0.0
    assert [vqa_accuracy("1", ["1"] * k + ["0"] * (10 - k)) for k in (1, 2, 3)] == pytest.approx([0.3, 0.6, 0.9])
    assert vqa_accuracy("yes", ["yes", "no", "no", "no"]) == pytest.approx(0.25)
    assert vqa_accuracy("red", ["red"]) == 1.0  # a single annotator must be matched
    assert vqa_accuracy("red", ["red", "blue"]) == 0.5
    assert answer_scores(["yes", "yes", "no", "no", "no", "maybe"]) == {"yes": pytest.approx(2 / 3), "no": 1.0, "maybe": pytest.approx(1 / 3)}


@pytest.mark.parametrize("answers, expected", [
    # 10 answers, official: for k matches, k subsets keep k - 1 of them and 10 - k keep all k: mean of min(./3, 1).
    (["red"] * 1 + ["blue"] * 9, (1 * 0 + 9 * (1 / 3)) / 10),  # 0.3
    (["red"] * 2 + ["blue"] * 8, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
    (["red"] * 3 + ["blue"] * 7, (3 * (2 / 3) + 7 * 1) / 10),  # 0.9
    (["red"] * 4 + ["blue"] * 6, 1.0),  # every subset keeps 3 matches
    (["blue"] * 10, 0.0),
    # 3 answers: min(#matching / 3, 1), no leave-one-out (it would cap 3 of 3 at 2/3).
    (["red", "blue", "green"], 1 / 3), (["red", "red", "blue"], 2 / 3), (["red", "Red.", "the red"], 1.0),
    (["blue", "green", "blue"], 0.0),
    # 2 answers: both annotators must agree for full credit.
    (["red", "blue"], 0.5), (["red", "red"], 1.0), (["blue", "green"], 0.0),
    # 1 answer: matching the lone annotator is right.
    (["red"], 1.0), (["blue"], 0.0),
    ([], 0.0),
])
def test_vqa_accuracy_for_1_2_3_and_10_answers(answers, expected):
    assert vqa_accuracy("red", answers) == pytest.approx(expected, abs=1e-12)
    if answers:  # the soft training target of the predicted answer uses the same denominator, without leave-one-out
        k, need = sum(normalize_answer(a) == "red" for a in answers), min(3, len(answers))
        assert answer_scores(answers).get("red", 0.0) == pytest.approx(min(k / need, 1.0))


def test_split_targets_point_at_the_answer_vocabulary():
    meta = [{"id": "a", "questions": [{"question": "what color?", "answers": ["red", "red", "blue"], "type": "color"}]},
            {"id": "b", "questions": [{"question": "how many?", "answer": "two"}]}]
    cfg = VQATask.Config()
    vocab = VQATask.vocabulary(meta, cfg)
    assert vocab == ["2", "blue", "red"]
    tok = imagen.data.Tokenizer.train(["what color how many"], vocab_size=300)
    rc = RunConfig(task="vqa", model=imagen.config.encoder_config("tiny", image_size=8, patch_size=4), train=imagen.config.TrainConfig(),
                   class_names=vocab)
    task = VQATask(rc, tok)
    split = task.build_split(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), meta, train=True)
    batch = split.__getitems__([0, 1])
    dense = task._targets(batch, len(vocab))
    assert torch.allclose(dense, torch.tensor([[0.0, 1 / 3, 2 / 3], [1.0, 0.0, 0.0]]))
    assert batch["question_ids"].shape[1] == int(batch["question_mask"].sum(1).max())  # padding trimmed


def test_rows_without_answers_or_questions_are_named(tmp_path):
    with pytest.raises(DataError, match="has no answers"):
        qa_rows([{"id": "x", "questions": [{"question": "what?", "answers": []}]}])
    with pytest.raises(DataError, match="question is empty"):
        qa_rows([{"id": "x", "questions": [{"question": " ", "answers": ["a"]}]}])


def test_vqa_learns_shapes_questions(tmp_path):
    """A learned result: a short fine-tune answers far better than the untrained model (which scores ~0)."""
    result = imagen.finetune("vqa", "shapes", tmp_path / "vqa", n=400, max_steps=150, lr=2e-3, **QUIET)
    assert result.status == "completed"
    report = imagen.evaluate(tmp_path / "vqa", "shapes", n=400, echo=lambda *a, **k: None)
    # Guessing among the ~30 answers scores ~0.03; learning which answers fit which question type scores ~0.3.
    assert report["vqa_accuracy"] > 0.25, report
    assert report["vqa_accuracy_exists"] >= 0.5 and report["vqa_accuracy_shape"] > 0.3, report
    assert set(report) >= {"vqa_accuracy_color", "vqa_accuracy_shape", "vqa_accuracy_position", "vqa_accuracy_relation"}


def test_vqa_user_jsonl_cli_predict_and_bad_input(tmp_path, capsys):
    from PIL import Image

    rows = []
    for i, color in enumerate(["red", "blue"] * 8):
        Image.new("RGB", (16, 16), (220, 40, 40) if color == "red" else (40, 80, 220)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "what color is it?", "answers": [color]})
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    code, out, err = run_cli(capsys, "finetune", "--task", "vqa", "--data", data, "--out", tmp_path / "run", "--max-steps", "5",
                             "--no-progress", "--precision", "fp32", "--report-to", "jsonl")
    assert code == 0, err
    code, out, err = run_cli(capsys, "predict", "--run", tmp_path / "run", "--question", "what color is it?", "--json", tmp_path / "0.png")
    assert code == 0, err
    row = json.loads(out.strip().splitlines()[-1])
    assert row["answer"] in ("red", "blue") and 0 <= row["score"] <= 1
    line = one_line_error(*run_cli(capsys, "predict", "--run", tmp_path / "run", tmp_path / "0.png")[::2])
    assert "--question" in line
    line = one_line_error(*run_cli(capsys, "predict", "--run", tmp_path / "run", "--instruction", "Describe the image.", tmp_path / "0.png")[::2])
    assert "--instruction" in line and "vqa" in line
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "0.png", "question": "what color?"}) + "\n")
    line = one_line_error(*run_cli(capsys, "finetune", "--task", "vqa", "--data", bad, "--out", tmp_path / "bad", "--max-steps", "1")[::2], ignore_logs=True)
    assert "no answers" in line and not (tmp_path / "bad").exists()


def test_generative_vqa_head_trains_and_answers(tmp_path):
    result = imagen.finetune("vqa", "shapes", tmp_path / "gen", n=200, max_steps=30, lr=2e-3,
                             sets=["vqa.head=generative"], **QUIET)
    assert result.status == "completed"
    loaded = imagen.load(tmp_path / "gen")
    assert type(loaded.model).__name__ == "EncoderDecoder"
    report = imagen.evaluate(tmp_path / "gen", "shapes", n=200, echo=lambda *a, **k: None)
    assert 0.0 <= report["vqa_accuracy"] <= 1.0 and "vqa_accuracy_count" in report
    with pytest.raises(imagen.config.ConfigError, match="vqa.head"):
        VQATask.Config(head="pointer")


def test_question_entries_that_are_not_objects_are_named():
    with pytest.raises(DataError, match="is not an object"):
        qa_rows([{"id": "x", "questions": ["what color?"]}])


def test_resumed_vqa_run_equals_uninterrupted(tmp_path):
    """Interrupt a task run after its first checkpoint and resume: the weights equal an uninterrupted run's."""
    kw = dict(n=120, max_steps=8, checkpoint_every=4, batch_size=16, **QUIET)
    imagen.finetune("vqa", "shapes", tmp_path / "full", **kw)
    imagen.finetune("vqa", "shapes", tmp_path / "cut", **{**kw, "max_steps": 8})
    # Rewind "cut" to its step-4 checkpoint, as if it had been stopped there, then resume it.
    (tmp_path / "cut" / "model.safetensors").unlink()
    ckpts = sorted((tmp_path / "cut" / "checkpoints").glob("step-*"))
    for later in ckpts[1:]:
        import shutil

        shutil.rmtree(later)
    result = imagen.finetune("vqa", "shapes", tmp_path / "cut", resume=True, progress=False, report_to=("jsonl",))
    assert result.step == 8
    a, b = imagen.load(tmp_path / "full").model.state_dict(), imagen.load(tmp_path / "cut").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(imagen.runs.RunError, match="is a vqa run"):
        imagen.finetune("caption", "shapes", tmp_path / "cut", resume=True)


def test_over_long_questions_are_truncated_with_a_warning(caplog):
    meta = [{"id": "a", "questions": [{"question": "is " + "very " * 60 + "red?", "answers": ["yes"]}]}]
    tok = imagen.data.Tokenizer.train(["is very red"], vocab_size=300)
    rc = RunConfig(task="vqa", model=imagen.config.encoder_config("tiny", image_size=8, patch_size=4, max_text_len=16),
                   train=imagen.config.TrainConfig(), class_names=["yes"])
    with caplog.at_level("WARNING", logger="imagen"):
        split = VQATask(rc, tok).build_split(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), meta, train=False)
    assert split.fields["question_ids"].shape[1] == 16 and "1 question(s) longer than 16 tokens" in caplog.text
