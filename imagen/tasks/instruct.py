"""Instruction-style multitask fine-tuning: one encoder-decoder answers instructions about an image.

Every task is phrased as an instruction and answered in text — "Describe the image.", "What color is the
circle?", "How many squares are there?", "Where is the red triangle?" — so one model and one generative head
serve them all. The training mixture is a config (`--set instruct.mixture=describe=2,count=1,...`): a kind with
weight w contributes round(w x images) training examples — whole copies of that kind's rows, then a sample
of the rest without replacement — so a weight of 0 leaves a kind out and a weight of 2 doubles it; kinds the
mixture does not name keep weight 1. Evaluation is per kind: `fact_accuracy` for descriptions on the Shapes
world (BLEU-4 and CIDEr-D otherwise) and answer accuracy (VQA-normalised exact match) for the others, with
`instruct_score` their mean.

User data: JSONL rows {"image", "instruction", "response"} (optional "task" names the kind; default custom).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np

from imagen.config import ConfigError
from imagen.errors import DataError
from imagen.data.shapes_scene import SHAPES
from imagen.eval.captioning import corpus_bleu, cider_d, fact_accuracy
from imagen.eval.vqa import normalize_answer
from imagen.tasks.caption import english_shapes, has_shapes_objects
from imagen.tasks.generative import GenerationOptions, GenerativeTask

log = logging.getLogger("imagen")
DESCRIBE = "Describe the image."
DEFAULT_MIXTURE = "describe=1,color=1,shape=1,count=1,position=1,exists=1,relation=1,custom=1"


def parse_mixture(text: str) -> dict[str, float]:
    """'describe=2,count=1' -> {'describe': 2.0, 'count': 1.0}; one clear error for anything else."""
    out = {}
    for part in str(text).split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not name.strip() or weight < 0:
            raise ConfigError(f"instruct.mixture entry {part.strip()!r} must look like kind=weight with weight >= 0, "
                              "e.g. describe=1,count=2")
        out[name.strip()] = weight
    if not out or not any(out.values()):
        raise ConfigError("instruct.mixture gives every kind weight 0; give at least one kind a positive weight")
    return out


@dataclass
class InstructConfig(GenerationOptions):
    mixture: str = DEFAULT_MIXTURE
    max_eval_per_kind: int = 300  # validation / evaluation rows per kind (generation is the slow part)

    def __post_init__(self):
        super().__post_init__()
        parse_mixture(self.mixture)


def _sentence(question: str) -> str:
    q = question.strip()
    return q[:1].upper() + q[1:]


def instruction_rows(k: int, m: dict, rng: np.random.Generator) -> list[dict]:
    """Every instruction row one sample offers: user instructions, or Shapes captions and questions."""
    rows = []
    objects = m.get("objects")
    if m.get("instructions"):  # user rows {"image", "instruction", "response"[, "task"]}, grouped by image
        for entry in m["instructions"]:
            instruction, response = str(entry.get("instruction") or "").strip(), entry.get("response")
            if not instruction:
                raise DataError(f"sample {m.get('id', k)}: the instruction is empty; give every row an 'instruction'")
            if response is None or not str(response).strip():
                raise DataError(f"sample {m.get('id', k)}: no 'response' for instruction {instruction!r}")
            rows.append({"image": k, "prompt": instruction, "target": str(response).strip(),
                         "kind": str(entry.get("task") or "custom"), "objects": objects})
        return rows
    if m.get("text"):
        rows.append({"image": k, "prompt": DESCRIBE, "target": m["text"], "kind": "describe", "objects": objects})
    for q in m.get("questions") or []:
        answer = q.get("answer") if q.get("answer") is not None else (q.get("answers") or [None])[0]
        if q.get("question") and answer is not None:
            rows.append({"image": k, "prompt": _sentence(q["question"]), "target": str(answer), "kind": str(q.get("type") or "custom")})
    if has_shapes_objects(objects):  # counting one kind of shape, present or absent
        counts = Counter(o["shape"] for o in objects)
        shape = SHAPES[rng.integers(len(SHAPES))]
        rows.append({"image": k, "prompt": f"How many {shape}s are there?", "target": str(counts.get(shape, 0)), "kind": "count"})
    return rows


class InstructTask(GenerativeTask):
    name = "instruct"
    monitor = ("loss", "min")  # held-out NLL: smooth, unlike generation metrics on small validation sets
    Config = InstructConfig
    headline = ("instruct_score", "describe_fact_accuracy", "count_accuracy", "position_accuracy")
    predict_inputs = ("instruction", "decoding")
    recipe = {"epochs": 10, "lr": 2e-3}

    @classmethod
    def tokenizer_texts(cls, meta, cfg):
        rng = np.random.default_rng(0)
        return [t for k, m in enumerate(meta) for r in instruction_rows(k, m, rng) for t in (r["prompt"], r["target"])]

    def rows(self, meta, train):
        rng = np.random.default_rng(self.rc.train.seed + (0 if train else 1))
        by_kind: dict[str, list[dict]] = {}
        for k, m in enumerate(meta):
            for r in instruction_rows(k, m, rng):
                by_kind.setdefault(r["kind"], []).append(r)
        if not by_kind:
            raise DataError("no instructions in this split; give rows {\"image\", \"instruction\", \"response\"} "
                            "or Shapes data (captions and questions)")
        weights = parse_mixture(self.cfg.mixture)
        unknown = sorted(set(weights) - set(by_kind) - {"custom"})
        if unknown and train:
            log.warning("instruct.mixture names kinds the data does not have: %s (it has: %s)", ", ".join(unknown),
                        ", ".join(sorted(by_kind)))
        rows = []
        for kind in sorted(by_kind):
            pool = by_kind[kind]
            w = weights.get(kind, 1.0)
            if w == 0:
                continue
            if train:  # whole copies of the pool, then a sample without replacement for the remainder
                count = max(1, round(w * len(meta)))
                whole, rest = divmod(count, len(pool))
                rows += pool * whole + [pool[i] for i in rng.choice(len(pool), size=rest, replace=False)]
            else:
                rows += [pool[i] for i in rng.permutation(len(pool))[: self.cfg.max_eval_per_kind]]
        if not rows:
            raise DataError(f"instruct.mixture {self.cfg.mixture!r} selects none of the kinds in the data: {', '.join(sorted(by_kind))}")
        return rows

    def compute_metrics(self, outputs):
        loss, texts, kinds, refs, objects = self.gather(outputs)
        metrics = {"loss": loss}
        scores = []
        for kind in sorted(set(kinds)):
            sel = [i for i, k in enumerate(kinds) if k == kind]
            t, r, o = [texts[i] for i in sel], [refs[i] for i in sel], [objects[i] for i in sel]
            if kind == "describe":
                metrics["describe_bleu4"] = corpus_bleu(t, r)
                metrics["describe_cider"] = cider_d(t, r)
                if english_shapes(o, [x[0] for x in r]):
                    metrics["describe_fact_accuracy"] = fact_accuracy(t, o)
                scores.append(metrics.get("describe_fact_accuracy", metrics["describe_bleu4"]))
            else:
                acc = float(np.mean([normalize_answer(a) in {normalize_answer(x) for x in ref} for a, ref in zip(t, r)]))
                metrics[f"{kind}_accuracy"] = acc
                scores.append(acc)
        metrics["instruct_score"] = float(np.mean(scores))
        return metrics

    def predict(self, model, images, files, instruction=None, decoding=None, **_):
        if instruction is None or not str(instruction).strip():
            raise DataError("instruct needs an instruction: pass --instruction \"Describe the image.\" (or a question)")
        out = self.predict_texts(model, images, files, prompt=str(instruction).strip(), decoding=decoding)
        for r in out:
            r["instruction"] = instruction
        return out
