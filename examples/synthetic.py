"""A deterministic synthetic recommendation dataset: the project's embedded demo and test data.

The catalogue has ten readable categories (coffee, running gear, sci-fi books, ...). Within a category
the items are grouped into short *chains* that share a product line (an adjective and a brand), such as
a book series or a kit built up piece by piece: "The Silent Nebula (Paperback)" is usually followed by
"The Silent Colony (Paperback)".

Each user has one or two favourite categories and a planted sequential habit. A sequence starts on a
popular item of a favourite category; each next item is

- with probability 0.6, the chain successor of the previous item (when it has one the user has not seen);
- with probability 0.05, a popular item of any category;
- otherwise, a Zipf-popular item of a favourite category (preferring items the user has not seen),

never repeating the previous item. Sequences hold 8..35 items; timestamps are integer seconds,
strictly increasing per user, with users' spans overlapping so that their last items interleave in time.

Only NumPy and Polars are used, and the output is byte-for-byte identical for a given seed:

    python -m laser_batch.examples.synthetic OUT_DIR [--users 1000] [--items 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from laser_batch.contracts import write_data_dir
from laser_batch.errors import ConfigError

MIN_LENGTH, MAX_LENGTH = 8, 35
P_SUCCESSOR = 0.6
P_ANY_CATEGORY = 0.05
CHAIN_LENGTHS = (3, 6)  # inclusive bounds
ITEM_ZIPF_EXPONENT = 1.0
CATEGORY_ZIPF_EXPONENT = 0.5
START_TIME = 1_700_000_000  # 2023-11-14, in Unix seconds
START_SPREAD = 180 * 86_400  # users start within about six months
GAP_RANGE = (600, 4 * 86_400)  # seconds between two interactions of a user, [low, high)
_UNSEEN_TRIES = 4


@dataclass(frozen=True)
class Category:
    """A product category: titles are `template` filled with one adjective, one noun and one variant."""

    name: str
    template: str
    adjectives: tuple[str, ...]
    nouns: tuple[str, ...]
    variants: tuple[str, ...]
    brands: tuple[str, ...]


CATEGORIES: tuple[Category, ...] = (
    Category(
        "Coffee", "{adj} {noun}{variant}",
        ("Ethiopian", "Colombian", "Guatemalan", "Kenyan", "Sumatran", "Brazilian", "Costa Rican", "Rwandan",
         "Peruvian", "Honduran"),
        ("Light Roast Coffee Beans", "Medium Roast Coffee Beans", "Dark Roast Coffee Beans", "Espresso Blend",
         "Decaf Whole Beans", "Single-Origin Ground Coffee", "Cold Brew Coarse Grind", "Pour-Over Filter Roast"),
        ("", " (250 g)", " (1 kg)"),
        ("Bean Theory", "Roastwell", "Highland Cup", "Morning Ritual", "Ember & Oak"),
    ),
    Category(
        "Running Gear", "{adj} {noun}{variant}",
        ("Trail", "Road", "Lightweight", "Cushioned", "Waterproof", "Reflective", "Breathable", "Carbon-Plated",
         "Merino", "Compression"),
        ("Running Shoes", "Running Shorts", "Running Jacket", "Hydration Vest", "Running Socks", "Running Tights",
         "Running Cap", "Running Gloves"),
        (" (Women)", " (Men)", " (Unisex)"),
        ("Stride Lab", "Northpace", "Kestrel", "Asphalt & Dirt", "Tempo"),
    ),
    Category(
        "Sci-Fi Books", "The {adj} {noun}{variant}",
        ("Silent", "Last", "Hollow", "Crimson", "Drifting", "Forgotten", "Iron", "Quantum", "Endless", "Shattered"),
        ("Nebula", "Colony", "Starship", "Horizon", "Signal", "Empire", "Archive", "Machine"),
        (" (Paperback)", " (Hardcover)", " (Audiobook)"),
        ("Orbit Line", "Farstar Press", "Meridian Books", "Vanta House", "Helix Editions"),
    ),
    Category(
        "Board Games", "{adj} {noun}{variant}",
        ("Castle", "Dragon", "Harbour", "Railway", "Jungle", "Galactic", "Viking", "Medieval", "Desert", "Arctic"),
        ("Strategy Game", "Card Game", "Dice Game", "Co-op Adventure", "Deck-Building Game", "Party Game",
         "Puzzle Game", "Worker-Placement Game"),
        ("", ": Expansion Pack", " (Travel Edition)"),
        ("Meeple Forge", "Tabletop Union", "Red Dice Co.", "Gamewright Hall", "Cardboard Kings"),
    ),
    Category(
        "Kitchen Tools", "{adj} {noun}{variant}",
        ("Stainless Steel", "Cast Iron", "Nonstick", "Bamboo", "Silicone", "Carbon Steel", "Ceramic", "Copper",
         "Enamelled", "Forged"),
        ("Chef's Knife", "Frying Pan", "Saucepan", "Cutting Board", "Whisk", "Dutch Oven", "Spatula", "Mixing Bowl"),
        ("", " (Small)", " (Large)"),
        ("Hearth & Hone", "Copperline", "Mise", "Little Kitchen", "Sous"),
    ),
    Category(
        "Indoor Plants", "{adj} {noun}{variant}",
        ("Variegated", "Dwarf", "Trailing", "Giant", "Pink", "Golden", "Silver", "Compact", "Rare", "Velvet"),
        ("Monstera", "Pothos", "Snake Plant", "Fiddle Leaf Fig", "Peace Lily", "ZZ Plant", "Calathea",
         "Rubber Plant"),
        (" in 12 cm Pot", " in 17 cm Pot", " in Hanging Basket"),
        ("Green Room", "Leaf & Loam", "Urban Jungle", "Fernhouse", "Potted"),
    ),
    Category(
        "Camera Gear", "{adj} {noun}{variant}",
        ("Lightweight Travel", "Professional", "Weather-Sealed", "Compact", "Full-Frame", "Carbon Fibre",
         "Vintage-Style", "Studio", "Mirrorless", "Street"),
        ("Prime Lens", "Zoom Lens", "Camera Body", "Tripod", "Camera Bag", "Lens Filter", "Flash", "Camera Strap"),
        ("", " (Black)", " (Silver)"),
        ("Lumen", "Aperture Works", "Halide", "Fieldview", "Kodo"),
    ),
    Category(
        "Jazz Records", "{adj} {noun}{variant}",
        ("Blue", "Midnight", "Smoky", "Velvet", "Harlem", "Late-Night", "Cool", "Bebop", "Modal", "Golden Hour"),
        ("Sessions", "Standards", "Quartet Live", "Ballads", "Nocturnes", "Swing Suite", "Trio Recordings",
         "Horizons"),
        (" (Vinyl LP)", " (CD)", " (Remastered Vinyl)"),
        ("Blue Lantern Records", "Night Owl Jazz", "Brass Alley", "Sundown Label", "Basement Tapes"),
    ),
    Category(
        "Hiking & Camping", "{adj} {noun}{variant}",
        ("Ultralight", "Four-Season", "Storm-Proof", "Insulated", "Packable", "Rugged", "Alpine", "Backcountry",
         "Down-Filled", "Expedition"),
        ("Tent", "Sleeping Bag", "Backpack", "Trekking Poles", "Headlamp", "Camping Stove", "Rain Shell",
         "Sleeping Mat"),
        ("", " (Green)", " (Orange)"),
        ("Summit & Co.", "Trailhead", "Wildcamp", "Ridgeline", "Basecamp Supply"),
    ),
    Category(
        "Tea", "{adj} {noun}{variant}",
        ("Darjeeling", "Assam", "Jasmine", "Sencha", "Oolong", "Earl Grey", "Rooibos", "Chamomile", "Matcha",
         "Pu-erh"),
        ("Loose Leaf Tea", "Tea Bags", "Gift Tin", "Tea Sampler", "Cold Brew Tea", "Organic Blend",
         "Pyramid Sachets", "Iced Tea Blend"),
        ("", " (50 g)", " (100 g)"),
        ("Leaf Republic", "Steep & Co.", "Kettle Hill", "Camellia House", "Slow Cup"),
    ),
)


def generate(*, users: int = 1000, items: int = 400, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Generate the example dataset.

    Args:
        users: number of users (ids 1..users).
        items: catalogue size (ids 1..items), at least two per category.
        seed: seed of `numpy.random.default_rng`; the same seed gives identical frames.

    Returns:
        (interactions, items): `user_id, item_id, timestamp` sorted by user then time, and
        `item_id, title, category, brand` sorted by item id. All integer columns are Int64.
    """
    _check(users=users, items=items, seed=seed)
    rng = np.random.default_rng(seed)
    catalogue = _catalogue(items, rng)
    interactions = _interactions(users, catalogue, rng)
    return interactions, catalogue.frame


