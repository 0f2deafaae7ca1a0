"""Ingest one site: scan, plan, write the series in parallel, then commit them, the quarantine table and
the report at once (the layout is in the package docstring)."""

from __future__ import annotations

import errno
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pe_triage import __version__
from pe_triage import schema as S
from pe_triage.config import IngestConfig, to_dict
from pe_triage.dicom import Pseudonymizer
from pe_triage.ingest.plan import Plan, existing_rows, make_plan
from pe_triage.ingest.records import (
    DUPLICATE,
    QUARANTINED,
    Candidate,
    Listing,
    Outcome,
    SeriesResult,
    SeriesTask,
)
from pe_triage.ingest.report import label_summary, run_report
from pe_triage.ingest.scan import list_source, scan_site
from pe_triage.ingest.write import write_series
from pe_triage.labels import Manifest, load_manifest
from pe_triage.parallel import run as parallel_run
from pe_triage.parallel import worker_count, worker_pool
from pe_triage.progress import progress
from pe_triage.storage import Location, Lock, location

log = logging.getLogger(__name__)
SITE_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # matched whole: "$" would let a final newline through
#: settings that change how a run executes, not what it writes (kept out of the file metadata)
_EXECUTION_ONLY = {"workers", "min_files_per_worker", "scan_chunk_files", "strict_labels", "lock_wait_s", "lock_ttl_s"}


class IngestError(RuntimeError):
    """The run cannot proceed (bad arguments, foreign dataset, strict label check failed)."""


def _check_dataset(out: Location, pseudo: Pseudonymizer) -> None:
    marker = out.join("_dataset.json")
    info = {"schema_version": S.SCHEMA_VERSION, "key_fingerprint": pseudo.fingerprint, "demo_key": pseudo.is_demo}
    if out.exists(marker):
        found = json.loads(out.read(marker))
        if found.get("key_fingerprint") != pseudo.fingerprint:
            raise IngestError(
                f"{out.uri} was pseudonymised with another key (fingerprint {found.get('key_fingerprint')}); "
                "mixing keys would split patients and defeat de-duplication"
            )
        if found.get("schema_version") != S.SCHEMA_VERSION:
            raise IngestError(f"{out.uri} has schema version {found.get('schema_version')}, this is {S.SCHEMA_VERSION}")
        return
    out.write_bytes(marker, json.dumps(info, indent=2).encode())


