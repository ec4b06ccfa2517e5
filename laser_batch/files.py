"""File primitives shared by every layer (training, export, scoring): checksums and atomic writes. No torch.

`atomic_write` is the package's one way to write a file that a reader may open at any moment: the content goes
to a hidden temporary sibling, which is renamed over the target only when the writer returned, so a reader sees
the old file or the whole new one, and a writer that fails leaves no temporary file behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: str | Path, write: Callable[[Path], object], *, fs=None) -> None:
    """Write `path` by calling `write(temporary_local_path)`, then renaming the temporary file over `path`.

    Args:
        path: the target; on `fs` a path in that filesystem, else a local path.
        write: writes the whole file at the local path it is given (e.g. `df.write_parquet`, `Path.write_text`).
        fs: a pyarrow filesystem (e.g. S3) for a remote target, or None for the local one. A remote target gets a
            copy of a local temporary file under a temporary name on `fs`, then a move.
    """
    if fs is not None and type(fs).__name__ != "LocalFileSystem":
        with tempfile.TemporaryDirectory(prefix="laser-batch-") as scratch:
            local = Path(scratch) / "file"
            write(local)
            remote_tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
            with local.open("rb") as src, fs.open_output_stream(remote_tmp) as dst:
                shutil.copyfileobj(src, dst, CHUNK)
            fs.move(remote_tmp, str(path))
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def replace_directory(partial: Path, out: Path) -> None:
    """Move the finished directory `partial` into place as `out`; an old `out` is removed only once the new one is
    there (a reader sees the old directory or the new one, never a half-written one)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    partial.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
