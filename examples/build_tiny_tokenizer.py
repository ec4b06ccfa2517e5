"""Build the embedded tiny LLM's tokenizer: `laser_batch/assets/tiny_tokenizer.json`.

A byte-level BPE (so any text encodes, byte by byte when nothing better matches) trained on the text
the embedded demo produces: the paper's instruction, item lines of the synthetic example catalogue
(seeds 0..2), digits and punctuation, and a list of generic English product words. Two special tokens:
"<|pad|>" (id 0) and "<|eos|>" (id 1); no BOS. The output is byte-for-byte identical on every run:

    python -m laser_batch.examples.build_tiny_tokenizer [OUT_JSON]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from laser_batch.config import PAPER_INSTRUCTION
from laser_batch.examples.synthetic import generate

VOCAB_SIZE = 1800
SPECIAL_TOKENS = ["<|pad|>", "<|eos|>"]
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "laser_batch" / "assets" / "tiny_tokenizer.json"

GENERIC_WORDS = """
the a an and or of for with in on to from by at as is are was were be this that these those it its you your
user users item items product products review reviews rating ratings price sale discount offer new used best
top popular favourite favorite bought purchased viewed browsed watched listened read played liked loved
recommend recommended recommendation assistant history characteristics summary summarize token single
brand category categories title year genre genres author artist series edition pack set kit bundle size
colour color black white red green blue grey gray silver gold orange pink purple brown yellow small medium
large extra light dark classic premium deluxe original organic natural vintage modern portable wireless
electric digital home kitchen garden outdoor indoor sports travel office kids men women unisex book books
music movie movies film films game games toy toys beauty health pet pets food drink coffee tea shoes clothing
camera phone computer laptop tablet accessories tools equipment supplies gift cards edition volume part
one two three four five six seven eight nine ten first second third last next previous more less very
good great nice quality fast slow easy hard high low long short old young day week month time times
""".split()


def corpus() -> list[str]:
    """The training text, in a fixed order."""
    lines = [PAPER_INSTRUCTION]
    for seed in range(3):
        # Titles depend only on the seed and the catalogue size (the catalogue is drawn before any user).
        _, items = generate(users=1, items=400, seed=seed)
        rows = items.select("title", "category", "brand").rows()
        for start in range(0, len(rows), 10):
            history = [
                f">>{k}. {title} (category: {category}, brand: {brand})"
                for k, (title, category, brand) in enumerate(rows[start:start + 10], 1)
            ]
            lines.append(PAPER_INSTRUCTION + "\n" + "\n".join(history))
    lines.append(" ".join(str(n) for n in range(1000)))
    lines.append("0123456789 .,;:!?'\"()[]{}<>-_/\\|@#$%^&*+=~` 1.5 2,000 10% $19.99 €5 £3 (250 g) (1 kg)")
    lines.append(" ".join(GENERIC_WORDS))
    lines.append(" ".join(word.capitalize() for word in GENERIC_WORDS))
    return lines


def build() -> Tokenizer:
    """Train the byte-level BPE on `corpus()`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(build().to_str(pretty=True) + "\n")
    print(f"{args.out}: {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
