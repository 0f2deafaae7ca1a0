"""Ingest one site: DICOM files (folder or S3 prefix) → the ``slices`` Parquet dataset.

Two passes, so a site of any size is planned from headers alone and pixels are decoded once:

1. **scan** (parallel, header bytes only): list the source (each real file once, links out of it
   refused unread), validate each file (sizes within limits before anything decodes), pseudonymise
   its ids, locate its pixels. Whole-site decisions follow in the parent: series grouping,
   geometry majority, positions, SOP conflicts, labels.
2. **write** (parallel, one series per task): read each file once (into a buffer reused from file
   to file), hash those bytes, decode and convert each slice to HU in z order and stream row groups
   into that series' Parquet file. A series that gained slices or labels is rewritten whole (its
   old rows are copied, never re-decoded), so ``slice_index`` always follows z.

Series files are staged under ``_staging/`` (ignored by Parquet dataset readers) and moved into
place only when every task has finished: an interrupted run leaves nothing visible, and a re-run
on the same input writes nothing. One run per site and dataset writes at a time (a second one
waits ``lock_wait_s``, then fails naming the holder), and a failed run removes its staging.

Layout of ``out``::

    site=<site>/<series pseudonym>.parquet         the slices (schema.SLICES_SCHEMA)
    _quarantine/site=<site>/quarantine.parquet     every file not ingested, with a reason
    _reports/site=<site>/ingest_report.json        counts of the latest run (no source path)
    _dataset.json                                  schema version and pseudonym-key fingerprint
    _locks/site=<site>.lock                        held by the one run of the site (storage.Lock)

A run starts at most one worker per ``min_files_per_worker`` files (a worker costs ~0.6 s to start)
and shows its progress as ``ingest <site>: headers`` and ``ingest <site>`` (files done).

Modules: ``scan`` (pass 1), ``plan`` (the whole-site decisions), ``write`` (pass 2), ``report``, and
``site``, which runs them; ``records`` holds what they hand each other.
"""

from pe_triage.ingest.site import IngestError, ingest_site, quarantined_files

__all__ = ["IngestError", "ingest_site", "quarantined_files"]
