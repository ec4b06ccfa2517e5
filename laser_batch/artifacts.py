"""Exported artefacts: the manifest, its checksums, and ONNX Runtime sessions that embed users. No torch here.

An artefact directory (written by `laser-batch export`) holds:

- `manifest.json`: kind ("laser" | "sasrec"), versions, opset, every file with its size and sha256, the graphs'
  inputs/outputs, the settings needed to build inputs, and the parity the export achieved;
- `sasrec.onnx` (always), `mformer.onnx` (Laser with an M-Former prefix), `user_encoder.onnx` (Laser);
- `item_matrix.npy` (N, D): row j scores internal item j + 1 (Laser: L2-normalised, cosine; SASRec: dot; Laser with
  `fusion = "gated"`: [SASRec item embedding ; Laser item embedding], dot with the user vector
  [SASRec user state ; g / tau * Laser user embedding], g and tau from the manifest's settings);
- `item_ids.parquet`: the original item id of each row (`index` = row + 1) and `train_interactions`, its interaction
  count in the training split (`score --backfill popular`; artefacts exported before it lack the column); for Laser
  `items.parquet` (the item text columns in row order) and `tokenizer.json`, and with an M-Former
  `item_id_vectors.npy` (N, d_id), each item's M-Former input as an item (`laser-batch items add`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from laser_batch.errors import ArtifactError, InputError
from laser_batch.files import sha256_file

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
ITEM_MATRIX = "item_matrix.npy"
ITEM_IDS = "item_ids.parquet"
ITEMS_TEXT = "items.parquet"
TOKENIZER = "tokenizer.json"
ITEM_ID_VECTORS = "item_id_vectors.npy"
TRAIN_COUNTS = "train_interactions"  # the item_ids.parquet column of training interaction counts
AUTO = "auto"  # `--variant auto`: see `resolve_variant`
CPU = "CPUExecutionProvider"


def file_record(directory: Path, name: str) -> dict:
    path = Path(directory) / name
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def manifest_sha256(directory: Path) -> str:
    """sha256 of ARTIFACTS/manifest.json: names the model a job ran (it lists every file's own sha256)."""
    return sha256_file(Path(directory) / MANIFEST)


def check_manifest_sha256(directory: Path, expected: str) -> None:
    """Refuse artefacts whose manifest.json is not the pinned one (`--expect-manifest-sha256`).

    Raises:
        ArtifactError: no manifest (as `load_manifest` says it), or its sha256 is not `expected`.
    """
    load_manifest(directory, verify=False, check_graphs=False)
    actual = manifest_sha256(directory)
    if actual != expected.lower():
        raise ArtifactError(f"{Path(directory) / MANIFEST}: sha256 {actual}, but --expect-manifest-sha256 is "
                            f"{expected}; these are not the pinned artefacts")


def load_manifest(directory: Path, *, verify: bool = True, check_graphs: bool = True) -> dict:
    """Read ARTIFACTS/manifest.json and (by default) check every listed file's size and sha256.

    Every file the manifest names (its files, its graphs and their quantised variants) must be a plain name inside
    the directory, and (`check_graphs`) every ONNX graph's external-data references must stay inside it too:
    a manifest written by someone else cannot make the job read, or hash, files elsewhere.

    Raises:
        ArtifactError: no such directory, no or unreadable manifest, a name that leaves the directory, a missing
            file or a checksum mismatch.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: artefact directory not found (write one with laser-batch export)")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: no manifest; not an export directory, or the export did not finish")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ArtifactError(f"{path}: manifest version {manifest.get('manifest_version')!r}, "
                            f"this laser-batch reads version {MANIFEST_VERSION}; export again")
    graphs = _graph_files(manifest)
    for name in [*manifest["files"], *graphs]:
        if not _plain_name(name):
            raise ArtifactError(f"{path}: file name {name!r} is not a plain name inside the artefact directory")
    if verify:
        for name, record in manifest["files"].items():
            file = directory / name
            if not file.is_file():
                raise ArtifactError(f"{file}: listed in the manifest but missing")
            if file.stat().st_size != record["bytes"] or sha256_file(file) != record["sha256"]:
                raise ArtifactError(f"{file}: checksum does not match the manifest (modified or corrupted)")
    if check_graphs:
        for name in graphs:
            _check_external_data(directory, name)
    return manifest


def _graph_files(manifest: dict) -> list[str]:
    """The file names of the manifest's graphs and of their quantised variants (skipped variants have none)."""
    names = []
    for graph in manifest.get("graphs", {}).values():
        names.append(graph["file"])
        names.extend(v["file"] for v in graph.get("variants", {}).values() if "file" in v)
    return names


def _plain_name(name: object) -> bool:
    """A file name with no directory part: no separator, not "", "." or "..", not absolute (on any OS)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and ":" not in name)


def _check_external_data(directory: Path, name: str) -> None:
    """Refuse a graph whose tensors keep their data in a file outside `directory` (ONNX Runtime would read it)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    file = directory / name
    if not file.is_file():
        raise ArtifactError(f"{file}: listed in the manifest but missing")
    try:
        model = onnx.load(str(file), load_external_data=False)
    except Exception as e:
        raise ArtifactError(f"{file}: not a readable ONNX graph ({str(e).splitlines()[0]})") from e
    for tensor in _tensors(model.graph):
        if uses_external_data(tensor):
            location = ExternalDataInfo(tensor).location
            if not _plain_name(location):
                raise ArtifactError(f"{file}: external data location {location!r} is not a plain name inside the "
                                    "artefact directory")


def _tensors(graph) -> Iterator:
    """Every tensor of an ONNX graph that can hold external data: initializers and attribute tensors, subgraphs too."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def providers(device: str = "auto") -> list[str]:
    """ONNX Runtime execution providers for `device` ("auto" | "cpu" | "cuda")."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "auto" and not _cuda_loadable():
        return ["CPUExecutionProvider"]  # no CUDA libraries: do not make ONNX Runtime try (and log errors)
    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise ArtifactError("--device cuda: this onnxruntime has no CUDA execution provider")
    if "CUDAExecutionProvider" in available and device in ("auto", "cuda"):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _cuda_loadable() -> bool:
    """Whether onnxruntime's CUDA provider library and its CUDA/cuDNN dependencies can be loaded here.

    `get_available_providers()` lists CUDA for every onnxruntime-gpu install, GPU or not.
    """
    import ctypes

    import onnxruntime as ort

    capi = Path(ort.__file__).parent / "capi"
    try:
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / "libonnxruntime_providers_cuda.so"))
    except OSError:
        return False
    return True


