"""The scoring job's core, shared by the local engine (`laser_batch.score`) and the Ray engine (`ray_engine`).

Each engine keeps only its loop; everything a job does around it is here, so both engines check the same options,
treat OUT the same way, and write the same files:

    OUT/_job.json                    the job's input and options (a resumed job must match them)
    OUT/part-00000.parquet ...       user_id, rank, item_id, score (written by the engine's loop)
    OUT/_fingerprints/part-00000.parquet ...   user_id, fingerprint of the part's users (`laser_batch.incremental`)
    OUT/rejects.parquet              user_id, reason (one of REJECT_REASONS)
    OUT/summary.json                 counts, rejects by reason, users/s, tokens/s, padding efficiency, provider,
                                     the user-encoder variant that ran and why (`variant_summary`)
    OUT/report.html, report.json     with --report or --fail-on (`laser_batch.report`); a check that fails
                                     withholds _SUCCESS and keeps the rest
    OUT/_SUCCESS                     written last: nothing in OUT counts before it

OUT is new (created), resumed (`--resume`: the job file must match this job) or overwritten (`--overwrite`); a
non-empty OUT without either is refused, and so is an OUT that names a file. OUT is a path on a pyarrow filesystem
(`inputs.filesystem`), and every file is written with `files.atomic_write`, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.fs as pafs

from laser_batch import filters, output, quality
from laser_batch.artifacts import Variant, check_variant, load_manifest
from laser_batch.errors import InputError
from laser_batch.files import atomic_write

REJECT_REASONS = ("null user_id", "duplicate user", "empty history", "no known items", "no eligible items")
JOB_FILE = "_job.json"
SUCCESS = "_SUCCESS"
REJECTS = "rejects.parquet"
SUMMARY = "summary.json"
DEFAULT_CHUNK = 50_000
# Padded tokens per graph run. Attention intermediates grow with B * T^2 (B users of T tokens), so `batch_size`
# alone lets a batch of long histories take hundreds of MB. Measured with the tiny model on the 640 longest of 10k
# synthetic users (~290 tokens): RSS growth 614 MB with 64-user batches, 301 MB at 8192 tokens, 159 MB at 4096;
# 8192 cost that small model ~15% users/s (its ops are tiny, so per-run overheads weigh); wide LLMs lose less.
DEFAULT_MAX_BATCH_TOKENS = 8192


def check_positive(options: dict[str, int]) -> None:
    """Refuse any option (named as on the command line, e.g. "--top-k") whose value is below 1."""
    for option, value in options.items():
        if value < 1:
            raise InputError(f"{option} {value}: expected a positive integer")


@dataclass(frozen=True)
class JobOptions:
    """The options of a scoring job, the same for both engines; checked when made (InputError names the option).

    Attributes:
        top_k: recommendations per user.
        batch_size, max_batch_tokens: users and padded tokens per graph run (`score.Recommender`).
        device: "auto" (CUDA when ONNX Runtime has it, else CPU), "cpu" or "cuda".
        threads: ONNX Runtime intra-op threads (0: its default; Ray: one per CPU reserved for an actor).
        include_history: also recommend items already in the history (excluded by default).
        variant: the user encoder (`artifacts.resolve_variant`): "auto" (on the CPU the export's recommended
            quantised variant, else the exported graph), "fp32" (the exported graph; "" too) or a quantised scheme
            of the manifest.
        io_binding: ONNX Runtime I/O binding (None: on with CUDA, off on the CPU).
        interactions: INPUT holds user_id, item_id, timestamp rows, grouped into histories first.
        chunk_size: users per part file (local: per chunk read and written; Ray: per batch).
        resume: finish an interrupted job in OUT (its job file must match); overwrite: replace OUT's contents.
        expect_manifest_sha256: refuse artefacts whose manifest.json has another sha256, before any user is read.
        allow_items, deny_items, item_filter, exclude, backfill: business filters (`laser_batch.filters`).
        explain, with_item_columns, score, layout: what the output holds and how (`laser_batch.output`).
        previous: a previous output whose rows are copied for users whose fingerprint is unchanged
            (`laser_batch.incremental`); None: every user is encoded.
        report: write OUT/report.html and report.json before `_SUCCESS` (`laser_batch.report`).
        fail_on: `--fail-on` checks on that report (`laser_batch.quality`); one that holds withholds `_SUCCESS`.
    """

    top_k: int = 20
    batch_size: int = 64
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    device: str = "auto"
    threads: int = 0
    include_history: bool = False
    variant: str = "auto"
    io_binding: bool | None = None
    interactions: bool = False
    chunk_size: int = DEFAULT_CHUNK
    resume: bool = False
    overwrite: bool = False
    expect_manifest_sha256: str | None = None
    allow_items: str | None = None
    deny_items: str | None = None
    item_filter: str | None = None
    exclude: str | None = None
    backfill: str = "none"
    explain: bool = False
    with_item_columns: str | tuple[str, ...] = ()
    score: str = "cosine"
    layout: str = "long"
    previous: str | None = None
    report: bool = False
    fail_on: str | None = None

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise InputError("--resume and --overwrite exclude each other")
        check_positive({"--chunk-size": self.chunk_size, "--top-k": self.top_k, "--batch-size": self.batch_size,
                        "--max-batch-tokens": self.max_batch_tokens})
        pinned = self.expect_manifest_sha256
        if pinned is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", pinned):
            raise InputError(f"--expect-manifest-sha256 {pinned}: expected 64 hex digits (the sha256 of "
                             "ARTIFACTS/manifest.json)")
        if self.backfill not in filters.BACKFILLS:
            raise InputError(f"--backfill {self.backfill}: expected one of {', '.join(filters.BACKFILLS)}")
        if self.score not in output.SCORES:
            raise InputError(f"--score {self.score}: expected one of {', '.join(output.SCORES)}")
        if self.layout not in output.LAYOUTS:
            raise InputError(f"--layout {self.layout}: expected one of {', '.join(output.LAYOUTS)}")
        if self.fail_on is not None:
            quality.parse_checks(self.fail_on, previous=self.previous is not None)

    def before_success(self, fs, root: str, shown: str) -> Callable[[], None] | None:
        """What `commit` runs between summary.json and `_SUCCESS`: the report and its checks (None: nothing).

        Raises:
            InputError: a report asked for an OUT that is not on the local filesystem (checked before any work).
        """
        if not (self.report or self.fail_on):
            return None
        if not isinstance(fs, pafs.LocalFileSystem):
            raise InputError(f"{shown}: --report and --fail-on need OUT on the local filesystem")

        def write() -> None:
            from laser_batch.report import write_report

            write_report(root, fail_on=self.fail_on, previous=self.previous)

        return write

    def check_variant(self, artifacts: Path) -> None:
        """Refuse a `--variant` that ARTIFACTS' manifest lacks (InputError naming the variants present); reads only
        the manifest, so it runs with the cheap checks, before OUT is touched."""
        check_variant(load_manifest(artifacts, verify=False, check_graphs=False), self.variant, directory=artifacts)

    def output_options(self, artifacts) -> output.OutputOptions:
        """The output options checked against ARTIFACTS (before any model work)."""
        return output.prepare(artifacts, explain=self.explain, with_item_columns=self.with_item_columns,
                              score=self.score, layout=self.layout)

    def item_filters(self, artifacts) -> filters.ItemFilters:
        """The filter options read and checked against ARTIFACTS' catalogue (before any model work)."""
        return filters.prepare(artifacts, allow_items=self.allow_items, deny_items=self.deny_items,
                               item_filter=self.item_filter, exclude=self.exclude, backfill=self.backfill)

    def recommender(self) -> dict:
        """The keywords of `score.Recommender`."""
        return {"top_k": self.top_k, "batch_size": self.batch_size, "max_batch_tokens": self.max_batch_tokens,
                "device": self.device, "threads": self.threads, "include_history": self.include_history,
                "variant": self.variant, "io_binding": self.io_binding}

    def record(self, input_description: dict, manifest_sha256: str, variant: str) -> dict:
        """The job file: the engine's description of its input, then what both engines' results depend on
        (`variant`: the resolved name, so a resumed "auto" must run what it ran before)."""
        return {**input_description, "interactions": self.interactions, "manifest_sha256": manifest_sha256,
                "top_k": self.top_k, "include_history": self.include_history, "variant": variant,
                "chunk_size": self.chunk_size, "filters": filters.options_record(self),
                "output": output.options_record(self),
                "previous": str(Path(self.previous).resolve()) if self.previous and "://" not in self.previous
                else self.previous}


