"""Detection: box ops, NMS, target assignment, COCO mAP and JSON in/out, bad boxes, a learned result, the CLI."""

import dataclasses
import json

import pytest
import torch
from PIL import Image, ImageDraw

import imagen
from imagen.config import ConfigError, TrainConfig, encoder_config
from imagen.data import load_dataset
from imagen.errors import DataError
from imagen.data.examples import collect
from imagen.data.images import image_to_tensor
from imagen.data.shapes import ShapesWorld
from imagen.data.coco import read_coco
from imagen.eval.detection import coco_map, write_coco_results
from imagen.models.detection import (
    assign_targets,
    batched_nms,
    box_iou,
    decode_detections,
    detection_loss,
    generalized_box_iou,
    nms,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from imagen.runs import RunConfig
from imagen.tasks.detect import DetectConfig, DetectTask, from_model_pixels, hflip, to_model_pixels
from imagen.tasks.registry import TASKS

from cli_helpers import one_line_error, run_cli

QUIET = dict(precision="fp32", progress=False, report_to=("jsonl",))


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The task under its name, whether or not the registry lists it yet."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TASKS, "detect", DetectTask)
        yield


def _task(class_names, image_size=32, **options):
    rc = RunConfig(task="detect", model=encoder_config("tiny", image_size=image_size), train=TrainConfig(),
                   class_names=list(class_names), task_config=options)
    return DetectTask(rc)


# -- box ops ----------------------------------------------------------------------------------------------


def test_iou_giou_and_conversions_of_known_boxes():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 4.0, 5.0, 5.0], [0.0, 0.0, 2.0, 2.0]])
    # overlap 1, union 7; disjoint; identical
    assert torch.allclose(box_iou(a, b), torch.tensor([[1 / 7, 0.0, 1.0]]))
    # GIoU = IoU - (hull - union) / hull: hulls 9 and 25
    assert torch.allclose(generalized_box_iou(a, b), torch.tensor([[1 / 7 - 2 / 9, -20 / 25, 1.0]]))
    assert torch.allclose(generalized_box_iou(a.expand(3, 4), b, pairwise=False), torch.tensor([1 / 7 - 2 / 9, -0.8, 1.0]))
    xywh = xyxy_to_xywh(torch.tensor([[10.0, 5.0, 30.0, 15.0]]))
    assert xywh.tolist() == [[10.0, 5.0, 20.0, 10.0]] and xywh_to_xyxy(xywh).tolist() == [[10.0, 5.0, 30.0, 15.0]]


def test_nms_keeps_the_best_of_overlapping_boxes_per_class():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.95, 0.7])
    # box 1 overlaps box 0 with IoU 90 / 110 = 0.82: dropped at 0.5, kept at 0.9; box 3 is box 0 again.
    assert nms(boxes[:3], scores[:3], 0.5).tolist() == [2, 0]
    assert nms(boxes[:3], scores[:3], 0.9).tolist() == [2, 0, 1]
    assert nms(boxes, scores, 0.5).tolist() == [2, 0]
    # Different classes never suppress each other.
    assert batched_nms(boxes, scores, torch.tensor([0, 0, 0, 1]), 0.5).tolist() == [2, 0, 3]
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []


# -- targets and loss --------------------------------------------------------------------------------------


def test_the_centre_cell_owns_a_box_with_exact_distances():
    # 32 px image, 8 x 8 grid of 4 px cells; the box's centre (12, 12) px lies in cell (row 3, col 3) = index 27.
    boxes = torch.tensor([[[4.0, 4.0, 20.0, 20.0], [0, 0, 0, 0]]]) / 32
    t = assign_targets(boxes, torch.tensor([[5, -1]]), grid=8, neighbor_target=0.5)
    assert t.num_objects == 1
    assert t.weight[0, 27] == 1.0 and t.labels[0, 27] == 5
    # that cell's centre is (14, 14) px: 10 px to the left and top edges, 6 px to the right and bottom ones
    assert t.ltrb[0, 27].tolist() == [10 / 32, 10 / 32, 6 / 32, 6 / 32]
    weights = t.weight[0].view(8, 8)
    assert (weights[2:5, 2:5] == torch.tensor([[0.5] * 3, [0.5, 1.0, 0.5], [0.5] * 3])).all()
    assert weights.sum() == 1.0 + 8 * 0.5  # nothing outside the 3 x 3 neighbourhood
    assert (t.labels[0][t.weight[0] == 0] == -1).all()
    off = assign_targets(boxes, torch.tensor([[5, -1]]), grid=8, neighbor_target=0.0)
    assert off.weight[0].nonzero().flatten().tolist() == [27]


