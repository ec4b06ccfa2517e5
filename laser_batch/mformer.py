"""M-Former: Laser's mixture-of-experts querying transformer (BLIP-2 Q-Former style).

K "query experts" each hold L learnable query tokens. A router on the frozen ID model's per-item
vectors picks the top-k experts for a history; their (weighted) queries attend to each other and,
every `cross_attention_freq`-th block, to the ID vectors, and come out as L prefix vectors of LLM width.

Written with `F.scaled_dot_product_attention` and explicit boolean key masks so that it exports to
ONNX with dynamic batch and history length. Histories are left-padded; padded positions never reach
an output, whatever vectors they hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from laser_batch.attention import Attention
from laser_batch.config import MFormerConfig
from laser_batch.errors import ConfigError

MAX_AUTO_WIDTH = 256  # hidden_size 0: the LLM's width, capped here to keep the M-Former small


@dataclass
class MFormerOutput:
    """What one M-Former pass returns (B histories, L queries, K experts)."""

    prefix: torch.Tensor  # (B, L, llm_size)
    experts: torch.Tensor  # (B, top_k) int64, best first
    weights: torch.Tensor  # (B, top_k), sum to 1
    router_probs: torch.Tensor  # (B, K): per-item softmax averaged over the valid items
    lb_loss: torch.Tensor  # scalar load-balancing loss of the batch


def load_balancing_loss(item_probs: torch.Tensor, id_mask: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load balancing over every valid history item of the batch.

    `K * sum_j f_j * P_j`, f_j = share of valid items whose argmax is expert j, P_j = mean router
    probability of expert j over valid items. 1.0 when perfectly balanced (and always for K = 1).

    Args:
        item_probs: (B, N, K) per-item router probabilities.
        id_mask: (B, N) bool, True = real history item.

    Returns:
        Scalar tensor; gradient flows through P only (the argmax counts are constants).
    """
    num_experts = item_probs.shape[-1]
    valid = id_mask[..., None].to(item_probs.dtype)  # (B, N, 1)
    count = valid.sum()
    experts = torch.arange(num_experts, device=item_probs.device)
    chosen = (item_probs.argmax(-1)[..., None] == experts).to(item_probs.dtype)  # (B, N, K) one-hot
    share = (chosen * valid).sum((0, 1)) / count  # (K,) f
    mean_prob = (torch.where(id_mask[..., None], item_probs, 0.0)).sum((0, 1)) / count  # (K,) P
    return num_experts * (share * mean_prob).sum()


class Block(nn.Module):
    """Pre-norm block: self-attention over the queries, optional cross-attention to the ID vectors, FFN."""

    def __init__(self, width: int, num_heads: int, dropout: float, cross_attention: bool) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(width)
        self.self_attn = Attention(width, num_heads, dropout)
        self.cross_norm = nn.LayerNorm(width) if cross_attention else None
        self.cross_attn = Attention(width, num_heads, dropout) if cross_attention else None
        self.ffn_norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) queries, ids: (B, N, D), key_mask: (B, 1, 1, N) bool -> (B, L, D)."""
        h = self.self_norm(x)
        x = x + self.dropout(self.self_attn(h, h))
        if self.cross_attn is not None:
            x = x + self.dropout(self.cross_attn(self.cross_norm(x), ids, key_mask))
        return x + self.ffn(self.ffn_norm(x))


class MFormer(nn.Module):
    """ID vectors (B, N, id_size) + mask (B, N) -> L prefix vectors (B, L, llm_size) from the routed experts.

    With top_k = 1 the chosen expert's queries are used as they are (weight exactly 1): the main loss
    then gives the router no gradient and only the load-balancing loss trains it. With top_k > 1 the
    queries are the renormalised weighted sum of the chosen experts', so the task trains the router too.
    K = 1 is the "no MoE" ablation: one shared set of queries, lb_loss exactly 1.
    """

    def __init__(self, config: MFormerConfig, id_size: int, llm_size: int) -> None:
        super().__init__()
        self.config = config
        width = config.hidden_size or min(llm_size, MAX_AUTO_WIDTH)
        if width % config.num_heads != 0:
            source = "hidden_size" if config.hidden_size else "the LLM width, capped at 256 (hidden_size = 0)"
            raise ConfigError(f"mformer.num_heads = {config.num_heads} is invalid: "
                              f"expected a divisor of the M-Former width {width} ({source})")
        self.width = width
        self.input_proj = nn.Sequential(nn.Linear(id_size, width), nn.LayerNorm(width))
        self.router = nn.Linear(width, config.num_experts)
        self.queries = nn.Parameter(torch.empty(config.num_experts, config.num_queries, width))  # (K, L, D)
        self.query_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(width, config.num_heads, config.dropout, cross_attention=i % config.cross_attention_freq == 0)
            for i in range(config.num_blocks)
        )
        self.final_norm = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, llm_size)
        self.apply(_init_weights)
        nn.init.normal_(self.queries, std=0.02)
        with torch.no_grad():
            self.out_proj.weight.mul_(config.output_init_scale)

    def route(self, ids: torch.Tensor, id_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Projected ids (B, N, D) + mask (B, N) -> experts (B, k), weights (B, k), probs (B, K), lb_loss."""
        item_probs = self.router(ids).softmax(-1)  # (B, N, K)
        valid = id_mask[..., None]  # (B, N, 1)
        count = valid.to(item_probs.dtype).sum(1)  # (B, 1); no bool sums, which ONNX lacks
        router_probs = torch.where(valid, item_probs, 0.0).sum(1) / count  # (B, K)
        top, experts = router_probs.topk(self.config.top_k, dim=-1)  # (B, k) each, best first
        if self.config.top_k == 1:
            weights = torch.ones_like(top)  # a hard choice: no gradient path from the task to the router
        else:
            weights = top / top.sum(-1, keepdim=True)
        return experts, weights, router_probs, load_balancing_loss(item_probs, id_mask)

    def forward(self, id_vectors: torch.Tensor, id_mask: torch.Tensor) -> MFormerOutput:
        """Route a batch of histories and run the chosen queries through the blocks.

        Args:
            id_vectors: (B, N, id_size) frozen ID-model vectors, left padded.
            id_mask: (B, N) bool, True = real history item; at least one per row.

        Returns:
            MFormerOutput with prefix (B, L, llm_size) and the routing details.
        """
        # Zero padded inputs first: arbitrary (even non-finite) padding must not reach any output.
        id_vectors = torch.where(id_mask[..., None], id_vectors, 0.0)
        ids = self.input_proj(id_vectors)  # (B, N, D)
        experts, weights, router_probs, lb_loss = self.route(ids, id_mask)
        chosen = self.queries[experts]  # (B, k, L, D)
        x = (weights[..., None, None].to(chosen.dtype) * chosen).sum(1)  # (B, L, D)
        x = self.query_dropout(x)
        key_mask = id_mask[:, None, None, :]  # (B, 1, 1, N)
        for block in self.blocks:
            x = block(x, ids, key_mask)  # (B, L, D)
        prefix = self.out_proj(self.final_norm(x))  # (B, L, llm_size)
        return MFormerOutput(prefix, experts, weights, router_probs, lb_loss)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