def write_example(out: Path, *, users: int = 1000, items: int = 400, seed: int = 0) -> dict:
    """Generate the example dataset and write it as a data directory (see `contracts`); returns the card."""
    interactions, catalogue = generate(users=users, items=items, seed=seed)
    return write_data_dir(
        interactions,
        catalogue,
        Path(out),
        source=f"laser_batch.examples.synthetic(seed={seed})",
        input_format="synthetic",
        extra={"synthetic": {"users": users, "items": items, "seed": seed}},
    )


def _check(*, users: int, items: int, seed: int) -> None:
    if users < 1:
        raise ConfigError(f"users={users}: must be at least 1")
    if items < 2 * len(CATEGORIES):
        raise ConfigError(f"items={items}: must be at least {2 * len(CATEGORIES)} (two per category)")
    if seed < 0:
        raise ConfigError(f"seed={seed}: must be non-negative")


@dataclass(frozen=True)
class _Catalogue:
    frame: pl.DataFrame  # item_id, title, category, brand
    item_ids: np.ndarray  # (n,) item id of each internal index
    category_items: list[np.ndarray]  # internal indices of each category
    category_cdf: list[np.ndarray]  # cumulative popularity within each category
    category_weights: np.ndarray  # (C,) how often a category is a favourite
    successor: np.ndarray  # (n,) internal index of the chain successor, -1 at a chain's end