def test_a_shared_cell_goes_to_the_smaller_box_and_empty_images_are_background():
    big, small = [0.0, 0.0, 24.0, 24.0], [16.0, 16.0, 28.0, 28.0]  # centre cells (3, 3) and (5, 5)
    t = assign_targets(torch.tensor([[big, small]]) / 32, torch.tensor([[0, 1]]), grid=8)
    assert t.labels[0, 3 * 8 + 3] == 0 and t.labels[0, 5 * 8 + 5] == 1
    assert t.labels[0, 4 * 8 + 4] == 1 and t.weight[0, 4 * 8 + 4] == 0.5  # both neighbours: the small box wins
    empty = assign_targets(torch.zeros(2, 1, 4), torch.full((2, 1), -1), grid=8)
    assert empty.num_objects == 0 and (empty.labels == -1).all() and (empty.weight == 0).all()
    logits, ltrb = torch.zeros(2, 64, 3, requires_grad=True), torch.full((2, 64, 4), 0.1)
    loss = detection_loss(logits, ltrb, empty, grid=8)
    assert torch.isfinite(loss["loss"]) and loss["l1"] == 0 and loss["giou"] == 0
    loss["loss"].backward()
    assert (logits.grad > 0).all()  # background cells learn to say "nothing here"


def test_decoding_keeps_confident_cells_and_removes_duplicates():
    logits = torch.full((1, 4, 2), -10.0)
    logits[0, 0, 1], logits[0, 1, 1], logits[0, 3, 0] = 3.0, 2.0, 1.0
    boxes = torch.tensor([[[0.0, 0, 0.5, 0.5], [0.05, 0, 0.55, 0.5], [0.5, 0.5, 1, 1], [0.6, 0.6, 1.2, 1.0]]])
    (d,) = decode_detections(logits, boxes, score_threshold=0.5, max_detections=5, nms_iou=0.5)
    assert d.cells.tolist() == [0, 3] and d.labels.tolist() == [1, 0]  # cell 1 duplicates cell 0, cell 2 is unsure
    assert d.boxes[1].tolist() == pytest.approx([0.6, 0.6, 1.0, 1.0])  # clipped to the image
    assert len(decode_detections(logits, boxes, 0.5, max_detections=1)[0].scores) == 1


# -- mAP ----------------------------------------------------------------------------------------------------


def test_map_is_one_for_perfect_boxes_and_drops_with_a_shift():
    gt = [[([0.0, 0.0, 10.0, 10.0], 0), ([20.0, 20.0, 30.0, 28.0], 1)], [([5.0, 5.0, 15.0, 15.0], 0)], []]
    perfect = [[(b, 0.9, c) for b, c in image] for image in gt]
    assert coco_map(gt, perfect, 2) == {"map": 1.0, "map_50": 1.0}
    # A 1 px shift of a 10 px box: IoU 90 / 110 = 0.82 passes the thresholds 0.50 ... 0.80 and fails 0.85 ... 0.95.
    shifted = [[([b[0] + 1, b[1], b[2] + 1, b[3]], 0.9, c) for b, c in image] for image in gt]
    result = coco_map(gt, shifted, 2)
    assert result["map_50"] == 1.0 and result["map"] == pytest.approx(0.7, abs=1e-6)
    far = [[([b[0] + 4, b[1], b[2] + 4, b[3]], 0.9, c) for b, c in image] for image in gt]  # IoU 60 / 140
    assert coco_map(gt, far, 2)["map_50"] == 0.0
    wrong_class = [[(b, 0.9, 1 - c) for b, c in image] for image in gt]
    assert coco_map(gt, wrong_class, 2)["map_50"] == 0.0
    assert coco_map(gt, [[], [], []], 2) == {"map": 0.0, "map_50": 0.0}


