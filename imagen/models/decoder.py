"""A Transformer text decoder with cross-attention, the encoder-decoder model, and decoding strategies.

Reads top to bottom: the decoder, the encoder-decoder (captioning, instruction following, generative VQA),
then decoding — greedy, beam search, and temperature / top-k / top-p (nucleus) sampling — written against a
`next_logits(ids) -> (B, vocab)` callable so each strategy is a few lines and testable on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagen.config import EncoderConfig
from imagen.models.encoder import MultimodalEncoder
from imagen.models.layers import Block


class TextDecoder(nn.Module):
    """Causal self-attention + cross-attention to a context (encoder states) + MLP, pre-norm; tied output layer."""

    def __init__(self, vocab_size: int, dim: int, num_layers: int, num_heads: int, max_len: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.max_len = max_len
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, dropout, cross_attention=True) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        nn.init.trunc_normal_(self.token_embed.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, input_ids, context, context_mask=None):
        """(B, T) ids, (B, S, dim) context -> (B, T, vocab) next-token logits."""
        T = input_ids.shape[1]
        if T > self.max_len:
            raise ValueError(f"decoder input of {T} tokens exceeds its max_len {self.max_len}")
        x = self.token_embed(input_ids) + self.pos_embed[:, :T]
        for block in self.blocks:
            x = block(x, causal=True, context=context, context_mask=context_mask)
        return self.norm(x) @ self.token_embed.weight.t()


class EncoderDecoder(nn.Module):
    """The multimodal encoder reads [image; prompt]; the decoder writes the response token by token.

    Captioning uses no prompt; instruction following and generative VQA put the instruction or question
    in the prompt, so the decoder attends to image patches and prompt tokens alike.
    """

    def __init__(self, config: EncoderConfig, decoder_layers: int = 2, max_len: int = 32, bos_id: int = 5,
                 eos_id: int = 6, pad_id: int = 0, grid_dim: int = 0):
        super().__init__()
        self.config = config
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.encoder = MultimodalEncoder(config)
        # Optional layout token: every fused patch state projected to grid_dim channels, flattened in raster order
        # and mapped back to one context token, so "where" is read off the grid by an MLP instead of having to be
        # found by cross-attention first (the same readout as EncoderForVQA's grid_dim).
        self.grid = None
        if grid_dim > 0:
            self.grid = nn.Sequential(nn.Linear(config.dim, grid_dim), nn.Flatten(1),
                                      nn.Linear(grid_dim * config.num_patches, config.dim), nn.LayerNorm(config.dim))
        self.decoder = TextDecoder(config.vocab_size, config.dim, decoder_layers, config.num_heads, max_len,
                                   config.mlp_ratio, config.dropout)

    def encode(self, images, prompt_ids=None, prompt_mask=None):
        """(context (B, S, dim), context_mask (B, S) bool) from the joint pass."""
        out = self.encoder(images=images, input_ids=prompt_ids, attention_mask=prompt_mask)
        states = [out.image_states]
        if out.text_states is not None:
            states.append(out.text_states)
        if self.grid is not None:
            states.append(self.grid(out.image_states[:, 1:])[:, None])  # (B, 1, dim) layout token
        context = torch.cat(states, 1)
        mask = torch.ones(context.shape[:2], dtype=torch.bool, device=images.device)
        if out.text_states is not None:
            n_img = out.image_states.shape[1]
            mask[:, n_img:n_img + out.text_states.shape[1]] = out.text_mask
        return context, mask

    def forward(self, images, target_ids, target_mask, prompt_ids=None, prompt_mask=None):
        """Teacher-forced NLL of targets `[BOS] tokens [EOS] [PAD]...`; returns (loss, logits)."""
        context, context_mask = self.encode(images, prompt_ids, prompt_mask)
        logits = self.decoder(target_ids[:, :-1], context, context_mask).float()
        labels = target_ids[:, 1:].masked_fill(~target_mask[:, 1:].bool(), -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return loss, logits

    @torch.no_grad()
    def generate(self, images, prompt_ids=None, prompt_mask=None, max_new_tokens: int | None = None,
                 decoding: str = "greedy", num_beams: int = 3, length_penalty: float = 1.0,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator=None) -> list[list[int]]:
        """Token ids of each response (without [BOS] / [EOS])."""
        context, context_mask = self.encode(images, prompt_ids, prompt_mask)
        steps = min(max_new_tokens or self.decoder.max_len - 1, self.decoder.max_len - 1)
        if decoding == "beam":
            return beam_search(self._next_logits, context, context_mask, self.bos_id, self.eos_id, steps, num_beams, length_penalty)
        start = torch.full((images.shape[0], 1), self.bos_id, dtype=torch.long, device=images.device)
        step = self._next_logits_fn(context, context_mask)
        if decoding == "greedy":
            ids = greedy(step, start, self.eos_id, steps)
        elif decoding == "sample":
            ids = sample(step, start, self.eos_id, steps, temperature, top_k, top_p, generator)
        else:
            raise ValueError(f"unknown decoding {decoding!r}; choose greedy, beam or sample")
        return [strip_special(row, self.eos_id) for row in ids[:, 1:].tolist()]

    def _next_logits(self, ids, context, context_mask):
        return self.decoder(ids, context, context_mask)[:, -1].float()

    def _next_logits_fn(self, context, context_mask):
        return lambda ids: self._next_logits(ids, context, context_mask)


# ---------------------------------------------------------------------------------------------
# Decoding strategies


def strip_special(ids: list[int], eos_id: int) -> list[int]:
    """Everything before the first [EOS]."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def _extend(next_logits, ids, eos_id: int, steps: int, choose):
    """Append choose(logits) until every row has produced [EOS] or `steps` tokens were added; finished rows pad with [EOS]."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(steps):
        token = choose(next_logits(ids))
        token = torch.where(done, torch.full_like(token, eos_id), token)
        ids = torch.cat([ids, token[:, None]], 1)
        done |= token == eos_id
        if bool(done.all()):
            break
    return ids


def greedy(next_logits, ids, eos_id: int, steps: int):
    """Append the most likely token each step."""
    return _extend(next_logits, ids, eos_id, steps, lambda logits: logits.argmax(-1))


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """Keep the top-k tokens and the smallest set whose probability reaches top_p (Holtzman et al. 2020)."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) >= top_p  # drop tokens once the mass before them reaches p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def sample(next_logits, ids, eos_id: int, steps: int, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Ancestral sampling from the temperature-scaled, top-k / top-p filtered distribution."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")

    def choose(logits):
        probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _extend(next_logits, ids, eos_id, steps, choose)


