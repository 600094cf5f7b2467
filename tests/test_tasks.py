"""Tasks through the trainer: classification learns, pretraining objectives decrease, augmentation is exact."""

import torch

import imagen
from imagen.data.augment import augment, random_hflip, random_shift


def test_random_shift_moves_content_and_keeps_size():
    torch.manual_seed(0)
    images = torch.zeros(8, 3, 8, 8, dtype=torch.uint8)
    images[:, :, 4, 4] = 255
    shifted = random_shift(images, 2)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    for img in shifted:
        ys, xs = torch.nonzero(img[0], as_tuple=True)
        assert len(ys) == 1 and abs(int(ys[0]) - 4) <= 2 and abs(int(xs[0]) - 4) <= 2
    assert len({tuple(torch.nonzero(img[0])[0].tolist()) for img in shifted}) > 1  # not all the same shift


def test_hflip_mirrors_exactly_the_chosen_images():
    torch.manual_seed(1)
    images = torch.arange(16 * 3 * 4 * 4, dtype=torch.float).reshape(16, 3, 4, 4)
    out = random_hflip(images)
    flipped = [bool((o == i.flip(-1)).all()) for o, i in zip(out, images)]
    kept = [bool((o == i).all()) for o, i in zip(out, images)]
    assert all(f != k for f, k in zip(flipped, kept)) and 0 < sum(flipped) < 16
    assert augment(images, "none") is images


def test_classifier_learns_shapes(tmp_path):
    """A learned result: a tiny encoder separates circles, squares and triangles within a few hundred steps."""
    result = imagen.finetune("classify", "shapes", tmp_path / "run", label="shape", n=1000, preset="tiny", max_steps=400,
                             batch_size=64, lr=2e-3, precision="fp32", progress=False, seed=0)
    assert result.status == "completed"
    report = imagen.evaluate(tmp_path / "run", "shapes", split="test", n=1000, echo=lambda *a, **k: None)
    assert report["accuracy"] >= 0.9, report


def test_pretraining_reduces_every_objective(tmp_path):
    imagen.pretrain("shapes", tmp_path / "pre", n=256, max_steps=60, batch_size=32, lr=2e-3, precision="fp32", progress=False,
                    sets=["model.dim=48", "model.num_heads=2"])
    import json

    rows = [json.loads(l) for l in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    first, last = train[0], train[-1]
    for key in ("mim", "itc", "mlm"):
        assert last[key] < first[key], (key, first[key], last[key])
