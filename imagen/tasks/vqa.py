"""Visual question answering: a classifier over an answer vocabulary on the fused [image; question] state.

The ViLT recipe (Kim et al. 2021): one joint pass over image patches and question tokens, an MLP on the fused
[CLS] states, binary cross-entropy against soft scores (each answer's VQA accuracy), and VQA accuracy as the
metric, reported overall and per question type when the data names types (Shapes: color, shape, count,
exists, position, relation).

`--set vqa.head=generative` answers through the text decoder instead (the encoder reads [image; question],
the decoder writes the answer): open-ended answers, no vocabulary, same metric.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imagen.config import ConfigError
from imagen.data.images import normalize_images
from imagen.errors import DataError
from imagen.data.examples import ExampleSplit
from imagen.eval.vqa import answer_scores, normalize_answer, vqa_accuracy
from imagen.models.heads import EncoderForVQA
from imagen.tasks.base import Task
from imagen.tasks.generative import GenerationOptions, GenerativeTask

log = logging.getLogger("imagen")


@dataclass
class VQAConfig(GenerationOptions):
    head: str = "classifier"  # classifier (answer vocabulary) | generative (text decoder)
    max_answers: int = 1000  # the most frequent training answers form the vocabulary (VQAv2 uses 3,129)
    min_answer_count: int = 1
    grid_dim: int = 8  # the classifier also reads each fused patch state projected to this many channels; 0 = [CLS] only

    def __post_init__(self):
        super().__post_init__()
        if self.head not in ("classifier", "generative"):
            raise ConfigError(f"unknown vqa.head {self.head!r}; choose classifier or generative")
        if self.max_answers < 2:
            raise ConfigError(f"vqa.max_answers must be at least 2, got {self.max_answers}")


def qa_rows(meta: list[dict]) -> list[tuple[int, str, list[str], str]]:
    """(image index, question, answers, type) for every question of every sample."""
    rows = []
    for k, m in enumerate(meta):
        for q in m.get("questions") or []:
            if not isinstance(q, dict):
                raise DataError(f"sample {m.get('id', k)}: question entry {q!r} is not an object; write "
                                "{\"question\": ..., \"answers\": [...]}")
            question = str(q.get("question") or "").strip()
            answers = q.get("answers")
            if answers is None:
                answers = [q["answer"]] if q.get("answer") is not None else []
            if not question:
                raise DataError(f"sample {m.get('id', k)}: a question is empty; give every row a question text")
            if not answers:
                raise DataError(f"sample {m.get('id', k)}: question {question!r} has no answers; add 'answers': [...]")
            rows.append((k, question, [str(a) for a in answers], str(q.get("type") or "all")))
    return rows


def _metrics(loss, acc, types):
    metrics = {"loss": loss, "vqa_accuracy": float(acc.mean())}
    for t in sorted(set(types)):
        if t != "all":
            sel = torch.tensor([x == t for x in types])
            metrics[f"vqa_accuracy_{t}"] = float(acc[sel].mean())
    return metrics


class _VQA:
    """What both VQA heads share: name, options, metric, recipe, answer vocabulary and tokenizer texts."""

    name = "vqa"
    monitor = ("vqa_accuracy", "max")
    Config = VQAConfig
    headline = ("vqa_accuracy",)
    predict_inputs = ("question",)
    recipe = {"epochs": 12, "lr": 2e-3}

    @classmethod
    def vocabulary(cls, meta, cfg, dataset=None):
        rows = qa_rows(meta)
        if not rows:
            raise DataError("no questions in the training data; VQA needs rows with 'question' and 'answers' "
                            "(or Shapes' built-in questions)")
        counts = Counter(normalize_answer(a) for _, _, answers, _ in rows for a in set(answers))
        vocab = [a for a, c in counts.most_common(cfg.max_answers) if c >= cfg.min_answer_count]
        if not vocab:
            raise DataError(f"no answer occurs {cfg.min_answer_count} times in the training data; "
                            "lower vqa.min_answer_count")
        return sorted(vocab)

    @classmethod
    def tokenizer_texts(cls, meta, cfg):
        return [q for _, q, _, _ in qa_rows(meta)] + [m["text"] for m in meta if m.get("text")]


class VQATask(_VQA, Task):
    """The answer classifier; `vqa.head=generative` makes the registry's VQA task a GenerativeVQATask instead."""

    def __new__(cls, run_config=None, tokenizer=None):
        if cls is VQATask and cls.config_from(getattr(run_config, "task_config", None)).head == "generative":
            return GenerativeVQATask(run_config, tokenizer)  # not a VQATask, so __init__ is not run twice
        return super().__new__(cls)

    @classmethod
    def build_model(cls, rc, tokenizer):
        if cls.config_from(rc.task_config).head == "generative":
            return GenerativeVQATask.build_model(rc, tokenizer)
        return EncoderForVQA(rc.model, len(rc.class_names or []), cls.config_from(rc.task_config).grid_dim)

    def build_split(self, images, meta, train):
        rows = qa_rows(meta)
        if not rows:
            raise DataError("no questions in this split; VQA needs rows with 'question' and 'answers'")
        index = {a: i for i, a in enumerate(self.rc.class_names)}
        ids, mask = self.encode_texts([q for _, q, _, _ in rows], "question")
        width = max(len(answer_scores(a)) for _, _, a, _ in rows)
        target_idx = torch.full((len(rows), width), -1, dtype=torch.long)
        target_score = torch.zeros((len(rows), width))
        for r, (_, _, answers, _) in enumerate(rows):
            for j, (a, s) in enumerate(answer_scores(answers).items()):
                if a in index:  # answers outside the vocabulary cannot be predicted; their rows still teach "not these"
                    target_idx[r, j], target_score[r, j] = index[a], s
        fields = {"question_ids": ids, "question_mask": mask, "target_idx": target_idx, "target_score": target_score,
                  "answers": [a for _, _, a, _ in rows], "qtype": [t for _, _, _, t in rows]}
        return ExampleSplit(images, torch.tensor([r[0] for r in rows]), fields)

    def _targets(self, batch, num_answers):
        idx, score = batch["target_idx"], batch["target_score"]
        dense = torch.zeros(idx.shape[0], num_answers + 1, device=idx.device)
        dense.scatter_(1, torch.where(idx < 0, num_answers, idx), score)  # -1 padding lands in a spare column
        return dense[:, :num_answers]

    def _forward(self, model, batch):
        return model(normalize_images(batch["images"]), batch["question_ids"], batch["question_mask"]).float()

    def training_step(self, model, batch):
        logits = self._forward(model, batch)
        targets = self._targets(batch, logits.shape[1])
        # ViLT scales the mean BCE by the number of answers, i.e. sums over answers and averages over questions.
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]
        hit = targets.gather(1, logits.argmax(1, keepdim=True)).mean()
        return {"loss": loss, "acc": hit.detach()}

    @torch.no_grad()
    def validation_step(self, model, batch):
        logits = self._forward(model, batch)
        targets = self._targets(batch, logits.shape[1])
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1)
        preds = [self.rc.class_names[i] for i in logits.argmax(1).tolist()]
        acc = torch.tensor([vqa_accuracy(p, a) for p, a in zip(preds, batch["answers"])])
        return {"loss": loss.cpu(), "acc": acc, "qtype": batch["qtype"]}

    def compute_metrics(self, outputs):
        acc = torch.cat([o["acc"] for o in outputs])
        types = [t for o in outputs for t in o["qtype"]]
        return _metrics(float(torch.cat([o["loss"] for o in outputs]).mean()), acc, types)

    @torch.no_grad()
    def predict(self, model, images, files, question=None, top_k=1, **_):
        if not question or not str(question).strip():
            raise DataError("VQA needs a question: pass --question \"...\"")
        ids, mask = self.encode_texts([question] * len(images), "question", pad_to_max=False)
        probs = model(normalize_images(images), ids, mask).float().sigmoid()
        out = []
        for f, p in zip(files, probs):
            top = p.topk(min(top_k, len(p)))
            out.append({"file": f, "question": question, "answer": self.rc.class_names[int(top.indices[0])],
                        "score": float(top.values[0]),
                        "top": [{"answer": self.rc.class_names[int(i)], "score": float(v)} for v, i in zip(top.values, top.indices)]})
        return out


class GenerativeVQATask(_VQA, GenerativeTask):
    """VQA through the encoder-decoder: the question is the prompt, the most common answer the target."""

    def rows(self, meta, train):
        rows = []
        for k, question, answers, qtype in qa_rows(meta):
            best = Counter(normalize_answer(a) for a in answers).most_common(1)[0][0]
            rows.append({"image": k, "prompt": question, "target": best, "kind": qtype, "references": answers})
        if not rows:
            raise DataError("no questions in this split; VQA needs rows with 'question' and 'answers'")
        return rows

    def compute_metrics(self, outputs):
        loss, texts, kinds, refs, _ = self.gather(outputs)
        acc = torch.tensor([vqa_accuracy(t, r) for t, r in zip(texts, refs)])
        return _metrics(loss, acc, kinds)

    def predict(self, model, images, files, question=None, **_):
        if not question or not str(question).strip():
            raise DataError("VQA needs a question: pass --question \"...\"")
        out = self.predict_texts(model, images, files, prompt=str(question).strip())
        for r in out:
            r.update(question=question, answer=r["text"])
        return out
