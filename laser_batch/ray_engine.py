"""The nightly job on a Ray cluster: the local engine's batch function (`Recommender.recommend`) in Ray Data.

    read_parquet(INPUT) -> map_batches(_Scorer, one actor per worker) -> part files in OUT/_temporary/ATTEMPT/
    -> the driver commits: part-00000.parquet ..., rejects.parquet, summary.json, _SUCCESS (last)

The output contract is the local engine's (`laser_batch.score`). Ray is imported only here, and this module
only when `--engine ray` is asked for.

- Duplicate users are found before the Ray job, on the driver, from the `user_id` column alone (a 64-bit hash
  per row, checked against the real ids): every row of a duplicated user is left out of the Ray job, the first
  occurrence (files in name order, rows in file order) is scored on the driver and the others are rejected, as
  the local engine does. Rows carry no position through Ray Data, so this is what keeps "the first one wins".
- Each scorer actor loads the ONNX sessions once (artefacts from a shared path, or copied once from a
  pyarrow-filesystem URI), scores one batch of `chunk_size` users per call, writes its part file into the
  attempt's staging directory and returns only its name, its rejects file and its counts. A file written by an
  attempt that died is not in the returned list and is deleted at commit, so a retried batch never doubles.
- Nothing in OUT counts until `_SUCCESS`: it is removed when a job starts and written after the commit.
  A failed or interrupted job is rerun from its start with `--resume` (Ray Data keeps no partial results).
- The user-encoder variant is resolved once, on the driver, for the provider the actors run on (`--device cuda` with
  GPUs, else the CPU), and every actor (and the driver's duplicates) runs that one variant by name: an "auto" job
  never mixes the GPU's and the CPU's choice.
- `--interactions`: the rows are grouped into users on the driver (Polars, streaming; the local engine's
  grouping) into the attempt's staging directory, and that file is the job's input.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import polars as pl

from laser_batch import errors, job
from laser_batch.artifacts import (
    CPU,
    ITEM_IDS,
    MANIFEST,
    check_manifest_sha256,
    load_manifest,
    manifest_sha256,
    resolve_variant,
)
from laser_batch.contracts import first_line
from laser_batch.errors import EngineError, InputError, LaserBatchError
from laser_batch.files import atomic_write
from laser_batch.filters import CANDIDATES
from laser_batch.incremental import FINGERPRINTS, Setup, check_previous, fingerprints, side_file
from laser_batch.incremental import prepare as prepare_incremental
from laser_batch.inputs import (
    check_users_schema,
    duplicated_users,
    filesystem,
    group_interactions,
    list_input,
    row_count,
)
from laser_batch.job import JobOptions
from laser_batch.score import Recommender

logger = logging.getLogger(__name__)
MAX_ACTOR_RESTARTS = 3  # per scorer actor (and retries per batch) before the job fails

STAGING = "_temporary"
RAY_EXTRA = "pip install 'laser-batch[ray]'"
# Tests only: {"marker": path, "mode": "exit" | "raise", "always": bool} makes the first batch that creates the
# marker file (every batch with "always") die (os._exit) or raise after writing its part file. Read on the driver
# when a job starts and handed to its actors.
_FAULT: dict | None = None


def _import_ray():
    try:
        import pyarrow.fs
        import ray
        import ray.data
    except ImportError as e:
        raise EngineError(f"--engine ray needs Ray Data, which is not installed ({first_line(e)}): {RAY_EXTRA}") from e
    return ray, pyarrow.fs


def local_artifacts(location: str) -> Path:
    """ARTIFACTS as a local directory: a path as it is (shared filesystem), a URI copied once per machine."""
    if "://" not in location:
        return Path(location)
    fs, path = filesystem(location)
    target = Path(tempfile.gettempdir()) / "laser-batch-artifacts" / hashlib.sha256(location.encode()).hexdigest()[:16]
    if not (target / MANIFEST).exists():  # the manifest's checksums are verified when the sessions load
        import pyarrow.fs as pafs

        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
        partial.mkdir(parents=True)
        try:
            pafs.copy_files(path, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        except Exception as e:
            raise InputError(f"{location}: cannot copy the artefacts ({first_line(e)})") from e
        try:
            partial.rename(target)
        except OSError:  # another worker on this machine finished first
            shutil.rmtree(partial, ignore_errors=True)
    return target


class _Registry:
    """The handles of a job's scorer actors, so that the driver can end them when the job fails: Ray Data leaves
    that to garbage collection, and anything that keeps the failure's traceback (a logging handler) keeps them."""

    def __init__(self) -> None:
        self.handles = []

    def add(self, handle) -> None:
        self.handles.append(handle)

    def all(self) -> list:
        return self.handles


