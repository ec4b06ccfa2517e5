"""Laser: Bi-Tuning around a frozen LLM.

LLM input = [prefix (L vectors from the M-Former over frozen SASRec vectors)] + embed(text) + [suffix];
the last-layer hidden state at the (last) suffix position, L2-normalised, is the user or item embedding.
Users and items share the path: an item is a one-item history and its M-Former input is its own
SASRec vector. Only the M-Former (or a free prefix) and the suffix are trained (and, with `laser.fusion = "gated"`,
the gate g of score(u, i) = SASRec(u, i) + g * cos(laser_u, laser_i) / tau).

The frozen LLM and SASRec are held outside the module tree, so they are never trained, never switched
to train mode and never saved with our weights.

`laser.cf_position = "after_text"` moves the prefix after the text: embed(text) + [prefix] + [suffix]. The causal
LLM's text states then depend on nothing trained, so training computes them without gradients and back-propagates
through the prefix and suffix positions only (`training_forward`); everything else runs the whole sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache

from laser_batch.config import LaserConfig, MFormerConfig
from laser_batch.llm import FrozenLLM
from laser_batch.mformer import MFormer
from laser_batch.sasrec import SASRec


class TextState(NamedTuple):
    """The frozen LLM's work on a left-padded text batch, for the positions that follow it (`cf_position`)."""

    cache: Cache  # the keys and values of every layer over the text (a transformers DynamicCache)
    hidden: torch.Tensor  # (B, T, D) last-layer states
    attention_mask: torch.Tensor  # (B, T) 1 for real tokens
    lengths: torch.Tensor  # (B,) real tokens per row: the next position of each row