# -- COCO JSON in and out ----------------------------------------------------------------------------------


def test_coco_files_round_trip(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    instances = {
        "images": [{"id": 7, "file_name": "a.png", "width": 64, "height": 48}, {"id": 9, "file_name": "b.png", "width": 32, "height": 32}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [30, 20, 8, 8], "area": 64, "iscrowd": 0},
            {"id": 3, "image_id": 9, "category_id": 3, "bbox": [0, 0, 32, 32], "area": 1024, "iscrowd": 1},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 5, "name": "dog"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(instances))
    samples = read_coco(path)
    assert [p for p, _ in samples] == [tmp_path / "a.png", tmp_path / "b.png"]
    meta = [m for _, m in samples]
    assert meta[0]["objects"] == [{"box": [10.0, 5.0, 30.0, 15.0], "label": "cat"}, {"box": [30.0, 20.0, 38.0, 28.0], "label": "dog"}]
    assert meta[0]["id"] == 7 and (meta[0]["width"], meta[0]["height"]) == (64, 48)
    assert meta[1]["objects"] == []  # a crowd region is not an object
    # Predictions equal to the ground truth come back as the same COCO boxes and score a perfect mAP.
    preds = [{"detections": [{"label": o["label"], "score": 0.9, "box": o["box"]} for o in m["objects"]]} for m in meta]
    out = write_coco_results(tmp_path / "out" / "results.json", preds, [m["id"] for m in meta], meta[0]["category_ids"])
    rows = json.loads(out.read_text())
    assert [(r["image_id"], r["category_id"], r["bbox"]) for r in rows] == [(7, 3, [10.0, 5.0, 20.0, 10.0]), (7, 5, [30.0, 20.0, 8.0, 8.0])]
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(path))
        ev = COCOeval(truth, truth.loadRes(str(out)), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_broken_coco_boxes_are_named(tmp_path):
    base = {"images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 20}], "categories": [{"id": 1, "name": "x"}]}
    for bbox, message in (([2, 2, 0, 5], "zero or negative width"), ([15, 2, 10, 5], "outside the 20x20 image"), ([1, 2], "must be")):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({**base, "annotations": [{"id": 4, "image_id": 1, "category_id": 1, "bbox": bbox}]}))
        with pytest.raises(DataError, match=message) as info:
            read_coco(path)
        assert "annotation 4 of image 1" in str(info.value)


# -- labels, splits and bad boxes --------------------------------------------------------------------------


def test_vocabulary_and_split_from_shapes_and_user_objects():
    shapes = [{"id": "s", "objects": [{"shape": "circle", "color": "red", "box": [0, 0, 10, 10]}]}]
    assert len(DetectTask.vocabulary(shapes, DetectConfig())) == 18
    assert DetectTask.vocabulary(shapes, DetectConfig(label="shape")) == ["circle", "square", "triangle"]
    user = [{"id": "u1", "objects": [{"box": [1, 2, 9, 12], "label": "dog"}, {"box": [12, 12, 30, 30], "category": "cat"}]},
            {"id": "u2", "objects": []},  # a pure background image
            {"id": "u3", "objects": [{"box": [0, 0, 4, 4], "label": "bird"}]}]
    vocab = DetectTask.vocabulary(user, DetectConfig())
    assert vocab == ["bird", "cat", "dog"]
    task = _task(vocab[1:])  # a run that never saw birds
    split = task.build_split(torch.zeros(3, 3, 32, 32, dtype=torch.uint8), user, train=True)
    batch = split.__getitems__([0, 1, 2])
    assert batch["boxes"].shape == (3, 2, 4) and batch["labels"].tolist() == [[1, 0], [-1, -1], [-1, -1]]
    assert batch["boxes"][0, 0].tolist() == [1.0, 2.0, 9.0, 12.0]
    out = task.training_step(task.build_model(task.rc, None), batch)
    assert torch.isfinite(out["loss"])
    with pytest.raises(DataError, match="no objects in the training data"):
        DetectTask.vocabulary([{"id": "e", "objects": []}], DetectConfig())


@pytest.mark.parametrize("obj, message", [
    ({"box": [10, 2, 5, 8], "label": "a"}, "x1 > x0"),
    ({"box": [2, 9, 8, 9], "label": "a"}, "y1 > y0"),
    ({"box": [1, 2, 3], "label": "a"}, "four numbers"),
    ({"box": ["a", 0, 3, 3], "label": "a"}, "four numbers"),
    ({"box": [0, 0, 3, 3]}, "no class"),
    ({"box": [20, 20, 40, 30], "label": "a"}, "outside the 32x32 image"),
])
def test_bad_boxes_name_the_sample_and_the_fix(obj, message):
    meta = [{"id": "good", "objects": []}, {"id": "img-17", "objects": [obj]}]
    with pytest.raises(DataError, match=message) as info:
        _task(["a"]).build_split(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), meta, train=True)
    assert "sample img-17" in str(info.value)


