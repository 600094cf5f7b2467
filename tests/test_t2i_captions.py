"""Text-to-image training data: one caption drawn per visit among an image's captions, each encoded once."""

import pytest
import torch

from imagen.tasks.text_to_image import T2ISplit


class CountingStage:
    """A stand-in frozen text encoder: a caption's encoding is its length, and every encoded text is counted."""

    def __init__(self):
        self.seen = []

    def encode_text(self, texts):
        self.seen += list(texts)
        n = torch.tensor([float(len(t)) for t in texts])
        length = max(len(t.split()) for t in texts)
        mask = torch.tensor([[k < len(t.split()) for k in range(length)] for t in texts])
        return {"text_states": n[:, None, None].expand(-1, length, 2).clone(), "text_mask": mask,
                "text_embed": n[:, None].expand(-1, 2).clone()}


def test_each_visit_draws_one_of_the_images_captions_at_their_frequency():
    images = torch.arange(3, dtype=torch.uint8)[:, None, None, None].expand(3, 3, 2, 2)
    split = T2ISplit(images, [["a red circle", "a red circle", "a circle"], ["one"], "two blue squares"])
    torch.manual_seed(0)
    draws = [split.__getitems__([0, 1, 2])["texts"] for _ in range(3000)]
    first = [d[0] for d in draws]
    assert abs(first.count("a red circle") / 3000 - 2 / 3) < 0.03  # repeats weigh a caption up
    assert set(first) == {"a red circle", "a circle"}
    assert all(d[1] == "one" and d[2] == "two blue squares" for d in draws)
    assert split.texts == ["a red circle", "a circle", "one", "two blue squares"]  # distinct, in first-seen order


def test_one_caption_per_image_draws_no_random_numbers():
    split = T2ISplit(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), ["a", "b", ["c"], "d"])
    state = torch.get_rng_state()
    assert split.__getitems__([0, 2, 3])["texts"] == ["a", "c", "d"]
    assert torch.equal(torch.get_rng_state(), state)  # runs with one caption per image train as before


def test_precompute_encodes_each_distinct_caption_once_and_batches_carry_its_encoding():
    captions = [["a b", "a b c d", "a"], ["a b c d"], ["x y z"]]
    split = T2ISplit(torch.zeros(3, 3, 2, 2, dtype=torch.uint8), captions)
    stage = CountingStage()
    split.precompute(stage, batch_size=2)
    assert sorted(stage.seen) == sorted({"a b", "a b c d", "a", "x y z"})
    torch.manual_seed(1)
    for _ in range(50):
        batch = split.__getitems__([0, 1, 2])
        chars = batch["text_embed"][:, 0]
        assert chars[0].item() in (3.0, 7.0, 1.0) and chars[1].item() == 7.0 and chars[2].item() == 5.0
        words = batch["text_mask"].sum(1)
        assert words.tolist()[1:] == [4, 3] and batch["text_states"].shape[1] == int(words.max())
        assert torch.equal(batch["text_states"][:, 0, 0], chars)  # states and pooled come from one caption


def test_mismatched_captions_are_refused():
    with pytest.raises(ValueError, match="3 images but 2 caption lists"):
        T2ISplit(torch.zeros(3, 3, 2, 2, dtype=torch.uint8), ["a", "b"])


@pytest.mark.parametrize("trim_text", [True, False])
def test_batches_drop_shared_padding_unless_the_unet_is_compiled(trim_text):
    # Captions of 1, 2 and 5 words: a batch of the first two needs 2 token slots of the 5 encoded. A compiled U-Net
    # (trim_text=False) gets every slot, so every batch has one shape; either way the tensors are contiguous.
    split = T2ISplit(torch.zeros(3, 3, 2, 2, dtype=torch.uint8), ["one", "two words", "five words in this caption"],
                     trim_text=trim_text)
    split.precompute(CountingStage())
    batch = split.__getitems__([0, 1])
    assert batch["text_states"].shape == (2, 2 if trim_text else 5, 2)
    assert batch["text_mask"].tolist() == [[True, False] + [False] * 3 * (not trim_text),
                                           [True, True] + [False] * 3 * (not trim_text)]
    assert batch["text_states"].is_contiguous() and batch["text_mask"].is_contiguous()
