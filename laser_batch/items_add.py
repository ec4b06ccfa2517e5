"""`laser-batch items add ARTIFACTS NEW_ITEMS.parquet --out NEW_ARTIFACTS`: new items without retraining. No torch.

A Laser item embedding is the user encoder's embedding of a one-item history: the item's text line, and (with an
M-Former) a prefix from the item's ID vector (`laser.item_id_vector`: its SASRec embedding row, or SASRec's output
for the one-item history). A new item has text but no SASRec row, so it is encoded through the exported graphs with a
fallback ID vector in its place:

- `mean`: the mean of the catalogue's ID vectors (`item_id_vectors.npy`), the ID vector of an "average" item;
- `zeros`: a zero vector, no ID information at all;
- `neighbours`: per new item, the mean ID vector of the `NEIGHBOURS` catalogue items whose item embeddings are
  closest (cosine) to its own; with an M-Former the item is first encoded with `mean`, its neighbours found, and
  then encoded again with their mean ID vector. It places a new item where the items its text resembles are.

The choice is recorded in the manifest; `benchmarks/cold_items.py` measures all three.

With the gated fusion (`laser.fusion = "gated"`) an item's row of `item_matrix.npy` is [SASRec item embedding ;
Laser item embedding] and a user's score is SASRec(u, i) + g * cos / tau; a new item's SASRec part is the fallback
too (the mean SASRec item embedding, or zeros). Its SASRec term is then the user's score of that fallback vector, the
same kind of "no information" score for every new item, and only g * cos / tau tells new items apart: at g = 0 (no
epoch beat SASRec, so the fusion kept SASRec's ranking) every new item gets the same SASRec term and text cannot lift
one above another; with `mean` it lands near the user's average item score (the middle of the ranking, plus its
text term), with `zeros` at 0, which is above or below the catalogue depending on the user's state. With
`neighbours` the SASRec part is the mean SASRec embedding of the item's text neighbours, so SASRec itself scores the
new item as it scores the items it resembles, even at g = 0.

The output is a new artefact directory: every file of ARTIFACTS, with the new rows appended to `item_matrix.npy`,
`item_ids.parquet` (`train_interactions` 0), `items.parquet` and `item_id_vectors.npy`, and a new manifest with every
file's checksum, `parent_manifest_sha256` and the record of each addition. It is written into a hidden temporary
directory next to OUT and renamed into place only when complete: an interrupted `items add` leaves ARTIFACTS as it was
and no OUT.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl

from laser_batch import __version__
from laser_batch.artifacts import (
    ITEM_ID_VECTORS,
    ITEM_IDS,
    ITEM_MATRIX,
    ITEMS_TEXT,
    MANIFEST,
    TOKENIZER,
    TRAIN_COUNTS,
    file_record,
    load_manifest,
    manifest_sha256,
    providers,
    session,
)
from laser_batch.contracts import first_line
from laser_batch.errors import ArtifactError, InputError
from laser_batch.files import replace_directory
from laser_batch.inputs import is_id
from laser_batch.sequences import length_batches

logger = logging.getLogger(__name__)

FALLBACKS = ("mean", "zeros", "neighbours")
NEIGHBOURS = 10  # `neighbours`: catalogue items whose ID vectors a new item's fallback averages
ALIGNS = ("linear", "none")
ALIGN_ITEMS = 2048  # catalogue items re-encoded to fit the alignment
CHECK_ITEMS = 64  # with --align none: catalogue items re-encoded only to measure the drift
RIDGE = (1e-3, 1e-2, 1e-1, 1.0)  # the alignment's ridge penalties (times items / width), chosen on held-out items


def add_items(artifacts: Path, new_items: Path, out: Path, *, id_vector: str = "neighbours", align: str = "linear",
              align_items: int = ALIGN_ITEMS, overwrite: bool = False, batch_size: int = 32, threads: int = 0) -> dict:
    """Encode the items of NEW_ITEMS with the artefacts' graphs and write ARTIFACTS + them to OUT; returns the manifest.

    Args:
        artifacts: Laser artefacts (`laser-batch export`, or an earlier `items add`).
        new_items: Parquet with `item_id`, `title` and the text columns that the artefacts' items.parquet has.
        out: the artefact directory to write (not ARTIFACTS itself).
        id_vector: the fallback ID vector of a new item, "mean" or "zeros" (module docstring).
        align: "linear": map the graphs' encodings into the item matrix's space by an affine map fitted on
            `align_items` catalogue items (kept only when it beats no map on held-out catalogue items); "none".
        overwrite: replace an existing OUT.
        batch_size: items per graph run; threads: ONNX Runtime intra-op threads (0: its default).

    Raises:
        InputError: a bad NEW_ITEMS (unreadable, missing columns, ids of the other type, null, repeated or already in
            the catalogue), a bad option, or OUT exists without `overwrite`.
        ArtifactError: artefacts that cannot encode new items (SASRec-only, users centred apart from items, no ID
            vectors for `mean`), a failed checksum, or graphs that do not give the catalogue's own rows back.
    """
    started = time.perf_counter()
    artifacts, new_items, out = Path(artifacts), Path(new_items), Path(out)
    if id_vector not in FALLBACKS:
        raise InputError(f"--id-vector {id_vector}: expected one of {', '.join(FALLBACKS)}")
    if align not in ALIGNS:
        raise InputError(f"--align {align}: expected one of {', '.join(ALIGNS)}")
    if align_items < 2:
        raise InputError(f"--align-items {align_items}: expected at least 2")
    if out.resolve() == artifacts.resolve():
        raise InputError(f"--out {out}: must not be ARTIFACTS itself (the parent artefacts stay as they are)")
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists; pass --overwrite to replace it")
    manifest = load_manifest(artifacts)  # checksums: the parent must be intact
    settings = manifest["settings"]
    if manifest["kind"] != "laser":
        raise ArtifactError(f"{artifacts}: {manifest['kind']}-only artefacts cannot encode new items (no text "
                            "encoder; a new item has no ID embedding); export a Laser run")
    if settings.get("center_users"):
        raise ArtifactError(f"{artifacts}: users are centred apart from items (laser.center_users), and the exported "
                            "user encoder centres as users: it cannot encode items")
    catalogue = pl.read_parquet(artifacts / ITEM_IDS).sort("index")
    items_text = pl.read_parquet(artifacts / ITEMS_TEXT)
    new = _read_new_items(new_items, catalogue, items_text)
    matrix = np.load(artifacts / ITEM_MATRIX)
    encoder = _ItemEncoder(artifacts, manifest, threads=threads)
    ids = np.load(artifacts / ITEM_ID_VECTORS) if (artifacts / ITEM_ID_VECTORS).exists() else None
    if encoder.mformer is not None and ids is None and id_vector == "mean":
        raise ArtifactError(f"{artifacts}: no {ITEM_ID_VECTORS} (exported before laser-batch recorded it); export "
                            "again, or use --id-vector zeros")
    fused = settings.get("fusion", "none") == "gated"
    if encoder.mformer is not None and ids is None and align == "linear":
        raise ArtifactError(f"{artifacts}: no {ITEM_ID_VECTORS} (exported before laser-batch recorded it): the "
                            "catalogue cannot be re-encoded for --align linear; export again, or use --align none")
    width = encoder.width
    laser_rows = matrix[:, matrix.shape[1] - width:].astype(np.float32)  # the fused matrix: its Laser part
    mapping, alignment = None, None
    if encoder.mformer is None or ids is not None:
        mapping, alignment = _fit_alignment(encoder, items_text, laser_rows, ids, batch_size=batch_size,
                                            max_items=align_items if align == "linear" else CHECK_ITEMS,
                                            fit=align == "linear")
    first_pass = "mean" if id_vector == "neighbours" else id_vector  # neighbours need an embedding to start from
    fallback = _fallback(ids, first_pass, encoder.id_size) if encoder.mformer is not None else None
    if fallback is not None:
        fallback = np.broadcast_to(fallback, (new.height, encoder.id_size))
    embeddings = _encode_aligned(encoder, new, fallback, mapping, batch_size)  # (M, D_llm)
    near = None
    if id_vector == "neighbours":
        near = _nearest(embeddings, laser_rows, NEIGHBOURS)
        if fallback is not None:  # each new item's ID vector from its text neighbours; encoded again with it
            fallback = ids[near].astype(np.float32).mean(axis=1)
            embeddings = _encode_aligned(encoder, new, fallback, mapping, batch_size)
    rows = embeddings
    d_id = matrix.shape[1] - width
    if fused:  # the new item's SASRec part: the fallback of the SASRec item embeddings (item_matrix's first d_id)
        sasrec_rows = matrix[:, :d_id].astype(np.float32)
        sasrec_fallback = (sasrec_rows[near].mean(axis=1) if near is not None
                           else np.broadcast_to(_fallback(sasrec_rows, id_vector, d_id), (len(new), d_id)))
        rows = np.concatenate([sasrec_fallback, embeddings], axis=1)

    first = catalogue.height + 1
    record = {"items": new.height, "first_index": first, "id_vector": id_vector,
              "id_vector_used_by": [*(["mformer"] if fallback is not None else []), *(["sasrec"] if fused else [])],
              "source": str(new_items.resolve()), "parent_manifest_sha256": manifest_sha256(artifacts),
              "align": align, "alignment": alignment, "created_by": f"laser-batch {__version__}"}
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for name in manifest["files"]:
            shutil.copyfile(artifacts / name, partial / name)
        np.save(partial / ITEM_MATRIX, np.concatenate([matrix, rows.astype(matrix.dtype)]))
        if ids is not None:
            added = fallback if fallback is not None else np.zeros((len(new), ids.shape[1]), dtype=ids.dtype)
            np.save(partial / ITEM_ID_VECTORS, np.concatenate([ids, added.astype(ids.dtype)]))
        appended = pl.DataFrame({"index": np.arange(first, first + new.height), "item_id": new["item_id"]},
                                schema={"index": catalogue.schema["index"], "item_id": catalogue.schema["item_id"]})
        if TRAIN_COUNTS in catalogue.columns:
            appended = appended.with_columns(pl.lit(0, dtype=catalogue.schema[TRAIN_COUNTS]).alias(TRAIN_COUNTS))
        pl.concat([catalogue, appended]).write_parquet(partial / ITEM_IDS)
        pl.concat([items_text, new.select(items_text.columns)]).write_parquet(partial / ITEMS_TEXT)
        record["seconds"] = round(time.perf_counter() - started, 2)
        child = {**manifest, "settings": {**settings, "num_items": catalogue.height + new.height,
                                          "sasrec_num_items": settings.get("sasrec_num_items", catalogue.height)},
                 "parent_manifest_sha256": record["parent_manifest_sha256"],
                 "items_added": [*manifest.get("items_added", []), record]}
        write_manifest(partial, child)
        load_manifest(partial)  # what was written verifies
        replace_directory(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("%s: %d items added to %s (%d -> %d), ID vector %s", out, new.height, artifacts, catalogue.height,
                catalogue.height + new.height, id_vector)
    return child


def write_manifest(directory: Path, manifest: dict) -> None:
    """List every file of `directory` with its size and sha256, then write manifest.json (last)."""
    manifest["files"] = {p.name: file_record(directory, p.name) for p in sorted(directory.iterdir())
                         if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _encode_aligned(encoder: _ItemEncoder, items: pl.DataFrame, id_vectors: np.ndarray | None,
                    mapping: np.ndarray | None, batch_size: int) -> np.ndarray:
    """The graphs' embeddings of `items`, mapped into the item matrix's space when an alignment was kept."""
    embeddings = encoder.encode(items, id_vectors, batch_size=batch_size)
    return embeddings if mapping is None else _unit(_affine(embeddings) @ mapping)


def _nearest(embeddings: np.ndarray, catalogue: np.ndarray, k: int) -> np.ndarray:
    """(M, k) rows of `catalogue` (N, D) closest by cosine to each of `embeddings` (M, D)."""
    similarity = _unit(embeddings) @ _unit(catalogue).T
    k = min(k, catalogue.shape[0])
    return np.argpartition(-similarity, k - 1, axis=1)[:, :k]


def _fallback(vectors: np.ndarray | None, kind: str, size: int) -> np.ndarray:
    """The fallback ID vector (size,) float32: the mean of `vectors` (N, size), or zeros."""
    if kind == "zeros":
        return np.zeros(size, dtype=np.float32)
    return vectors.astype(np.float32).mean(axis=0)


def _read_new_items(path: Path, catalogue: pl.DataFrame, items_text: pl.DataFrame) -> pl.DataFrame:
    """NEW_ITEMS with the columns of items.parquet, in their types; every bad input is one InputError."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        new = pl.read_parquet(path)
    except Exception as e:
        raise InputError(f"{path}: not a readable Parquet file ({first_line(e)})") from e
    missing = [c for c in items_text.columns if c not in new.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}: the model's item text is built from "
                         f"{', '.join(items_text.columns)}")
    if new.height == 0:
        raise InputError(f"{path}: no rows, no items to add")
    item_dtype = catalogue.schema["item_id"]
    given = new.schema["item_id"]
    if not is_id(given) or (given == pl.String) != (item_dtype == pl.String):
        raise InputError(f"{path}: column 'item_id' has type {given}, but the model's item ids are {item_dtype}")
    if new["item_id"].null_count():
        raise InputError(f"{path}: column 'item_id' has {new['item_id'].null_count()} null(s)")
    new = new.with_columns(pl.col("item_id").cast(item_dtype))
    repeated = new.filter(pl.col("item_id").is_duplicated())["item_id"]
    if repeated.len():
        raise InputError(f"{path}: item_id {repeated[0]!r} appears more than once")
    known = new.filter(pl.col("item_id").is_in(catalogue["item_id"].implode()))["item_id"]
    if known.len():
        more = f" and {known.len() - 1} more" if known.len() > 1 else ""
        raise InputError(f"{path}: item_id {known[0]!r}{more} already in the catalogue of the artefacts (items add "
                         "adds new items only)")
    try:
        return new.select(pl.col(c).cast(items_text.schema[c]) for c in items_text.columns)
    except Exception as e:
        raise InputError(f"{path}: a text column does not have the type of the artefacts' items.parquet "
                         f"({first_line(e)})") from e