class Laser(nn.Module):
    def __init__(self, config: LaserConfig, mformer_config: MFormerConfig, llm: FrozenLLM, sasrec: SASRec) -> None:
        super().__init__()
        self.config = config
        self.mformer_config = mformer_config
        self._frozen = (llm, sasrec.eval().requires_grad_(False))  # a tuple: not registered as submodules
        width = llm.hidden_size
        token_scale = llm.embed(torch.arange(min(1024, llm.tokenizer.vocab_size))).float().std().item()
        if config.prefix == "mformer":
            self.mformer = MFormer(mformer_config, sasrec.config.hidden_size, width)
        elif config.prefix == "free":  # the "no collaborative prefix" ablation: same length, no ID input
            self.free_prefix = nn.Parameter(torch.randn(mformer_config.num_queries, width) * token_scale)
        if config.pooling == "suffix":
            eos = llm.embed(torch.tensor([self.eos_id])).float()  # start from the EOS token's embedding
            self.suffix = nn.Parameter(eos.repeat(config.num_suffix_tokens, 1).clone())
        if config.center:  # the catalogue's mean raw embedding, set at each item re-encoding (not trained)
            self.register_buffer("center", torch.zeros(width))
        if config.center_users:  # the users' own mean raw embedding, set alongside (not trained)
            self.register_buffer("user_center", torch.zeros(width))
        if config.fusion == "gated":  # Laser's weight next to SASRec's scores; at 0 the model ranks exactly as SASRec
            if config.gate_fit == "train":
                self.gate = nn.Parameter(torch.zeros(()))
            else:  # set on validation after every epoch (LaserTraining.validate), never by a gradient
                self.register_buffer("gate", torch.zeros(()))

    @property
    def llm(self) -> FrozenLLM:
        return self._frozen[0]

    @property
    def sasrec(self) -> SASRec:
        return self._frozen[1]

    @property
    def eos_id(self) -> int:
        tokenizer = self.llm.tokenizer
        return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id

    @property
    def id_window(self) -> int:
        return self.mformer_config.id_window

    @property
    def fused(self) -> bool:
        """Whether users are ranked by the gated fusion with SASRec (`laser.fusion = "gated"`)."""
        return self.config.fusion == "gated"

    @property
    def gate_value(self) -> float | None:
        """The fusion gate g as a number (None without fusion): what a fused run reports."""
        return float(self.gate.detach()) if self.fused else None

    def forward(
        self, id_history: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, raw: bool = False,
        items: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed users (or items, as one-item histories).

        Args:
            id_history: (B, S) internal item ids, left-padded with 0, the SASRec input (S <= SASRec max_len).
            input_ids: (B, T) token ids of the template text, left-padded.
            attention_mask: (B, T) 1 for real tokens.
            raw: return the pooled hidden states as they are (before centering and normalising).
            items: the rows are items (one-item histories); see `LaserConfig.item_id_vector`.

        Returns:
            (embeddings (B, D) float32, L2-normalised; load-balancing loss, a scalar (0 without an M-Former)).
        """
        prefix, lb_loss = self.make_prefix(id_history, input_ids.shape[0], items=items)
        return self.encode(prefix, input_ids, attention_mask, raw=raw, items=items), lb_loss

    def make_prefix(
        self, id_history: torch.Tensor, batch: int, *, items: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The prefix vectors (B, L, D) (None without a prefix) and the load-balancing loss (0 without an M-Former)."""
        lb_loss = torch.zeros((), device=id_history.device)
        if self.config.prefix == "mformer":
            with torch.no_grad():
                if items and self.config.item_id_vector == "embedding":  # the item's own ID embedding (B, 1, d_id)
                    id_vectors = self.sasrec.item_embedding(id_history[:, -1:])
                else:  # the per-position vectors of the last N positions (B, N, d_id)
                    id_vectors = self.sasrec(id_history)[:, -self.id_window:]
            out = self.mformer(id_vectors, id_history[:, -self.id_window:] != 0)
            return out.prefix, out.lb_loss
        if self.config.prefix == "free":
            return self.free_prefix.expand(batch, -1, -1), lb_loss
        return None, lb_loss

    def encode(
        self, prefix: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, raw: bool = False,
        items: bool = False,
    ) -> torch.Tensor:
        """The frozen LLM over the whole input: (B, D) embeddings, centred and L2-normalised.

        The input is [prefix] + embed(text) + [suffix], or embed(text) + [prefix] + [suffix] with
        `laser.cf_position = "after_text"`. The exported user encoder is this function (the token lookup included).
        `items`: centre as items (by the catalogue mean) rather than as users (by `user_center` when
        `laser.center_users` is set).
        """
        head, tail = self._trained_parts(prefix, attention_mask)
        text = [(self.llm.embed(input_ids), attention_mask)]  # (B, T, D)
        parts = text + head + tail if self.config.cf_position == "after_text" else head + text + tail
        embeds = torch.cat([p.to(self.llm.model.dtype) for p, _ in parts], dim=1)  # (B, P + T + S, D)
        mask = torch.cat([m for _, m in parts], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # padding in the middle does not shift positions
        hidden = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).float()
        return self._pool(hidden, mask, raw=raw, items=items)

    def training_forward(
        self, id_history: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What a training step runs for users: `forward`, the same embeddings by a cheaper route where it can.

        With `laser.cf_position = "after_text"` the text depends on nothing trained: its keys and values are
        computed without gradients (`encode_text`) and the graph holds only the prefix and suffix positions
        (`encode_after_text`). The full-sequence `encode` stays the reference (items, evaluation, export).
        """
        if self.config.cf_position != "after_text":
            return self(id_history, input_ids, attention_mask)
        prefix, lb_loss = self.make_prefix(id_history, input_ids.shape[0])
        return self.encode_after_text(prefix, self.encode_text(input_ids, attention_mask)), lb_loss

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextState:
        """The frozen LLM over the left-padded text alone, without gradients: its keys/values and hidden states.

        Memory: one key and one value per layer, KV head and token; SmolLM2-135M (30 layers, 3 KV heads of 64) holds
        46 KB per token in float32, so 14 MB for a 300-token user. Kept for one batch only: across an epoch the
        texts would need that per training sample (13 GB for ML-100K's 943 users), and each is used once per epoch.
        """
        positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
        out = self.llm.model(inputs_embeds=self.llm.embed(input_ids), attention_mask=attention_mask,
                             position_ids=positions, use_cache=True)
        return TextState(out.past_key_values, out.last_hidden_state, attention_mask, attention_mask.sum(1))

    def encode_after_text(
        self, prefix: torch.Tensor | None, text: TextState, *, raw: bool = False, items: bool = False
    ) -> torch.Tensor:
        """`encode` with `cf_position = "after_text"`, run over the prefix and suffix only, attending to `text`.

        Equal to `encode` on the whole sequence up to float rounding (tests/test_cf_position.py). `text` is used
        up: the LLM appends these positions' keys and values to its cache.
        """
        head, tail = self._trained_parts(prefix, text.attention_mask)
        embeds = torch.cat([p.to(self.llm.model.dtype) for p, _ in head + tail], dim=1)  # (B, L + S, D)
        new = torch.arange(embeds.shape[1], device=embeds.device)
        mask = torch.cat([text.attention_mask, *(m for _, m in head + tail)], dim=1)  # (B, T + L + S): past + new
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=text.lengths[:, None] + new,
                                past_key_values=text.cache, use_cache=True).last_hidden_state
        hidden = torch.cat([text.hidden, hidden], dim=1).float()  # mean pooling reads the text's states too
        return self._pool(hidden, mask, raw=raw, items=items)

    def _trained_parts(
        self, prefix: torch.Tensor | None, attention_mask: torch.Tensor
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
        """The inputs around the text, each (embeddings (B, n, D), mask (B, n)): ([prefix], [suffix or EOS])."""
        batch, ones = attention_mask.shape[0], attention_mask.new_ones
        head = [] if prefix is None else [(prefix, ones(batch, prefix.shape[1]))]
        tail = []
        if self.config.pooling == "suffix":
            tail.append((self.suffix.expand(batch, -1, -1), ones(batch, self.suffix.shape[0])))
        elif self.config.pooling == "eos":  # the untrained-EOS ablation
            eos = torch.full((batch, 1), self.eos_id, device=attention_mask.device)
            tail.append((self.llm.embed(eos), ones(batch, 1)))
        return head, tail

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor, *, raw: bool, items: bool) -> torch.Tensor:
        """Last-layer states (B, P + T + S, D) float32 -> the (B, D) embedding (see `encode`)."""
        if self.config.pooling == "mean":
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        else:
            pooled = hidden[:, -1]  # the (last) suffix or EOS position sees everything
        if raw:
            return pooled
        if self.config.center:
            pooled = pooled - (self.user_center if self.config.center_users and not items else self.center)
        return F.normalize(pooled, dim=-1)

    def loss(
        self, users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, lb_loss: torch.Tensor, *,
        id_history: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-entropy over the whole catalogue + lambda * load-balancing loss.

        The logits are cosine / tau, or with the gated fusion and `gate_fit = "train"` `fused_scores` (SASRec's dot
        + g * cosine / tau; with `gate_fit = "valid"` Laser trains on its own logits and g is fitted on validation),
        or with `gate_fit = "residual"` offsets + cosine / tau (the held-out SASRec's scores, then g fitted on
        validation). users: (B, D) normalised; items: (N, D) normalised (row j = internal item j + 1); targets: (B,)
        in 1..N; id_history: (B, S) the users' SASRec input, required with `gate_fit = "train"`; offsets: (B, N),
        required with `gate_fit = "residual"`.
        """
        cosine = users @ items.T  # (B, N)
        if self.fused and self.config.gate_fit == "train":
            if id_history is None:
                raise ValueError("the gated fusion's loss needs the users' id_history (SASRec's input)")
            logits = self.fused_scores(id_history, cosine)
        elif self.fused and self.config.gate_fit == "residual":
            if offsets is None:
                raise ValueError("the residual fusion's loss needs the held-out SASRec's scores (offsets)")
            logits = offsets + cosine / self.config.temperature
        else:
            logits = cosine / self.config.temperature
        return F.cross_entropy(logits, targets - 1) + self.config.lb_weight * lb_loss

    @torch.no_grad()
    def sasrec_state(self, id_history: torch.Tensor) -> torch.Tensor:
        """SASRec's user state (B, d_id): its output at the last position of (B, S) left-padded ids."""
        return self.sasrec(id_history)[:, -1]

    def fused_scores(self, id_history: torch.Tensor, cosine: torch.Tensor) -> torch.Tensor:
        """score(u, i) = SASRec(u, i) + g * cos(laser_u, laser_i) / tau, (B, N), from cosine (B, N) = users @ items.T.

        SASRec(u, i) is `evaluate --model sasrec`'s score (laser_batch.training.sasrec_scores): at g = 0 the sum is
        exactly SASRec's scores. Neither term is rescaled: SASRec's dot scores are not normalised, Laser's are
        cosine / tau, and g learns how much of the second to add.
        """
        return self.sasrec_scores(id_history) + self.gate * cosine / self.config.temperature

    @torch.no_grad()
    def sasrec_scores(self, id_history: torch.Tensor) -> torch.Tensor:
        """SASRec(u, i) for every item, (B, N): the fusion's first term."""
        return self.sasrec_state(id_history) @ self.sasrec.item_vectors().T

    @torch.no_grad()
    def fused_users(self, users: torch.Tensor, id_history: torch.Tensor) -> torch.Tensor:
        """The fused user vectors [SASRec state ; g * users / tau], (B, d_id + D): `fused_items` scores them."""
        return torch.cat([self.sasrec_state(id_history), self.gate * users / self.config.temperature], dim=1)

    @torch.no_grad()
    def fused_items(self, items: torch.Tensor) -> torch.Tensor:
        """The fused item matrix [SASRec item embedding ; Laser item embedding], (N, d_id + D).

        One product with `fused_users` gives `fused_scores`: what the export writes, so that the scorer stays a dot
        product of user vectors with an item matrix.
        """
        return torch.cat([self.sasrec.item_vectors(), items], dim=1)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly the trained weights, plus the centering vector when there is one (what a checkpoint stores)."""
        state = {name: p.detach().contiguous() for name, p in self.named_parameters() if p.requires_grad}
        return state | {name: b.detach().clone() for name, b in self.named_buffers()}
