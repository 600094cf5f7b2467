"""The encoder with its self-supervised heads: MLM, MIM, image-text contrastive (ITC) and matching (ITM).

Each objective runs only when its weight is non-zero and its inputs exist, so the same model pretrains on
image-text pairs (all four) or on images alone (MIM only).

- MLM: BERT's masked language modelling (Devlin et al. 2019), on the joint [image; text] pass.
- MIM: masked patch pixel regression on per-patch normalised pixels (MAE, He et al. 2022; SimMIM's mask token).
- ITC: symmetric InfoNCE with a learned temperature (CLIP, Radford et al. 2021) on unimodal passes.
- ITM: binary match / no-match on the fused [CLS], with hard negatives drawn from the ITC scores (ALBEF, Li et al. 2021).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imagen.config import EncoderConfig, PretrainConfig
from imagen.models.encoder import MultimodalEncoder, patchify
from imagen.models.layers import Block


def mask_tokens(input_ids, attention_mask, probability, mask_id, vocab_size, num_special, generator=None):
    """BERT masking: pick `probability` of real non-special tokens; 80 % [MASK], 10 % random, 10 % kept.

    Returns (masked_ids, labels) with labels = -100 where no prediction is made.
    """
    real = attention_mask.bool() & (input_ids >= num_special)
    rand = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    chosen = real & (rand < probability)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    masked = input_ids.clone()
    masked[chosen & (action < 0.8)] = mask_id
    random_tokens = torch.randint(num_special, vocab_size, input_ids.shape, generator=generator, device=input_ids.device)
    swap = chosen & (action >= 0.8) & (action < 0.9)
    masked[swap] = random_tokens[swap]
    return masked, labels


def random_patch_mask(batch_size, num_patches, ratio, device, generator=None):
    """(B, N) bool mask with exactly round(ratio * N) True entries per row, chosen uniformly."""
    n_mask = max(1, round(ratio * num_patches))
    noise = torch.rand(batch_size, num_patches, generator=generator, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < n_mask


class MAEDecoder(nn.Module):
    """MAE's light decoder (He et al. 2022): the encoder's states of the visible patches, projected to the decoder's
    width, are put back in place among mask tokens, get the decoder's own position embeddings, and `layers`
    Transformer blocks predict every patch's pixels. Only pretraining uses it; fine-tuning keeps the encoder."""

    def __init__(self, config: EncoderConfig, layers: int, dim: int = 0):
        super().__init__()
        # The encoder's width and heads by default; a width of its own gets heads of 32 channels, as MAE's decoder.
        dim, heads = (dim, dim // 32) if dim else (config.dim, config.num_heads)
        self.embed = nn.Linear(config.dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_patches, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, config.mlp_ratio, qk_norm=config.qk_norm) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, config.patch_size ** 2 * config.in_channels)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, states: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """states (B, 1 + visible, enc_dim) from a `drop_masked` pass, patch_mask (B, N) -> pixels (B, N, p*p*C)."""
        x = self.embed(states)
        B, N = patch_mask.shape
        patches = self.mask_token.to(x.dtype).expand(B, N, -1).clone()
        patches[~patch_mask] = x[:, 1:].reshape(-1, x.shape[-1])
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 1:])