class _ItemEncoder:
    """Items (rows of an items table) -> Laser item embeddings, through the exported M-Former and user encoder."""

    def __init__(self, directory: Path, manifest: dict, *, threads: int) -> None:
        import tokenizers

        from laser_batch.config import TextConfig

        chosen = providers("cpu")
        graphs, settings = manifest["graphs"], manifest["settings"]
        self.mformer = session(directory / graphs["mformer"]["file"], chosen, threads=threads) \
            if "mformer" in graphs else None
        self.user_encoder = session(directory / graphs["user_encoder"]["file"], chosen, threads=threads)
        self.takes_prefix = "prefix" in [i.name for i in self.user_encoder.get_inputs()]
        self.id_size = self.mformer.get_inputs()[0].shape[2] if self.mformer is not None else 0  # d_id
        self.tokenizer = tokenizers.Tokenizer.from_file(str(directory / TOKENIZER))
        self.text_config, self.pad_id = TextConfig(**settings["text"]), settings["pad_id"]

    def encode(self, items: pl.DataFrame, id_vectors: np.ndarray | None, *, batch_size: int = 32) -> np.ndarray:
        """(M, D) embeddings of the rows of `items`, each with ID vector `id_vectors` (M, d) or (d,) (with an
        M-Former)."""
        from laser_batch.text import TextEncoder

        text = TextEncoder(self.tokenizer, items, self.text_config, pad_id=self.pad_id)
        rows = np.arange(1, items.height + 1)
        if id_vectors is not None and id_vectors.ndim == 1:
            id_vectors = np.broadcast_to(id_vectors, (items.height, len(id_vectors)))
        out = None
        for batch in length_batches(text.lengths(rows[:, None]), batch_size):
            input_ids, attention_mask = text.encode_items(rows[batch])
            feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
            if self.takes_prefix:
                ids = np.ascontiguousarray(id_vectors[batch][:, None, :], dtype=np.float32)  # (b, 1, d_id)
                feeds["prefix"] = self.mformer.run(["prefix"], {"id_vectors": ids, "id_mask": np.ones(
                    (len(batch), 1), dtype=np.int64)})[0]
            embedding = self.user_encoder.run(["embedding"], feeds)[0]
            if out is None:
                out = np.empty((items.height, embedding.shape[1]), dtype=np.float32)
            out[batch] = embedding
        return out

    @property
    def width(self) -> int:
        """D: the width of the user encoder's embedding."""
        return int(self.user_encoder.get_outputs()[0].shape[-1])


