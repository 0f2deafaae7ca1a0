"""Local folders and S3 prefixes behind one pyarrow filesystem interface.

S3 settings come from the standard AWS environment (credentials chain, ``AWS_REGION``,
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for S3-compatible stores), never from code.
:class:`Lock` gives one writer at a time to a part of a dataset, on both.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

log = logging.getLogger(__name__)


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


# -- one writer at a time ------------------------------------------------------------------------

#: seconds between two tries of a waiting run: each try is one small request or system call
_POLL_S = 1.0
#: a waiting run repeats who it waits for this often, so a long wait is never silent
_SAY_AGAIN_S = 60.0


class LockBusy(RuntimeError):
    """Another live run holds the lock; the message names it by host, pid and times, never by data."""


class LockLost(RuntimeError):
    """Another run took the lock over (this one had stopped renewing it): this run must not commit."""


def _pid_space() -> str:
    """This boot of this machine and this pid namespace: a pid names one process only within them
    (two containers may share a host name)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:  # no /proc: a holder's liveness is judged from its heartbeat alone
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, run by another user
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its lock record says: host, process and times; no path, nothing of a patient."""

    host: str
    pid: int
    pid_space: str
    token: str
    started: float
    heartbeat: float

    @classmethod
    def me(cls) -> Holder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), _pid_space(), uuid.uuid4().hex, now, now)

    @classmethod
    def parse(cls, data: bytes, written: float) -> Holder:
        """The recorded holder; a record being written or not ours as an unknown holder seen at ``written``."""
        try:
            d = json.loads(data)
            return cls(str(d["host"]), int(d["pid"]), str(d["pid_space"]), str(d["token"]), float(d["started"]),
                       float(d["heartbeat"]))
        except (ValueError, TypeError, KeyError):
            return cls("unknown", 0, "", "", written, written)

    def body(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    def dead(self, ttl_s: float) -> bool:
        """Not renewed for ``ttl_s``, or a process of this machine and pid namespace that is gone."""
        if time.time() - self.heartbeat > ttl_s:
            return True
        return bool(self.pid_space) and self.pid_space == _pid_space() and not _alive(self.pid)

    def describe(self) -> str:
        started = datetime.fromtimestamp(self.started, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        renewed = f", renewed {time.time() - self.heartbeat:.0f} s ago" if self.heartbeat != self.started else ""
        return f"pid {self.pid} on host {self.host}, started {started}{renewed}"


class _LocalLock:
    """``flock`` on a lock file. The kernel drops the lock when its holder dies (kill -9 too), so a dead
    holder never blocks and a live one is never robbed: no TTL. Works on NFS (Linux maps flock to NFS
    byte-range locks). The file is never deleted: a waiter could otherwise lock an unlinked inode."""

    renews = False

    def __init__(self, path: str) -> None:
        self.path, self.fd = path, -1

    def try_acquire(self, me: Holder, ttl_s: float) -> Holder | None:
        """None once taken; else who holds it."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Holder.parse(os.pread(fd, 4096, 0), time.time())
            os.close(fd)
            return holder
        try:
            os.ftruncate(fd, 0)  # a dead holder's record
            os.pwrite(fd, me.body(), 0)
        except OSError:  # e.g. a full disk: the flock must not outlive the failed take
            os.close(fd)
            raise
        self.fd = fd
        return None

    def renew(self, me: Holder) -> bool:
        return True

    def holds(self, me: Holder) -> bool:
        return self.fd >= 0

    def release(self) -> None:
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # the last descriptor of the file: the flock goes with it
        self.fd = -1


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class _S3Lock:
    """A lock object written with S3 conditional requests (AWS S3 has them; tested on the moto server).

    Take: ``PUT If-None-Match: *`` creates it only where there is none. Renew, and take over from a
    dead holder: ``PUT If-Match: <ETag read>`` replaces exactly the record that was read, so of several
    runs taking over one dead lock only the first matches (the others get 412), and a holder whose
    lock was taken over learns it at its next renewal. Release: ``DELETE If-Match: <own ETag>`` never
    deletes another run's lock. Each take is read back (the token must be ours) for stores whose
    conditional writes are a check, then a write.
    """

    renews = True

    def __init__(self, root: str, name: str) -> None:
        self.bucket, _, prefix = root.partition("/")
        self.key = "/".join(p for p in (prefix, "_locks", f"{name}.lock") if p)
        self.client = _s3_client()
        self.etag = ""

    def _put(self, me: Holder, **condition: str) -> bool:
        try:
            self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=me.body(), **condition)["ETag"]
        except ClientError as exc:
            if _status(exc) in (409, 412):  # precondition failed, or a concurrent conditional write won
                return False
            raise
        return True

    def _read(self) -> tuple[Holder, str] | None:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as exc:
            if _status(exc) == 404:
                return None
            raise
        return Holder.parse(got["Body"].read(), got["LastModified"].timestamp()), got["ETag"]

    def try_acquire(self, me: Holder, ttl_s: float) -> Holder | None:
        """None once taken; else who holds it."""
        for _ in range(3):  # the lock may be released between a refused create and the read
            if self._put(me, IfNoneMatch="*"):
                return self._confirm(me)
            found = self._read()
            if found is None:
                continue
            holder, etag = found
            if not holder.dead(ttl_s):
                return holder
            if self._put(me, IfMatch=etag):
                log.warning("took over lock %s from a dead run (%s)", self.key.rsplit("/", 1)[-1], holder.describe())
                return self._confirm(me)
            # another run took it over first: the next round reads who
        return Holder.parse(b"", time.time())

    def _confirm(self, me: Holder) -> Holder | None:
        """None when the record read back is ours; else whose it is."""
        found = self._read()
        if found is None:
            return Holder.parse(b"", time.time())
        return None if found[0].token == me.token else found[0]

    def renew(self, me: Holder) -> bool:
        """False once another run has replaced the record."""
        return self._put(me, IfMatch=self.etag)

    def holds(self, me: Holder) -> bool:
        found = self._read()
        return found is not None and found[0].token == me.token

    def release(self) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except ClientError as exc:
            if _status(exc) not in (404, 412):  # 412: another run took it over meanwhile
                raise


