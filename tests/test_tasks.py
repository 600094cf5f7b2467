"""Tasks through the trainer: classification learns, pretraining objectives decrease, augmentation is exact."""

import json

import torch

import imagen
from imagen.data.augment import augment, random_hflip, random_shift
from imagen.tasks.classify import RECIPE_MODEL, RECIPE_OPTIONS


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


def _folder(root, size, n_per_class, mode="L"):
    from PIL import Image
    for k, name in enumerate(("dark", "light")):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            Image.new(mode, (size, size), 40 + 150 * k + i % 7).save(root / name / f"{i}.png")
    return root


def test_classify_recipe_fits_the_data():
    """The default recipe on real images: size, patch grid and epochs follow the data; the user's options win."""
    from imagen.tasks.classify import (INIT_LAYER_DECAY, MAX_AUTO_IMAGE_SIZE, MAX_EPOCHS, MIN_EPOCHS, TARGET_IMAGES_SEEN,
                                       ClassifyTask)

    def fit(size, n, **given):
        return ClassifyTask.fit_recipe(_Data(size, n), "folder", given)

    fitted, notes = fit(28, 55000)
    assert (fitted["image_size"], fitted["patch_size"]) == (28, 4)
    assert fitted["epochs"] == max(MIN_EPOCHS, round(TARGET_IMAGES_SEEN / 55000))
    assert any("28 px" in line for line in notes) and any("55000 training images" in line for line in notes)
    fitted, _ = fit(256, 1400)
    assert fitted["image_size"] == MAX_AUTO_IMAGE_SIZE and MAX_AUTO_IMAGE_SIZE % fitted["patch_size"] == 0
    assert fitted["epochs"] == min(MAX_EPOCHS, round(TARGET_IMAGES_SEEN / 1400)) > 10
    fitted, _ = fit(50, 5000)
    assert fitted["image_size"] % fitted["patch_size"] == 0 and fitted["image_size"] <= 50
    # What the user gave is never chosen, and the rest follows from it.
    fitted, notes = fit(64, 5000, image_size=32, epochs=2, augment="none")
    assert not {"image_size", "epochs", "augment"} & set(fitted) and fitted["patch_size"] == 4  # 8 x 8 at 32 px
    fitted, _ = fit(64, 5000, patch_size=16)
    assert fitted["image_size"] == 64 and "patch_size" not in fitted
    assert ClassifyTask.fit_recipe(_Data(32, 500), "shapes", {}) == ({}, [])  # Shapes keeps its measured recipe
    # A run started from another keeps that run's model (and resolution) and gets the schedule fitted to the data.
    fitted, notes = ClassifyTask.fit_recipe(_Data(28, 550), "folder", {}, from_run=True)
    assert fitted["epochs"] == MAX_EPOCHS and fitted["lr"] == RECIPE_OPTIONS["lr"] and fitted["augment"] == "shift"
    assert not {"image_size", "patch_size", "preset", *RECIPE_MODEL} & set(fitted) and len(notes) == 1
    assert fitted["layer_decay"] == INIT_LAYER_DECAY < 1


def test_pretrain_recipe_fits_real_images_as_classify_does():
    """Pretraining on real images gets the classify recipe's model, so a run fine-tuned from it has the model it would
    have had from scratch; image-only pretraining is MAE-style; the user's options win; Shapes keeps its defaults."""
    from imagen.tasks.classify import ClassifyTask
    from imagen.tasks.pretrain import MAE_OPTIONS, PRETRAIN_IMAGES_SEEN, PRETRAIN_OPTIONS, PretrainTask

    fitted, notes = PretrainTask.fit_recipe(_Data(28, 55000), "folder", {})
    model_keys = {"image_size", "patch_size", *RECIPE_MODEL}
    assert {k: fitted[k] for k in model_keys} == {k: v for k, v in ClassifyTask.fit_recipe(_Data(28, 55000), "folder", {})[0].items()
                                                  if k in model_keys}
    assert {k: fitted[k] for k in {**PRETRAIN_OPTIONS, **MAE_OPTIONS}} == {**PRETRAIN_OPTIONS, **MAE_OPTIONS}
    assert fitted["epochs"] == round(PRETRAIN_IMAGES_SEEN / 55000) == 12 and any("MAE" in line for line in notes)
    # Captioned data pretrains with every objective, SimMIM's head unless asked; given values are never chosen.
    fitted, _ = PretrainTask.fit_recipe(_Data(28, 5000, has_text=True), "folder", {"max_steps": 10, "lr": 5e-4})
    assert not {"epochs", "lr", *MAE_OPTIONS} & set(fitted) and fitted["stem_layers"] == RECIPE_MODEL["stem_layers"]
    fitted, _ = PretrainTask.fit_recipe(_Data(28, 5000, has_text=True), "folder", {"image_only": True})
    assert fitted["mim_decoder_layers"] == MAE_OPTIONS["mim_decoder_layers"]
    assert PretrainTask.fit_recipe(_Data(32, 500), "shapes", {}) == ({}, [])


class _Data:
    def __init__(self, size, n, has_text=False):
        self.image_size, self.n, self.has_text = size, n, has_text

    def __len__(self):
        return self.n


def test_finetune_from_a_pretrained_run_on_a_folder_gets_the_fitted_schedule(tmp_path, pretrained):
    data = _folder(tmp_path / "data", 40, 12)
    imagen.finetune("classify", str(data), tmp_path / "run", init_from=pretrained, epochs=1, progress=False)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    pre = json.loads((pretrained / "config.json").read_text())["model"]
    assert cfg["model"] == {**pre, "vocab_size": cfg["model"]["vocab_size"]}  # the pretrained model, not the recipe's
    assert cfg["train"]["lr"] == RECIPE_OPTIONS["lr"] and cfg["train"]["epochs"] == 1  # the user's epochs win
    assert cfg["task_config"]["augment"] == RECIPE_OPTIONS["augment"] and cfg["train"]["layer_decay"] < 1


def test_bare_finetune_on_a_folder_of_large_images_says_what_it_chose(tmp_path, caplog):
    data = _folder(tmp_path / "data", 96, 12, mode="RGB")
    with caplog.at_level("INFO", logger="imagen"):
        imagen.finetune("classify", str(data), tmp_path / "run", preset="tiny", max_steps=2, progress=False)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model"]["image_size"] == 64 and cfg["model"]["patch_size"] == 8
    assert cfg["model"]["stem_layers"] == RECIPE_MODEL["stem_layers"] and cfg["model"]["qk_norm"]
    assert cfg["task_config"]["augment"] == "shift" and cfg["task_config"]["label_smoothing"] > 0
    assert cfg["model"]["dim"] == 64  # the user's preset (tiny) wins over the recipe's
    assert any("images are 96 px: training at 64 px" in r.getMessage() for r in caplog.records)
    report = imagen.evaluate(tmp_path / "run", str(data), split="val", echo=lambda *a, **k: None)
    assert 0 <= report["accuracy"] <= 1
    # A value given with --set counts as given: the rest of the recipe follows from it.
    imagen.finetune("classify", str(data), tmp_path / "run32", preset="tiny", max_steps=1, progress=False,
                    sets=["model.image_size=32", "train.epochs=1"])
    cfg = json.loads((tmp_path / "run32" / "config.json").read_text())
    assert (cfg["model"]["image_size"], cfg["model"]["patch_size"]) == (32, 4)
    assert cfg["train"]["epochs"] == 1 and cfg["train"]["early_stopping_patience"] is None
