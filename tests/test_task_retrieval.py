"""Retrieval task: recall@k and zero-shot metrics on exact cases, init from pretraining, a learned result, predict."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import imagen
from cli_helpers import one_line_error, run_cli
from imagen.config import ConfigError, TrainConfig, apply_overrides
from imagen.data import load_dataset
from imagen.data.examples import collect
from imagen.eval.retrieval import (caption_relevance, class_embeddings, contrastive_loss, recall_at_k, retrieval_metrics,
                                   zero_shot_accuracy)
from imagen.runs import RunConfig
from imagen.tasks.loading import load
from imagen.tasks.retrieval import RetrievalConfig, RetrievalTask, zero_shot_label

QUIET = dict(precision="fp32", progress=False, report_to=("jsonl",))


# -- metrics on hand-made cases ---------------------------------------------------------------------------


def test_recall_at_k_exact_numbers():
    sim = torch.tensor([[0.9, 0.1, 0.2, 0.0],   # query 0: its item ranks 1st
                        [0.8, 0.7, 0.1, 0.0],   # query 1: 2nd
                        [0.1, 0.2, 0.0, 0.3],   # query 2: 4th (last)
                        [0.0, 0.1, 0.2, 0.3]])  # query 3: 1st
    rel = torch.eye(4, dtype=torch.bool)
    assert recall_at_k(sim, rel, ks=(1, 2, 3, 4, 10)) == {1: 0.5, 2: 0.75, 3: 0.75, 4: 1.0, 10: 1.0}
    none_relevant = rel.clone()
    none_relevant[1] = False  # a query with nothing relevant is a miss at every k
    assert recall_at_k(sim, none_relevant, ks=(1, 2)) == {1: 0.5, 2: 0.5}


def test_duplicate_captions_are_hits_in_both_directions():
    captions = ["a red circle", "a blue square", "a red circle"]
    assert caption_relevance(captions).tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    images = torch.eye(3)
    # Image 0 is closest to text 2, which repeats its caption: a hit. Image 1 is closest to text 0: a miss.
    texts = F.normalize(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.5, 1.0], [1.0, 0.0, 0.0]]), dim=-1)
    m = retrieval_metrics(images, texts, captions)
    # image->text top-1: image 0 -> text 2 (hit, duplicate), image 1 -> text 0 (miss), image 2 -> text 1 (miss)
    assert m["r@1"] == pytest.approx(1 / 3)
    # text->image top-1: text 0 -> image 1 (miss), text 1 -> image 2 (miss), text 2 -> image 0 (hit, duplicate)
    assert m["t2i_r@1"] == pytest.approx(1 / 3)
    assert m["r@5"] == m["r@10"] == m["t2i_r@10"] == 1.0  # k beyond the gallery counts the whole gallery
    assert m["r_mean"] == pytest.approx((1 / 3 + 1 + 1 + 1 / 3 + 1 + 1) / 6)
    assert retrieval_metrics(torch.eye(3), torch.eye(3), ["a", "b", "c"])["r@1"] == 1.0  # unique captions: standard


def _lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


def test_contrastive_loss_exact_values():
    # Unique captions: rows give -log softmax at the diagonal = log(1 + e^-2) twice; columns log(1 + e^-1), log(1 + e^-3).
    loss = contrastive_loss(torch.tensor([[2.0, 0.0], [1.0, 3.0]]), torch.eye(2, dtype=torch.bool))
    expected = 0.5 * (math.log1p(math.exp(-2)) + 0.5 * (math.log1p(math.exp(-1)) + math.log1p(math.exp(-3))))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Items 0 and 2 share a caption: each row's target is split over its matches, so a row's loss is
    # logsumexp(row) - the mean of its matches' logits.
    logits = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
    same = caption_relevance(["a red circle", "a blue square", "a red circle"])
    i2t = (_lse(1, 0, 2) - 1.5 + _lse(0, 1, 0) - 1 + _lse(3, 0, 0) - 1.5) / 3
    t2i = (_lse(1, 0, 3) - 2 + _lse(0, 1, 0) - 1 + _lse(2, 0, 0) - 1) / 3
    assert contrastive_loss(logits, same).item() == pytest.approx(0.5 * (i2t + t2i), rel=1e-6)
    # Perfect, confident logits cost almost nothing; swapped ones cost about the logit gap.
    assert contrastive_loss(20 * torch.eye(3), torch.eye(3, dtype=torch.bool)).item() == pytest.approx(0, abs=1e-6)
    assert contrastive_loss(20 * (1 - torch.eye(2)), torch.eye(2, dtype=torch.bool)).item() == pytest.approx(20, rel=1e-6)


def test_zero_shot_accuracy_on_a_constructed_case():
    # Two classes x two templates; each class's prompts point near its own axis.
    prompts = torch.tensor([[[1.0, 0.2, 0.0], [1.0, -0.2, 0.0]],
                            [[0.1, 1.0, 0.0], [-0.1, 1.0, 0.3]]])
    classes = class_embeddings(prompts)
    assert torch.allclose(classes.norm(dim=-1), torch.ones(2))
    assert torch.allclose(classes[0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)  # the template directions average out
    images = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.7, 0.6, 0.0], [0.0, 1.0, 0.0], [5.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0, -1])  # image 2 leans to class 0 (wrong); image 3 is labelled wrong; -1 ignored
    assert zero_shot_accuracy(images, classes, labels) == 0.5


def test_zero_shot_labels_and_config():
    one = {"labels": {"color-shape": "red circle"}, "objects": [{}]}
    three = {"labels": {"color-shape": "red circle", "count": "3"}, "objects": [{}, {}, {}]}
    assert zero_shot_label(one, "color-shape") == "red circle"
    assert zero_shot_label(three, "color-shape") is None  # the largest of three objects does not name the picture
    assert zero_shot_label(three, "count") == "3"
    assert zero_shot_label({"label": "shirt"}, "color-shape") == "shirt"  # other data: the sample's label
    assert zero_shot_label(one, "none") is None
    assert RetrievalTask.vocabulary([one, three, {"labels": {"color-shape": "blue square"}, "objects": [{}]}],
                                    RetrievalConfig()) == ["blue square", "red circle"]
    assert RetrievalTask.vocabulary([one], RetrievalConfig()) is None  # one class cannot be classified

    cfg = RetrievalConfig()
    apply_overrides({"retrieval": cfg}, ["retrieval.templates=a photo of a {label},a {label}"])
    assert cfg.templates == ("a photo of a {label}", "a {label}")
    assert RetrievalTask.config_from({"templates": ["a photo of a {label}"]}).templates == ("a photo of a {label}",)
    with pytest.raises(ConfigError, match="placeholder"):
        RetrievalConfig(templates=("a photo",))
    with pytest.raises(ConfigError, match="temperature"):
        RetrievalConfig(temperature_init=0.0)


# -- runs --------------------------------------------------------------------------------------------------


def test_init_from_a_pretrain_run_loads_encoder_and_contrastive_heads(pretrained):
    pre = load(pretrained)
    rc = RunConfig(task="retrieval", model=pre.config.model, train=TrainConfig(), task_config={})
    task = RetrievalTask(rc, pre.tokenizer)
    torch.manual_seed(1)
    model = task.build_model(rc, pre.tokenizer)
    assert not torch.equal(model.image_proj.weight, pre.model.image_proj.weight)
    assert task.init_from(model, pre) == "encoder, image/text projections and temperature"
    for name, value in model.state_dict().items():
        assert torch.equal(value, pre.model.state_dict()[name]), name

    # A run without contrastive heads (a classifier) gives its encoder only; the fresh heads stay as they were.
    from imagen.models.heads import EncoderForClassification

    classifier = EncoderForClassification(pre.config.model, 3)
    fresh = task.build_model(rc, pre.tokenizer)
    before = fresh.text_proj.weight.clone()
    assert task.init_from(fresh, SimpleNamespace(model=classifier, task="classify")) == "encoder"
    assert torch.equal(fresh.text_proj.weight, before)
    for name, value in fresh.encoder.state_dict().items():
        assert torch.equal(value, classifier.encoder.state_dict()[name]), name


def test_retrieval_learns_on_shapes(tmp_path):
    """A learned result: a short contrastive run beats its own untrained model and chance by a wide margin."""
    result = imagen.finetune("retrieval", "shapes", tmp_path / "ret", n=600, max_steps=100, batch_size=64, lr=2e-3, **QUIET)
    assert result.status == "completed"
    report = imagen.evaluate(tmp_path / "ret", split="test", n=600, echo=lambda *a, **k: None)
    assert report["n"] == 150 and {"r@1", "r@5", "r@10", "t2i_r@1", "t2i_r@5", "t2i_r@10", "r_mean"} <= set(report)

    run = load(tmp_path / "ret")
    task = RetrievalTask(run.config, run.tokenizer)
    split = task.build_split(*collect(load_dataset("shapes", "test", n=600), 32), train=False)
    torch.manual_seed(0)
    untrained = task.evaluate(task.build_model(run.config, run.tokenizer), split)
    # Measured: r@1 0.23 and t2i_r@1 0.27 after 100 steps against 0.01 untrained; r@10 0.91 against 0.07.
    assert report["r@1"] >= max(0.1, untrained["r@1"] + 0.08), (report, untrained)
    assert report["t2i_r@1"] >= max(0.1, untrained["t2i_r@1"] + 0.08), (report, untrained)
    assert report["r@10"] >= 0.5 >= untrained["r@10"], (report, untrained)


def test_finetune_evaluate_predict_from_the_command_line(capsys, shapes_dir, pretrained, tmp_path):
    out = tmp_path / "ret"
    code, _, err = run_cli(capsys, "finetune", "--task", "retrieval", "--data", shapes_dir, "--init-from", pretrained,
                           "--out", out, "--max-steps", "3", "--precision", "fp32", "--no-progress", "--batch-size", "16")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["task_config"]["templates"] == list(RetrievalConfig().templates)
    assert len(config["class_names"]) >= 2 and all(" " in c for c in config["class_names"])  # colour-shape names

    code, stdout, err = run_cli(capsys, "evaluate", "--run", out, "--split", "test", "--json")
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["task"] == "retrieval" and 0.0 <= result["r@1"] <= result["r@5"] <= result["r@10"] <= 1.0

    images = sorted((shapes_dir / "images").glob("*.png"))[:2]
    code, stdout, err = run_cli(capsys, "predict", "--run", out, "--texts", "a red circle", "a blue square", "--top-k", "2",
                                "--json", *images)
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.strip().splitlines()]
    assert [r["file"] for r in rows] == [str(p) for p in images]
    for r in rows:
        assert r["text"] in ("a red circle", "a blue square") and [t["text"] for t in r["top"]][0] == r["text"]
        assert len(r["top"]) == 2 and sum(t["score"] for t in r["top"]) == pytest.approx(1.0, abs=1e-5)

    code, stdout, err = run_cli(capsys, "predict", "--run", out, *images)  # no texts: zero-shot over the class names
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[1].rsplit(" (", 1)[0] in config["class_names"]

    code, _, err = run_cli(capsys, "predict", "--run", out, "--texts", " ", "--", *images)
    assert "empty" in one_line_error(code, err)


def test_fact_recall_counts_captions_naming_the_right_objects():
    from imagen.eval.retrieval import fact_recall

    captions = ["a red circle", "there is a red circle on the left", "two blue squares"]
    objects = [[{"color": "red", "shape": "circle"}], [{"color": "red", "shape": "circle"}],
               [{"color": "blue", "shape": "square"}] * 2]
    eye = torch.eye(3)
    # image 0 retrieves caption 1 first: a different text, but it names exactly image 0's objects.
    sim = torch.tensor([[0.5, 0.9, 0.0], [0.9, 0.5, 0.0], [0.8, 0.0, 0.1]])  # image 2 retrieves caption 0 first: a miss
    m = fact_recall(eye, sim.t(), captions, objects, ks=(1, 2))
    assert m["facts_r@1"] == pytest.approx(2 / 3) and m["facts_r@2"] == 1.0
    assert m["facts_t2i_r@1"] == 1.0  # text 0 retrieves image 1, also a lone red circle: a hit
