"""Multi-head attention on `F.scaled_dot_product_attention` with explicit boolean masks (exports to ONNX)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Queries (B, T, D) attend to keys/values (B, N, D): self-attention when both are the same sequence."""

    def __init__(self, width: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """queries (B, T, D), keys (B, N, D), mask broadcastable to (B, H, T, N), True = may attend -> (B, T, D)."""
        batch, length, width = queries.shape
        head = width // self.num_heads
        q = self.query(queries).view(batch, length, self.num_heads, head).transpose(1, 2)  # (B, H, T, Dh)
        k, v = (t.reshape(batch, -1, self.num_heads, head).transpose(1, 2)  # (B, H, N, Dh)
                for t in self.key_value(keys).chunk(2, dim=-1))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(batch, length, width))
