"""Shapes world: determinism, geometry, colours, captions, questions and writing to disk."""

import json

import numpy as np
import pytest

from imagen.data import DataError, ShapesWorld, open_image, load_dataset, shapes_class_names, write_shapes
from imagen.data.shapes import PARAPHRASES
from imagen.data.shapes_scene import COLORS, POSITIONS, SHAPES, place_objects
from imagen.data.shapes_text import COLOR_ZH, SHAPE_ZH, caption

N = 150


def _samples(seed=0, size=32, lang="en", **kw):
    world = ShapesWorld(seed=seed, size=size, lang=lang, **kw)
    return [world.sample(i) for i in range(N)]


def test_same_seed_same_pixels_different_seed_differs():
    a, b = ShapesWorld(seed=3), ShapesWorld(seed=3)
    for i in (0, 7, 1234):
        assert np.array_equal(np.asarray(a.sample(i)["image"]), np.asarray(b.sample(i)["image"]))
        assert a.sample(i)["text"] == b.sample(i)["text"]
    c = ShapesWorld(seed=4)
    assert any(not np.array_equal(np.asarray(a.sample(i)["image"]), np.asarray(c.sample(i)["image"]))
               for i in range(5))


@pytest.mark.parametrize("size", [32, 64])
def test_objects_inside_canvas_non_overlapping_and_sized(size):
    counts = set()
    for s in _samples(size=size):
        assert s["image"].mode == "RGB" and s["image"].size == (size, size)
        objs = s["objects"]
        counts.add(len(objs))
        assert 1 <= len(objs) <= 3
        for o in objs:
            x0, y0, x1, y1 = o["box"]
            assert all(isinstance(v, int) for v in o["box"])
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            extent = (x1 - x0) / size
            assert 0.25 <= extent <= 0.45
            lo, hi = (0.25, 0.33) if o["size"] == "small" else (0.37, 0.45)
            assert lo <= extent <= hi
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                ax0, ay0, ax1, ay1 = a["box"]
                bx0, by0, bx1, by1 = b["box"]
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, (a, b)
    assert counts == {1, 2, 3}


