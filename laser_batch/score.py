"""The nightly job: users' histories in Parquet -> top-K recommendations in Parquet, on ONNX Runtime. No torch.

    OUT_DIR/part-00000.parquet ...   user_id, rank, item_id, score   (original ids and types; rank 1 = best)
    OUT_DIR/rejects.parquet          user_id, reason
    OUT_DIR/summary.json             counts, rejects by reason, users/s, tokens/s, padding efficiency, provider,
                                     the user-encoder variant (variant, variant_requested, variant_reason)
    OUT_DIR/_SUCCESS                 written last

This module is the local engine: `Recommender` and the loop over chunks. The option checks, OUT's states (new,
resumed, overwritten), the summary and the commit are the job core's (`laser_batch.job`), shared with the Ray
engine.

The input is read in fixed slices of rows (chunk k = rows [k * C, (k + 1) * C)), so memory does not grow
with the number of users and a killed job can be resumed: a chunk is finished when its part file exists
(written to a temporary name, then renamed), and `resume=True` redoes only the unfinished ones. Duplicate
users are found across the whole input with a 64-bit hash of each user id (8 bytes per user).

`Recommender.recommend` is the one batch function (a DataFrame of users -> recommendations + rejects); the
CLI drives it over the chunks and a distributed engine can map it over its blocks.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl

from laser_batch import filters as item_filters
from laser_batch import job, metrics
from laser_batch.artifacts import ITEM_IDS, ITEM_MATRIX, Embedder, check_manifest_sha256, manifest_sha256
from laser_batch.files import atomic_write
from laser_batch.filters import ItemFilters
from laser_batch.incremental import (
    FINGERPRINTS,
    Previous,
    Setup,
    check_previous,
    copied_counts,
    fingerprints,
    merge,
    side_file,
)
from laser_batch.incremental import prepare as prepare_incremental
from laser_batch.inputs import check_users_schema, filesystem, group_interactions, input_files
from laser_batch.job import DEFAULT_MAX_BATCH_TOKENS, JobOptions, Progress
from laser_batch.output import BECAUSE, OutputOptions
from laser_batch.sequences import length_batches

logger = logging.getLogger(__name__)

RECS_SCHEMA_COLUMNS = ("user_id", "rank", "item_id", "score")
STATS_DIR = "_stats"
WORK_DIR = "_work"


class Recommender:
    """Loads the exported graphs once; `recommend` maps a DataFrame of users to recommendations and rejects.

    Args:
        artifacts: a directory written by `laser-batch export` (checksums verified on load).
        top_k: recommendations per user.
        batch_size: users per graph run (users are grouped by text length to cut padding).
        max_batch_tokens: padded tokens per graph run (batch users x the longest one's tokens, the width of
            the last graph's input); a batch ends at whichever of the two limits comes first, and a single user
            longer than the budget runs alone.
        device: "auto" (CUDA when ONNX Runtime has it, else CPU), "cpu" or "cuda" (an error without CUDA).
        threads: ONNX Runtime intra-op threads (0: its default).
        include_history: also recommend items already in the history (excluded by default).
        variant: the user encoder (`artifacts.resolve_variant`): "auto" (on the CPU the export's recommended quantised
            variant, else the exported graph), "fp32" (the exported graph; "" too) or a quantised scheme.
        io_binding: run the graphs with ONNX Runtime I/O binding (the M-Former's prefix stays on the device for
            the user encoder); None: on with CUDA, off on the CPU, where it gives the same numbers.
        filters: business filters and backfill (`laser_batch.filters.prepare`); None: none.
        output: explanations, item columns, score scale and layout (`laser_batch.output.prepare`); None: the plain
            long output.
        previous: a previous output's fingerprints (`laser_batch.incremental`): `recommend` copies the rows of the
            users whose fingerprint it holds instead of encoding them; None: every user is encoded.
    """

    def __init__(self, artifacts: Path, *, top_k: int = 20, batch_size: int = 64,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, device: str = "auto", threads: int = 0,
                 include_history: bool = False, variant: str = "auto", io_binding: bool | None = None,
                 filters: ItemFilters | None = None, output: OutputOptions | None = None,
                 previous: Previous | None = None) -> None:
        job.check_positive({"--top-k": top_k, "--batch-size": batch_size, "--max-batch-tokens": max_batch_tokens})
        self.artifacts = Path(artifacts)
        self.embedder = Embedder(self.artifacts, device=device, threads=threads, variant=variant,
                                 io_binding=io_binding)
        self.top_k, self.batch_size, self.include_history = top_k, batch_size, include_history
        self.max_batch_tokens = max_batch_tokens
        self.item_matrix = np.ascontiguousarray(np.load(self.artifacts / ITEM_MATRIX).astype(np.float32))  # (N, D)
        ids = pl.read_parquet(self.artifacts / ITEM_IDS).sort("index")
        self.item_ids = ids["item_id"]  # original id of internal item j + 1
        self.id_map = pl.DataFrame({"item_id": self.item_ids,
                                    "_internal": np.arange(1, len(ids) + 1, dtype=np.int64)})
        self.providers = self.embedder.providers
        self.manifest_sha256 = manifest_sha256(self.artifacts)
        self.filters = filters if filters is not None else ItemFilters()
        self.output = output if output is not None else OutputOptions()
        self.previous = previous

    @property
    def item_id_dtype(self) -> pl.DataType:
        return self.item_ids.dtype

    def recommend(self, users: pl.DataFrame, seen: SeenUsers | None = None, fingerprints: pl.Series | None = None
                  ) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
        """Top-K recommendations for a batch of users.

        Args:
            users: `user_id` + `history` (list of original item ids, oldest first), and optionally `candidates`
                (list of item ids: rank only these; null: every item).
            seen: the user ids met before this batch (their rows are duplicates).
            fingerprints: each row's fingerprint (`incremental.fingerprints`); with `previous`, the users whose
                fingerprint is unchanged get their previous rows (counted as `reused`).

        Returns:
            (recommendations: user_id, rank, item_id, score (+ source with backfill, because_item_id, item columns;
            or one row per user with `layout = "list"`); rejects: user_id, reason; stats dict).
        """
        stats: Counter = Counter(users_in=users.height)
        users = users.with_row_index("_row")
        reason = self._reasons(users, seen)
        # Map ids; unknown items are dropped (and counted); histories left empty are rejected.
        lengths = users["history"].list.len().fill_null(0).to_numpy()
        flat = users.select("_row", pl.col("history").cast(pl.List(self.item_id_dtype))).explode("history")
        flat = flat.filter(pl.col("history").is_not_null()).join(
            self.id_map, left_on="history", right_on="item_id", how="left", maintain_order="left")
        known = flat.filter(pl.col("_internal").is_not_null())
        stats["unknown_items_dropped"] = flat.height - known.height
        grouped = known.group_by("_row", maintain_order=True).agg(pl.col("_internal"))
        has_known = np.zeros(users.height, dtype=bool)
        has_known[grouped["_row"].to_numpy()] = True
        reason = np.where((reason == "") & (lengths == 0), "empty history", reason)
        reason = np.where((reason == "") & ~has_known, "no known items", reason)
        keep = grouped.filter(pl.Series(reason[grouped["_row"].to_numpy()] == ""))
        rows = keep["_row"].to_numpy()
        histories = [np.asarray(h, dtype=np.int64) for h in keep["_internal"].to_list()]
        restrictions = self.filters.restrictions(
            users["user_id"].gather(rows),
            users[item_filters.CANDIDATES].gather(rows) if item_filters.CANDIDATES in users.columns else None,
            self.id_map, stats)
        order = pl.DataFrame({"user_id": users["user_id"].gather(rows), "_row": rows})
        copied = None
        if self.previous is not None and fingerprints is not None and len(rows):
            hit = self.previous.matches(order["user_id"], fingerprints.gather(rows))
            if hit.any():  # these users skip the model: their rows are last night's
                copied = self.previous.rows(order["user_id"].filter(pl.Series(hit)))
                rows, histories = rows[~hit], [h for h, h_ok in zip(histories, ~hit, strict=True) if h_ok]
                restrictions = restrictions.keep(~hit)
                stats["reused"] = int(hit.sum())
        if len(rows):
            top, scores, filled, backfilled = self._top_k(histories, stats, restrictions)
        else:
            top, scores, filled = np.empty((0, 1), dtype=np.int64), np.empty((0, 1)), np.zeros((0, 1), dtype=bool)
            backfilled = filled
        # Nothing at rank 1: every item was excluded (e.g. the history covers the catalogue) and none backfilled.
        eligible = filled[:, 0]
        reason[rows[~eligible]] = "no eligible items"
        rows, top, scores, filled, backfilled = (a[eligible] for a in (rows, top, scores, filled, backfilled))
        histories = [h for h, ok in zip(histories, eligible, strict=True) if ok]

        rejected = reason != ""
        rejects = pl.DataFrame({"user_id": users["user_id"].filter(pl.Series(rejected)),
                                "reason": reason[rejected].astype(str)}, schema={
            "user_id": users.schema["user_id"], "reason": pl.String})
        for r, n in Counter(reason[rejected].tolist()).items():
            stats[f"rejected:{r}"] = n
        stats["scored"] = len(rows) + stats["reused"]
        stats["short_of_k"] = int((filled.sum(1) < self.top_k).sum())  # fewer eligible items than K: all of them
        if self.filters.backfill:
            stats["backfilled_users"] = int(backfilled.any(1).sum())
            stats["backfill_items"] = int(backfilled.sum())
        recs = self._frame(users["user_id"], rows, top, scores, filled, backfilled, histories)
        if copied is not None:
            stats.update(copied_counts(copied, top_k=self.top_k, layout=self.output.layout,
                                       backfill=self.filters.backfill))
            recs = merge(recs, copied, order)
        return recs, rejects, dict(stats)

    def _frame(self, user_ids: pl.Series, rows: np.ndarray, top: np.ndarray, scores: np.ndarray, filled: np.ndarray,
               backfilled: np.ndarray, histories: list[np.ndarray]) -> pl.DataFrame:
        """The recommendations of the scored users `rows` (the batch's rows): one row per filled slot, best first."""
        k = top.shape[1]
        valid = filled.reshape(-1)  # fewer eligible items than k: the user gets all of them
        columns = top.reshape(-1)[valid]
        recs = pl.DataFrame({
            "user_id": user_ids.gather(np.repeat(rows, k)[valid]),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(rows))[valid],
            "item_id": self.item_ids.gather(columns),
            "score": scores.reshape(-1)[valid].astype(np.float32),
        })
        if self.filters.backfill:
            recs = recs.with_columns(pl.Series(item_filters.SOURCE, np.where(backfilled.reshape(-1)[valid], "backfill",
                                                                             "model"), dtype=pl.String))
        if self.output.explain:
            because = self.output.because(top, filled, histories, self.item_matrix).reshape(-1)[valid]
            recs = recs.with_columns(self.item_ids.gather(because).alias(BECAUSE))
        return self.output.finish(recs, columns)

    def _reasons(self, users: pl.DataFrame, seen: SeenUsers | None) -> np.ndarray:
        """Per row: "" (fine so far), "null user_id" or "duplicate user" (the first occurrence is kept)."""
        null = users["user_id"].is_null().to_numpy()
        hashes = users["user_id"].hash(seed=0).to_numpy()
        first = ~users.select(pl.col("user_id").is_duplicated() & ~pl.col("user_id").is_first_distinct()
                              ).to_series().to_numpy()
        before = seen.contains(hashes) if seen is not None else np.zeros(users.height, dtype=bool)
        reason = np.full(users.height, "", dtype=object)
        reason[(~first | before) & ~null] = "duplicate user"
        reason[null] = "null user_id"
        return reason

    def _top_k(self, histories: list[np.ndarray], stats: Counter, restrictions: item_filters.Restrictions
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(top item rows (B, k), their scores (B, k), filled (B, k): a slot holds an item (a user with fewer than k
        eligible items has empty ones), backfilled (B, k): the slot was filled by `--backfill popular`)."""
        k = min(self.top_k, self.item_matrix.shape[0])
        top = np.zeros((len(histories), k), dtype=np.int64)
        best = np.full((len(histories), k), -np.inf, dtype=np.float32)
        filled = np.zeros((len(histories), k), dtype=bool)
        backfilled = np.zeros((len(histories), k), dtype=bool)
        if self.embedder.kind == "laser":
            lengths = self.embedder.text.lengths(histories)
        else:
            lengths = np.fromiter((min(len(h), self.embedder.max_len) for h in histories), dtype=np.int64)
        for batch in length_batches(lengths, self.batch_size, max_tokens=self.max_batch_tokens):
            hist = [histories[i] for i in batch]
            feeds = self.embedder.feeds(hist)
            mask = feeds.get("attention_mask", feeds.get("item_ids"))
            stats["real_tokens"] += int((mask != 0).sum())
            stats["padded_tokens"] += int(mask.size)
            users = self.embedder.run(feeds)  # (b, D)
            scores = users @ self.item_matrix.T  # (b, N)
            normaliser = self.output.log_normaliser(scores)  # --score prob: over the whole catalogue, unfiltered
            if not self.include_history:
                metrics.exclude_items(scores, hist)
            self.filters.mask(scores, batch, restrictions)  # every filter is a mask before the top K
            chosen, chosen_scores = metrics.top_k(scores, k)
            present = np.isfinite(chosen_scores)
            if self.filters.backfill:
                added = self.filters.fill(chosen, present, hist, batch, restrictions)  # fills `chosen` in place
                rows, slots = np.nonzero(added)
                # A backfilled item carries the model's own score for it; its rank comes from popularity.
                chosen_scores[rows, slots] = np.einsum("id,id->i", users[rows], self.item_matrix[chosen[rows, slots]])
                present |= added
                backfilled[batch] = added
            top[batch], filled[batch] = chosen, present
            best[batch] = self.output.finish_scores(chosen_scores, normaliser)
        return top, best, filled, backfilled


def score_users(users_path: Path, artifacts: Path, out: Path, *, on_chunk: Callable[[Progress], None] | None = None,
                **options) -> dict:
    """Run the job over `users_path` (or grouped interactions) and write OUT_DIR; returns the summary.

    `users_path` is one Parquet file or a directory of Parquet files with one schema (`laser_batch.inputs`), read as
    their concatenation in name order. A resumed job must see the same files, sizes and modification times.
    `options`: the fields of `laser_batch.job.JobOptions` (top_k, batch_size, ..., resume, overwrite,
    expect_manifest_sha256, previous); `on_chunk(progress)` is called after each chunk is committed.
    """
    opts = JobOptions(**options)
    users_path, out = Path(users_path), Path(out)
    started = time.perf_counter()
    fs, root = filesystem(str(out))
    job.check_out(fs, root, str(out), resume=opts.resume, overwrite=opts.overwrite)  # before any model work
    before_success = opts.before_success(fs, root, str(out))
    recommender, setup, files = prepare_job(users_path, Path(artifacts), out, opts)
    variant = recommender.embedder.variant
    record = opts.record({"input": str(users_path.resolve()), "input_files": [
        [f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}, recommender.manifest_sha256, variant.name)
    job.open_out(fs, root, str(out), record, resume=opts.resume, keep_finished=True)
    chunk_size = opts.chunk_size
    source = [_grouped_interactions(fs, files, out)] if opts.interactions else files
    rows = pl.scan_parquet(source).select(pl.len()).collect().item()
    job.check_rows(rows, users_path)
    chunks = max(1, math.ceil(rows / chunk_size))
    (out / STATS_DIR).mkdir(exist_ok=True)
    (out / FINGERPRINTS).mkdir(exist_ok=True)
    done = [k for k in range(chunks) if (out / _part(k)).exists()]
    first_open = next((k for k in range(chunks) if k not in set(done)), chunks)
    seen = _seen_before(source, first_open * chunk_size)
    finished = sum(min(chunk_size, rows - k * chunk_size) for k in done)
    logger.info("scoring %d users in %d chunk(s) of %d on %s, variant %s (%s)%s%s", rows, chunks, chunk_size,
                recommender.providers[0], variant.name, variant.reason,
                f" (resuming: {len(done)} done)" if done else "",
                f"; reusing unchanged users of {opts.previous}" if setup.previous is not None
                else f"; every user is scored: {setup.reason}" if setup.reason else "")
    for k in range(chunks):
        if (out / _part(k)).exists():
            continue
        users = pl.scan_parquet(source).slice(k * chunk_size, chunk_size).collect()
        if k != first_open:  # chunks finish in order; a later finished one cannot precede an open one
            seen = _seen_before(source, k * chunk_size)
        prints = fingerprints(users, setup.key)
        recs, rejects, stats = recommender.recommend(users, seen, prints)
        seen.add(users["user_id"].drop_nulls().hash(seed=0).to_numpy())
        first_open = k + 1
        atomic_write(out / STATS_DIR / f"rejects-{k:05d}.parquet", rejects.write_parquet)
        job.write_text(fs, f"{root}/{STATS_DIR}/stats-{k:05d}.json", json.dumps(stats))
        atomic_write(out / FINGERPRINTS / _part(k), side_file(users, prints, recs).write_parquet)
        atomic_write(out / _part(k), recs.write_parquet)  # the commit point of chunk k
        finished += users.height
        if on_chunk is not None:
            on_chunk(Progress(chunk=k, chunks=chunks, users=users.height, done=finished, total=rows))
    return _finish(fs, root, out, chunks, recommender, time.perf_counter() - started, rows, setup,
                   before_success, job.variant_summary(opts.variant, variant))


def prepare_job(users_path: Path, artifacts: Path, out: Path, opts: JobOptions) -> tuple[Recommender, Setup,
                                                                                        list[Path]]:
    """Every check of a local job before it touches OUT: pinned manifest, input schema, `--variant`, filters, output
    options, `--previous`, then the model (its checksums verified, the variant resolved on the provider its sessions
    got, and with it the fingerprints' key). Returns (recommender, incremental setup, input files). Shared with
    `laser_batch.plan` (`score --dry-run`)."""
    if opts.expect_manifest_sha256 is not None:
        check_manifest_sha256(artifacts, opts.expect_manifest_sha256)
    schema = check_users_schema(users_path, interactions=opts.interactions)
    opts.check_variant(artifacts)
    prepared = opts.item_filters(artifacts)
    prepared.check_input(schema, users_path)
    output = opts.output_options(artifacts)
    previous = check_previous(opts, str(out))
    recommender = Recommender(artifacts, **opts.recommender(), filters=prepared, output=output)
    setup = prepare_incremental(opts, recommender.manifest_sha256, schema, previous,
                                variant=recommender.embedder.variant.name)
    recommender.previous = setup.previous
    check_users_schema(users_path, recommender.item_id_dtype, interactions=opts.interactions)
    return recommender, setup, input_files(users_path)


def _part(k: int) -> str:
    return f"part-{k:05d}.parquet"


def _grouped_interactions(fs, files: list[Path], out: Path) -> Path:
    """user_id, item_id, timestamp rows -> OUT_DIR/_work/users.parquet (user_id, history oldest first), once."""
    target = out / WORK_DIR / "users.parquet"
    if not target.exists():
        target.parent.mkdir(exist_ok=True)
        group_interactions(fs, [str(f) for f in files], str(target))
    return target


class SeenUsers:
    """The 64-bit hashes of the user ids met so far, as sorted runs, each at least twice as long as the next (a
    log-structured merge: a new run is merged into the one before it until that holds). So there are at most
    log2(users) runs, each hash is moved O(log chunks) times in all, and a lookup is one binary search per run.

    One sorted array grown by `np.union1d` per chunk costs O(users) per chunk, O(users^2 / chunk) in all: measured
    with SASRec-only artefacts (2 threads), it took 65% of a 3M-user job's time (9.8k users/s against 21k at 1M),
    and its temporaries (~4 copies of the array) raised the peak memory at 3M users to 524 MB (381 at 1M).
    """

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []  # sorted uint64; runs[i] at least twice as long as runs[i + 1]

    def add(self, hashes: np.ndarray) -> None:
        run = np.unique(hashes)
        while self.runs and len(self.runs[-1]) < 2 * len(run):
            run = np.concatenate([self.runs.pop(), run])
            run.sort(kind="stable")  # two sorted runs: a linear merge
        if len(run):
            self.runs.append(run)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        found = np.zeros(len(hashes), dtype=bool)
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, hashes), len(run) - 1)
            found |= run[at] == hashes
        return found


def _seen_before(source: list[Path], rows: int) -> SeenUsers:
    """The (non-null) user ids in the first `rows` rows."""
    seen = SeenUsers()
    if rows:
        ids = pl.scan_parquet(source).select("user_id").slice(0, rows).collect()["user_id"].drop_nulls()
        seen.add(ids.hash(seed=0).to_numpy())
    return seen


def _finish(fs, root: str, out: Path, chunks: int, recommender: Recommender, seconds: float, rows: int,
            setup: Setup, before_success: Callable[[], None] | None, variant: dict) -> dict:
    totals: Counter = Counter()
    for k in range(chunks):
        totals.update(json.loads((out / STATS_DIR / f"stats-{k:05d}.json").read_text()))
    summary = job.summarize(
        totals, rows=rows, chunks=chunks, seconds=seconds, provider=recommender.providers[0],
        providers=recommender.providers, model=str(recommender.artifacts), model_kind=recommender.embedder.kind,
        manifest_sha256=recommender.manifest_sha256, top_k=recommender.top_k, batch_size=recommender.batch_size,
        max_batch_tokens=recommender.max_batch_tokens, io_binding=recommender.embedder.io_binding, **variant,
        filters=recommender.filters.info, incremental=setup.summary(totals))
    rejects = [pl.read_parquet(p) for p in sorted((out / STATS_DIR).glob("rejects-*.parquet"))]
    job.commit(fs, root, rejects, summary, scratch=f"{root}/{WORK_DIR}", before_success=before_success)
    return summary