def ingest_site(
    site: str,
    source: str,
    out: str,
    *,
    pseudo: Pseudonymizer,
    labels: str | None = None,
    config: IngestConfig = IngestConfig(),
) -> dict[str, Any]:
    """Ingest ``source`` as ``site`` into the slices dataset at ``out``; returns the run report."""
    started = time.perf_counter()
    if not SITE_PATTERN.fullmatch(site):
        raise IngestError(f"site name {site!r} must match {SITE_PATTERN.pattern} (it becomes a folder name)")
    if pseudo.site != site:
        raise IngestError(f"pseudonymizer is for site {pseudo.site!r}, not {site!r}")
    dst = location(out)
    # one run per site and dataset: two would each rewrite a series with only their own slices
    lock = Lock(dst, f"{S.SITE}={site}", ttl_s=config.lock_ttl_s, wait_s=config.lock_wait_s)
    with _disk_full_is_an_error(site), lock, _staging_dropped_on_error(dst, site):
        src = location(source)
        manifest = _manifest(labels, pseudo)
        listing = list_source(src)
        workers = max(1, min(worker_count(config.workers), len(listing.files) // config.min_files_per_worker))
        with worker_pool(workers) as pool:
            return _ingest(_Run(site, src, dst, pseudo, config, pool, workers, started, lock), manifest, listing)


@dataclass(frozen=True)
class _Run:
    """What every part of one run uses."""

    site: str
    src: Location
    dst: Location
    pseudo: Pseudonymizer
    config: IngestConfig
    pool: Executor | None
    workers: int
    started: float
    lock: Lock


@contextmanager
def _disk_full_is_an_error(site: str) -> Iterator[None]:
    """A full disk (or quota) as one clear line, not a traceback: its message names no path."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise IngestError(f"ingest of site {site} stopped: no space left where the dataset is written "
                          f"({errno.errorcode[exc.errno]}); its staged files were removed, free space and run it again"
                          ) from exc


@contextmanager
def _staging_dropped_on_error(dst: Location, site: str) -> Iterator[None]:
    """A failed run removes what it staged, once its workers have stopped. Inside the site's lock, so
    whatever is staged for the site is this run's or a dead run's."""
    try:
        yield
    except BaseException:
        with suppress(OSError):  # the run's own error is the one to report
            staging = dst.join("_staging", f"{S.SITE}={site}")
            if dst.exists(staging):
                dst.fs.delete_dir(staging)
        raise


def _ingest(run: _Run, manifest: Manifest | None, listing: Listing) -> dict[str, Any]:
    site, src, dst, config = run.site, run.src, run.dst, run.config
    _check_dataset(dst, run.pseudo)
    staging = dst.join("_staging", f"{S.SITE}={site}")
    if dst.exists(staging):
        dst.fs.delete_dir(staging)  # left by an interrupted run; never visible to readers
    run_dir = f"{staging}/{uuid.uuid4().hex}"
    existing, existing_files = existing_rows(dst, site)
    metadata = _file_metadata(run.pseudo, config)
    with progress(len(listing.files), f"ingest {site}: headers", unit="file", logger=log) as bar:
        scanned = [*scan_site(run.pool, src, listing.files, run.pseudo, config, done=bar.update), *listing.refused]
    scan_s = time.perf_counter() - run.started

    def make_task(series_uid: str, cands: tuple[Candidate, ...], existing_file: str | None,
                  existing_sha: dict[str, str], labs: dict[str, str | None], rewrite: bool) -> SeriesTask:
        return SeriesTask(src, dst, run.pseudo, config, site, series_uid, cands, existing_file, existing_sha, labs,
                          rewrite, f"{run_dir}/{series_uid}.parquet", metadata)

    plan = make_plan(scanned, existing, existing_files, manifest, make_task)
    results = _write(run, plan, len(listing.paths))
    outcomes = [*plan.quarantined, *(o for r in results for o in r.outcomes)]
    by_sop_outcome = {o.sop_uid: o for o in outcomes if o.sop_uid and o.status == QUARANTINED}
    final = _final_rows(existing, results)
    label_report = label_summary(manifest, final, plan.label_rows, by_sop_outcome) if manifest else None
    if config.strict_labels and label_report and (label_report["unmatched_rows"] or label_report["inconsistent_patients"]):
        if dst.exists(run_dir):
            dst.fs.delete_dir(run_dir)
        raise IngestError(
            f"label manifest does not match the ingested slices: {len(label_report['unmatched_rows'])} unmatched row(s), "
            f"{len(label_report['inconsistent_patients'])} inconsistent patient(s); first: "
            f"{(label_report['unmatched_rows'] or label_report['inconsistent_patients'])[0]}"
        )
    run.lock.check()  # a run that lost its lock (stalled past its TTL) must not overwrite the new holder's work
    _commit(dst, site, results, staging)
    _write_quarantine(dst, site, run.pseudo, outcomes)
    report = run_report(site, src, listing, outcomes, final, results, label_report, run.pseudo, config.z_grid_tolerance,
                        run.workers, scan_s, run.started)
    dst.write_bytes(dst.join("_reports", f"{S.SITE}={site}", "ingest_report.json"), json.dumps(report, indent=2).encode())
    return report


def _write(run: _Run, plan: Plan, files: int) -> list[SeriesResult]:
    """Pass 2 over the series, largest first (it balances the workers), counting every file's outcome:
    those refused before it at once, the others as their series is done."""
    plan.tasks.sort(key=lambda t: -len(t.candidates))
    results = []
    with progress(files, f"ingest {run.site}", unit="file", logger=log) as bar:
        bar.update(len(plan.quarantined))
        for result in parallel_run(run.pool, write_series, plan.tasks):
            results.append(result)
            bar.update(len(result.outcomes))
    return results


def _manifest(labels: str | None, pseudo: Pseudonymizer) -> Manifest | None:
    if labels is None:
        return None
    lab = location(labels)
    return load_manifest(lab.read(lab.root).decode("utf-8-sig"), pseudo)


def _file_metadata(pseudo: Pseudonymizer, config: IngestConfig) -> dict[str, str]:
    """What every series file records about how it was written (the execution-only settings left out)."""
    return {
        "pe_triage.schema_version": S.SCHEMA_VERSION,
        "pe_triage.version": __version__,
        "pe_triage.key_fingerprint": pseudo.fingerprint,
        "pe_triage.ingest_config": json.dumps({k: v for k, v in to_dict(config).items() if k not in _EXECUTION_ONLY},
                                              sort_keys=True),
    }


def _final_rows(existing: dict[str, dict[str, Any]], results: list[SeriesResult]) -> dict[str, dict[str, Any]]:
    """The site's rows (without pixels) by SOP as they will be once the staged series are committed."""
    final = dict(existing)
    for r in results:
        if r.staged:
            final.update((row[S.SOP_UID], row) for row in r.written)
    return final


def _commit(dst: Location, site: str, results: list[SeriesResult], staging: str) -> None:
    """Move the staged series into place: the only moment the dataset changes."""
    for r in results:
        if r.staged:
            dst.replace(r.staged, dst.join(f"{S.SITE}={site}", f"{r.series_uid}.parquet"))
    if dst.exists(staging):
        dst.fs.delete_dir(staging)


def _write_quarantine(dst: Location, site: str, pseudo: Pseudonymizer, outcomes: list[Outcome]) -> None:
    rows = [
        {S.SITE: site, S.PATH_PSEUDONYM: pseudo("path", o.path), S.SOURCE_HMAC: o.digest, S.SIZE_BYTES: o.size,
         S.REASON: o.reason.value, S.DETAIL: o.detail}
        for o in sorted(outcomes, key=lambda o: o.path)
        if o.status in (QUARANTINED, DUPLICATE) and o.reason is not None
    ]
    qpath = dst.join("_quarantine", f"{S.SITE}={site}", "quarantine.parquet")
    dst.fs.create_dir(qpath.rsplit("/", 1)[0], recursive=True)
    pq.write_table(pa.Table.from_pylist(rows, S.QUARANTINE_SCHEMA), qpath, filesystem=dst.fs, compression="zstd")


def quarantined_files(site: str, source: str, out: str, *, pseudo: Pseudonymizer) -> list[dict[str, Any]]:
    """The quarantine table of ``site`` with clear relative paths, for the hospital that holds the key.

    Outputs only carry path pseudonyms; this maps them back by pseudonymising the source listing.
    """
    dst = location(out)
    table = pq.read_table(dst.join("_quarantine", f"{S.SITE}={site}", "quarantine.parquet"), filesystem=dst.fs)
    clear = {pseudo("path", rel): rel for rel in list_source(location(source)).paths}
    return [{"path": clear.get(row[S.PATH_PSEUDONYM]), **row} for row in table.to_pylist()]
