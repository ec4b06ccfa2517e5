"""`score --dry-run`: every check of a scoring job, a timed probe batch of real users, and the plan. Writes nothing.

The checks are the local engine's own (`score.prepare_job`): OUT's state, the pinned manifest, `--variant`, the
input's schema, the filters and output options, the artefacts with their checksums (the sessions are loaded, and the
plan says which user-encoder variant they run and why), and `--previous`.
Then the first `--batch-size` users of the input are scored once (after a warm-up run of a few of them, so that
session start-up is not timed), and their recommendations are written to memory to measure bytes per user.

The plan's estimates are linear: time = users to encode / the probe's users/s, output size = users x the probe's
bytes per user. With `--previous` the users whose fingerprint matches are counted (their histories are read and
hashed, as the job does), and only the others count towards the time. For `--engine ray` the time is that of one
local process. `--interactions` are grouped into users in a temporary directory, outside OUT.
"""

from __future__ import annotations

import io
import math
import tempfile
import time
from pathlib import Path

import polars as pl
import pyarrow.fs as pafs

from laser_batch import job
from laser_batch.incremental import Setup, fingerprints
from laser_batch.inputs import filesystem, group_interactions
from laser_batch.job import JobOptions
from laser_batch.score import prepare_job

WARM_UP_USERS = 8


def plan_job(users_path: str | Path, artifacts: str | Path, out: str | Path, **options) -> dict:
    """Check the job and estimate it; returns the plan (users, chunks, probe timing, estimated seconds and bytes).

    `options`: the fields of `laser_batch.job.JobOptions`, as for `score.score_users`.

    Raises:
        InputError, ArtifactError: as the job itself would, before any user is scored.
    """
    opts = JobOptions(**options)
    users_path, out = Path(users_path), Path(out)
    fs, root = filesystem(str(out))
    job.check_out(fs, root, str(out), resume=opts.resume, overwrite=opts.overwrite)
    recommender, setup, files = prepare_job(users_path, Path(artifacts), out, opts)
    with tempfile.TemporaryDirectory(prefix="laser-batch-plan-") as scratch:
        source = files
        if opts.interactions:
            source = [Path(scratch) / "users.parquet"]
            group_interactions(pafs.LocalFileSystem(), [str(f) for f in files], str(source[0]))
        rows = pl.scan_parquet(source).select(pl.len()).collect().item()
        job.check_rows(rows, users_path)
        probe = pl.scan_parquet(source).head(min(rows, opts.batch_size)).collect()
        recommender.recommend(probe.head(WARM_UP_USERS))
        started = time.perf_counter()
        recs, _, stats = recommender.recommend(probe)  # no fingerprints: every probe user is encoded
        seconds = time.perf_counter() - started
        buffer = io.BytesIO()
        recs.write_parquet(buffer)
        reusable = _reusable(source, setup, opts.chunk_size) if setup.previous is not None else 0
    rate = stats["scored"] / seconds if seconds and stats["scored"] else None
    per_user = buffer.getbuffer().nbytes / max(stats["scored"], 1)
    plan = {
        "users": rows, "chunks": max(1, math.ceil(rows / opts.chunk_size)), "chunk_size": opts.chunk_size,
        "provider": recommender.providers[0], **job.variant_summary(opts.variant, recommender.embedder.variant),
        "probe_users": probe.height, "probe_scored": stats["scored"],
        "probe_seconds": round(seconds, 3), "users_per_second": round(rate, 1) if rate else None,
    }
    if opts.previous is not None:
        plan.update(previous=opts.previous, rescore_reason=setup.reason, reusable_users=reusable)
    to_encode = rows - reusable
    plan.update(users_to_encode=to_encode,
                estimated_seconds=round(to_encode / rate, 3) if rate else None,
                estimated_output_bytes=int(per_user * rows), writes="nothing (dry run)")
    return plan


def _reusable(source: list[Path], setup: Setup, chunk_size: int) -> int:
    """Users (first occurrences, non-null ids) whose fingerprint the previous output holds."""
    columns = [c for c in pl.read_parquet_schema(source[0]) if c in ("user_id", "history", "candidates")]
    found = 0
    for users in pl.scan_parquet(source).select(columns).collect_batches(chunk_size=chunk_size):
        prints = fingerprints(users, setup.key)
        first = (users["user_id"].is_not_null() & users["user_id"].is_first_distinct()).to_numpy()
        found += int(setup.previous.matches(users["user_id"].filter(pl.Series(first)),
                                            prints.filter(pl.Series(first))).sum())
    return found