def session(path: Path, provider_list: Sequence[str], *, threads: int = 0):
    """An InferenceSession; `session.get_providers()` says what it really got (CUDA may silently fall back)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the CUDA provider's load failure on a machine without a GPU is not news
    if threads:
        options.intra_op_num_threads = threads
    # Idle intra-op threads sleep instead of spinning: on a shared CPU (other jobs, several Ray actors per node)
    # spinning threads steal the cores the GEMMs need. Measured on 2 shared cores, same outputs bit for bit:
    # tiny user encoder 114-122 vs 68-77 users/s, SmolLM2-135M Laser user encoder 1.58 vs 0.98 users/s.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(provider_list))
    except Exception as e:
        raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from e


class Variant(NamedTuple):
    """The graph a job's users go through last, as `resolve_variant` chose it.

    Attributes:
        file: its file name in the artefact directory (SASRec artefacts: sasrec.onnx).
        name: "fp32" or "fp16" for the exported graph (as the export wrote it), else the quantised scheme.
        reason: why: "asked for", or why `--variant auto` chose it.
    """

    file: str
    name: str
    reason: str


def variant_names(manifest: dict) -> list[str]:
    """What `--variant` accepts for these artefacts: auto, the exported graph's names, the quantised variants that
    were written (a skipped scheme has no file)."""
    exported = ["fp32", "fp16"] if _graph_dtype(manifest) == "fp16" else ["fp32"]
    return [AUTO, *exported, *sorted(_quantised(manifest))]


def check_variant(manifest: dict, requested: str, *, directory: Path | str = "ARTIFACTS") -> None:
    """Refuse a `--variant` these artefacts do not have (needs no session: the job core checks it before OUT).

    Raises:
        InputError: one line naming DIRECTORY/manifest.json and the variants present.
    """
    if requested not in ("", *variant_names(manifest)):
        sasrec = " (SASRec artefacts have no user encoder to quantise)" if manifest["kind"] == "sasrec" else ""
        raise InputError(f"--variant {requested}: not in {Path(directory) / MANIFEST}; present: "
                         f"{', '.join(variant_names(manifest))}{sasrec}")


def resolve_variant(manifest: dict, requested: str, provider: str, *,
                    directory: Path | str = "ARTIFACTS") -> Variant:
    """The graph that `--variant requested` means on `provider` (an ONNX Runtime execution provider).

    "fp32" or "" (and "fp16" for an fp16 export): the exported graph as it is. A quantised scheme: its file.
    "auto": on the CPU the export's `recommended_cpu_variant` (the fastest variant that passed its quality gate) when
    it names a variant present, else the exported graph; on CUDA always the exported graph (the quantised variants
    are int8 CPU kernels); SASRec artefacts have no user encoder and always run their exported graph.

    Raises:
        InputError: a variant the manifest does not have (`check_variant`).
    """
    check_variant(manifest, requested, directory=directory)
    kind = manifest["kind"]
    graph = manifest["graphs"]["sasrec" if kind == "sasrec" else "user_encoder"]
    exported = _graph_dtype(manifest)
    if requested in ("", "fp32", "fp16"):
        changed = requested == "fp32" and exported == "fp16"  # "fp32" has always meant the exported graph
        return Variant(graph["file"], exported, "asked for fp32: the exported graph, which this export wrote in "
                                                "float16" if changed else "asked for")
    quantised = _quantised(manifest)
    if requested != AUTO:
        return Variant(quantised[requested], requested, "asked for")
    if kind == "sasrec":
        return Variant(graph["file"], exported, "SASRec artefacts have no user-encoder variants")
    if provider != CPU:
        return Variant(graph["file"], exported, f"on {provider} the exported graph runs (the quantised variants "
                                                "are for the CPU)")
    if not quantised:
        return Variant(graph["file"], exported, "no quantised variants in the manifest")
    recommended = graph.get("recommended_cpu_variant")
    if recommended is None:
        return Variant(graph["file"], exported, "no quantised variant passed the export's quality gate "
                                                "(recommended_cpu_variant is null)")
    if recommended not in quantised:
        return Variant(graph["file"], exported, f"recommended_cpu_variant {recommended!r} is not a variant in the "
                                                "manifest")
    return Variant(quantised[recommended], recommended, "the export's recommended_cpu_variant: the fastest variant "
                                                        "that passed its quality gate")


def _graph_dtype(manifest: dict) -> str:
    """"fp16" or "fp32": the dtype the export wrote its graphs in (exports before the setting: fp32)."""
    return "fp16" if manifest["settings"].get("graph_dtype") == "float16" else "fp32"


def _quantised(manifest: dict) -> dict[str, str]:
    """{scheme: file} of the user encoder's quantised variants that were written (skipped ones have no file)."""
    variants = manifest["graphs"].get("user_encoder", {}).get("variants", {})
    return {name: v["file"] for name, v in variants.items() if "file" in v}