def beam_search(next_logits, context, context_mask, bos_id: int, eos_id: int, steps: int, num_beams: int = 3,
                length_penalty: float = 1.0) -> list[list[int]]:
    """Beam search per example; finished hypotheses are ranked by log-prob / length ** length_penalty.

    Each step extends the K live beams by their 2K best continuations; those ending in [EOS] join the
    finished list, the best K others live on. Stops once every example has K finished hypotheses.
    """
    B = context.shape[0]
    K = num_beams
    ctx = context.repeat_interleave(K, 0)
    ctx_mask = context_mask.repeat_interleave(K, 0)
    ids = torch.full((B * K, 1), bos_id, dtype=torch.long, device=context.device)
    scores = torch.zeros(B, K, device=context.device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand from the first only
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    for t in range(steps):
        logp = next_logits(ids, ctx, ctx_mask).log_softmax(-1)  # (B*K, V)
        V = logp.shape[-1]
        total = (scores.reshape(-1, 1) + logp).reshape(B, K * V)
        top, flat = total.topk(2 * K, dim=1)  # spare candidates replace those that finish
        beam, token = flat // V, flat % V
        new_scores = torch.full((B, K), float("-inf"), device=context.device)
        rows = []
        for b in range(B):
            kept = 0
            for s, k, tok in zip(top[b].tolist(), beam[b].tolist(), token[b].tolist()):
                if s == float("-inf"):
                    break
                seq = ids[b * K + k, 1:].tolist()
                if tok == eos_id or t == steps - 1:
                    final = seq if tok == eos_id else seq + [tok]
                    finished[b].append((s / max(1, len(final) + 1) ** length_penalty, final))
                    continue
                if kept < K:
                    rows.append(torch.cat([ids[b * K + k], torch.tensor([tok], device=ids.device)]))
                    new_scores[b, kept] = s
                    kept += 1
                if kept == K:
                    break
            while kept < K:  # pad with a dead beam
                rows.append(torch.cat([ids[b * K], torch.tensor([eos_id], device=ids.device)]))
                kept += 1
        ids, scores = torch.stack(rows), new_scores
        if all(len(f) >= K for f in finished):  # K finished hypotheses each (HF's early_stopping=True)
            break
    out = []
    for b in range(B):
        if finished[b]:
            out.append(max(finished[b], key=lambda x: x[0])[1])
        else:
            out.append(strip_special(ids[b * K, 1:].tolist(), eos_id))
    return out