@dataclass(frozen=True)
class Progress:
    """What an engine tells its `on_chunk` hook after each committed chunk (Ray: each finished batch).

    Attributes:
        chunk, chunks: the chunk just committed (0-based) and how many the job has (Ray: an estimate).
        users: input rows of that chunk; done: input rows of every finished chunk (resumed ones included);
        total: the input's rows.
    """

    chunk: int
    chunks: int
    users: int
    done: int
    total: int


def check_out(fs, root: str, shown: str, *, resume: bool, overwrite: bool) -> None:
    """Refuse an OUT that is a file, or a non-empty OUT without --resume or --overwrite; changes nothing.

    Args:
        fs, root: OUT on its pyarrow filesystem.
        shown: OUT as the user gave it (for messages).
    """
    kind = fs.get_file_info(root).type
    if kind == pafs.FileType.NotFound:
        return
    if kind != pafs.FileType.Directory:
        raise InputError(f"{shown}: is a file, not a directory; --out names the directory to write the results to")
    if fs.get_file_info(pafs.FileSelector(root)) and not (resume or overwrite):
        raise InputError(f"{shown}: not empty; pass --resume to finish an interrupted job or --overwrite to replace it")


def open_out(fs, root: str, shown: str, job: dict, *, resume: bool, keep_finished: bool) -> None:
    """Bring OUT into the state the job starts from: the finished parts of the same job, or nothing but the job file.

    A resumed job must have the job file's input and options (else InputError, naming what changed). With
    `keep_finished` (the local engine: it redoes only the chunks without a part file) a resumed OUT keeps its
    contents; otherwise (Ray Data keeps no partial results, or a new or overwritten job) OUT is emptied.
    `_SUCCESS` is gone in either case until the job commits.
    """
    fs.create_dir(root)
    path = f"{root}/{JOB_FILE}"
    if resume and fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            previous = json.loads(f.read())
        changed = [k for k in job if previous.get(k) != job[k]]
        if changed:
            raise InputError(f"{shown}: the interrupted job had another {', '.join(changed)}; "
                             "use --overwrite to start over")
        if keep_finished:
            _delete_if_there(fs, f"{root}/{SUCCESS}")
            return
    fs.delete_dir_contents(root)  # --resume without a job file starts over, as --overwrite does
    write_text(fs, path, json.dumps(job, indent=2) + "\n")