class Feeds(dict):
    """A batch's inputs of the last graph by name (what ONNX Runtime is fed), and `sasrec_state`: SASRec's user state
    (B, d_id) that a gated fusion's user vector starts with (None otherwise; no graph takes it)."""

    sasrec_state: np.ndarray | None = None


class Embedder:
    """Users (histories of internal item ids, oldest first) -> user vectors, with the exported graphs only.

    Laser: SASRec ids -> sasrec.onnx -> the last `id_window` vectors -> mformer.onnx -> prefix;
    text -> token ids; prefix + tokens -> user_encoder.onnx -> embedding. With the gated fusion the user vector is
    [sasrec.onnx's last position ; g / tau * embedding]. SASRec: the last position's vector.

    `variant` picks the user encoder (`resolve_variant`, on the provider the sessions really got): "fp32" (the
    exported graph; "" too), "auto" or a quantised scheme of the manifest; `self.variant` says which and why.
    """

    def __init__(self, directory: Path, *, device: str = "auto", threads: int = 0, verify: bool = True,
                 variant: str = "fp32", io_binding: bool | None = None) -> None:
        directory = self.directory = Path(directory)
        self.threads = threads
        self.manifest = manifest = load_manifest(directory, verify=verify)
        self.kind = manifest["kind"]
        check_variant(manifest, variant, directory=directory)  # before any session is loaded
        chosen = providers(device)
        self.sasrec = session(directory / manifest["graphs"]["sasrec"]["file"], chosen, threads=threads)
        self.variant = resolve_variant(manifest, variant, self.sasrec.get_providers()[0], directory=directory)
        self.max_len = manifest["settings"]["sasrec_max_len"]
        self.mformer = self.user_encoder = self.text = None
        self.gate_scale: float | None = None  # g / tau of a gated fusion
        # Items added after training (`laser-batch items add`) have internal ids above SASRec's table: no ID.
        self.id_items: int | None = manifest["settings"].get("sasrec_num_items")
        if self.kind == "laser":
            import polars as pl
            import tokenizers

            from laser_batch.config import TextConfig
            from laser_batch.text import TextEncoder

            graphs = manifest["graphs"]
            if "mformer" in graphs:
                self.mformer = session(directory / graphs["mformer"]["file"], chosen, threads=threads)
            self.user_encoder = session(directory / self.variant.file, chosen, threads=threads)
            settings = manifest["settings"]
            self.text = TextEncoder(tokenizers.Tokenizer.from_file(str(directory / TOKENIZER)),
                                    pl.read_parquet(directory / ITEMS_TEXT), TextConfig(**settings["text"]),
                                    pad_id=settings["pad_id"])
            self.id_window = settings["id_window"]
            self.takes_prefix = "prefix" in [i.name for i in self.user_encoder.get_inputs()]
            if settings.get("fusion", "none") == "gated":
                self.gate_scale = settings["gate"] / settings["temperature"]
        self.providers = self.sasrec.get_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in self.providers:
            # onnxruntime-gpu lists CUDA as available even without a GPU or CUDA libraries, then falls back.
            raise ArtifactError("--device cuda: ONNX Runtime could not start its CUDA execution provider (no GPU, "
                                f"or CUDA/cuDNN libraries missing); it would run on {self.providers[0]}")
        if device == "auto":
            logger.info("ONNX Runtime runs on %s", self.providers[0])
        on_cuda = self.providers[0] == "CUDAExecutionProvider"
        self.io_binding = on_cuda if io_binding is None else bool(io_binding)
        self._device = ("cuda", 0) if on_cuda else ("cpu", 0)  # where bound intermediate tensors live

    def embed(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """(B, D) float32 user vectors of internal-id histories (each non-empty, ids 1..N): `item_matrix.npy`'s
        rows score them."""
        return self.run(self.feeds(histories))

    def run(self, feeds: Feeds) -> np.ndarray:
        """(B, D) user vectors from the inputs `feeds` built."""
        if self.kind == "sasrec":
            return self._run(self.sasrec, feeds, "id_vectors")[:, -1]
        return self.user_vectors(feeds, self._run(self.user_encoder, feeds, "embedding"))

    def user_vectors(self, feeds: Feeds, embedding: np.ndarray) -> np.ndarray:
        """The user vectors from the user encoder's `embedding` (B, D_llm): the embedding itself, or with the gated
        fusion [SASRec user state ; g / tau * embedding] (B, d_id + D_llm)."""
        if self.gate_scale is None:
            return embedding
        return np.concatenate([feeds.sasrec_state, embedding * np.float32(self.gate_scale)], axis=1)

    def feeds(self, histories: Sequence[np.ndarray]) -> Feeds:
        """The inputs of the last graph (SASRec: sasrec.onnx; Laser: user_encoder.onnx) for a batch of histories.

        With I/O binding the Laser prefix is an `onnxruntime.OrtValue` left where the M-Former wrote it (on the
        GPU under CUDA) and bound as the user encoder's input as it is; every other value is a NumPy array.
        """
        from laser_batch.sequences import pad_left

        id_histories = list(histories)
        if self.id_items is not None:  # added items are read as text only: the ID path skips them
            id_histories = [h[h <= self.id_items] for h in id_histories]
        width = min(self.max_len, max(1, max(len(h) for h in id_histories)))
        item_ids = pad_left(id_histories, width)
        if self.kind == "sasrec":
            return Feeds(item_ids=item_ids)
        feeds = Feeds()
        if self.takes_prefix or self.gate_scale is not None:
            # SASRec reads the whole history (up to max_len); the M-Former sees its last id_window positions.
            vectors = self._run(self.sasrec, {"item_ids": item_ids}, "id_vectors")
            feeds.sasrec_state = vectors[:, -1] if self.gate_scale is not None else None
        if self.takes_prefix:
            mask = (item_ids[:, -self.id_window:] != 0).astype(np.int64)
            mask[:, -1] |= mask.sum(1) == 0  # only added items: the M-Former reads one zero vector (no ID)
            feeds["prefix"] = self._run(self.mformer, {"id_vectors": vectors[:, -self.id_window:], "id_mask": mask},
                                        "prefix", keep=True)
        feeds["input_ids"], feeds["attention_mask"] = self.text.encode_users(histories)
        return feeds

    def _run(self, graph, inputs: dict, output: str, *, keep: bool = False):
        """One output of `graph`: a NumPy array, or with I/O binding and `keep` an OrtValue left on the device.

        With I/O binding, inputs are copied to the device once (an OrtValue input is bound where it is) and the
        output is written by ONNX Runtime into a buffer on the device (`keep`) or in host memory.
        """
        if not self.io_binding:
            return graph.run([output], inputs)[0]
        import onnxruntime as ort

        binding = graph.io_binding()
        for name, value in inputs.items():
            if isinstance(value, np.ndarray):  # on the CPU a view of the array; the binding holds it until done
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), *self._device)
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(output, *(self._device if keep else ("cpu", 0)))
        graph.run_with_iobinding(binding)
        value = binding.get_outputs()[0]
        return value if keep else value.numpy()
