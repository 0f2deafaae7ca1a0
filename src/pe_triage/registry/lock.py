"""One champion move at a time: ``promote`` and ``rollback`` run inside :func:`champion_lock`.

MLflow has no compare-and-set; its tags are only read and written whole. That is enough for
Lamport's bakery algorithm, which needs no more than such registers. Each contender keeps one tag
on the registered model, ``lock.<random token>`` (JSON), and:

1. writes its entry as ``choosing``;
2. reads every entry and writes its ticket: one above the highest ticket it saw;
3. waits until no other entry is ``choosing`` and none holds a lower ticket (equal tickets: the
   lower token first); then it holds the lock, and deletes its entry when done.

Two contenders that read at the same time may draw the same ticket, but each wrote ``choosing``
before reading, so each sees the other and the token decides; one that comes later reads the
earlier one's ticket and draws a higher one. Entries carry their wall-clock time, refreshed while
waiting: an entry older than ``lock_expiry_s`` belongs to a holder that died (kill -9) and is deleted
by whoever sees it. A holder slower than that finds its entry gone: the ``check`` the lock yields
raises instead of letting it write, and callers verify their writes after making them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pe_triage.config import RegistryConfig
from pe_triage.registry.errors import PromotionConflict

log = logging.getLogger(__name__)

LOCK_PREFIX = "lock."
CHOOSING, TICKET = "choosing", "ticket"


def _live(raw: str, config: RegistryConfig) -> dict[str, Any] | None:
    """A lock entry, or None when it is unreadable or older than the expiry (its holder died)."""
    try:
        entry = json.loads(raw)
        return entry if time.time() - float(entry["time"]) < config.lock_expiry_s else None
    except (ValueError, TypeError, KeyError):
        return None


def moving(tags: Mapping[str, str], config: RegistryConfig) -> bool:
    """Is a champion move under way (a live lock entry among a registered model's tags)?"""
    return any(key.startswith(LOCK_PREFIX) and _live(raw, config) for key, raw in tags.items())


def _entries(client: Any, name: str, config: RegistryConfig) -> dict[str, dict[str, Any]]:
    """Token -> entry of every live lock entry; dead (or unreadable) ones are deleted."""
    live = {}
    for key, raw in client.get_registered_model(name).tags.items():
        if not key.startswith(LOCK_PREFIX):
            continue
        if (entry := _live(raw, config)) is not None:
            live[key.removeprefix(LOCK_PREFIX)] = entry
        else:
            log.warning("%s: removing a dead holder's lock entry (%s)", name, key)
            client.delete_registered_model_tag(name, key)
    return live


def _holder(entry: dict[str, Any]) -> str:
    since = dt.datetime.fromtimestamp(float(entry["time"]), dt.UTC).isoformat(timespec="seconds")
    return f"{entry.get('actor')} ({entry.get('action')}, entry of {since})"


def _blockers(entries: dict[str, dict[str, Any]], token: str, ticket: int) -> list[dict[str, Any]]:
    """Entries that go first: still choosing, or a lower (ticket, token)."""
    return sorted((e for t, e in entries.items() if t != token and
                   (e.get("state") == CHOOSING or (int(e.get("n", 0)), t) < (ticket, token))),
                  key=lambda e: (e.get("state") == CHOOSING, int(e.get("n", 0))))


def _acquire(client: Any, name: str, config: RegistryConfig, token: str, me: dict[str, Any]) -> None:
    key = LOCK_PREFIX + token
    client.set_registered_model_tag(name, key, json.dumps(me | {"state": CHOOSING, "time": time.time()}))
    ticket = 1 + max((int(e.get("n", 0)) for t, e in _entries(client, name, config).items() if t != token), default=0)
    client.set_registered_model_tag(name, key, json.dumps(me | {"state": TICKET, "n": ticket, "time": time.time()}))
    deadline = refreshed = time.monotonic()
    deadline += config.lock_wait_s
    while True:
        entries = _entries(client, name, config)
        if token not in entries:
            raise PromotionConflict(f"conflict: the {me['action']} waited past lock_expiry_s and lost its place; nothing "
                                    "changed")
        blockers = _blockers(entries, token, ticket)
        if not blockers:
            return
        if time.monotonic() > deadline:
            raise PromotionConflict(f"conflict: {_holder(blockers[0])} holds the champion lock of {name}; nothing changed: "
                                    f"run the {me['action']} again when it is done (an entry older than "
                                    f"{config.lock_expiry_s:.0f} s counts as a dead holder's and is removed)")
        if time.monotonic() - refreshed > config.lock_expiry_s / 4:  # still alive: keep the entry fresh
            client.set_registered_model_tag(name, key, json.dumps(me | {"state": TICKET, "n": ticket, "time": time.time()}))
            refreshed = time.monotonic()
        time.sleep(config.lock_poll_s * random.uniform(0.5, 1.5))


@contextmanager
def champion_lock(client: Any, name: str, config: RegistryConfig, *, actor: str,
                  action: str) -> Iterator[Callable[[], None]]:
    """Hold the champion lock of registered model ``name`` (which must exist); yields ``check()``,
    which raises :class:`PromotionConflict` when the entry is gone (the holder outlived the expiry).
    Waits up to ``config.lock_wait_s``, then raises a conflict naming the holder."""
    token = uuid.uuid4().hex
    key = LOCK_PREFIX + token

    def check() -> None:
        if key not in client.get_registered_model(name).tags:
            raise PromotionConflict(f"conflict: the {action} held the champion lock of {name} past lock_expiry_s and "
                                    "lost it; nothing more is written")

    try:
        _acquire(client, name, config, token, {"actor": actor, "action": action})
        yield check
    finally:
        client.delete_registered_model_tag(name, key)