class PretrainingModel(nn.Module):
    """MultimodalEncoder plus the MLM / MIM / ITC / ITM heads; forward returns the weighted losses."""

    def __init__(self, config: EncoderConfig, pretrain: PretrainConfig, mask_id: int = 4, num_special: int = 7, proj_dim: int = 128):
        super().__init__()
        self.config = config
        self.pretrain = pretrain
        self.mask_id = mask_id
        self.num_special = num_special
        self.encoder = MultimodalEncoder(config)
        d = config.dim
        self.mlm_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, config.vocab_size))
        mae = pretrain.mim_decoder_layers > 0
        self.mim_head = None if mae else nn.Linear(d, config.patch_size**2 * config.in_channels)
        self.mim_decoder = MAEDecoder(config, pretrain.mim_decoder_layers, pretrain.mim_decoder_dim) if mae else None
        self.image_proj = nn.Linear(d, proj_dim)
        self.text_proj = nn.Linear(d, proj_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.itm_head = nn.Linear(d, 2)

    # --- objectives -------------------------------------------------------------------------------

    def mim_loss(self, images):
        """Masked image modelling: regress normalised pixels of masked patches from the visible ones."""
        c = self.config
        B = images.shape[0]
        patch_mask = random_patch_mask(B, c.num_patches, self.pretrain.mim_mask_ratio, images.device)
        visible = images
        if self.pretrain.mim_blank_pixels:  # a conv stem sees past a patch's edges: hide masked pixels from it too
            grid = c.image_size // c.patch_size
            pixel_mask = patch_mask.view(B, 1, grid, 1, grid, 1).expand(-1, -1, -1, c.patch_size, -1, c.patch_size)
            visible = images.masked_fill(pixel_mask.reshape(B, 1, c.image_size, c.image_size), 0.0)
        if self.mim_decoder is not None:  # MAE: the encoder sees the visible patches only
            out = self.encoder(images=visible, patch_mask=patch_mask, drop_masked=True)
            pred = self.mim_decoder(out.image_states, patch_mask).float()
        else:  # SimMIM: mask tokens in the encoder, a linear head
            out = self.encoder(images=visible, patch_mask=patch_mask)
            pred = self.mim_head(out.image_states[:, 1:]).float()  # (B, N, p*p*C)
        target = patchify(images.float(), c.patch_size)
        # MAE's per-patch normalisation makes the target about structure, not overall brightness.
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = ((pred - target) ** 2).mean(-1)  # (B, N)
        return (per_patch * patch_mask).sum() / patch_mask.sum()

    def contrastive_logits(self, images, input_ids, attention_mask):
        """Image-to-text similarity logits (B, B) from unimodal passes, scaled by the learned temperature."""
        img = F.normalize(self.image_proj(self.encoder(images=images).image_embed).float(), dim=-1)
        txt = F.normalize(self.text_proj(self.encoder(input_ids=input_ids, attention_mask=attention_mask).text_embed).float(), dim=-1)
        scale = self.logit_scale.exp().clamp(max=100.0)
        return scale * img @ txt.t()

    def forward(self, images=None, input_ids=None, attention_mask=None) -> dict[str, torch.Tensor]:
        """Weighted sum of every applicable objective as "loss", plus each objective's own value."""
        p = self.pretrain
        has_text = input_ids is not None and not p.image_only
        has_image = images is not None
        losses: dict[str, torch.Tensor] = {}
        if has_image and p.mim_weight > 0:
            losses["mim"] = self.mim_loss(images)
        if has_image and has_text:
            B = images.shape[0]
            same_text = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1)  # (B, B) duplicate captions
            if p.itc_weight > 0 or p.itm_weight > 0:
                logits = self.contrastive_logits(images, input_ids, attention_mask)
                # Duplicate captions are true matches, not negatives: use soft targets over them.
                targets = same_text.float() / same_text.float().sum(1, keepdim=True)
                if p.itc_weight > 0:
                    losses["itc"] = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets.t()))
            if p.mlm_weight > 0 or p.itm_weight > 0:
                vocab = self.config.vocab_size
                masked_ids, labels = mask_tokens(input_ids, attention_mask, p.mlm_probability, self.mask_id, vocab, self.num_special)
                joint = self.encoder(images=images, input_ids=masked_ids, attention_mask=attention_mask)
                if p.mlm_weight > 0:
                    if (labels != -100).any():
                        mlm_logits = self.mlm_head(joint.text_states).float()
                        losses["mlm"] = F.cross_entropy(mlm_logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=-100)
                    else:
                        losses["mlm"] = joint.text_states.sum() * 0.0
            if p.itm_weight > 0 and B > 1:
                losses["itm"] = self.itm_loss(images, input_ids, attention_mask, logits.detach(), same_text)
        if not losses:
            raise ValueError("no pretraining objective applies: enable one whose inputs exist (images for MIM, image-text pairs for the others)")
        weights = {"mim": p.mim_weight, "itc": p.itc_weight, "mlm": p.mlm_weight, "itm": p.itm_weight}
        losses["loss"] = sum(weights[k] * v for k, v in losses.items())
        return losses

    def itm_loss(self, images, input_ids, attention_mask, logits, same_text):
        """Matching loss on positives and on hard negatives sampled in proportion to their ITC similarity."""
        B = images.shape[0]
        with torch.no_grad():
            # Sampling weights: softmax of similarity, never a true match (same index or same caption).
            forbid = same_text | torch.eye(B, dtype=torch.bool, device=images.device)
            w_i2t = logits.softmax(1).masked_fill(forbid, 0.0)
            w_t2i = logits.t().softmax(1).masked_fill(forbid, 0.0)
            # Rows with no valid negative (all captions in the batch identical) fall back to any other index.
            fallback = (~torch.eye(B, dtype=torch.bool, device=images.device)).float()
            w_i2t = torch.where(w_i2t.sum(1, keepdim=True) > 0, w_i2t, fallback)
            w_t2i = torch.where(w_t2i.sum(1, keepdim=True) > 0, w_t2i, fallback)
            neg_text = torch.multinomial(w_i2t, 1).squeeze(1)  # for each image, a hard negative text
            neg_image = torch.multinomial(w_t2i, 1).squeeze(1)  # for each text, a hard negative image
        all_images = torch.cat([images, images, images[neg_image]])
        all_ids = torch.cat([input_ids, input_ids[neg_text], input_ids])
        all_mask = torch.cat([attention_mask, attention_mask[neg_text], attention_mask])
        fused = self.encoder(images=all_images, input_ids=all_ids, attention_mask=all_mask).image_embed
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(images.device)
        # A sampled "negative" that repeats the positive's caption is a match after all.
        labels[B:2 * B] = same_text[torch.arange(B, device=images.device), neg_text].long()
        labels[2 * B:] = same_text[neg_image, torch.arange(B, device=images.device)].long()
        return F.cross_entropy(self.itm_head(fused).float(), labels)