def test_boxes_follow_the_resize_and_centre_crop_of_their_image():
    # A 64 x 48 image resized to 32: shorter side 48 -> 32, width 64 -> 43, 5 px cropped off the left.
    meta = {"id": "wide", "width": 64, "height": 48}
    box = [8.0, 6.0, 40.0, 30.0]
    mapped = to_model_pixels(box, meta, 0, 32)
    assert mapped == pytest.approx([8 * 43 / 64 - 5, 4.0, 40 * 43 / 64 - 5, 20.0])
    assert from_model_pixels(mapped, 64, 48, 32) == pytest.approx(box)
    img = Image.new("RGB", (64, 48))
    ImageDraw.Draw(img).rectangle([8, 6, 39, 29], fill=(255, 255, 255))
    ys, xs = (image_to_tensor(img, 32)[0] > 128).nonzero(as_tuple=True)
    seen = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]  # the drawn box, as the model sees it
    assert all(abs(s - m) <= 1 for s, m in zip(seen, mapped)), (seen, mapped)
    assert to_model_pixels([0.0, 0.0, 6.0, 10.0], meta, 0, 32) is None  # cut away by the crop
    with pytest.raises(DataError, match="outside the 64x48 image"):
        to_model_pixels([50.0, 0.0, 70.0, 10.0], meta, 0, 32)


def test_flipped_images_carry_their_boxes():
    torch.manual_seed(0)
    images = torch.zeros(16, 3, 32, 32, dtype=torch.uint8)
    images[:, :, 6:10, 2:12] = 255  # an object at [2, 6, 12, 10] in every image
    boxes = torch.tensor([[[2.0, 6.0, 12.0, 10.0]]]).expand(16, 1, 4)
    out = hflip({"images": images, "boxes": boxes, "labels": torch.zeros(16, 1, dtype=torch.long)})
    flipped = (out["images"] != images).flatten(1).any(1)
    assert 0 < int(flipped.sum()) < 16
    for img, box, f in zip(out["images"], out["boxes"][:, 0], flipped):
        ys, xs = img[0].nonzero(as_tuple=True)
        assert [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] == box.tolist()
        assert box.tolist() == ([20.0, 6.0, 30.0, 10.0] if f else [2.0, 6.0, 12.0, 10.0])


def test_options_are_checked():
    with pytest.raises(ConfigError, match="detect.label"):
        DetectConfig(label="count")
    with pytest.raises(ConfigError, match="detect.nms_iou"):
        DetectConfig(nms_iou=1.5)
    with pytest.raises(ConfigError, match="detect.max_detections"):
        DetectTask.config_from({"max_detections": 0})


