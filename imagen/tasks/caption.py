"""Image captioning: the encoder reads the image, a Transformer decoder writes the caption (teacher-forced NLL).

Metrics: corpus BLEU-4 and CIDEr-D against each image's reference captions, and on the Shapes world
`fact_accuracy` — the share of generated captions that name exactly the image's objects (colour and shape,
each once), which BLEU and CIDEr cannot tell from fluent but wrong text.
"""

from __future__ import annotations

from dataclasses import dataclass

from imagen.errors import DataError
from imagen.eval.captioning import corpus_bleu, cider_d, fact_accuracy
from imagen.tasks.generative import GenerationOptions, GenerativeTask


@dataclass
class CaptionConfig(GenerationOptions):
    pass


def has_shapes_objects(objects) -> bool:
    return bool(objects) and all(isinstance(o, dict) and "color" in o and "shape" in o for o in objects)


def english_shapes(objects: list, texts: list[str]) -> bool:
    """True when every sample is a Shapes scene and every text English: where fact-level metrics apply."""
    return all(has_shapes_objects(o) for o in objects) and all(t.isascii() for t in texts)


class CaptionTask(GenerativeTask):
    name = "caption"
    monitor = ("loss", "min")  # held-out NLL: smooth, unlike generation metrics on small validation sets
    Config = CaptionConfig
    headline = ("fact_accuracy", "bleu4", "cider")
    predict_inputs = ("decoding",)
    # 16,000 Shapes images x 10 epochs: test fact_accuracy 0.926 where 4,000 x 40 epochs (the same steps)
    # overfit to 0.820 (bench/RESULTS.md).
    recipe = {"epochs": 10, "lr": 2e-3, "shapes_n": 16000}

    def rows(self, meta, train):
        rows = []
        for k, m in enumerate(meta):
            refs = [t for t in (m.get("captions") or [m.get("text")]) if t]
            if not refs:
                continue  # an image without a caption teaches nothing here
            rows.append({"image": k, "target": refs[0], "kind": "caption", "references": refs, "objects": m.get("objects")})
        if not rows:
            raise DataError("no captions in this split; captioning needs images with a 'text' (or 'caption') field")
        return rows

    def compute_metrics(self, outputs):
        loss, texts, _, refs, objects = self.gather(outputs)
        metrics = {"loss": loss, "bleu4": corpus_bleu(texts, refs), "cider": cider_d(texts, refs)}
        if english_shapes(objects, [r[0] for r in refs]):
            metrics["fact_accuracy"] = fact_accuracy(texts, objects)
        return metrics

    def predict(self, model, images, files, decoding=None, **_):
        return self.predict_texts(model, images, files, decoding=decoding)
