"""Local folders and S3 prefixes behind one pyarrow filesystem interface.

S3 settings come from the standard AWS environment (credentials chain, ``AWS_REGION``,
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for S3-compatible stores), never from code.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


@dataclass(frozen=True)
class Location:
    """A filesystem and a root path on it; picklable, so worker processes can open files."""

    fs: pafs.FileSystem
    root: str
    uri: str

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def read(self, path: str, nbytes: int | None = None) -> bytes:
        """The whole file, or its first ``nbytes`` (one ranged request on S3)."""
        with self.fs.open_input_file(path) as f:
            return f.read() if nbytes is None else f.read_at(nbytes, 0)

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def list_files(self, path: str | None = None) -> list[tuple[str, int]]:
        """(relative path, size) of every file below ``path``, sorted; hidden files included."""
        base = path or self.root
        if self.fs.get_file_info(base).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{self.uri}: no such folder or prefix")
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        prefix = base.rstrip("/") + "/"
        return sorted((i.path[len(prefix) :], i.size or 0) for i in infos if i.type == pafs.FileType.File)

    def write_bytes(self, path: str, data: bytes) -> None:
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def replace(self, src: str, dst: str) -> None:
        """Move ``src`` over ``dst``: an atomic rename locally, copy + delete on S3."""
        self.fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
        self.fs.move(src, dst)


def _s3() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, object] = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def location(uri: str) -> Location:
    """``s3://bucket/prefix`` or a local path (relative paths are made absolute)."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        return Location(_s3(), f"{parsed.netloc}{parsed.path}".rstrip("/"), uri)
    if "://" in uri:
        raise ValueError(f"{uri}: only local paths and s3:// URIs are supported")
    return Location(pafs.LocalFileSystem(), os.path.abspath(uri), uri)


class RowGroupWriter:
    """Streams row groups into one Parquet file, opened at the first group: a task that writes
    nothing leaves no file. The ``bulk`` pixel column gets neither a dictionary nor statistics
    (both cost time and bytes on image data); string columns get a dictionary."""

    def __init__(self, loc: Location, path: str, schema: pa.Schema, *, bulk: str, zstd_level: int) -> None:
        self.loc, self.path, self.schema, self.bulk, self.zstd_level = loc, path, schema, bulk, zstd_level
        self._writer: pq.ParquetWriter | None = None

    @property
    def opened(self) -> bool:
        return self._writer is not None

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self.loc.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
            small = [f.name for f in self.schema if f.name != self.bulk]
            self._writer = pq.ParquetWriter(
                self.path, self.schema, filesystem=self.loc.fs, compression="zstd", compression_level=self.zstd_level,
                use_dictionary=[c for c in small if self.schema.field(c).type == pa.string()], write_statistics=small,
            )
        self._writer.write_table(table)

    def __enter__(self) -> RowGroupWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()



@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A hidden temporary path beside ``path``, renamed onto it when the block succeeds: readers see
    the old file or the new one, never half of one (a killed writer leaves no partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """:func:`atomic_path` for a folder, which the block creates and fills. A folder cannot be renamed
    onto a non-empty one, so an older folder at ``path`` is first moved aside: ``path`` is only ever
    the old folder or the new one, never a mix, and never missing once it exists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.{uuid.uuid4().hex}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