class _Scorer:
    """A Ray Data actor: Recommender loaded once; each call scores a batch and writes its part file to staging."""

    def __init__(self, *, artifacts: str, staging: str, drop: pl.Series | None, options: dict, registry,
                 key: bytes, fault: dict | None = None) -> None:
        import ray

        registry.add.remote(ray.get_runtime_context().current_actor)
        self.recommender = Recommender(local_artifacts(artifacts), **options)
        self.fs, self.staging = filesystem(staging)
        self.drop, self.fault, self.key = drop, fault, key

    def __call__(self, batch):
        import pyarrow as pa

        users = pl.from_arrow(batch)
        if self.drop is not None:  # every row of a duplicated user is handled by the driver
            users = users.filter(~(pl.col("user_id").is_in(self.drop.implode()).fill_null(False)))
        prints = fingerprints(users, self.key)
        recs, rejects, stats = self.recommender.recommend(users, fingerprints=prints)
        name = uuid.uuid4().hex
        atomic_write(f"{self.staging}/fingerprints-{name}.parquet", side_file(users, prints, recs).write_parquet,
                     fs=self.fs)
        atomic_write(f"{self.staging}/part-{name}.parquet", recs.write_parquet, fs=self.fs)
        rejects_name = ""
        if rejects.height:
            rejects_name = f"rejects-{name}.parquet"
            atomic_write(f"{self.staging}/{rejects_name}", rejects.write_parquet, fs=self.fs)
        if self.fault is not None:
            _inject_fault(self.fault)
        return pa.table({"part": [f"part-{name}.parquet"], "rejects": [rejects_name], "stats": [json.dumps(stats)],
                         "provider": [self.recommender.providers[0]]})


