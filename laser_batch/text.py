"""Histories and items as token ids, with the paper's template (torch-free: the scorer reuses it).

    <instruction>
    >>1. <title> (<field>: <value>, ...)
    >>2. ...                                   (one line per item, oldest first)

An item is encoded as a history of exactly that one item. Everything that can be tokenized ahead of time
is, once: the instruction, every item's line body and the line numbering for k = 1..max_history_items.
Encoding a batch is then a gather from one flat token array, with no tokenizer call. Item text is
kept on one line (whitespace, newlines included, collapses to one space).

The pieces are tokenized separately, cut at line boundaries and right after {index} (which must come before
{title} and {fields} in `item_line`): "\\n>>k" (newline and numbering) and ". <title> (...)" (the rest of
the line). So a byte-level BPE (GPT-2, Llama 3, Qwen) yields the same pre-tokens as on the whole text,
and decode(ids) equals `render(history)` exactly. A tokenizer that adds
a prefix space to every call (SentencePiece "Metaspace" ones) does not round-trip; a warning says so.
"""

from __future__ import annotations

import itertools
import logging
import string
from collections.abc import Sequence

import numpy as np
import polars as pl
import tokenizers

from laser_batch.config import TextConfig
from laser_batch.errors import ConfigError

logger = logging.getLogger(__name__)

_ITEM_FIELDS = ("title", "fields")


def _clean(value: object) -> str:
    """One line of text: whitespace (newlines included) collapsed, so an item never spans two lines."""
    if isinstance(value, list | tuple | pl.Series):
        value = ", ".join(_clean(v) for v in value if v is not None)
    return " ".join(str(value).split())


def item_line_bodies(
    items: pl.DataFrame, item_line_fields: list[str], *, template: str = "{title}{fields}"
) -> list[str]:
    """The per-item part of each item's line, one string per row of `items`.

    Args:
        items: rows with a `title` column and the `item_line_fields` columns.
        item_line_fields: columns listed after the title as " (name: value, ...)"; null or empty values are
            skipped, and there are no parentheses when no column has a value.
        template: str.format template over {title} and {fields}.

    Returns:
        E.g. "Heat (brand: Warner, year: 1995)" for the default template.
    """
    bodies = []
    for title, *values in items.select("title", *item_line_fields).iter_rows():
        pairs = [(name, _clean(v)) for name, v in zip(item_line_fields, values, strict=True) if v is not None]
        fields = ", ".join(f"{name}: {v}" for name, v in pairs if v)
        bodies.append(template.format(title=_clean(title or ""), fields=f" ({fields})" if fields else ""))
    return bodies


