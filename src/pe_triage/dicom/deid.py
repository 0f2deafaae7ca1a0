"""Keyed pseudonyms: the only form in which patient, study, series and instance ids leave ingest.

HMAC-SHA256 with a deployment secret (DICOM PS3.15 Annex E: replace identifiers by values that
cannot be reversed without the key). The site is part of the message, so the same MRN at two
hospitals gives two pseudonyms, and the same input always gives the same pseudonym.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass

KEY_ENV = "PE_TRIAGE_PSEUDONYM_KEY"
#: public, so anything pseudonymised with it is not protected: demos and tests on synthetic data only
DEMO_KEY = b"pe-triage demo key: synthetic data only, never patient data"
MIN_KEY_BYTES = 16
#: what each pseudonym stands for, readable at a glance in tables and reports
PREFIXES = {"patient": "pt", "study": "st", "series": "se", "sop": "im", "path": "file", "source": "src"}
#: separates the source digests from every other use of the key
_SOURCE_DIGEST_DOMAIN = b"pe-triage source file\x1f"

log = logging.getLogger(__name__)


class MissingKeyError(RuntimeError):
    """No pseudonym key is configured and demo mode was not asked for."""


@dataclass(frozen=True)
class Pseudonymizer:
    key: bytes
    site: str

    def __post_init__(self) -> None:
        if len(self.key) < MIN_KEY_BYTES:
            raise ValueError(f"pseudonym key must have at least {MIN_KEY_BYTES} bytes")

    def __repr__(self) -> str:  # never show the key in logs or tracebacks
        return f"Pseudonymizer(site={self.site!r}, key=<{self.fingerprint}>)"

    def __call__(self, kind: str, value: str) -> str:
        """``kind`` (one of :data:`PREFIXES`) namespaces the value; 24 hex digits = 96 bits."""
        msg = f"{self.site}\x1f{kind}\x1f{value}".encode()
        return PREFIXES[kind] + "-" + hmac.new(self.key, msg, hashlib.sha256).hexdigest()[:24]

    def source_digest(self, data: bytes | memoryview) -> str:
        """HMAC-SHA256 of a source file's bytes: the same bytes give the same value, so duplicates are
        found across runs and sites, but unlike a plain hash nobody without the key can match a file
        they hold (an identified original) against the dataset."""
        digest = hmac.new(self.key, _SOURCE_DIGEST_DOMAIN, hashlib.sha256)
        digest.update(data)
        return digest.hexdigest()

    @property
    def fingerprint(self) -> str:
        """Identifies the key without revealing it: a dataset refuses rows made with another key."""
        return hmac.new(self.key, b"pe-triage key fingerprint", hashlib.sha256).hexdigest()[:16]

    @property
    def is_demo(self) -> bool:
        return self.key == DEMO_KEY


def load_key(*, demo: bool = False) -> bytes:
    """The deployment key from ``PE_TRIAGE_PSEUDONYM_KEY``; the public demo key only when asked."""
    value = os.environ.get(KEY_ENV, "")
    if value:
        key = value.encode()
        if len(key) < MIN_KEY_BYTES:
            raise MissingKeyError(f"{KEY_ENV} is shorter than {MIN_KEY_BYTES} bytes")
        return key
    if demo:
        log.warning("demo mode: pseudonyms use the public demo key; never use it on patient data")
        return DEMO_KEY
    raise MissingKeyError(
        f"set {KEY_ENV} (a secret of at least {MIN_KEY_BYTES} bytes, e.g. from a Kubernetes secret) "
        "or pass --demo for synthetic data"
    )