# -- learning and the command line -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("det") / "run"
    result = imagen.finetune("detect", "shapes", out, n=800, max_steps=150, batch_size=32, lr=2e-3, **QUIET)
    assert result.status == "completed"
    return out


def test_detection_learns_shapes(trained):
    """A learned result: 150 steps find and name most objects; the untrained head finds none."""
    report = imagen.evaluate(trained, "shapes", n=800, echo=lambda *a, **k: None)
    assert report["map_50"] > 0.35 and report["map"] > 0.2, report
    loaded = imagen.load(trained)
    task = DetectTask(loaded.config)
    task.cfg = dataclasses.replace(task.cfg, score_threshold=0.0)  # let every guess of the fresh model count
    split = task.build_split(*collect(load_dataset("shapes", "test", n=800), 32), train=False)
    torch.manual_seed(0)
    untrained = task.evaluate(DetectTask.build_model(loaded.config, None), split)
    assert untrained["map_50"] < 0.05, untrained


def test_cli_predict_draws_boxes(trained, tmp_path, capsys):
    ShapesWorld(seed=5).sample(0)["image"].save(tmp_path / "img.png")
    code, out, err = run_cli(capsys, "predict", "--run", trained, "--out-dir", tmp_path / "drawn", "--json", tmp_path / "img.png")
    assert code == 0, err
    row = json.loads(out.strip().splitlines()[-1])
    drawn = tmp_path / "drawn" / "img-detect.png"
    assert row["drawn"] == str(drawn) and Image.open(drawn).size == (256, 256)
    assert row["detections"] and row["summary"].startswith(f"{len(row['detections'])} object(s)")
    for d in row["detections"]:
        x0, y0, x1, y1 = d["box"]
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32 and d["label"] in imagen.load(trained).class_names
    code, out, err = run_cli(capsys, "predict", "--run", trained, tmp_path / "img.png")
    assert code == 0 and out.startswith(str(tmp_path / "img.png") + "\t"), err


def test_user_boxes_train_and_bad_boxes_fail_in_one_line(tmp_path, capsys):
    rows = []
    for i in range(12):
        img = Image.new("RGB", (32, 32))
        box = [4 + i, 6, 16 + i, 20]
        ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(220, 40, 40) if i % 2 else (40, 80, 220))
        img.save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "objects": [{"box": box, "label": "red" if i % 2 else "blue"}] if i != 3 else []})
    data = tmp_path / "boxes.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    code, out, err = run_cli(capsys, "finetune", "--task", "detect", "--data", data, "--out", tmp_path / "run", "--max-steps", "2",
                             "--batch-size", "4", "--no-progress", "--precision", "fp32", "--report-to", "jsonl")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["class_names"] == ["blue", "red"]
    for i in (5, 6):  # two rows, so that one of them is read at fine-tuning time (the other may be the test split)
        rows[i]["objects"][0]["box"] = [20, 6, 10, 20]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    line = one_line_error(*run_cli(capsys, "finetune", "--task", "detect", "--data", data, "--out", tmp_path / "bad",
                                   "--max-steps", "1")[::2], ignore_logs=True)
    assert ("sample 5.png" in line or "sample 6.png" in line) and "x1 > x0" in line and not (tmp_path / "bad").exists()


def test_boxes_of_non_square_user_images_follow_the_centre_crop(tmp_path):
    """collect() keeps each image's original size, so JSONL boxes map through the same resize and crop."""
    from PIL import Image

    from imagen.data import load_dataset
    from imagen.data.examples import collect
    from imagen.tasks.detect import to_model_pixels

    Image.new("RGB", (64, 48)).save(tmp_path / "wide.png")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"image": "wide.png", "objects": [{"box": [10, 5, 30, 15], "label": "lamp"}]}))
    ds = load_dataset(tmp_path / "rows.jsonl", "train")
    images, meta = collect(ds, 48)
    assert (meta[0]["width"], meta[0]["height"]) == (64, 48)
    assert to_model_pixels(meta[0]["objects"][0]["box"], meta[0], 0, 48) == [2.0, 5.0, 22.0, 15.0]  # 8 px cropped off the left
