"""User data: ImageFolder, JSONL/CSV, bad samples, splits, and image mode conversion."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from imagen.data import DataError, image_to_tensor, load_dataset, open_image, to_rgb


def _png(path, color=(200, 30, 30), size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _image_folder(root, per_class=5):
    for cls, color in (("cat", (200, 0, 0)), ("dog", (0, 200, 0))):
        for i in range(per_class):
            _png(root / cls / f"{i}.png", color)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".DS_Store").write_bytes(b"\0\1")
    return root


def _all_splits(spec, **kw):
    return {s: load_dataset(str(spec), s, **kw) for s in ("train", "val", "test")}


def test_image_folder_labels_and_seeded_split(tmp_path):
    root = _image_folder(tmp_path / "pets", per_class=10)
    splits = _all_splits(root, seed=1)
    ids = {s: {d[i]["id"] for i in range(len(d))} for s, d in splits.items()}
    assert sum(len(v) for v in ids.values()) == 20
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    for d in splits.values():
        assert d.class_names == ["cat", "dog"] and d.has_labels and not d.has_text and d.skipped == []
    sample = splits["train"][0]
    assert sample["image"].mode == "RGB" and sample["label"] in ("cat", "dog")
    assert {s: {d[i]["id"] for i in range(len(d))} for s, d in _all_splits(root, seed=1).items()} == ids
    assert {d[i]["id"] for d in [load_dataset(str(root), "train", seed=2)] for i in range(len(d))} != ids["train"]
    assert splits["train"].fast_images(8).shape == (len(splits["train"]), 3, 8, 8)


def test_train_val_test_subfolders_are_respected(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        _png(tmp_path / split / "a" / "x0.png")
        for i in range(1, n):
            _png(tmp_path / split / ("b" if split == "test" else "a") / f"x{i}.png")
    sizes = {s: len(d) for s, d in _all_splits(tmp_path).items()}
    assert sizes == {"train": 4, "val": 2, "test": 3}
    assert load_dataset(str(tmp_path), "train").class_names == ["a", "b"]  # union across splits


def test_jsonl_and_csv_with_relative_paths(tmp_path):
    for i in range(10):
        _png(tmp_path / "img" / f"{i}.png", (i * 20, 0, 0))
    rows = [{"image": f"img/{i}.png", "caption": f"picture {i}", "label": "odd" if i % 2 else "even",
             "question": "what number?", "answers": [str(i)], "boxes": [[0, 0, 4, 4]]} for i in range(10)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    csv_lines = ["filename,text,label"] + [f"img/{i}.png,picture {i},{'odd' if i % 2 else 'even'}" for i in range(10)]
    (tmp_path / "data.csv").write_text("\n".join(csv_lines) + "\n")
    for name in ("data.jsonl", "data.csv"):
        splits = _all_splits(tmp_path / name)
        texts = sorted(s["text"] for d in splits.values() for s in d)
        assert texts == sorted(f"picture {i}" for i in range(10))
        d = splits["train"]
        assert d.has_text and d.class_names == ["even", "odd"]
        s = d[0]
        assert s["label"] == ("odd" if int(s["text"].split()[1]) % 2 else "even")
    s = load_dataset(str(tmp_path / "data.jsonl"))[0]
    assert s["questions"][0]["answer"] == s["text"].split()[1] and s["objects"][0]["box"] == [0, 0, 4, 4]


def _bad_folder(tmp_path):
    root = _image_folder(tmp_path / "bad", per_class=6)
    good = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "dog" / "text.png").write_text("hello, I am not a PNG")
    return root


def test_bad_files_are_skipped_with_one_warning(tmp_path, caplog):
    root = _bad_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="imagen.data"):
        splits = _all_splits(root, on_bad_sample="skip")
    assert sum(len(d) for d in splits.values()) == 12
    skipped = sorted(p for d in splits.values() for p in d.skipped)
    assert sorted(p.rsplit("/", 1)[1] for p in skipped) == ["empty.png", "text.png", "truncated.png"]
    warnings = [r for r in caplog.records if r.name == "imagen.data" and r.levelno == logging.WARNING]
    assert 1 <= len(warnings) <= 3 and all("skipped" in r.getMessage() for r in warnings)


def test_bad_files_raise_with_on_bad_sample_error(tmp_path):
    root = _bad_folder(tmp_path)
    with pytest.raises(DataError, match=r"(empty|truncated|text)\.png"):
        for split in ("train", "val", "test"):
            load_dataset(str(root), split, on_bad_sample="error")


def test_open_image_errors_name_the_file(tmp_path):
    (tmp_path / "e.png").write_bytes(b"")
    (tmp_path / "t.jpg").write_text("plain text")
    for name in ("e.png", "t.jpg", "missing.png"):
        with pytest.raises(DataError, match=name) as info:
            open_image(tmp_path / name)
        assert "\n" not in str(info.value)


def test_broken_jsonl_line_names_line_number(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text('{"image": "a.png", "text": "x"}\n{"image": "a.png", "text": \n')
    with pytest.raises(DataError, match=r"d\.jsonl:2"):
        load_dataset(str(tmp_path / "d.jsonl"))


def test_rows_without_image_or_file_are_bad_samples(tmp_path):
    for i in range(5):
        _png(tmp_path / f"{i}.png")
    rows = [{"image": f"{i}.png", "text": "ok"} for i in range(5)] + [{"text": "no image"}, {"image": "gone.png"}]
    (tmp_path / "annotations.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"annotations\.jsonl:6|gone\.png"):
        _all_splits(tmp_path, on_bad_sample="error")
    total = sum(len(d) for d in _all_splits(tmp_path).values())
    assert total == 5


def test_missing_path_empty_folder_and_bad_names(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_dataset(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="shapes, fashion-mnist, emoji"):
        load_dataset("shpaes")
    with pytest.raises(DataError, match="train, val, test"):
        load_dataset("shapes", "validation")
    with pytest.raises(DataError, match="color-shape"):
        load_dataset("shapes", label="size")
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="no usable"):
        load_dataset(str(only_bad))


def test_mode_conversion_gives_sensible_rgb():
    cases = {
        "L": (Image.new("L", (4, 4), 128), (128, 128, 128)),
        "LA": (Image.new("LA", (4, 4), (200, 0)), (0, 0, 0)),
        "RGBA": (Image.new("RGBA", (4, 4), (255, 0, 0, 128)), (128, 0, 0)),
        "CMYK": (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
        "I;16": (Image.new("I;16", (4, 4), 65535), (255, 255, 255)),
        "I;16 half": (Image.new("I;16", (4, 4), 32768), (128, 128, 128)),
        "F": (Image.new("F", (4, 4), 1.0), (255, 255, 255)),
        "1": (Image.new("1", (4, 4), 1), (255, 255, 255)),
    }
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    cases["P"] = (pal, (10, 200, 30))
    pal_t = pal.copy()
    pal_t.info["transparency"] = 1
    cases["P transparent"] = (pal_t, (0, 0, 0))
    for name, (img, expect) in cases.items():
        rgb = to_rgb(img)
        assert rgb.mode == "RGB", name
        assert np.abs(np.asarray(rgb)[0, 0].astype(int) - expect).max() <= 1, (name, np.asarray(rgb)[0, 0])


def test_16bit_png_from_disk_and_tensor_resize(tmp_path):
    arr = np.full((6, 8), 65535, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "w.png")
    assert np.asarray(open_image(tmp_path / "w.png")).min() == 255
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    t = image_to_tensor(img, 16)
    assert t.shape == (3, 16, 16) and t.dtype.is_floating_point is False and int(t[2].min()) >= 250


def test_coco_instances_file_as_data(tmp_path):
    """A COCO .json file is a data source: boxes become objects with category names; the image size is kept."""
    import json

    from PIL import Image

    from imagen.data import load_dataset

    images, anns = [], []
    for i in range(10):
        Image.new("RGB", (40, 20), (10, 10, 10)).save(tmp_path / f"{i}.png")
        images.append({"id": 100 + i, "file_name": f"{i}.png", "width": 40, "height": 20})
        anns.append({"id": i, "image_id": 100 + i, "category_id": 7, "bbox": [2, 3, 10, 5], "iscrowd": 0})
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 7, "name": "lamp"}]}))
    ds = load_dataset(coco, "train")
    sample = ds[0]
    assert sample["objects"] == [{"box": [2.0, 3.0, 12.0, 8.0], "label": "lamp"}]
    assert (sample["width"], sample["height"]) == (40, 20) and sample["image"].size == (40, 20)
    assert len(ds) + len(load_dataset(coco, "val")) + len(load_dataset(coco, "test")) == 10


def test_rows_about_one_image_become_one_record(tmp_path):
    """VQA-style files give one question per row: the image must be one sample, in one split, with every question."""
    import json

    from PIL import Image

    from imagen.data import load_dataset

    rows = []
    for i in range(10):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / f"{i}.png")
        for q in ("what color?", "how many?", "is there a cat?"):
            rows.append({"image": f"{i}.png", "question": q, "answers": [{"answer": "red"}, {"answer": "red"}]})
        rows.append({"image": f"{i}.png", "caption": f"picture {i}"})
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    splits = {s: load_dataset(data, s) for s in ("train", "val", "test")}
    ids = [sample["id"] for ds in splits.values() for sample in ds]
    assert sorted(ids) == sorted(f"{i}.png" for i in range(10))  # each image exactly once over the splits
    sample = splits["train"][0]
    assert [q["question"] for q in sample["questions"]] == ["what color?", "how many?", "is there a cat?"]
    assert sample["questions"][0]["answers"] == ["red", "red"]  # VQAv2 answer objects
    assert sample["text"].startswith("picture") and sample["captions"] == [sample["text"]]


def test_json_lines_file_named_json_still_loads(tmp_path):
    import json

    from PIL import Image

    from imagen.data import load_dataset

    for i in range(5):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    (tmp_path / "rows.json").write_text("\n".join(json.dumps({"image": f"{i}.png", "text": "dark"}) for i in range(5)))
    assert sum(len(load_dataset(tmp_path / "rows.json", s)) for s in ("train", "val", "test")) == 5


def test_caption_sets_gather_every_caption_of_an_image(tmp_path):
    import json

    from PIL import Image

    from imagen.data import load_dataset

    rows = []
    for i in range(6):
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(tmp_path / f"{i}.png")
        rows += [{"image": f"{i}.png", "caption": f"picture {i}"}, {"image": f"{i}.png", "caption": f"photo {i}"}]
    rows.append({"image": "0.png", "question": "what?", "answer": "red"})  # a row without a caption adds none
    data = tmp_path / "caps.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_dataset(data, "train", on_bad_sample="skip")
    assert len(ds) >= 3
    for sample, captions in zip(ds, ds.caption_sets()):
        k = sample["id"].split(".")[0]
        assert captions == [f"picture {k}", f"photo {k}"]


def test_skip_warning_says_why_and_huge_images_are_refused(tmp_path, caplog, monkeypatch):
    import imagen.data.images as images

    root = _image_folder(tmp_path / "data")
    (root / "cat" / "empty.png").write_bytes(b"")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)  # 12 x 10 = 120 pixels: over the limit, refused before decoding
    with pytest.raises(DataError, match=r"is 12 x 10, over the limit of 0 million pixels; downscale it or remove it"):
        open_image(root / "cat" / "0.png")
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="imagen.data"):
        _all_splits(root)
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert any("image file is empty" in w and "empty.png" in w for w in warnings), warnings


def test_an_image_with_two_labels_is_reported(tmp_path, caplog):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", color=(0, 200, 0))
    rows = [{"image": "a.png", "label": "red"}, {"image": "b.png", "label": "green"}, {"image": "a.png", "label": "green"}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="imagen.data"):
        load_dataset(str(tmp_path / "data.jsonl"), "train")
    assert any("is labelled 'red' on line 1 but 'green' here; kept the first" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match="data.jsonl:3 .image a.png is labelled 'red' on line 1 but 'green' here"):
        load_dataset(str(tmp_path / "data.jsonl"), "train", on_bad_sample="error")


def test_a_device_file_is_not_data():
    with pytest.raises(DataError, match="data path /dev/zero is neither a folder nor a regular file"):
        load_dataset("/dev/zero", "train")
