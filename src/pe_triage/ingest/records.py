"""What the passes hand each other: the source listing, a scanned file, the files of one SOP instance, a
series' write task, and what became of each file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pe_triage.config import IngestConfig
from pe_triage.dicom import Pseudonymizer, SliceHeader
from pe_triage.schema import Reason
from pe_triage.storage import Location

#: what becomes of a file (``Outcome.status``)
INGESTED, ALREADY_INGESTED, DUPLICATE, QUARANTINED = "ingested", "already_ingested", "duplicate", "quarantined"


@dataclass(frozen=True, slots=True)
class Scanned:
    path: str
    size: int
    header: SliceHeader | None = None
    reason: Reason | None = None
    detail: str = ""


@dataclass(frozen=True)
class Listing:
    """The source's files, each real file once, and what is refused before it is opened."""

    files: list[tuple[str, int]]  # (relative path, size), sorted
    refused: list[Scanned]  # links out of the source, folders that cannot be listed, special files
    skipped_links: int  # names of a file or folder listed under another name (links inside the source)

    @property
    def paths(self) -> list[str]:
        """Every relative path that gets an outcome."""
        return [rel for rel, _ in self.files] + [s.path for s in self.refused]


@dataclass(frozen=True)
class Candidate:
    """One SOP instance of a series: every file that carries it (sorted by path) and its label."""

    files: tuple[Scanned, ...]
    label: str | None

    @property
    def header(self) -> SliceHeader:
        header = self.files[0].header
        assert header is not None
        return header


@dataclass(frozen=True)
class SeriesTask:
    src: Location
    out: Location
    pseudo: Pseudonymizer
    config: IngestConfig
    site: str
    series_uid: str
    candidates: tuple[Candidate, ...]  # sorted by z
    existing_file: str | None
    existing_digest: dict[str, str]  # sop -> source digest of rows already in the dataset
    labels: dict[str, str | None]  # sop -> label for rows already in the dataset
    rewrite: bool  # existing labels changed
    staged: str
    metadata: dict[str, str]


@dataclass(frozen=True, slots=True)
class Outcome:
    path: str
    size: int
    digest: str | None  # Pseudonymizer.source_digest of the file, when it was read
    status: str
    sop_uid: str | None = None
    reason: Reason | None = None
    detail: str = ""


@dataclass
class SeriesResult:
    series_uid: str
    staged: str | None
    rows: int
    outcomes: list[Outcome] = field(default_factory=list)
    written: list[dict[str, Any]] = field(default_factory=list)  # the staged rows without pixels, in file order