def _fit_alignment(encoder: _ItemEncoder, items_text: pl.DataFrame, laser_rows: np.ndarray, ids: np.ndarray | None,
                   *, max_items: int, batch_size: int, fit: bool, seed: int = 0) -> tuple[np.ndarray | None, dict]:
    """(affine map (D + 1, D) or None, its record): from the graphs' encodings of catalogue items to their rows.

    The catalogue's rows were encoded during training, at the start of the epoch whose weights were kept, and the
    user side trained on after that; the exported graphs hold the final weights. So re-encoding a catalogue item
    does not give its row back exactly, and a new item encoded by the graphs lies in a drifted space. With `fit`, an
    affine ridge map from re-encoded items (with their own ID vectors) to their rows is fitted; the penalty (or no
    map) is chosen by the mean cosine on a held-out fifth of them, then refitted on all. Without `fit` the drift is
    only measured.
    """
    n = items_text.height
    picked = np.sort(np.random.default_rng(seed).choice(n, size=min(max_items, n), replace=False))
    got = encoder.encode(items_text[picked], ids[picked] if ids is not None else None, batch_size=batch_size)
    target = _unit(laser_rows[picked])
    raw = (_unit(got) * target).sum(1)
    record = {"catalogue_items": len(picked), "reencoded_cosine": {"mean": round(float(raw.mean()), 4),
                                                                   "min": round(float(raw.min()), 4)}}
    if not fit or len(picked) < 5:
        return None, {**record, "map": None}
    order = np.random.default_rng(seed + 1).permutation(len(picked))
    held, train = order[:len(picked) // 5], order[len(picked) // 5:]
    scores = {"none": float(raw[held].mean())}
    for penalty in RIDGE:
        mapping = _ridge(got[train], target[train], penalty)
        scores[f"ridge {penalty:g}"] = float((_unit(_affine(got[held]) @ mapping) * target[held]).sum(1).mean())
    chosen = max(scores, key=scores.get)
    record.update({"held_out_cosine": {k: round(v, 4) for k, v in scores.items()}, "map": chosen})
    if chosen == "none":
        return None, record
    return _ridge(got, target, float(chosen.split()[1])), record


def _ridge(x: np.ndarray, y: np.ndarray, penalty: float) -> np.ndarray:
    """(D + 1, D) W minimising |[x, 1] W - y|^2 + penalty * (n / D) * |W|^2 (the bias column too)."""
    a = _affine(x).astype(np.float64)
    gram = a.T @ a + penalty * len(x) / x.shape[1] * np.eye(a.shape[1])
    return np.linalg.solve(gram, a.T @ y.astype(np.float64)).astype(np.float32)


def _affine(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((len(x), 1), dtype=x.dtype)], axis=1)


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