def _inject_fault(fault: dict) -> None:
    """`_FAULT`: the first call anywhere (an O_EXCL marker file), or every call with "always", dies."""
    try:
        os.close(os.open(fault["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        if not fault.get("always"):
            return
    if fault["mode"] == "exit":
        os._exit(1)
    raise RuntimeError("injected fault")


def _read(fs, path: str) -> pl.DataFrame:
    import pyarrow.parquet as pq

    return pl.from_arrow(pq.read_table(path, filesystem=fs))


def score_ray(users: str | Path, artifacts: str | Path, out: str | Path, *, ray_address: str | None = None,
              workers: int = 0, gpus_per_worker: float | None = None,
              on_chunk: Callable[[job.Progress], None] | None = None, **options) -> dict:
    """Run the job on Ray Data and write OUT as the local engine does; returns the summary.

    Args:
        users, artifacts, out: paths (on a filesystem every worker sees) or pyarrow-filesystem URIs.
        ray_address: a running cluster ("auto", "ray://head:10001", ...); None: ray.init()'s default (RAY_ADDRESS,
            else a local cluster). A Ray session already started in this process is used as it is.
        workers: scorer actors (0: one per GPU, or one per `threads` CPUs leaving one CPU for reading).
        gpus_per_worker: GPUs reserved per actor (None: 1 when the cluster has GPUs and device is auto/cuda).
        on_chunk: called with a `job.Progress` after each finished batch (in the order they finish).
        options: the fields of `laser_batch.job.JobOptions`, as for `laser_batch.score.score_users`; `threads` 0
            means one ONNX Runtime thread per CPU reserved for an actor.

    Raises:
        EngineError: Ray is not installed or not reachable, or the Ray job failed (OUT is then not finished).
        InputError, ArtifactError: bad input, options or artefacts, before OUT is touched (those about the
            cluster's resources once connected to it).
    """
    ray, _ = _import_ray()
    started = time.perf_counter()
    opts = JobOptions(**options)
    if workers < 0 or (gpus_per_worker is not None and gpus_per_worker < 0):
        raise InputError("--workers and --gpus-per-worker must not be negative")
    out_fs, root = filesystem(str(out))
    job.check_out(out_fs, root, str(out), resume=opts.resume, overwrite=opts.overwrite)
    before_success = opts.before_success(out_fs, root, str(out))
    model = local_artifacts(str(artifacts))
    if opts.expect_manifest_sha256 is not None:
        check_manifest_sha256(model, opts.expect_manifest_sha256)
    manifest = load_manifest(model)  # a missing file or a failing checksum stops here, before Ray starts
    opts.check_variant(model)
    in_fs, files = list_input(users)
    schema = check_users_schema(users, pl.read_parquet_schema(model / ITEM_IDS)["item_id"],
                                interactions=opts.interactions, listed=(in_fs, files))
    prepared = opts.item_filters(model)  # read and checked here, once; the actors get the result
    prepared.check_input(schema, users)
    output = opts.output_options(model)
    previous = check_previous(opts, str(out))  # before Ray; its fingerprints are read once the variant is known
    columns = ["user_id", "history", *([CANDIDATES] if CANDIDATES in schema and not opts.interactions else [])]
    if opts.interactions:  # grouped into users below, once OUT is prepared
        rows, dups = row_count(in_fs, files), pl.DataFrame()
    else:
        rows, dups = duplicated_users(in_fs, files, columns=columns)
    job.check_rows(rows, users)
    _connect(ray, ray_address)  # the cluster's GPUs decide the actors' provider, hence the variant
    resources = ray.cluster_resources()
    device, threads = opts.device, opts.threads
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if device != "cpu" and resources.get("GPU", 0) > 0 else 0.0
    if gpus_per_worker > 0 and device == "cpu":
        raise InputError("--gpus-per-worker with --device cpu: pass --device cuda or auto, or no GPUs")
    if device == "cuda" and gpus_per_worker == 0:
        raise InputError("--device cuda with --engine ray needs GPUs on the cluster (--gpus-per-worker > 0)")
    cpus = 1 if gpus_per_worker else max(1, threads)
    variant = resolve_variant(manifest, opts.variant, "CUDAExecutionProvider" if gpus_per_worker else CPU,
                              directory=model)
    setup = prepare_incremental(opts, manifest_sha256(model), schema, previous, variant=variant.name)
    record = opts.record({"engine": "ray", "input": [in_fs.get_file_info(f).size for f in files], "files": files},
                         manifest_sha256(model), variant.name)
    # Ray Data keeps no partial results: a resumed job starts again from an empty OUT.
    job.open_out(out_fs, root, str(out), record, resume=opts.resume, keep_finished=False)
    if not workers:
        workers = (max(1, int(resources.get("GPU", 0) // gpus_per_worker)) if gpus_per_worker
                   else max(1, int(resources.get("CPU", 1) // cpus) - 1))
    options = {**opts.recommender(), "threads": threads or cpus, "device": "cuda" if gpus_per_worker else "cpu",
               "variant": variant.name, "filters": prepared, "output": output, "previous": setup.previous}
    attempt = f"{STAGING}/{uuid.uuid4().hex[:12]}"
    staging = f"{root}/{attempt}"  # on out_fs; the actors open it from its location
    out_fs.create_dir(staging)
    staging_location = f"{str(out).rstrip('/')}/{attempt}" if "://" in str(out) else staging
    if opts.interactions:  # one users file in the staging directory, which every worker reads; its ids are unique
        group_interactions(in_fs, files, f"{staging}/users.parquet", out_fs=out_fs)
        in_fs, files = out_fs, [f"{staging}/users.parquet"]
        rows = row_count(in_fs, files)
    drop = dups["user_id"].unique() if dups.height else None
    location = str(artifacts) if "://" in str(artifacts) else str(model.resolve())
    logger.info("scoring %d users on Ray (%d worker(s), %g GPU(s) each, cluster %s)", rows, workers,
                gpus_per_worker, {k: resources[k] for k in ("CPU", "GPU") if k in resources})
    # Ray Data's V2 Parquet reader starts reader actors from inside its listing task; with the scorer actors
    # holding the other CPUs of a small cluster that waits forever. The V1 reader needs no actors.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    registry = ray.remote(num_cpus=0)(_Registry).remote()
    dataset = ray.data.read_parquet(files, filesystem=in_fs, columns=columns, partitioning=None)
    dataset = dataset.map_batches(
        _Scorer, batch_size=opts.chunk_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus, num_gpus=gpus_per_worker or None,
        # Ray Data restarts dead actors and retries their batches, by default without end: bound it so that a scorer
        # that dies every time fails the job instead of looping.
        max_restarts=MAX_ACTOR_RESTARTS, max_task_retries=MAX_ACTOR_RESTARTS,
        fn_constructor_kwargs={"artifacts": location, "staging": staging_location, "drop": drop, "options": options,
                               "registry": registry, "key": setup.key, "fault": _FAULT})
    results, done, expected = [], 0, math.ceil(rows / opts.chunk_size)
    try:
        for result in dataset.iter_rows():
            results.append(result)
            users_in = json.loads(result["stats"])["users_in"]
            done += users_in
            if on_chunk is not None:
                on_chunk(job.Progress(chunk=len(results) - 1, chunks=max(len(results), expected), users=users_in,
                                      done=done, total=rows))
    except Exception as e:
        for handle in ray.get(registry.all.remote()):  # free their CPUs/GPUs for the next job now
            ray.kill(handle, no_restart=True)
        raise _job_error(e) from None
    finally:
        ray.kill(registry)
    if dups.height:
        results.append(_score_duplicates(dups, model, options, out_fs, staging, setup.key))
    return _commit(out_fs, root, staging, results, rows, started, model=str(artifacts), top_k=opts.top_k,
                   manifest_sha256=record["manifest_sha256"], workers=workers, gpus_per_worker=gpus_per_worker,
                   kind=_kind(model), **job.variant_summary(opts.variant, variant), filters=prepared.info, setup=setup,
                   before_success=before_success)


def _connect(ray, address: str | None) -> None:
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except Exception as e:
        where = f"--ray-address {address}" if address else "a local Ray cluster"
        raise EngineError(f"{where}: cannot start or connect ({first_line(e)})") from e


def _job_error(e: Exception) -> LaserBatchError:
    """The typed error a worker raised (e.g. an ArtifactError), else EngineError with the worker's root cause.

    Ray wraps a worker's exception in a RayTaskError and a UserCodeException, whose text holds the remote
    traceback: its first "Name: message" line is the root cause."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    match = re.search(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", text, re.MULTILINE)
    if match is None:
        return EngineError(f"the Ray job failed, OUT is not finished (rerun with --resume): {first_line(e)}")
    typed = getattr(errors, match[1], None)
    if isinstance(typed, type) and issubclass(typed, LaserBatchError):
        return typed(match[2])
    return EngineError(f"the Ray job failed, OUT is not finished (rerun with --resume): {match[1]}: {match[2]}")


def _kind(model: Path) -> str:
    return json.loads((model / MANIFEST).read_text())["kind"]


def _score_duplicates(dups: pl.DataFrame, model: Path, options: dict, fs, staging: str, key: bytes) -> dict:
    """On the driver: the first row of each duplicated user is scored, the later rows are rejects."""
    first = dups.filter(pl.col("user_id").is_first_distinct())
    later = dups.filter(~pl.col("user_id").is_first_distinct())
    recommender = Recommender(model, **{**options, "device": "cpu", "threads": 0})
    first = first.drop("_pos")
    prints = fingerprints(first, key)
    recs, rejects, stats = recommender.recommend(first, fingerprints=prints)
    rejects = pl.concat([rejects, later.select("user_id", reason=pl.lit("duplicate user"))])
    stats = Counter(stats)
    stats["users_in"] += later.height
    stats["rejected:duplicate user"] += later.height
    name = uuid.uuid4().hex
    atomic_write(f"{staging}/fingerprints-{name}.parquet", side_file(first, prints, recs).write_parquet, fs=fs)
    atomic_write(f"{staging}/part-{name}.parquet", recs.write_parquet, fs=fs)
    atomic_write(f"{staging}/rejects-{name}.parquet", rejects.write_parquet, fs=fs)
    return {"part": f"part-{name}.parquet", "rejects": f"rejects-{name}.parquet", "stats": json.dumps(stats),
            "provider": recommender.providers[0]}


def _commit(fs, root: str, staging: str, results: list[dict], rows: int, started: float, *, kind: str,
            setup: Setup, before_success=None, **info) -> dict:
    """Move the listed part files into OUT, then the job core's commit (rejects, summary, staging gone, _SUCCESS)."""
    totals: Counter = Counter()
    for r in results:
        totals.update(json.loads(r["stats"]))
    summary = job.summarize(totals, rows=rows, chunks=len(results), seconds=time.perf_counter() - started,
                            provider=results[0]["provider"], providers=sorted({r["provider"] for r in results}),
                            engine="ray", model_kind=kind, **info, incremental=setup.summary(totals))
    fs.create_dir(f"{root}/{FINGERPRINTS}")
    for k, r in enumerate(results):  # files of attempts that died are not listed and go with the staging
        fs.move(f"{staging}/{r['part'].replace('part-', 'fingerprints-', 1)}",
                f"{root}/{FINGERPRINTS}/part-{k:05d}.parquet")
        fs.move(f"{staging}/{r['part']}", f"{root}/part-{k:05d}.parquet")
    rejects = [_read(fs, f"{staging}/{r['rejects']}") for r in results if r["rejects"]]
    job.commit(fs, root, rejects, summary, scratch=f"{root}/{STAGING}", before_success=before_success)
    return summary
