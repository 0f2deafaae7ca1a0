"""DICOMweb: find a study's CT series (QIDO-RS), fetch them to disk (WADO-RS), store results (STOW-RS).

Every request is retried with exponential back-off on connection errors, timeouts and 5xx/408/429
answers, then fails with :class:`PacsUnavailable`. Credentials come from the environment
(:data:`USER_ENV` + :data:`PASSWORD_ENV`, or :data:`TOKEN_ENV`) and are never logged; error
messages name the step and the HTTP status, never a URL (URLs carry study UIDs).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import requests
from dicomweb_client import DICOMwebClient

from pe_triage.config import PacsConfig
from pe_triage.predict import PredictError

log = logging.getLogger(__name__)

USER_ENV, PASSWORD_ENV, TOKEN_ENV = "PE_TRIAGE_PACS_USER", "PE_TRIAGE_PACS_PASSWORD", "PE_TRIAGE_PACS_TOKEN"
_MODALITY, _SERIES_UID = "00080060", "0020000E"
#: ask for the stored transfer syntax: a PACS that transcodes lossy JPEG to native would hide from
#: ingest that the pixels are lossy (ingest refuses lossy input)
_AS_STORED = (("application/dicom", "*"),)
_RETRIABLE = {408, 429, 500, 502, 503, 504}
T = TypeVar("T")


class PacsError(PredictError):
    """A study that cannot be triaged over DICOMweb (the CLI reports it and exits 2)."""


class PacsUnavailable(PacsError):
    """The PACS did not answer usefully after every retry."""


class StowRejected(PacsError):
    """The PACS refused the result objects; they stay on disk for a retry."""


def connect(url: str, config: PacsConfig) -> DICOMwebClient:
    """A client of the DICOMweb service at ``url``, authenticated from the environment."""
    session = requests.Session()
    if os.environ.get(TOKEN_ENV):
        session.headers["Authorization"] = f"Bearer {os.environ[TOKEN_ENV]}"
    elif os.environ.get(USER_ENV):
        session.auth = (os.environ[USER_ENV], os.environ.get(PASSWORD_ENV, ""))
    client = DICOMwebClient(url, session=session, timeout=(config.connect_timeout_s, config.read_timeout_s))
    client.set_http_retry_params(retry=False)  # retried here, with the configured back-off
    return client


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return None if response is None else int(response.status_code)


def with_retries(call: Callable[[], T], what: str, config: PacsConfig) -> T:
    """``call()``, retried on transient failures; a 4xx other than 408/429 is not retried."""
    for attempt in range(config.retries):
        try:
            return call()
        except (requests.ConnectionError, requests.Timeout, requests.HTTPError,
                requests.exceptions.ChunkedEncodingError) as exc:  # the last: a stream cut mid-series
            status = _status(exc)
            cause = f"HTTP {status}" if status else type(exc).__name__
            if status is not None and status not in _RETRIABLE:
                raise PacsError(f"{what}: the PACS answered {cause}") from None
            if attempt + 1 == config.retries:
                raise PacsUnavailable(f"{what}: PACS unreachable after {config.retries} attempts ({cause})") from None
            delay = config.backoff_s * 2**attempt
            log.warning("%s: %s, retrying in %.1f s (attempt %d of %d)", what, cause, delay, attempt + 2, config.retries)
            time.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


def _value(item: dict, tag: str) -> str:
    values = item.get(tag, {}).get("Value", [])
    return str(values[0]) if values else ""


def ct_series(client: DICOMwebClient, study_uid: str, config: PacsConfig) -> list[str]:
    """The study's CT series (QIDO-RS); :class:`PacsError` when it has none."""
    found = with_retries(lambda: client.search_for_series(study_instance_uid=study_uid), "QIDO-RS series search", config)
    modalities = sorted({_value(s, _MODALITY) or "?" for s in found})
    ct = [_value(s, _SERIES_UID) for s in found if _value(s, _MODALITY) == "CT"]
    if not ct:
        detail = f"its {len(found)} series have modalities {modalities}" if found else "the PACS knows no series of it"
        raise PacsError(f"the study has no CT series ({detail})")
    return ct


def retrieve_study(client: DICOMwebClient, study_uid: str, folder: Path, config: PacsConfig) -> list[Path]:
    """Each CT series of the study into its own sub-folder of ``folder`` (WADO-RS), one instance in
    memory at a time; a failed series is fetched again from scratch. Returns the series folders."""
    folders = []
    for n, series_uid in enumerate(ct_series(client, study_uid, config), start=1):
        target = folder / f"series-{n}"
        folders.append(target)

        def fetch(target: Path = target, series_uid: str = series_uid) -> int:
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            count = 0
            for count, ds in enumerate(client.iter_series(study_uid, series_uid, media_types=_AS_STORED), start=1):
                ds.save_as(target / f"{count:06d}.dcm", enforce_file_format=True)
            return count

        count = with_retries(fetch, f"WADO-RS retrieve of series {n}", config)
        log.info("retrieved series %d: %d instance(s)", n, count)
    return folders
