"""The multimodal Transformer: ViT patches and text tokens encoded jointly by one encoder.

Reads top to bottom: embeddings, the output record, the encoder. The same weights encode an image alone,
a text alone, or the pair [image; text] (single-stream fusion, as in ViLT), so one pretrained model serves
contrastive retrieval (unimodal passes) and fused tasks (joint pass) alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from imagen.config import EncoderConfig
from imagen.errors import ConfigError, DataError
from imagen.models.layers import Block


class PatchEmbed(nn.Module):
    """Turn an image into patch tokens: an optional convolutional stem, then a strided projection to `dim`.

    `stem_layers` 3x3 convolutions run first (`stem_channels` 0: the plain ViT patch projection). The first keeps
    the resolution and gives `stem_channels`; each later one halves the resolution while the patch size allows, and
    the channels double after every halving (3 -> 32 -> 32 -> 64 for three layers and patch 4); `stem_norm`
    "batch" puts BatchNorm between each conv and its activation. The projection
    covers the rest of the patch (a 1x1 convolution once the stem has reached it). Early
    convolutions make small ViTs learn shape far faster from little data (Xiao et al. 2021; the tokenizer of CCT,
    Hassani et al. 2021).
    """

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int, stem_channels: int = 0,
                 stem_layers: int = 1, stem_norm: str = "none"):
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.stem = None
        stride_left = patch_size
        if stem_channels > 0 and stem_layers > 0:
            layers, c = [], stem_channels
            for i in range(stem_layers):
                stride = 2 if i > 0 and stride_left % 2 == 0 else 1
                stride_left //= stride
                if stem_norm == "batch":
                    layers += [nn.Conv2d(in_channels, c, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c)]
                else:
                    layers.append(nn.Conv2d(in_channels, c, 3, stride=stride, padding=1))
                layers.append(nn.GELU())
                in_channels, c = c, c * stride
            self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=stride_left, stride=stride_left)
        self._init_weights()

    def _init_weights(self):
        """He initialisation of the stem, a unit-gain projection, zero biases: each layer keeps the variance of its
        input, so patch tokens differ from image to image from the first step. PyTorch's default convolution init
        scales the variance by about 1/3 per layer, which behind a stem leaves the tokens of all images nearly the
        same vector (measured in bench/RESULTS.md, "Encoder on real images")."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is self.proj:
                    fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                    nn.init.trunc_normal_(m.weight, std=fan_in ** -0.5)
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, images):
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"image size {tuple(images.shape[-2:])} does not match the model's {self.image_size}")
        # Channels-last convolutions: 6 % faster bf16 classify steps on CPU (bench/RESULTS.md, "Faster steps"), and
        # the projection's output then flattens into tokens without a copy.
        x = self.stem(images.contiguous(memory_format=torch.channels_last)) if self.stem is not None else images
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, num_patches, dim)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, num_patches, patch_size**2 * C), patches in raster order (MIM targets)."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, dim) position embeddings -> (1, 1 + grid*grid, dim): the [CLS] row kept, the g x g patch grid
    resized bicubically (align_corners=False) to grid x grid."""
    cls_row, patches = pos_embed[:, :1], pos_embed[:, 1:]
    old = round(patches.shape[1] ** 0.5)
    if old * old != patches.shape[1]:
        raise ValueError(f"position embeddings of {patches.shape[1]} patches do not form a square grid")
    if old == grid:
        return pos_embed
    dim = patches.shape[-1]
    x = patches.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()  # (1, dim, g, g)
    x = torch.nn.functional.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([cls_row, x], dim=1)


@dataclass
class EncoderOutput:
    """Per-token states and pooled embeddings; fields are None for an absent modality."""

    image_states: torch.Tensor | None = None  # (B, 1 + num_patches, dim), index 0 is the image [CLS]
    text_states: torch.Tensor | None = None  # (B, T, dim), index 0 is the text [CLS]
    image_embed: torch.Tensor | None = None  # (B, dim) pooled image (fused with text in a joint pass)
    text_embed: torch.Tensor | None = None  # (B, dim) pooled text (fused with image in a joint pass)
    text_mask: torch.Tensor | None = None  # (B, T) True where a real token

    @property
    def pooled(self) -> torch.Tensor:
        """One embedding per example: the image [CLS] when there is an image, else the text [CLS]."""
        return self.image_embed if self.image_embed is not None else self.text_embed


class MultimodalEncoder(nn.Module):
    """ViT patch embedding + token embedding, modality and position embeddings, one joint Transformer."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = c = config
        self.patch_embed = PatchEmbed(c.image_size, c.patch_size, c.in_channels, c.dim, c.stem_channels, c.stem_layers,
                                      c.stem_norm)
        self.image_cls = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.image_pos_embed = nn.Parameter(torch.zeros(1, 1 + c.num_patches, c.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.dim))  # replaces masked patches (MIM)
        self.token_embed = nn.Embedding(c.vocab_size, c.dim)
        self.text_pos_embed = nn.Parameter(torch.zeros(1, c.max_text_len, c.dim))
        self.modality_embed = nn.Embedding(2, c.dim)  # 0 = image, 1 = text
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c.dim, c.num_heads, c.mlp_ratio, c.dropout, qk_norm=c.qk_norm)
                                    for _ in range(c.num_layers))
        self.norm = nn.LayerNorm(c.dim)
        self._init_weights()

    def _init_weights(self):
        for p in (self.image_cls, self.image_pos_embed, self.mask_token, self.text_pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=0.02)

    @property
    def dim(self) -> int:
        return self.config.dim

    def embed_image(self, images, patch_mask=None, drop_masked: bool = False):
        """(B, C, H, W) -> (B, 1 + num_patches, dim); patches where patch_mask is True become the mask token, or with
        `drop_masked` are left out: (B, 1 + visible, dim), every row masking the same number of patches (MAE)."""
        x = self.patch_embed(images)  # (B, N, dim)
        if patch_mask is not None and not drop_masked:
            x = torch.where(patch_mask[..., None], self.mask_token.to(x.dtype).expand_as(x), x)
        x = torch.cat([self.image_cls.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, dim)
        x = x + self.image_pos_embed + self.modality_embed.weight[0]
        if patch_mask is not None and drop_masked:
            x = torch.cat([x[:, :1], x[:, 1:][~patch_mask].view(x.shape[0], -1, x.shape[-1])], dim=1)
        return x

    def embed_text(self, input_ids):
        """(B, T) token ids -> (B, T, dim)."""
        T = input_ids.shape[1]
        V = self.config.vocab_size
        # (Skipped while exporting a graph: a check on the values cannot be part of it.)
        if not torch.compiler.is_exporting() and input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < V:
            bad = int(input_ids.max()) if int(input_ids.max()) >= V else int(input_ids.min())
            raise DataError(f"token id {bad} is outside the model's vocabulary of {V} (model.vocab_size); the "
                            "tokenizer does not match the model: use the run's own tokenizer.json")
        if T > self.config.max_text_len:
            raise ValueError(f"text length {T} exceeds the model's max_text_len {self.config.max_text_len}")
        return self.token_embed(input_ids) + self.text_pos_embed[:, :T] + self.modality_embed.weight[1]

    def forward(self, images=None, input_ids=None, attention_mask=None, patch_mask=None,
                drop_masked: bool = False) -> EncoderOutput:
        """Encode an image, a text, or both jointly (single stream); key padding masks are honoured. Masked patches
        (patch_mask True) become the mask token, or with `drop_masked` are left out of the sequence (then
        image_states holds [CLS] and the visible patches in raster order)."""
        if images is None and input_ids is None:
            raise ValueError("the encoder needs images, input_ids or both")
        parts, masks = [], []
        if images is not None:
            img = self.embed_image(images, patch_mask, drop_masked)
            parts.append(img)
            masks.append(torch.ones(img.shape[:2], dtype=torch.bool, device=img.device))
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = input_ids != self.config.pad_token_id
            parts.append(self.embed_text(input_ids))
            masks.append(attention_mask.bool())
        x = self.drop(torch.cat(parts, dim=1))  # (B, S, dim)
        key_mask = torch.cat(masks, dim=1)
        # Without padding the mask is all True; dropping it lets SDPA use its fastest kernel. An exported graph keeps
        # it (a branch on the values cannot be exported), which gives the same numbers.
        if input_ids is None or (not torch.compiler.is_exporting() and bool(key_mask.all())):
            key_mask = None
        for block in self.blocks:
            x = block(x, key_mask=key_mask)
        x = self.norm(x)

        out = EncoderOutput(text_mask=attention_mask.bool() if input_ids is not None else None)
        n_img = parts[0].shape[1] if images is not None else 0
        if images is not None:
            out.image_states = x[:, :n_img]
            out.image_embed = x[:, 0]
        if input_ids is not None:
            out.text_states = x[:, n_img:]
            out.text_embed = x[:, n_img]
        return out

    def load_encoder_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load another encoder's weights, resampling its image position embeddings when its patch grid differs
        (a run pretrained at 32 px fine-tuned at 64 px), as timm does when a ViT changes resolution."""
        key = "image_pos_embed"
        if key in state and state[key].shape != self.image_pos_embed.shape:
            state = {**state, key: resample_pos_embed(state[key], self.config.image_size // self.config.patch_size)}
        self.load_state_dict(state)

    # timm-style interface
    def forward_features(self, images=None, input_ids=None, attention_mask=None) -> EncoderOutput:
        return self.forward(images, input_ids, attention_mask)

    def freeze(self, mode: str) -> None:
        """Freeze parameters: 'none', 'encoder' (all of it), or 'all-but-last-N' (train only the top N blocks)."""
        for p in self.parameters():
            p.requires_grad_(True)
        if mode == "none":
            return
        if mode == "encoder":
            for p in self.parameters():
                p.requires_grad_(False)
            return
        prefix = "all-but-last-"
        if mode.startswith(prefix) and mode[len(prefix):].isdigit():
            n = int(mode[len(prefix):])
            if n > len(self.blocks):
                raise ConfigError(f"--freeze {mode}: the encoder has only {len(self.blocks)} blocks; use all-but-last-0 "
                                  f"to all-but-last-{len(self.blocks)}")
            for p in self.parameters():
                p.requires_grad_(False)
            for block in list(self.blocks)[len(self.blocks) - n:]:
                for p in block.parameters():
                    p.requires_grad_(True)
            if n > 0:  # the final norm sits on top of the trained blocks, so it trains with them
                for p in self.norm.parameters():
                    p.requires_grad_(True)
            return
        raise ConfigError(f"unknown freeze mode {mode!r} (--freeze); use none, encoder or all-but-last-N (N a number of blocks, e.g. all-but-last-1)")
