"""The `laser-batch` command line: thin commands that parse options and call one library function.

Installed as `laser_batch.cli`. Heavy imports (torch, the model code) happen inside the commands, so
`laser-batch --help` and `laser-batch score --help` stay fast and torch-free.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from laser_batch import __version__
from laser_batch.errors import LaserBatchError
from laser_batch.extras import require_train

app = typer.Typer(
    name="laser-batch",
    help="Train Laser, export it to ONNX and score users in batch.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Convert public datasets into the Parquet data contract.", no_args_is_help=True)
app.add_typer(data_app, name="data")
items_app = typer.Typer(help="Change the catalogue of exported artefacts without retraining.", no_args_is_help=True)
app.add_typer(items_app, name="items")

_state = {"debug": False, "quiet": False}
logger = logging.getLogger("laser_batch")


class Stage(str, Enum):
    sasrec = "sasrec"
    laser = "laser"
    all = "all"


class EvalModel(str, Enum):
    sasrec = "sasrec"
    laser = "laser"
    popularity = "popularity"


class Split(str, Enum):
    valid = "valid"
    test = "test"


class Format(str, Enum):
    s3rec = "s3rec"
    recbole = "recbole"
    movielens = "movielens"
    amazon2018 = "amazon2018"
    unisrec = "unisrec"


@contextmanager
def _errors() -> Iterator[None]:
    """Turn library errors into one readable line and an exit code; --debug keeps the traceback."""
    try:
        yield
    except LaserBatchError as e:
        if _state["debug"]:
            raise
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"laser-batch {__version__}")
        raise typer.Exit()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (not the stream of the first call: CliRunner replaces it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
) -> None:
    _state["debug"] = debug
    _state["quiet"] = quiet
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def _progress(*, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="seq", leave=False, dynamic_ncols=True, disable=None)


class _ScoreProgress:
    """`score`'s progress: a tqdm bar (users/s, ETA) on a terminal, a log line per chunk otherwise, nothing with
    --quiet. Called by the engine after each chunk (`laser_batch.job.Progress`); resumed chunks count as done."""

    def __init__(self) -> None:
        import time

        # The clock starts with the job (model loading included), not at the first callback, which comes after the
        # first chunk: timed from there, a one-chunk job showed an absurd rate.
        self.bar, self.started, self.first = None, time.perf_counter(), None

    def __call__(self, progress) -> None:
        import time

        if _state["quiet"]:
            return
        if self.first is None:
            self.first = progress.done - progress.users  # users finished by an earlier run (--resume)
            if sys.stderr.isatty():
                from tqdm import tqdm

                self.bar = tqdm(total=progress.total, initial=self.first, desc="score", unit="users",
                                dynamic_ncols=True, leave=False)
        if self.bar is not None:
            self.bar.update(progress.users)
            return
        rate = (progress.done - self.first) / max(time.perf_counter() - self.started, 1e-9)
        left = (progress.total - progress.done) / rate if rate else 0
        logger.info("chunk %d/%d: %d/%d users, %.1f users/s, ETA %.0f s", progress.chunk + 1, progress.chunks,
                    progress.done, progress.total, rate, left)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@data_app.command("convert")
def data_convert(
    inputs: Annotated[list[Path], typer.Argument(help="Input file(s) or directory of the chosen format.")],
    input_format: Annotated[Format, typer.Option("--format", help="Layout of the input.")],
    out: Annotated[Path, typer.Option("--out", help="Data directory to write.")],
) -> None:
    """Convert a public dataset into interactions.parquet + items.parquet + card.json."""
    from laser_batch.convert import convert

    with _errors():
        card = convert(input_format.value, inputs, out)
    typer.echo(f"{out}: {card['users']} users, {card['items']} items, {card['interactions']} interactions")


@data_app.command("example")
def data_example(
    out: Annotated[Path, typer.Option("--out", help="Data directory to write.")],
    users: Annotated[int, typer.Option(help="Number of users.")] = 1000,
    items: Annotated[int, typer.Option(help="Number of items.")] = 400,
    seed: Annotated[int, typer.Option(help="Random seed (the data is deterministic per seed).")] = 0,
) -> None:
    """Write the embedded synthetic example dataset (readable titles, planted tastes and habits)."""
    from laser_batch.examples.synthetic import write_example

    with _errors():
        card = write_example(out, users=users, items=items, seed=seed)
    typer.echo(f"{out}: {card['users']} users, {card['items']} items, {card['interactions']} interactions")


@app.command()
def train(
    data: Annotated[Path | None, typer.Option("--data", help="Data directory (see `laser-batch data`); "
                                              "needed for the sasrec stage.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Run directory to write.")] = ...,
    stage: Annotated[Stage, typer.Option("--stage", help="sasrec, laser (on RUN_DIR/sasrec) or all.")] = Stage.sasrec,
    llm: Annotated[str | None, typer.Option("--llm", help="Frozen LLM: 'tiny' (embedded), a hub id, a local "
                                            "directory or a .gguf file. Overrides llm.source.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML config file.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Override train.epochs (SASRec).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Override train.seed.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing stage.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted Laser stage.")] = False,
    drop_unknown_items: Annotated[bool, typer.Option(
        "--drop-unknown-items", help="Drop interactions whose item is missing from items.parquet.")] = False,
) -> None:
    """Train SASRec (the frozen ID model) and/or Laser, writing RUN_DIR/sasrec and RUN_DIR/laser."""
    with _errors():
        require_train("train")
        from laser_batch.config import load_config

        cfg = load_config(config, train={"epochs": epochs, "seed": seed}, llm={"source": llm})
        if stage in (Stage.sasrec, Stage.all):
            if data is None:
                raise LaserBatchError(f"--stage {stage.value} needs --data DATA_DIR")
            from laser_batch.train import train_sasrec

            result = train_sasrec(data, out, cfg, overwrite=overwrite, drop_unknown_items=drop_unknown_items,
                                  progress=_progress)
            metrics = " ".join(f"{k} {v:.4f}" for k, v in result.valid_metrics.items())
            typer.echo(f"{result.checkpoint}: best epoch {result.best_epoch}/{result.epochs_run}, valid {metrics}, "
                       f"{result.train_seconds:.0f}s")
        if stage in (Stage.laser, Stage.all):
            from laser_batch.train_laser import train_laser

            laser = train_laser(out, cfg, overwrite=overwrite, resume=resume, progress=_progress)
            metrics = " ".join(f"{k} {v:.4f}" for k, v in laser.valid_metrics.items())
            typer.echo(f"{laser.checkpoint}: best stage {laser.best_stage} epoch {laser.best_epoch}, valid {metrics}, "
                       f"{laser.seconds_per_epoch:.0f}s/epoch, {laser.trainable_parameters} trained parameters"
                       + (f", gate {laser.gate:.4f}" if laser.gate is not None else ""))


@app.command()
def evaluate(
    run_dir: Annotated[Path | None, typer.Argument(help="Run directory written by `train`.")] = None,
    model: Annotated[EvalModel, typer.Option("--model", help="Model to evaluate.")] = EvalModel.sasrec,
    split: Annotated[Split, typer.Option("--split", help="valid: second last item; test: last item.")] = Split.test,
    k: Annotated[list[int] | None, typer.Option("--k", help="Cut-off(s) for HR@K / NDCG@K.")] = None,
    include_history: Annotated[bool, typer.Option(
        "--include-history", help="Also rank items already in the user's history.")] = False,
    data: Annotated[Path | None, typer.Option("--data", help="Use this data directory instead of the run's.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON.")] = None,
    recs: Annotated[Path | None, typer.Option("--recs", help="Evaluate a `score` output directory instead "
                                              "(torch-free); needs --truth.")] = None,
    truth: Annotated[Path | None, typer.Option("--truth", help="Parquet of user_id, item_id: the items each "
                                               "user went on to interact with.")] = None,
) -> None:
    """Full-ranking evaluation of a run, or HR/NDCG/MRR@K of `score` output against a truth file."""
    if recs is not None or truth is not None:
        with _errors():
            if recs is None or truth is None or run_dir is not None:
                raise LaserBatchError("evaluate --recs OUT_DIR --truth TRUTH.parquet (both, and no RUN_DIR)")
            from laser_batch.recs_eval import evaluate_recommendations

            result = evaluate_recommendations(recs, truth, k or [10, 20])
        typer.echo(f"{recs}: {result['cases']} truth rows, {result['cases_without_recommendations']} without "
                   "recommendations")
        for name, value in result["metrics"].items():
            typer.echo(f"  {name:<10} {value:.4f}")
        if json_out is not None:
            json_out.write_text(json.dumps(result, indent=2) + "\n")
        return
    from laser_batch.evaluate import evaluate_run

    with _errors():
        if run_dir is None:
            raise LaserBatchError("evaluate needs RUN_DIR (or --recs OUT_DIR --truth TRUTH.parquet)")
        if model is not EvalModel.popularity:  # the trained models run in torch; popularity is counting
            require_train(f"evaluate --model {model.value}")
        result = evaluate_run(run_dir, model=model.value, split=split.value, ks=k or [10, 20],
                              exclude_history=not include_history, data_dir=data)
    typer.echo(f"{result['model']} on {result['split']} ({result['users']} users, "
               f"history {'excluded' if result['exclude_history'] else 'included'})")
    for name, value in result["metrics"].items():
        typer.echo(f"  {name:<10} {value:.4f}")
    if result.get("gate") is not None:  # a fused Laser: the weight of its LLM part (0 = SASRec alone)
        typer.echo(f"  {'gate':<10} {result['gate']:.4f}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")


class ExportModel(str, Enum):
    laser = "laser"
    sasrec = "sasrec"


class ExportDtype(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `train`.")],
    out: Annotated[Path, typer.Option("--out", help="Artefact directory to write.")],
    model: Annotated[ExportModel | None, typer.Option(
        "--model", help="laser or sasrec; default: laser when the run has that stage, else sasrec.")] = None,
    dtype: Annotated[ExportDtype, typer.Option("--dtype", help="fp32, or fp16 graphs (for GPUs).")] = ExportDtype.fp32,
    quantize: Annotated[list[str] | None, typer.Option(
        "--quantize", help="Add quantised CPU variants of the user encoder: int8 (every scheme) or a scheme: "
        "int8-dynamic, int8-dynamic-mixed, nbits8, nbits8-fp32, nbits4, nbits4-mixed, int8-smooth, int8-smooth-mixed "
        "(Llama-family LLMs).")] = None,
    validate_users: Annotated[int, typer.Option("--validate-users", help="Held-out users for the end-to-end "
                                                "check.")] = 256,
    threads: Annotated[int, typer.Option("--threads", help="ONNX Runtime threads for checks (0: default).")] = 0,
    gate_users: Annotated[int, typer.Option("--gate-users", help="Users whose validation and test targets the "
                                            "quality gate of --quantize variants judges (2 pairs each; 0: every "
                                            "user).")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing ARTIFACTS directory.")] = False,
) -> None:
    """Export a trained run to ONNX (through Optimum), validated against torch, with a manifest."""
    with _errors():
        require_train("export")
        from laser_batch.exporters.export import export_run

        manifest = export_run(run_dir, out, model=model.value if model else None, dtype=dtype.value,
                              quantize=quantize, validate_users=validate_users, threads=threads,
                              gate_users=gate_users, overwrite=overwrite)
    e2e = manifest.get("end_to_end")
    check = (f"end to end on {e2e['users']} held-out users: min cosine {e2e['min_cosine']:.6f}, "
             f"top-10 same for {e2e['top10']['same_set']:.1%}") if e2e else "no held-out users (data gone)"
    typer.echo(f"{out}: {manifest['kind']} exported in {manifest['export_seconds']:.0f}s; {check}")
    encoder = manifest["graphs"].get("user_encoder", {})
    for scheme, v in encoder.get("variants", {}).items():
        if "gate" not in v:
            typer.echo(f"  {scheme:<20} skipped: {v.get('skipped')}")
            continue
        g = v["gate"]
        low, high = g["ndcg10_diff_ci95"]
        verdict = "non-inferior" if g["non_inferior"] else "inferior"
        typer.echo(f"  {scheme:<20} NDCG@10 {g['ndcg10']:.4f} vs fp32 {g['ndcg10_fp32']:.4f}, "
                   f"diff {g['ndcg10_diff']:+.4f} [{low:+.4f}, {high:+.4f}] ({verdict}), "
                   f"{v['speedup_vs_fp32']:.2f}x fp32 speed")
    if encoder.get("variants"):
        typer.echo(f"  recommended CPU variant: {encoder.get('recommended_cpu_variant') or 'fp32'} "
                   f"({encoder.get('recommended_reason')})")


class IdVector(str, Enum):
    mean = "mean"
    zeros = "zeros"
    neighbours = "neighbours"


class Align(str, Enum):
    linear = "linear"
    none = "none"


@items_app.command("add")
def items_add(
    artifacts: Annotated[Path, typer.Argument(help="Laser artefacts written by `export` (or an earlier `items add`).")],
    new_items: Annotated[Path, typer.Argument(help="Parquet of the new items: item_id, title and the text columns "
                                              "of the artefacts' items.parquet.")],
    out: Annotated[Path, typer.Option("--out", help="The new artefact directory to write (ARTIFACTS is kept).")],
    id_vector: Annotated[IdVector, typer.Option(
        "--id-vector", help="A new item's fallback ID vector (it has no SASRec row): mean (of the catalogue's), "
        "zeros, or neighbours (the mean of its 10 nearest catalogue items' by item embedding).")] = IdVector.neighbours,
    align: Annotated[Align, typer.Option(
        "--align", help="linear: map the graphs' encodings into the item matrix's space by an affine map fitted on "
        "re-encoded catalogue items (kept only if it beats none on held-out ones); none.")] = Align.linear,
    align_items: Annotated[int, typer.Option("--align-items", help="Catalogue items re-encoded to fit --align "
                                             "linear.")] = 2048,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Items per graph run.")] = 32,
    threads: Annotated[int, typer.Option("--threads", help="ONNX Runtime threads (0: its default).")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT.")] = False,
) -> None:
    """Add new items to exported artefacts: encoded from their text by the exported graphs, torch-free."""
    with _errors():
        from laser_batch.items_add import add_items

        manifest = add_items(artifacts, new_items, out, id_vector=id_vector.value, align=align.value,
                             align_items=align_items, overwrite=overwrite, batch_size=batch_size, threads=threads)
    added = manifest["items_added"][-1]
    typer.echo(f"{out}: {added['items']} items added ({manifest['settings']['num_items']} in all), ID vector "
               f"{added['id_vector']}; parent manifest {added['parent_manifest_sha256'][:12]}")


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class Backfill(str, Enum):
    none = "none"
    popular = "popular"


class ScoreKind(str, Enum):
    cosine = "cosine"
    prob = "prob"


class Layout(str, Enum):
    long = "long"
    list = "list"


@app.command()
def score(
    users: Annotated[str, typer.Argument(help="Parquet file, or directory of Parquet files, of users: user_id + "
                                          "history (item ids, oldest first).")],
    model: Annotated[str, typer.Option("--model", help="Artefact directory written by `export`.")],
    out: Annotated[str, typer.Option("--out", help="Output directory for recommendations.")],
    top_k: Annotated[int, typer.Option("--top-k", help="Recommendations per user.")] = 20,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Users per graph run.")] = 64,
    max_batch_tokens: Annotated[int, typer.Option("--max-batch-tokens", help="Padded tokens per graph run (users x "
                                                  "the longest one's tokens): bounds memory.")] = 8192,
    device: Annotated[Device, typer.Option("--device", help="auto (CUDA when available), cpu or cuda.")] = Device.auto,
    threads: Annotated[int, typer.Option("--threads", help="ONNX Runtime threads (0: its default).")] = 0,
    interactions: Annotated[bool, typer.Option(
        "--interactions", help="USERS holds user_id, item_id, timestamp rows; group them into histories.")] = False,
    include_history: Annotated[bool, typer.Option(
        "--include-history", help="Also recommend items already in the history.")] = False,
    variant: Annotated[str, typer.Option("--variant", help="The user encoder: auto (on the CPU the export's "
                                         "recommended_cpu_variant, the fastest quantised variant that passed its "
                                         "quality gate, if any; else, and on CUDA, the exported graph), fp32 (the "
                                         "exported graph; fp16 for an fp16 export) or a quantised variant in "
                                         "manifest.json, e.g. nbits8. summary.json says which ran and why.")
                       ] = "auto",
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Users read and written per part file.")] = 50_000,
    show: Annotated[int, typer.Option("--show", help="Print the top 5 of this many users when done.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Finish an interrupted job in OUT.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the contents of OUT.")] = False,
    expect_manifest_sha256: Annotated[str | None, typer.Option(
        "--expect-manifest-sha256", help="Refuse artefacts whose manifest.json has another sha256 (pins the exact "
        "model a job may use; the summary's manifest_sha256 names it).")] = None,
    engine: Annotated[Engine, typer.Option("--engine", help="local (this process) or ray (Ray Data on a cluster; "
                                           "needs laser-batch[ray]; paths may then be URIs).")] = Engine.local,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Ray: the cluster (auto, "
                                                    "ray://HEAD:10001); default RAY_ADDRESS or a local one.")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Ray: scorer actors (0: one per GPU or CPU).")] = 0,
    gpus_per_worker: Annotated[float | None, typer.Option(
        "--gpus-per-worker", help="Ray: GPUs per actor (default 1 when the cluster has GPUs).")] = None,
    allow_items: Annotated[str | None, typer.Option(
        "--allow-items", help="Recommend only these items: Parquet with item_id, or text with one id per line.",
        rich_help_panel="Filters")] = None,
    deny_items: Annotated[str | None, typer.Option(
        "--deny-items", help="Never recommend these items (same formats as --allow-items).",
        rich_help_panel="Filters")] = None,
    item_filter: Annotated[str | None, typer.Option(
        "--item-filter", help="SQL WHERE clause over the artefacts' items.parquet columns (Polars SQL), e.g. "
        "\"category LIKE '%Lab%' AND brand <> 'X'\".", rich_help_panel="Filters")] = None,
    exclude: Annotated[str | None, typer.Option(
        "--exclude", help="Parquet of user_id, item_id pairs never to recommend (e.g. last night's output).",
        rich_help_panel="Filters")] = None,
    backfill: Annotated[Backfill, typer.Option(
        "--backfill", help="popular: fill users left short of K by their candidates or exclusions with the most "
        "popular eligible items (output column source = model | backfill).", rich_help_panel="Filters")
    ] = Backfill.none,
    explain: Annotated[bool, typer.Option(
        "--explain", help="Add because_item_id: the history item whose item embedding is closest to the "
        "recommended item.", rich_help_panel="Output")] = False,
    with_item_columns: Annotated[str | None, typer.Option(
        "--with-item-columns", help="Join these items.parquet columns into the output, e.g. title,brand.",
        rich_help_panel="Output")] = None,
    score_kind: Annotated[ScoreKind, typer.Option(
        "--score", help="cosine: the score the model ranks by (dot for SASRec and the gated fusion); prob: the "
        "softmax over the catalogue of the model's training logits, an estimate of next-item probability.",
        rich_help_panel="Output")] = ScoreKind.cosine,
    layout: Annotated[Layout, typer.Option(
        "--layout", help="long: one row per (user, rank); list: one row per user with item_ids and scores as "
        "lists.", rich_help_panel="Output")] = Layout.long,
    previous: Annotated[str | None, typer.Option(
        "--previous", help="Last night's output directory: users whose history and options are unchanged get its "
        "rows copied instead of being encoded (the summary counts reused and scored).",
        rich_help_panel="Incremental")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Check inputs, artefacts, options and filters, time a probe batch of real users and print "
        "the plan (users, chunks, estimated time and output size); writes nothing.")] = False,
    report: Annotated[bool, typer.Option(
        "--report", help="Also write OUT/report.html and report.json: coverage, Gini, popularity, scores, rejects, "
        "throughput (see `laser-batch report`).", rich_help_panel="Report")] = False,
    fail_on: Annotated[str | None, typer.Option(
        "--fail-on", help="Checks on the report, e.g. \"coverage<0.05,gini>0.9\": when one holds, OUT is kept but "
        "gets no _SUCCESS and the job exits with code 3.", rich_help_panel="Report")] = None,
) -> None:
    """The nightly batch job on ONNX Runtime (torch-free): top-K recommendations for every user."""
    options = dict(interactions=interactions, top_k=top_k, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                   device=device.value, threads=threads, include_history=include_history, variant=variant,
                   chunk_size=chunk_size, resume=resume, overwrite=overwrite,
                   expect_manifest_sha256=expect_manifest_sha256, allow_items=allow_items, deny_items=deny_items,
                   item_filter=item_filter, exclude=exclude, backfill=backfill.value, explain=explain,
                   with_item_columns=with_item_columns or (), score=score_kind.value, layout=layout.value,
                   previous=previous, report=report, fail_on=fail_on)
    if dry_run:
        with _errors():
            from laser_batch.plan import plan_job

            plan = plan_job(users, model, out, **options)
        for key, value in plan.items():
            typer.echo(f"{key:<24} {value}")
        return
    progress = _ScoreProgress()
    with _errors():
        if engine is Engine.ray:  # the same job and keywords on Ray Data, plus the cluster's options
            from functools import partial

            from laser_batch.ray_engine import score_ray

            score_users = partial(score_ray, ray_address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker)
        elif ray_address is not None or workers or gpus_per_worker is not None:
            raise LaserBatchError("--ray-address, --workers and --gpus-per-worker need --engine ray")
        else:
            from laser_batch.score import score_users

        try:
            summary = score_users(users, model, out, on_chunk=progress, **options)
        finally:
            progress.close()
    rejected = sum(summary["users_rejected"].values())
    incremental = summary["incremental"]
    reused = (f" ({incremental['reused']} reused from {previous}, {incremental['scored']} encoded)"
              if previous and not incremental["rescore_reason"] else "")
    typer.echo(f"{out}: {summary['users_scored']} users scored{reused}, {rejected} rejected, "
               f"{summary['users_per_second']} users/s on {summary['provider']}")
    if incremental["rescore_reason"]:
        typer.echo(f"every user was scored: {incremental['rescore_reason']}")
    if show:
        _show(Path(out), Path(model), show, layout.value)


@app.command("report")
def report_command(
    directory: Annotated[Path, typer.Argument(help="A `score` output directory, or a training run directory.")],
    out: Annotated[Path | None, typer.Option("--out", help="The page to write (report.json goes beside it); "
                                             "default DIR/report.html.")] = None,
    previous: Annotated[Path | None, typer.Option("--previous", help="An earlier `score` output to compare with: "
                                                  "per-user Jaccard@K, items new and dropped.")] = None,
    model: Annotated[Path | None, typer.Option("--model", help="The artefacts whose catalogue the output was scored "
                                               "on; default: the model that summary.json names.")] = None,
    fail_on: Annotated[str | None, typer.Option("--fail-on", help="Checks on the report, e.g. "
                                                "\"coverage<0.05,jaccard_mean<0.2\": exit code 3 when one "
                                                "holds.")] = None,
) -> None:
    """A self-contained HTML page (plots inline) and report.json on a night's output or a training run's curves."""
    with _errors():
        from laser_batch.report import write_report

        numbers = write_report(directory, out=out, previous=previous, artifacts=model, fail_on=fail_on)
    target = out or directory / "report.html"
    if numbers["kind"] == "run":
        typer.echo(f"{target}: training curves of {', '.join(numbers['models'])}")
    else:
        typer.echo(f"{target}: {numbers['users']['scored']} users, coverage@{numbers['top_k']} "
                   f"{numbers['coverage']:.4f}, Gini {numbers['gini']:.4f}")


def _show(out: Path, model: Path, users: int, layout: str = "long") -> None:
    import polars as pl

    from laser_batch.output import scan_recommendations

    recs = scan_recommendations([out / "part-00000.parquet"])[0].collect()
    recs = recs.filter(pl.col("rank") <= 5)
    titles = model / "items.parquet"  # Laser artefacts carry the item texts; SASRec-only ones do not
    if titles.exists():
        recs = recs.join(pl.read_parquet(titles).select("item_id", "title"), on="item_id", how="left",
                         maintain_order="left")
    for user_id in recs["user_id"].unique(maintain_order=True).head(users):
        typer.echo(f"user {user_id}:")
        for row in recs.filter(pl.col("user_id") == user_id).iter_rows(named=True):
            typer.echo(f"  {row['rank']}. {row.get('title') or row['item_id']}  ({row['score']:.3f})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
