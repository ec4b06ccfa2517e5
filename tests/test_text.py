import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from laser_batch.config import PAPER_INSTRUCTION, TextConfig
from laser_batch.errors import ConfigError
from laser_batch.text import TextEncoder, item_line_bodies

PAD = 0


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A byte-level BPE (vocab ~300) trained here: decodes any text back exactly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([PAPER_INSTRUCTION, ">>1. Heat (brand: Warner, year: 1995)", "Toy Story Casino Alien"],
                            trainer)
    assert tok.token_to_id("<pad>") == PAD
    return tok


@pytest.fixture(scope="module")
def items() -> pl.DataFrame:
    return pl.DataFrame({
        "item_id": [10, 20, 30, 40],
        "title": ["Heat", "Toy Story", "Casino", "Alien: the long\ntitle of an item that goes on and on and on"],
        "brand": ["Warner", None, "", "Fox"],
        "year": [1995, 1995, None, 1979],
    })


def encoder(tokenizer, items, **text) -> TextEncoder:
    return TextEncoder(tokenizer, items, TextConfig(**text), pad_id=PAD)


def test_paper_template_exact_text(tokenizer, items):
    expected = (
        "You are an intelligent recommendation assistant. Please summarize the user's characteristics into a "
        "single token based on the browsing history. In chronological order, the user has browsed the following "
        "items:\n>>1. Heat (brand: Warner, year: 1995)\n>>2. Toy Story (year: 1995)"
    )
    assert encoder(tokenizer, items).render(np.array([1, 2])) == expected


def test_fields_skip_null_and_empty_values(items):
    assert item_line_bodies(items, ["brand", "year"]) == [
        "Heat (brand: Warner, year: 1995)", "Toy Story (year: 1995)", "Casino",
        "Alien: the long title of an item that goes on and on and on (brand: Fox, year: 1979)",
    ]
    assert item_line_bodies(items, [])[0] == "Heat"


def test_item_is_a_one_item_history(tokenizer, items):
    enc = encoder(tokenizer, items)
    assert enc.render([3]) == PAPER_INSTRUCTION + "\n>>1. Casino"
    ids, mask = enc.encode_items(np.array([3, 1]))
    users, _ = enc.encode_users([np.array([3]), np.array([1])])
    np.testing.assert_array_equal(ids, users)
    assert tokenizer.decode(ids[0][mask[0] == 1].tolist()) == enc.render([3])


def test_left_padding_and_mask(tokenizer, items):
    enc = encoder(tokenizer, items)
    histories = [np.array([1]), np.array([1, 2, 4]), np.array([0, 0, 2])]  # zeros are padding, ignored
    ids, mask = enc.encode_users(histories)
    lengths = enc.lengths(histories)
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape == (3, lengths.max())
    np.testing.assert_array_equal(mask.sum(1), lengths)
    for row, n in enumerate(lengths):
        assert (mask[row, -n:] == 1).all() and (mask[row, :-n] == 0).all()  # left padded
        assert (ids[row, :-n] == PAD).all()
    single, _ = enc.encode_users([np.array([2])])
    np.testing.assert_array_equal(ids[2, -lengths[2]:], single[0])  # padding does not change the tokens


def test_decode_equals_render(tokenizer, items):
    enc = encoder(tokenizer, items)
    histories = [[1], [4, 3], [1, 2, 3, 4], [2, 2, 2], [3, 4, 1, 2, 1]]
    ids, mask = enc.encode_users([np.array(h) for h in histories])
    for row, h in enumerate(histories):
        assert tokenizer.decode(ids[row][mask[row] == 1].tolist()) == enc.render(h)


def test_max_history_items_keeps_most_recent(tokenizer, items):
    enc = encoder(tokenizer, items, max_history_items=2)
    assert enc.render([1, 2, 3]) == enc.render([2, 3]) == (
        PAPER_INSTRUCTION + "\n>>1. Toy Story (year: 1995)\n>>2. Casino")