def _s3_client() -> Any:
    """boto3 for the lock (pyarrow has no conditional writes), from the same environment as :func:`_s3`."""
    import boto3  # type: ignore[import-untyped]  # only S3 locks need it; importing takes ~0.1 s

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return boto3.client("s3", endpoint_url=endpoint or None, region_name=region or None)


class Lock:
    """One writer at a time for ``name`` (e.g. ``site=a``) of the dataset at ``loc``, for a ``with`` block.

    The record (``_locks/<name>.lock``) names its holder by host, pid and a random token. A local folder
    uses ``flock`` (:class:`_LocalLock`); S3 uses conditional writes renewed every quarter of ``ttl_s``
    by a thread (:class:`_S3Lock`), and a record not renewed for ``ttl_s``, or left by a process of this
    machine that is gone, is taken over (so ``ttl_s`` must exceed the clock skew between machines). A run
    finding the lock held waits up to ``wait_s`` seconds, logging who holds it, then raises
    :class:`LockBusy`. Call :meth:`check` right before making changes visible.
    """

    def __init__(self, loc: Location, name: str, *, ttl_s: float, wait_s: float, poll_s: float = _POLL_S) -> None:
        if ttl_s <= 0 or wait_s < 0 or poll_s <= 0:
            raise ValueError(f"lock {name}: the TTL and poll interval must be positive, the wait not negative")
        self.name, self.ttl_s, self.wait_s, self.poll_s = name, ttl_s, wait_s, poll_s
        if isinstance(loc.fs, pafs.S3FileSystem):
            self._backend: _LocalLock | _S3Lock = _S3Lock(loc.root, name)
        elif isinstance(loc.fs, pafs.LocalFileSystem):
            self._backend = _LocalLock(loc.join("_locks", f"{name}.lock"))
        else:
            raise ValueError(f"{loc.uri}: locks need a local folder or S3")
        self._me = Holder.me()
        self._stop = threading.Event()
        self._lost = False
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        said: str | None = None
        said_at = 0.0
        while (holder := self._backend.try_acquire(self._me, self.ttl_s)) is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockBusy(f"lock {self.name} is held by another run ({holder.describe()}); "
                               f"gave up after waiting {self.wait_s:.0f} s")
            if holder.token != said or time.monotonic() - said_at > _SAY_AGAIN_S:
                log.warning("lock %s is held by another run (%s): waiting up to %.0f s", self.name, holder.describe(), left)
                said, said_at = holder.token, time.monotonic()
            time.sleep(min(self.poll_s, left))
        if self._backend.renews:
            self._beat = threading.Thread(target=self._renew, name=f"lock {self.name}", daemon=True)
            self._beat.start()

    def _renew(self) -> None:
        """Renews the record every quarter TTL until released; stops for good once another run took it."""
        while not self._stop.wait(self.ttl_s / 4):
            self._me = dataclasses.replace(self._me, heartbeat=time.time())
            try:
                if not self._backend.renew(self._me):
                    self._lost = True
                    return
            except (BotoCoreError, ClientError) as exc:  # a network hiccup: the TTL leaves room for three more
                log.warning("could not renew lock %s (%s); trying again", self.name, type(exc).__name__)

    def check(self) -> None:
        """Raises :class:`LockLost` when another run has taken the lock over."""
        if self._lost or not self._backend.holds(self._me):
            self._lost = True
            raise LockLost(f"lock {self.name} was taken over by another run after this one stopped renewing it "
                           f"for {self.ttl_s:.0f} s; nothing more of this run is committed")

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self._lost:
            return
        try:
            self._backend.release()
        except (OSError, BotoCoreError, ClientError) as exc:  # never hide the run's own outcome behind this
            log.warning("could not release lock %s (%s): it expires after %.0f s", self.name, type(exc).__name__,
                        self.ttl_s)

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