def _split_template(template: str) -> tuple[str, str]:
    """Cut `template` after its last {index}: (numbering part, per-item part)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"text.item_line = {template!r} is invalid: {e}") from e
    names = [name for _, name, _, _ in parsed if name is not None]
    unknown = sorted(set(names) - {"index", *_ITEM_FIELDS})
    if unknown:
        raise ConfigError(f"text.item_line = {template!r} is invalid: unknown field(s) {unknown}; "
                          "use {index}, {title} and {fields}")
    if "index" not in names:
        return "", template
    cut = max(j for j, (_, name, _, _) in enumerate(parsed) if name == "index") + 1
    if any(name in _ITEM_FIELDS for _, name, _, _ in parsed[:cut]):
        raise ConfigError(f"text.item_line = {template!r} is invalid: {{index}} must come before {{title}} and "
                          "{fields}")

    def join(parts: list) -> str:
        out = []
        for literal, name, spec, conversion in parts:
            out.append(literal.replace("{", "{{").replace("}", "}}"))
            if name is not None:
                out.append("{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}")
        return "".join(out)

    return join(parsed[:cut]), join(parsed[cut:])


class TextEncoder:
    """Token ids for histories of internal item ids (1..N; 0 = padding, ignored).

    Truncation, in order: keep the last `max_history_items` items; while instruction + lines exceed
    `max_text_tokens` tokens, drop the oldest whole line (the kept lines are renumbered from 1, oldest
    first); if even the most recent line alone does not fit, keep it cut from its end, so that a history
    never becomes empty.
    """

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, items: pl.DataFrame, config: TextConfig, *, pad_id: int
    ) -> None:
        """Tokenize the template pieces of every item once.

        Args:
            tokenizer: the LLM's tokenizer (a `tokenizers.Tokenizer`, e.g. `AutoTokenizer(...).backend_tokenizer`);
                a copy without padding or truncation is used.
            items: one row per internal item, row i - 1 = item i, with `title` and the text columns.
            config: template, text columns and limits.
            pad_id: the id written into padded positions.

        Raises:
            ConfigError: an unknown text column, a bad template or a `max_text_tokens` too small for the
                instruction and one line number.
        """
        if not isinstance(pad_id, int | np.integer):
            raise ValueError(f"pad_id must be an integer token id, got {pad_id!r}")
        self.config, self.pad_id = config, int(pad_id)
        columns = config.text_columns
        if columns is None:
            columns = [c for c in items.columns if c not in ("item_id", "title")]
        missing = [c for c in columns if c not in items.columns]
        if missing:
            raise ConfigError(f"text.text_columns names column(s) {', '.join(map(repr, missing))} that the items "
                              f"do not have (found: {', '.join(items.columns)})")
        self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        head, tail = _split_template(config.item_line)
        newline = "\n" if config.instruction else ""  # the first line follows the instruction
        numbering = [("\n" if k > 1 else newline) + head.format(index=k)
                     for k in range(1, config.max_history_items + 1)]
        self._body_text = item_line_bodies(items, columns, template=tail)
        # Piece p of the flat token store: 0 = instruction, k = numbering of line k (1..M), M + i = body of item i.
        self._texts = [config.instruction, *numbering, *self._body_text]
        pieces = [e.ids for e in self._tokenizer.encode_batch(self._texts, add_special_tokens=False)]
        self._len = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        self._start = np.cumsum(self._len) - self._len
        self._store = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=int(self._len.sum()))
        self._numbering_cum = np.cumsum(self._len[:config.max_history_items + 1]) - self._len[0]  # (M + 1,)
        if self._len[0] + self._len[1] >= config.max_text_tokens:
            raise ConfigError(f"text.max_text_tokens = {config.max_text_tokens} is invalid: the instruction and "
                              f"the first line number alone take {self._len[0] + self._len[1]} tokens")
        if items.height:
            ids, _ = self.encode_items(np.array([1]))
            if self._tokenizer.decode(ids[0].tolist()) != self.render([1]):
                logger.warning("this tokenizer does not decode separately tokenized pieces back to the rendered "
                               "text; token ids may differ from tokenizing the whole text at once")

    @property
    def num_items(self) -> int:
        return len(self._body_text)

    def _recent(self, histories: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
        """(B, M) the last M non-padding ids of each history, right-aligned, 0 on the left."""
        if not len(histories):
            raise ValueError("cannot encode an empty batch")
        m = self.config.max_history_items
        if isinstance(histories, np.ndarray) and histories.ndim == 2:  # e.g. items: one column
            sizes, flat = np.full(len(histories), histories.shape[1]), histories.astype(np.int64).reshape(-1)
        else:
            sizes = np.fromiter(map(len, histories), dtype=np.int64, count=len(histories))
            flat = np.concatenate([np.asarray(h, dtype=np.int64).reshape(-1) for h in histories])
        if len(flat) and (flat.min() < 0 or flat.max() > self.num_items):
            bad = flat[(flat < 0) | (flat > self.num_items)][0]
            raise ValueError(f"internal item id {bad} is out of range (0 = padding, items 1..{self.num_items})")
        width = max(int(sizes.max()), m)
        out = np.zeros((len(histories), width), dtype=np.int64)
        out[np.arange(width) >= width - sizes[:, None]] = flat
        if (flat == 0).any():  # move padding left, keeping the order of the items
            out = np.take_along_axis(out, np.argsort(out != 0, axis=1, kind="stable"), axis=1)
        empty = np.flatnonzero(out[:, -1] == 0)
        if len(empty):
            raise ValueError(f"cannot encode an empty history (batch row {empty[0]})")
        return out[:, -m:]

    def _layout(self, histories: Sequence[Sequence[int] | np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pieces of each text after truncation: (piece ids, token counts, kept), each (B, 1 + 2M)."""
        recent = self._recent(histories)  # (B, M)
        batch, m = recent.shape
        limit = self.config.max_text_tokens
        body_len = np.where(recent > 0, self._len[m + recent], 0)
        suffix = np.zeros((batch, m + 1), dtype=np.int64)  # (B, M + 1) body tokens of the last j lines
        suffix[:, 1:] = np.cumsum(body_len[:, ::-1], axis=1)
        total = self._len[0] + self._numbering_cum + suffix  # (B, M + 1) text tokens when keeping the last j lines
        count = (recent > 0).sum(1)
        fits = (total[:, 1:] <= limit) & (np.arange(1, m + 1) <= count[:, None])  # a prefix, as total grows with j
        kept_lines = np.maximum(fits.sum(1), 1)
        cut = np.maximum(total[np.arange(batch), kept_lines] - limit, 0)  # > 0 only when one line is kept
        number = np.arange(m) - (m - kept_lines[:, None]) + 1  # (B, M) line number, < 1 when dropped
        keep = np.ones((batch, 1 + 2 * m), dtype=bool)
        keep[:, 1::2] = keep[:, 2::2] = number >= 1
        pieces = np.zeros((batch, 1 + 2 * m), dtype=np.int64)
        pieces[:, 1::2] = np.where(number >= 1, number, 0)
        pieces[:, 2::2] = np.where(number >= 1, m + recent, 0)
        counts = np.where(keep, self._len[pieces], 0)
        counts[:, -1] -= cut
        return pieces, counts, keep

    def render(self, history: Sequence[int] | np.ndarray) -> str:
        """The text a history is encoded as, after truncation (`history`: internal ids, oldest first)."""
        pieces, counts, keep = (a[0] for a in self._layout([history]))
        texts = [self._texts[p] for p, k in zip(pieces.tolist(), keep.tolist(), strict=True) if k]
        if counts[-1] < self._len[pieces[-1]]:
            start = self._start[pieces[-1]]
            texts[-1] = self._tokenizer.decode(self._store[start:start + counts[-1]].tolist())
        return "".join(texts)

    def lengths(self, histories: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
        """Token counts without padding, (B,) int64: to group histories of similar length into batches."""
        return self._layout(histories)[1].sum(1)

    def encode_users(self, histories: Sequence[Sequence[int] | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of user histories (internal ids, oldest first), left padded to the longest.

        Returns:
            (input_ids, attention_mask), both (B, T) int64; padded positions hold `pad_id` and mask 0.

        Raises:
            ValueError: an empty history or batch, or an id outside 0..N.
        """
        pieces, counts, _ = self._layout(histories)
        lengths = counts.sum(1)
        counts, starts = counts.reshape(-1), self._start[pieces].reshape(-1)
        # Ragged gather: token t of the concatenation comes from store[start of its piece + offset in it].
        offsets = np.repeat(starts - (np.cumsum(counts) - counts), counts)
        tokens = self._store[offsets + np.arange(len(offsets))]
        width = int(lengths.max())
        mask = np.arange(width) >= width - lengths[:, None]  # (B, T), True on tokens
        input_ids = np.full(mask.shape, self.pad_id, dtype=np.int64)
        input_ids[mask] = tokens  # row-major order is the order of the concatenation
        return input_ids, mask.astype(np.int64)

    def encode_items(self, item_ids: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of items (internal ids 1..N), each as a one-item history; see `encode_users`."""
        return self.encode_users(np.asarray(item_ids, dtype=np.int64).reshape(-1, 1))
