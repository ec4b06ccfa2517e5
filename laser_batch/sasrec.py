"""SASRec: causal self-attention over item-id sequences (Kang & McAuley, 2018).

Written with `F.scaled_dot_product_attention` and explicit boolean masks so that the model exports to
ONNX with dynamic batch and length. Sequences are left-padded with item 0. Positions count from the
first real item of each sequence, so the output at a real position does not depend on how much
padding precedes it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from laser_batch.config import SASRecConfig


def attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """Causal mask that also hides padded keys: (B, T) bool -> (B, 1, T, T) bool, True = may attend.

    Every position may attend to itself, so a padded row never has all keys masked (no NaN).
    """
    steps = torch.arange(valid.shape[1], device=valid.device)
    causal = steps[None, :] <= steps[:, None]  # (T, T): key <= query
    diagonal = steps[None, :] == steps[:, None]  # built by comparison: torch.eye(bool) does not export
    return (causal & valid[:, None, :]) | diagonal  # (B, T, T)


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D), mask: (B, T, T) bool -> (B, T, D)."""
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, width // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None], dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.attn_norm = nn.LayerNorm(d, eps=1e-8)
        self.attn = SelfAttention(d, config.num_heads, config.dropout)
        self.ffn_norm = nn.LayerNorm(d, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(d, d), nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(d, d), nn.Dropout(config.dropout)
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), mask))
        return x + self.ffn(self.ffn_norm(x))


class SASRec(nn.Module):
    """Item ids (B, T), 0 = padding -> per-position vectors (B, T, D).

    The vector at position t summarises items 0..t and is scored against item embeddings to predict
    item t + 1. Item embeddings are shared between input and output.
    """

    def __init__(self, config: SASRecConfig, num_items: int) -> None:
        super().__init__()
        self.config = config
        self.num_items = num_items
        d = config.hidden_size
        self.item_embedding = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_len, d)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_blocks))
        self.final_norm = nn.LayerNorm(d, eps=1e-8)
        self.apply(_init_weights)

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        """item_ids: (B, T) int64, left-padded with 0 -> (B, T, D); padded positions are zero."""
        valid = item_ids != 0  # (B, T)
        positions = (valid.cumsum(1) - 1).clamp(0, self.config.max_len - 1)  # (B, T), 0 at the first real item
        x = self.item_embedding(item_ids) * math.sqrt(self.config.hidden_size) + self.position_embedding(positions)
        x = self.embedding_dropout(x) * valid[..., None]
        mask = attention_mask(valid)
        for block in self.blocks:
            x = block(x, mask) * valid[..., None]
        return self.final_norm(x) * valid[..., None]

    def item_vectors(self) -> torch.Tensor:
        """Output embeddings of the real items 1..N: (N, D); row j scores item j + 1."""
        return self.item_embedding.weight[1:]

    def loss(self, item_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Next-item loss at every real position. item_ids, targets: (B, T), 0 where there is no target."""
        hidden = self(item_ids)[targets != 0]  # (P, D)
        positives = targets[targets != 0]  # (P,)
        if self.config.loss == "ce":
            logits = hidden @ self.item_vectors().T  # (P, N): the whole catalogue
            return F.cross_entropy(logits, positives - 1)
        # The original SASRec objective: one uniformly sampled negative per positive.
        negatives = torch.randint(1, self.num_items + 1, positives.shape, device=positives.device)
        negatives = torch.where(negatives == positives, negatives % self.num_items + 1, negatives)
        pos_logits = (hidden * self.item_embedding(positives)).sum(-1)
        neg_logits = (hidden * self.item_embedding(negatives)).sum(-1)
        return F.binary_cross_entropy_with_logits(pos_logits, torch.ones_like(pos_logits)) + \
            F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.xavier_normal_(module.weight)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
