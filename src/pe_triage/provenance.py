"""Where a model came from: code version, configuration hash and dataset digests.

These go into model artifacts and registry tags so a version can be traced back to the exact code,
configuration and data that produced it, and two evaluations can be checked to use the same data.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pe_triage import __version__
from pe_triage import schema as S
from pe_triage.storage import location

#: set at image build time (there is no .git inside a container)
GIT_COMMIT_ENV = "PE_TRIAGE_GIT_COMMIT"


def git_commit() -> str:
    """The commit of the running code: the image's build-time value, else the source checkout's."""
    if value := os.environ.get(GIT_COMMIT_ENV):
        return value
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a configuration mapping (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dataset_digest(folder: str | Path) -> str:
    """Digest of a Parquet dataset (folder or ``s3://`` URI): see :func:`parquet_dataset_digest`."""
    return parquet_dataset_digest(str(folder))[0]


def parquet_dataset_digest(uri: str, subfolder: str | None = None) -> tuple[str, int, int]:
    """(digest, files, rows) of a Parquet dataset, or of ``subfolder`` of it: per file, its relative
    path, row count and the source digest its writer stored (content hash of the inputs + config);
    the file's own bytes otherwise.

    Cheap on large datasets (footers only, for files written by pe-triage) and stable across
    re-runs, since the steps write byte-identical files for identical inputs.
    """
    loc = location(uri)
    root = loc.join(subfolder) if subfolder else loc.root
    files = [rel for rel, _ in loc.list_files(root)
             if rel.endswith(".parquet") and not any(p.startswith(("_", ".")) for p in rel.split("/"))]
    if not files:
        raise ValueError(f"{uri}{f' {subfolder}' if subfolder else ''}: no Parquet files to digest")
    h, rows = hashlib.sha256(), 0
    for rel in files:
        path = f"{root}/{rel}"
        with loc.fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        stored = (meta.metadata or {}).get(S.META_SOURCE_DIGEST.encode())
        h.update(f"{rel}\0{meta.num_rows}\0".encode())
        h.update(stored if stored else hashlib.sha256(loc.read(path)).hexdigest().encode())
        rows += meta.num_rows
    return h.hexdigest(), len(files), rows


def package_version() -> str:
    return __version__
