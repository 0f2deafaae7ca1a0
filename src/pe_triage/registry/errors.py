"""The registry's errors: each a ``RuntimeError`` whose message is the one line the CLI prints."""

from __future__ import annotations


class RegistryError(RuntimeError):
    """A registry operation cannot proceed; the message says why and what to do."""


class IntegrityError(RegistryError):
    """A registered version is not what was registered or promoted (artifacts changed since, or a
    champion alias no recorded decision explains): refused, nothing of it loaded."""


class PromotionConflict(RegistryError):
    """Another promote or rollback moved (or holds) the champion meanwhile: nothing was changed
    (CLI exit 1); the message names the winner or the holder."""
