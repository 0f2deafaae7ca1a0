"""Pass 1: the header scan, in parallel chunks of files; only the header bytes are read."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor

from pe_triage.dicom import HEADER_PREFIX_BYTES, IncompleteHeader, Pseudonymizer, Rejected, parse_header
from pe_triage.ingest.records import Scanned
from pe_triage.parallel import run
from pe_triage.schema import Reason
from pe_triage.storage import Location


def scan_files(src: Location, items: Sequence[tuple[str, int]], pseudo: Pseudonymizer) -> list[Scanned]:
    """Header scan of a chunk of files (runs in a worker)."""
    results = []
    for rel, size in items:
        path = src.join(rel)
        try:
            prefix = src.read(path, min(size, HEADER_PREFIX_BYTES)) if size else b""
            try:
                header = parse_header(prefix, pseudo, complete=size <= HEADER_PREFIX_BYTES)
            except IncompleteHeader:
                header = parse_header(src.read(path), pseudo, complete=True)
            results.append(Scanned(rel, size, header))
        except Rejected as r:
            results.append(Scanned(rel, size, reason=r.reason, detail=r.detail))
        except OSError as exc:
            results.append(Scanned(rel, size, reason=Reason.UNREADABLE, detail=f"cannot read file ({type(exc).__name__})"))
    return results


def _scan_chunk(args: tuple[Location, Sequence[tuple[str, int]], Pseudonymizer]) -> list[Scanned]:
    return scan_files(*args)


def scan_site(pool: Executor | None, src: Location, items: Sequence[tuple[str, int]], pseudo: Pseudonymizer,
              chunk_files: int) -> list[Scanned]:
    """Every listed file scanned, in listing order; chunks of ``chunk_files`` keep the pool's overhead per file small."""
    chunks = [items[i : i + chunk_files] for i in range(0, len(items), chunk_files)]
    return [s for chunk in run(pool, _scan_chunk, [(src, c, pseudo) for c in chunks]) for s in chunk]
