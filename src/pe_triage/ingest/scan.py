"""Pass 1: list the source, then scan the headers in parallel chunks of files; only the header bytes are read."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import pyarrow.fs as pafs

from pe_triage.config import IngestConfig
from pe_triage.dicom import HEADER_PREFIX_BYTES, IncompleteHeader, Pseudonymizer, Rejected, parse_header
from pe_triage.ingest.records import Listing, Scanned
from pe_triage.parallel import run
from pe_triage.schema import Reason
from pe_triage.storage import Location


def list_source(src: Location) -> Listing:
    """Every file of the source once. A local folder is walked without following links: a link that
    stays inside the source names something the walk lists anyway (so loops end and nothing counts
    twice), and one that leaves it is refused unopened. Object stores have neither links nor folders
    to be refused."""
    if not isinstance(src.fs, pafs.LocalFileSystem):
        return Listing(src.list_files(), [], 0)
    if not os.path.isdir(src.root):
        raise FileNotFoundError(f"{src.uri}: no such folder or prefix")
    return _walk(src.root)


def _walk(root: str) -> Listing:
    files: list[tuple[str, int]] = []
    refused: list[Scanned] = []
    links: list[str] = []
    inodes: set[tuple[int, int]] = set()
    skipped = 0
    folders = [""]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(os.path.join(root, folder)) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            refused.append(Scanned(folder or ".", 0, reason=Reason.UNREADABLE,
                                   detail=f"cannot list folder ({type(exc).__name__})"))
            continue
        for entry in entries:
            rel = f"{folder}/{entry.name}" if folder else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                refused.append(Scanned(rel, 0, reason=Reason.UNREADABLE, detail=f"cannot stat ({type(exc).__name__})"))
                continue
            if stat.S_ISLNK(st.st_mode):
                links.append(rel)
            elif stat.S_ISDIR(st.st_mode):
                folders.append(rel)
            elif not stat.S_ISREG(st.st_mode):
                refused.append(Scanned(rel, 0, reason=Reason.UNREADABLE, detail="not a regular file (device, pipe or socket)"))
            elif (st.st_dev, st.st_ino) in inodes:
                skipped += 1  # a hard link to a file listed already
            else:
                inodes.add((st.st_dev, st.st_ino))
                files.append((rel, st.st_size))
    bad_links = _refused_links(root, links)
    refused += bad_links
    skipped += len(links) - len(bad_links)
    return Listing(sorted(files), sorted(refused, key=lambda s: s.path), skipped)


def _refused_links(root: str, links: list[str]) -> list[Scanned]:
    """The symbolic links that lead out of the source or to nothing. The others lead to a file or
    folder inside it, which the walk lists under its own name (a loop back into the source too)."""
    real_root = os.path.realpath(root)
    refused = []
    for rel in links:
        target = os.path.realpath(os.path.join(root, rel))
        if os.path.commonpath([target, real_root]) != real_root:
            refused.append(Scanned(rel, 0, reason=Reason.OUTSIDE_SOURCE,
                                   detail="symbolic link to a path outside the source folder: not read"))
        elif not os.path.exists(target):
            refused.append(Scanned(rel, 0, reason=Reason.UNREADABLE, detail="broken symbolic link"))
    return refused


def scan_files(src: Location, items: Sequence[tuple[str, int]], pseudo: Pseudonymizer, config: IngestConfig) -> list[Scanned]:
    """Header scan of a chunk of files (runs in a worker)."""
    results = []
    for rel, size in items:
        path = src.join(rel)
        try:
            prefix = src.read(path, min(size, HEADER_PREFIX_BYTES)) if size else b""
            try:
                header = parse_header(prefix, pseudo, complete=size <= HEADER_PREFIX_BYTES, config=config)
            except IncompleteHeader:
                header = parse_header(src.read(path), pseudo, complete=True, config=config)
            results.append(Scanned(rel, size, header))
        except Rejected as r:
            results.append(Scanned(rel, size, reason=r.reason, detail=r.detail))
        except OSError as exc:
            results.append(Scanned(rel, size, reason=Reason.UNREADABLE, detail=f"cannot read file ({type(exc).__name__})"))
    return results


def _scan_chunk(args: tuple[Location, Sequence[tuple[str, int]], Pseudonymizer, IngestConfig]) -> list[Scanned]:
    return scan_files(*args)


def scan_site(pool: Executor | None, src: Location, items: Sequence[tuple[str, int]], pseudo: Pseudonymizer,
              config: IngestConfig, done: Callable[[int], object] = lambda n: None) -> list[Scanned]:
    """Every listed file scanned, in listing order; chunks of ``scan_chunk_files`` keep the pool's overhead per
    file small. ``done`` is told the size of each chunk scanned."""
    step = config.scan_chunk_files
    chunks = [items[i : i + step] for i in range(0, len(items), step)]
    scanned: list[Scanned] = []
    for chunk in run(pool, _scan_chunk, [(src, c, pseudo, config) for c in chunks]):
        scanned.extend(chunk)
        done(len(chunk))
    return scanned