def check_rows(rows: int, users: object) -> None:
    """Refuse an input without rows (`users`: INPUT as given, for the message)."""
    if rows == 0:
        raise InputError(f"{users}: no rows, nothing to score")


def summarize(totals: Counter, *, rows: int, chunks: int, seconds: float, provider: str, providers: list[str],
              **info) -> dict:
    """The summary from the batches' summed counts (`Recommender.recommend` stats); `info` is added as it is.

    Raises:
        RuntimeError: the counts do not account for every input row (a bug: OUT is then not finished).
    """
    if totals["users_in"] != rows:
        raise RuntimeError(f"internal error: {rows} input rows but {totals['users_in']} accounted for; OUT is not "
                           "finished")
    padded = max(totals["padded_tokens"], 1)
    return {
        "users_in": totals["users_in"], "users_scored": totals["scored"],
        "users_rejected": {r: totals.get(f"rejected:{r}", 0) for r in REJECT_REASONS},
        "unknown_items_dropped": totals["unknown_items_dropped"],
        "chunks": chunks, "seconds": round(seconds, 2),
        "users_per_second": round(totals["scored"] / seconds, 2) if seconds else None,
        "tokens_per_second": round(totals["real_tokens"] / seconds, 1) if seconds else None,
        "padding_efficiency": round(totals["real_tokens"] / padded, 4),
        **{name: totals[name] for name in filters.COUNTS},
        "provider": provider, "providers": providers, **info,
    }


def variant_summary(requested: str, variant: Variant) -> dict:
    """The summary's record of the user encoder a job ran: its resolved name, the `--variant` asked for, and why."""
    return {"variant": variant.name, "variant_requested": requested, "variant_reason": variant.reason}


def commit(fs, root: str, rejects: list[pl.DataFrame], summary: dict, *, scratch: str,
           before_success: Callable[[], None] | None = None) -> None:
    """Finish OUT once every part file is in place: rejects.parquet, summary.json, drop `scratch`, then
    `before_success` (the report; an error there leaves OUT without `_SUCCESS`), then _SUCCESS."""
    merged = (pl.concat(rejects, how="vertical_relaxed") if rejects
              else pl.DataFrame(schema={"user_id": pl.Int64, "reason": pl.String}))
    atomic_write(f"{root}/{REJECTS}", merged.write_parquet, fs=fs)
    write_text(fs, f"{root}/{SUMMARY}", json.dumps(summary, indent=2) + "\n")
    if fs.get_file_info(scratch).type == pafs.FileType.Directory:
        fs.delete_dir(scratch)
    if before_success is not None:
        before_success()
    write_text(fs, f"{root}/{SUCCESS}", "")


def write_text(fs, path: str, text: str) -> None:
    """`path` on `fs` holds `text` (written atomically)."""
    atomic_write(path, lambda local: local.write_text(text), fs=fs)


def _delete_if_there(fs, path: str) -> None:
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
