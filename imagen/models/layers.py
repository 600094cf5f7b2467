"""Transformer building blocks shared by the encoder and decoders: attention, MLP, pre-norm block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# SDPA backends tried on CUDA, in torch's order of preference (flash needs no mask; the others take one).
_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def key_padding_to_attn_mask(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Turn a (B, S) bool mask (True = real token) into an SDPA mask broadcastable to (B, heads, T, S)."""
    if key_mask is None:
        return None
    return key_mask[:, None, None, :].bool()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for (B, heads, T, d) queries and (B, heads, S, d) keys and values.

    On GPUs, and for fp32 on CPU, this is PyTorch's fused kernel. For bf16 (autocast) on CPU it is written out
    as two matrix products: there the fused kernel is slow for this toolkit's small heads, most of all in the
    backward pass, which was 35 % of a step of the base text-to-image U-Net (bench/RESULTS.md: "Attention on
    CPU"). In fp32 the fused kernel is as fast or faster. Both give the same numbers (tests/test_models.py).
    On CUDA the cuDNN backend is left out: its host-side cost (about 9 ms a call on an H200, against 10 us on the
    GPU) made the base text-to-image step launch-bound (bench/RESULTS.md, "On a GPU").
    A bool mask keeps True positions; every query must keep at least one key."""
    if q.device.type == "cuda":
        with sdpa_kernel(_CUDA_SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return matmul_attention(q, k, v, mask, dropout_p)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                     dropout_p: float = 0.0, probs_out: list | None = None) -> torch.Tensor:
    """`attention` written out: softmax(q k^T / sqrt(d) + mask) v as two matrix products. With `probs_out`, the
    attention probabilities averaged over heads, (B, T, S), are appended to it (before dropout)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(dim=-1)
    if probs_out is not None:
        probs_out.append(probs.float().mean(1))
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


def head_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm` over the last dim of x, returned in x's dtype. Autocast would run LayerNorm in fp32 and leave an fp32
    copy of every query and key to cast back; here the norm reads and writes x's dtype (statistics still in fp32).
    With fused AdamW it made bf16 classify steps on CPU 3.5 % faster (bench/RESULTS.md, "Faster steps")."""
    with torch.autocast(x.device.type, enabled=False):
        weight = norm.weight.to(x.dtype) if norm.weight is not None else None
        bias = norm.bias.to(x.dtype) if norm.bias is not None else None
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)


class Attention(nn.Module):
    """Multi-head self- or cross-attention (see `attention` for the kernel)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, context_dim: int | None = None,
                 qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dim_head = dim // num_heads
        # QK-norm (Dehghani et al. 2023; Wortsman et al. 2023): LayerNorm of each head's queries and keys bounds the
        # attention logits, whose growth makes small Transformers diverge or stall at high learning rates.
        self.q_norm = nn.LayerNorm(self.dim_head) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.dim_head) if qk_norm else None
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.proj_drop = nn.Dropout(dropout)
        # A list while its attention probabilities are wanted (e.g. `EfficientUNet.recording_cross_attention`):
        # each forward then runs the written-out kernel and appends its head-averaged probabilities, (B, T, S).
        self.recorded: list | None = None

    def forward(self, x, context=None, key_mask=None, causal: bool = False):
        B, T, D = x.shape
        context = x if context is None else context
        S = context.shape[1]
        q = self.to_q(x).view(B, T, self.num_heads, self.dim_head)
        k, v = self.to_kv(context).view(B, S, 2, self.num_heads, self.dim_head).unbind(2)
        if self.q_norm is not None:
            q, k = head_norm(self.q_norm, q), head_norm(self.k_norm, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T or S, dim_head)
        mask = key_padding_to_attn_mask(key_mask)
        if causal:
            causal_mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril()
            mask = causal_mask if mask is None else mask & causal_mask
        p = self.dropout if self.training else 0.0
        if self.recorded is not None:
            out = matmul_attention(q, k, v, mask, dropout_p=p, probs_out=self.recorded)
        else:
            out = attention(q, k, v, mask, dropout_p=p)
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, T, dim)
        return self.proj_drop(self.proj(out))


class MLP(nn.Module):
    """Two-layer feed-forward network with GELU."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), [x + cross_attn(norm(x), context)], x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, cross_attention: bool = False,
                 qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout, qk_norm=qk_norm)
        self.cross_norm = nn.LayerNorm(dim) if cross_attention else None
        self.cross_attn = Attention(dim, num_heads, dropout) if cross_attention else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x, key_mask=None, causal: bool = False, context=None, context_mask=None):
        x = x + self.attn(self.norm1(x), key_mask=key_mask, causal=causal)
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.cross_norm(x), context=context, key_mask=context_mask)
        return x + self.mlp(self.norm2(x))