def _catalogue(n_items: int, rng: np.random.Generator) -> _Catalogue:
    n_cat = len(CATEGORIES)
    sizes = [n_items // n_cat + (c < n_items % n_cat) for c in range(n_cat)]
    titles: list[str] = []
    categories: list[str] = []
    brands: list[str] = []
    successor: list[int] = []
    category_items: list[np.ndarray] = []
    category_cdf: list[np.ndarray] = []
    for category, size in zip(CATEGORIES, sizes, strict=True):
        first = len(titles)
        for adj, brand, line in _chains(category, size, rng):
            for k, (noun, variant, edition) in enumerate(line):
                title = category.template.format(adj=adj, noun=noun, variant=variant)
                titles.append(title if edition == 0 else f"{title} (Edition {edition + 1})")
                categories.append(category.name)
                brands.append(brand)
                successor.append(len(titles) if k + 1 < len(line) else -1)
        members = np.arange(first, len(titles))
        weights = 1.0 / (rng.permutation(size) + 1.0) ** ITEM_ZIPF_EXPONENT
        category_items.append(members)
        category_cdf.append(np.cumsum(weights))
    item_ids = rng.permutation(n_items).astype(np.int64) + 1  # ids do not reveal category or chain
    category_weights = 1.0 / (rng.permutation(n_cat) + 1.0) ** CATEGORY_ZIPF_EXPONENT
    frame = pl.DataFrame(
        {"item_id": item_ids, "title": titles, "category": categories, "brand": brands},
        schema={"item_id": pl.Int64, "title": pl.String, "category": pl.String, "brand": pl.String},
    ).sort("item_id")
    return _Catalogue(frame, item_ids, category_items, category_cdf, category_weights / category_weights.sum(),
                      np.asarray(successor, dtype=np.int64))


_Line = tuple[str, str, list[tuple[str, str, int]]]  # adjective, brand, [(noun, variant, edition), ...]


def _chains(category: Category, size: int, rng: np.random.Generator) -> Iterator[_Line]:
    """Yield (adjective, brand, [(noun, variant, edition), ...]) product lines covering `size` items.

    A line keeps one adjective, so its titles are distinct; once an adjective's (noun, variant) pairs run
    out (only for catalogues above ~2400 items) they are reused with an edition number.
    """
    pairs = [(noun, variant) for noun in category.nouns for variant in category.variants]
    queues: dict[str, list[tuple[str, str, int]]] = {}
    editions = dict.fromkeys(category.adjectives, 0)
    adjectives = [category.adjectives[i] for i in rng.permutation(len(category.adjectives))]
    left, index = size, 0
    while left:
        length = min(left, int(rng.integers(CHAIN_LENGTHS[0], CHAIN_LENGTHS[1] + 1)))
        adj = adjectives[index % len(adjectives)]
        brand = category.brands[int(rng.integers(len(category.brands)))]
        line = []
        for _ in range(length):
            if not queues.get(adj):
                queues[adj] = [(*pairs[i], editions[adj]) for i in rng.permutation(len(pairs))]
                editions[adj] += 1
            line.append(queues[adj].pop())
        yield adj, brand, line
        left, index = left - length, index + 1


class _Uniforms:
    """Uniform [0, 1) draws taken from `rng` in blocks: one Python call per draw would dominate the run time."""

    def __init__(self, rng: np.random.Generator, block: int = 8192) -> None:
        self._rng, self._block = rng, block
        self._values: list[float] = []
        self._next = 0

    def __call__(self) -> float:
        if self._next == len(self._values):
            self._values, self._next = self._rng.random(self._block).tolist(), 0
        self._next += 1
        return self._values[self._next - 1]


def _interactions(n_users: int, cat: _Catalogue, rng: np.random.Generator) -> pl.DataFrame:
    n_cat = len(CATEGORIES)
    lengths = rng.integers(MIN_LENGTH, MAX_LENGTH + 1, size=n_users)
    n_favourites = rng.integers(1, 3, size=n_users)
    starts = START_TIME + rng.integers(0, START_SPREAD, size=n_users)
    gaps = rng.integers(*GAP_RANGE, size=int(lengths.sum()))
    uniform = _Uniforms(rng)
    cdfs = [cdf.tolist() for cdf in cat.category_cdf]
    members = [m.tolist() for m in cat.category_items]
    successor = cat.successor.tolist()

    def popular(c: int) -> int:
        cdf = cdfs[c]
        return members[c][min(bisect.bisect_right(cdf, uniform() * cdf[-1]), len(cdf) - 1)]

    sequence: list[int] = []
    for user in range(n_users):
        favourites = rng.choice(n_cat, size=int(n_favourites[user]), replace=False, p=cat.category_weights).tolist()
        seen: set[int] = set()
        prev = popular(favourites[int(uniform() * len(favourites))])
        sequence.append(prev)
        seen.add(prev)
        for _ in range(int(lengths[user]) - 1):
            r = uniform()
            nxt = successor[prev]
            if r >= P_SUCCESSOR or nxt < 0 or nxt in seen:
                any_category = r >= 1.0 - P_ANY_CATEGORY
                for attempt in range(_UNSEEN_TRIES + 1):
                    c = int(uniform() * n_cat) if any_category else favourites[int(uniform() * len(favourites))]
                    nxt = popular(c)
                    if nxt != prev and (nxt not in seen or attempt >= _UNSEEN_TRIES):
                        break
                while nxt == prev:  # every category has at least two items, so this ends
                    nxt = popular(c)
            sequence.append(nxt)
            seen.add(nxt)
            prev = nxt

    user_ids = np.repeat(np.arange(1, n_users + 1, dtype=np.int64), lengths)
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    cumulative = np.cumsum(gaps)
    offsets = cumulative - cumulative[first] + gaps[first]  # per-user running sum of gaps
    timestamps = np.repeat(starts, lengths) + offsets
    return pl.DataFrame(
        {"user_id": user_ids, "item_id": cat.item_ids[np.asarray(sequence, dtype=np.int64)], "timestamp": timestamps},
        schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64},
    )


def main(argv: list[str] | None = None) -> None:
    """Write the example data directory (script entry point)."""
    parser = argparse.ArgumentParser(description="Write the synthetic example data directory.")
    parser.add_argument("out", type=Path, help="output data directory")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        card = write_example(args.out, users=args.users, items=args.items, seed=args.seed)
    except ConfigError as e:
        parser.error(str(e))
    print(f"{args.out}: {card['users']} users, {card['items']} items, {card['interactions']} interactions")


if __name__ == "__main__":
    main()