def test_centre_pixel_has_named_colour():
    checked = 0
    for s in _samples():
        img = np.asarray(s["image"]).astype(int)
        for o in s["objects"]:
            if o["shape"] == "triangle":
                continue
            x0, y0, x1, y1 = o["box"]
            px = img[(y0 + y1) // 2, (x0 + x1) // 2]
            assert np.abs(px - np.array(COLORS[o["color"]])).max() <= 12, (o, px)
            checked += 1
    assert checked > 50
    assert tuple(np.asarray(_samples()[0]["image"])[0, 0]) in {(16, 16, 16)} | {tuple(c) for c in COLORS.values()}


def test_caption_names_every_object_and_positions_match():
    for s in _samples():
        for o in s["objects"]:
            assert o["color"] in s["text"] and o["shape"] in s["text"], (s["text"], o)
            x0, y0, x1, y1 = o["box"]
            row, col = min(2, int((y0 + y1) / 2 * 3 / 32)), min(2, int((x0 + x1) / 2 * 3 / 32))
            assert o["position"] == POSITIONS[row][col]


def test_questions_and_labels_are_consistent():
    types = set()
    for s in _samples():
        objs = s["objects"]
        for q in s["questions"]:
            types.add(q["type"])
            if q["type"] == "count":
                assert q["answer"] == str(len(objs))
            if q["type"] == "exists":
                assert q["answer"] in ("yes", "no")
                named = q["question"][len("is there a "):-1]
                assert (q["answer"] == "yes") == any(f"{o['color']} {o['shape']}" == named for o in objs)
            if q["type"] == "color":
                shape = q["question"].split()[-1].rstrip("?")
                assert [o["color"] for o in objs if o["shape"] == shape] == [q["answer"]]
        big = max(objs, key=lambda o: o["box"][2] - o["box"][0])
        assert s["labels"]["count"] == str(len(objs))
        assert s["labels"]["color-shape"] == f"{big['color']} {big['shape']}"
    assert types == {"color", "shape", "count", "exists", "position", "relation"}


def test_chinese_captions_use_chinese_words():
    for s in _samples(lang="zh")[:60]:
        for o in s["objects"]:
            assert COLOR_ZH[o["color"]] in s["text"] and SHAPE_ZH[o["shape"]] in s["text"], s["text"]
        assert not any(c in s["text"] for c in COLORS)


def test_class_names_and_label_loading():
    assert len(shapes_class_names("color-shape")) == 18
    assert shapes_class_names("shape") == list(SHAPES)
    assert shapes_class_names("count") == ["1", "2", "3"]
    with pytest.raises(DataError, match="color-shape"):
        shapes_class_names("size")
    ds = load_dataset("shapes", "val", label="color-shape", n=80)
    assert len(ds) == 10 and ds.class_names == shapes_class_names("color-shape")
    assert all(len(ds[i]["objects"]) == 1 and ds[i]["label"] in ds.class_names for i in range(len(ds)))
    train, test = load_dataset("shapes", "train", n=16), load_dataset("shapes", "test", n=16)
    assert train[0]["text"] != test[0]["text"] or train[1]["text"] != test[1]["text"]
    assert train.class_names is None and train[0]["label"] is None
    assert load_dataset("shapes", n=8).fast_images(16).shape == (8, 3, 16, 16)


def test_write_shapes_round_trip(tmp_path):
    out = write_shapes(tmp_path / "ds", n=12, seed=5)
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(12)]
    rows = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[0]["image"] == "images/000000.png"
    world = ShapesWorld(seed=5)
    assert [r["text"] for r in rows] == [world.sample(i)["text"] for i in range(12)]
    assert np.array_equal(np.asarray(world.sample(3)["image"]), np.asarray(open_image(out / "images/000003.png")))
    loaded = [load_dataset(str(out), split) for split in ("train", "val", "test")]
    assert sorted(s["text"] for d in loaded for s in d) == sorted(r["text"] for r in rows)
    assert any(s.get("questions") for s in loaded[0])
    labelled = load_dataset(str(out), "train", label="shape")
    assert labelled.class_names == sorted({r["labels"]["shape"] for r in rows}) and labelled[0]["label"] in SHAPES
    with pytest.raises(DataError, match="not empty"):
        write_shapes(out, n=2, seed=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir cleaned up


def test_paraphrases_name_every_object_and_leave_the_sample_stream_alone():
    world = ShapesWorld(seed=5)
    styles = set()
    for i in range(60):
        s = world.sample(i)
        captions = world.captions(i)
        paraphrases = captions[1:]
        assert captions[0] == s["text"] and len(paraphrases) == PARAPHRASES
        for text in paraphrases:
            for o in s["objects"]:
                assert o["color"] in text and o["shape"] in text, (text, s["objects"])
        styles.update(paraphrases)
        # The sample's own caption is what the stream gave before paraphrases existed.
        rng = np.random.default_rng([5, i])
        objects = place_objects(rng, 32, int(rng.integers(1, 4)))
        assert objects == s["objects"] and caption(objects, rng) == s["text"]
    assert len(styles) > 200  # not one caption repeated
    # Dataset view: the caption first, then the paraphrases (repeats kept, so a draw follows the templates).
    ds = load_dataset("shapes", "train", n=8)
    sets = ds.caption_sets()
    assert [cs[0] for cs in sets] == ds.texts() and all(len(cs) == PARAPHRASES + 1 for cs in sets)


def _kind(objects: list[dict]) -> str:
    names = {(o["color"], o["shape"]) for o in objects}
    if len(objects) == 1:
        return "single"
    if len(objects) == 2 and len(names) == 2:
        return "pair"
    return "group" if len(names) == 1 else "other"


def test_compositional_mix_draws_its_kinds_of_scene_and_words_them_truthfully():
    n = 2000
    ds = load_dataset("shapes:compositional", "train", n=n)
    plain = load_dataset("shapes", "train", n=n)
    kinds = {"single": 0, "pair": 0, "group": 0, "other": 0}
    relations = counted = 0
    for i in range(n):
        s = ds[i]
        kinds[_kind(s["objects"])] += 1
        relations += any(r in s["text"] for r in (" left of ", " right of ", " above ", " below "))
        counted += any(f" {w} " in f" {s['text']}" for w in ("two", "three"))  # "two green triangles" anywhere
        for o in s["objects"]:
            assert o["color"] in s["text"] and o["shape"] in s["text"], (s["text"], s["objects"])
    # Shares from SCENE_MIXES (placement may drop an object that does not fit: a few scenes change kind).
    assert abs(kinds["single"] / n - 0.25) < 0.04 and abs(kinds["pair"] / n - 0.45) < 0.05
    assert abs(kinds["group"] / n - 0.20) < 0.04
    # Relations and counts are twice / three times as common as in the uniform mix; the default is unchanged.
    plain_relations = sum(any(r in t for r in (" left of ", " right of ", " above ", " below ")) for t in plain.texts())
    assert relations > 1.8 * plain_relations and relations / n > 0.2 and counted / n > 0.15
    assert plain.texts() == [ShapesWorld(seed=0).sample(i)["text"] for i in range(n)]
    # The spec is recorded whole and splits keep their own streams.
    assert ds.texts()[:8] == [ShapesWorld(seed=0, mix="compositional").sample(i)["text"] for i in range(8)]
    assert load_dataset("shapes:compositional", "val", n=n).texts()[:8] != ds.texts()[:8]


def test_scene_mix_bad_input_says_what_to_use():
    with pytest.raises(DataError, match="choose one of: uniform, compositional"):
        load_dataset("shapes:balanced", "train", n=4)
    with pytest.raises(DataError, match=r"unknown Shapes scene mix '' \(in 'shapes:'\)"):
        load_dataset("shapes:", "train", n=4)  # an empty variant is a typo, not the uniform mix
    with pytest.raises(DataError, match="unknown Shapes scene mix 'balanced'; choose one of"):
        ShapesWorld(mix="balanced")
    with pytest.raises(DataError, match="only shapes has variants"):
        load_dataset("fashion-mnist:compositional", "train", n=4)
    with pytest.raises(DataError, match="use plain 'shapes'"):
        load_dataset("shapes:compositional", "train", label="shape", n=4)
    with pytest.raises(DataError, match="leave min_objects"):
        ShapesWorld(mix="compositional", max_objects=2)