def test_max_text_tokens_drops_oldest_lines_and_renumbers(tokenizer, items):
    full = encoder(tokenizer, items)
    budget = int(full.lengths([[2, 3]])[0])  # room for the last two lines, not three
    enc = encoder(tokenizer, items, max_text_tokens=budget)
    assert enc.render([1, 2, 3]) == PAPER_INSTRUCTION + "\n>>1. Toy Story (year: 1995)\n>>2. Casino"
    assert enc.lengths([[1, 2, 3]])[0] == budget
    ids, mask = enc.encode_users([np.array([1, 2, 3])])
    assert tokenizer.decode(ids[0].tolist()) == enc.render([1, 2, 3])


def test_truncation_matches_a_reference_on_random_histories(tokenizer, items):
    """Whole-text tokenization as the reference: keep the most recent lines that fit, renumbered from 1."""
    bodies = item_line_bodies(items, ["brand", "year"])
    rng = np.random.default_rng(0)

    def text(h: list[int]) -> str:
        return PAPER_INSTRUCTION + "".join(f"\n>>{k}. {bodies[i - 1]}" for k, i in enumerate(h, 1))

    seen = set()
    base = len(tokenizer.encode(PAPER_INSTRUCTION).ids)
    for budget in (base + 8, base + 25, base + 45, base + 200):
        enc = encoder(tokenizer, items, max_history_items=4, max_text_tokens=budget)
        histories = [rng.integers(0, 5, rng.integers(1, 8)) for _ in range(30)]
        histories = [np.append(h, rng.integers(1, 5)) for h in histories]  # never empty
        ids, mask = enc.encode_users(histories)
        for row, history in enumerate(histories):
            kept = [int(i) for i in history if i][-4:]
            while len(kept) > 1 and len(tokenizer.encode(text(kept)).ids) > budget:
                kept = kept[1:]
            assert tokenizer.decode(ids[row].tolist()) == enc.render(history)
            fits = len(tokenizer.encode(text(kept)).ids) <= budget
            seen.add((len(kept) < len([i for i in history if i][-4:]), fits))
            if fits:
                assert enc.render(history) == text(kept)
            else:
                assert text(kept).startswith(enc.render(history)) and mask[row].sum() == budget
    assert len(seen) == 4  # every case met: lines dropped or not, last line cut or not


def test_single_line_too_long_is_cut_from_its_end(tokenizer, items):
    instruction_and_number = int(encoder(tokenizer, items, instruction="Hi").lengths([[3]])[0]) - 2  # "Casino" >= 2
    enc = encoder(tokenizer, items, instruction="Hi", max_text_tokens=instruction_and_number + 3)
    text = enc.render([1, 4])
    assert text.startswith("Hi\n>>1. Alien") and not text.endswith("on")
    ids, _ = enc.encode_users([np.array([1, 4])])
    assert ids.shape == (1, instruction_and_number + 3) and tokenizer.decode(ids[0].tolist()) == text
    with pytest.raises(ConfigError, match="text.max_text_tokens"):
        encoder(tokenizer, items, instruction="Hi", max_text_tokens=1)


def test_bad_inputs(tokenizer, items):
    with pytest.raises(ConfigError, match="text.text_columns.*'genre'"):
        encoder(tokenizer, items, text_columns=["brand", "genre"])
    with pytest.raises(ConfigError, match="text.item_line"):
        encoder(tokenizer, items, item_line="{title} #{index}")
    with pytest.raises(ConfigError, match="text.item_line.*brand"):
        encoder(tokenizer, items, item_line="{index}: {title} {brand}")
    enc = encoder(tokenizer, items)
    with pytest.raises(ValueError, match="empty history"):
        enc.encode_users([np.array([1]), np.array([0, 0])])
    with pytest.raises(ValueError, match="out of range"):
        enc.encode_users([np.array([5])])


def test_custom_template_and_columns(tokenizer, items):
    enc = encoder(tokenizer, items, instruction="History:", item_line="[{index:02d}] {title}{fields};",
                  text_columns=["year"])
    assert enc.render([1, 4]) == (
        "History:\n[01] Heat (year: 1995);\n[02] Alien: the long title of an item that goes on and on and on "
        "(year: 1979);")
    ids, mask = enc.encode_users([np.array([1, 4])])
    assert tokenizer.decode(ids[0].tolist()) == enc.render([1, 4])
    no_instruction = encoder(tokenizer, items, instruction="", item_line="{title}")
    assert no_instruction.render([1, 3]) == "Heat\nCasino"


def test_import_does_not_import_torch():
    code = "import sys, laser_batch.text; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
