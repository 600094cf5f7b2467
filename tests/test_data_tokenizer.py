"""Tokenizer: training on Shapes captions, round trips, batching, special ids, save/load."""

import unicodedata

import pytest
import torch

from imagen.data import DataError, ShapesWorld, Tokenizer


@pytest.fixture(scope="module")
def captions():
    en, zh = ShapesWorld(seed=0), ShapesWorld(seed=0, lang="zh")
    return [en.sample(i)["text"] for i in range(300)] + [zh.sample(i)["text"] for i in range(300)]


@pytest.fixture(scope="module")
def tok(captions):
    return Tokenizer.train(captions, vocab_size=600)


def test_special_ids(tok):
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.bos_id, tok.eos_id) == tuple(range(7))
    assert [tok.id_to_token(i) for i in range(7)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]"]
    assert 300 < tok.vocab_size <= 600


def test_round_trip_english_chinese_and_unseen_text(tok, captions):
    for text in captions[:20] + captions[300:320] + ["Zebra 🦓 über 汉字 ok"]:
        ids, mask = tok.encode([text], max_length=256)
        assert ids[0, 0] == tok.cls_id and ids[0, mask[0].sum() - 1] == tok.sep_id
        assert tok.decode(ids[0]) == unicodedata.normalize("NFKC", text).lower()  # NFKC: "，" -> ","
        assert tok.unk_id not in ids[0].tolist()


def test_learns_merges_for_frequent_words(tok):
    assert len(tok.tokenize("一个红色的圆形")) < len("一个红色的圆形".encode()) // 2
    assert len(tok.tokenize("a red circle")) <= 4


def test_padding_truncation_and_mask(tok):
    ids, mask = tok.encode(["a red circle", "a small blue square in the top left and a green triangle"], max_length=8)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
    assert ids.shape[1] <= 8 and ids[1, -1] == tok.sep_id and mask[1].all()
    n0 = int(mask[0].sum())
    assert ids[0, n0 - 1] == tok.sep_id and (ids[0, n0:] == tok.pad_id).all() and not mask[0, n0:].any()
    ids, mask = tok.encode(["a"], max_length=12, pad_to_max=True)
    assert ids.shape == (1, 12) and mask.sum() == 3
    ids, _ = tok.encode(["a red circle"], max_length=12, add_special_tokens=False)
    assert tok.cls_id not in ids[0].tolist() and tok.sep_id not in ids[0].tolist()


def test_save_load_identical(tok, captions, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(path)
    a = tok.encode(captions[::37], max_length=32)
    b = again.encode(captions[::37], max_length=32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and again.vocab_size == tok.vocab_size
    assert Tokenizer.load(tmp_path).vocab_size == tok.vocab_size  # a run folder works too
    with pytest.raises(DataError, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        Tokenizer.load(tmp_path / "bad.json")
