"""SASRec: causal self-attention over item-id sequences (Kang & McAuley, 2018).

Written with `F.scaled_dot_product_attention` and explicit boolean masks so that the model exports to
ONNX with dynamic batch and length. Sequences are left-padded with item 0. Positions count back from
the most recent item (as in the original model), so the output at a real position does not depend on
how much padding precedes it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from laser_batch.attention import Attention
from laser_batch.config import SASRecConfig


def attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """Causal mask that also hides padded keys: (B, T) bool -> (B, 1, T, T) bool, True = may attend.

    Every position may attend to itself, so a padded row never has all keys masked (no NaN).
    """
    steps = torch.arange(valid.shape[1], device=valid.device)
    causal = steps[None, :] <= steps[:, None]  # (T, T): key <= query
    diagonal = steps[None, :] == steps[:, None]  # built by comparison: torch.eye(bool) does not export
    return (causal & valid[:, None, :]) | diagonal  # (B, T, T)


class Block(nn.Module):
    """The original SASRec block: queries from LayerNorm(x), keys and values from x; then a point-wise FFN.

    x <- LN(x) + attn(LN(x), x); x <- LN'(x) + ffn(LN'(x)), as in Kang & McAuley's code.
    """

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.attn_norm = nn.LayerNorm(d, eps=1e-8)
        self.attn = Attention(d, config.num_heads, config.dropout)
        self.ffn_norm = nn.LayerNorm(d, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(d, d), nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(d, d), nn.Dropout(config.dropout)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.attn_norm(x)
        x = self.ffn_norm(q + self.attn(q, x, mask[:, None]))  # mask (B, 1, T, T)
        return x + self.ffn(x)


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
        self.position_embedding = nn.Embedding(config.max_len + 1, d, padding_idx=0)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_blocks))
        self.final_norm = nn.LayerNorm(d, eps=1e-8)
        self.apply(_init_weights)

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        """item_ids: (B, T) int64, left-padded with 0 -> (B, T, D); padded positions are zero."""
        valid = item_ids != 0  # (B, T)
        positions = self.positions(valid)
        x = self.item_embedding(item_ids) * math.sqrt(self.config.hidden_size) + self.position_embedding(positions)
        x = self.embedding_dropout(x) * valid[..., None]
        mask = attention_mask(valid)
        for block in self.blocks:
            x = block(x, mask) * valid[..., None]
        return self.final_norm(x) * valid[..., None]

    def positions(self, valid: torch.Tensor) -> torch.Tensor:
        """Position ids (B, T) counted back from the most recent item: max_len for it, one less per step back.

        As in the original SASRec, where left-padded sequences of length max_len put the most recent item at
        the last position; counting from the end keeps that meaning for shorter (trimmed) batches, and the
        amount of left padding never changes a real position's id. Padding gets 0 (a zero embedding).
        """
        from_end = valid.long().flip(1).cumsum(1).flip(1)  # (B, T): 1 for the most recent item, 2 for the one before
        return torch.where(valid, (self.config.max_len + 1 - from_end).clamp(min=1), 0)

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
