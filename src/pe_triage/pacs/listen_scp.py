"""``pe-triage listen``'s DICOM side: the C-STORE SCP that fills the spool, and :func:`run_listener`
that runs it beside the :class:`~pe_triage.pacs.listen.Listener` loop.

Associations are accepted only from ``listen.allowed_calling_aes`` and only for CT Image Storage
(any transfer syntax, compressed ones included: ingest decides what it can read) and Verification
(C-ECHO, so a PACS administrator can test the node).
"""

from __future__ import annotations

import logging
import threading
from functools import partial
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from pe_triage.config import Config, ConfigError, ListenConfig
from pe_triage.pacs.cstore import send_cstore
from pe_triage.pacs.dicomweb import connect
from pe_triage.pacs.listen import Listener, ModelSource, Sender, Spool
from pe_triage.pacs.stow import send_outbox

log = logging.getLogger(__name__)
#: pynetdicom logs every association and, at debug, whole datasets: only its warnings pass
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

#: C-STORE statuses (PS3.4 B.2.3): stored; refused for lack of resources; not a usable instance
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


def _on_store(event: Any, spool: Spool) -> int:
    """Spool one instance; a failure is a C-STORE error status (the sender keeps and retries it)."""
    ds = event.dataset
    study, sop = ds.get("StudyInstanceUID"), event.request.AffectedSOPInstanceUID
    if not study or not sop:
        log.warning("an instance without Study or SOP Instance UID refused (calling AE %s)", event.assoc.requestor.ae_title)
        return CANNOT_UNDERSTAND
    try:
        spool.receive(str(study), str(sop), event.encoded_dataset())
    except OSError as e:
        log.error("cannot spool an instance (%s): answered out of resources", type(e).__name__)
        return OUT_OF_RESOURCES
    return SUCCESS


def _on_rejected(event: Any) -> None:
    log.warning("association from calling AE %r rejected (not in listen.allowed_calling_aes)",
                event.assoc.requestor.ae_title)


def start_scp(spool: Spool, config: ListenConfig, host: str) -> ThreadedAssociationServer:
    """The C-STORE SCP on ``host:config.port``, serving in its own threads."""
    ae = AE(ae_title=config.ae_title)
    ae.require_calling_aet = list(config.allowed_calling_aes)
    ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    handlers = [(evt.EVT_C_STORE, _on_store, [spool]), (evt.EVT_REJECTED, _on_rejected)]
    return ae.start_server((host, config.port), block=False, evt_handlers=handlers)  # type: ignore[arg-type,return-value]


def sender(config: Config) -> Sender:
    """C-STORE to ``listen.destination_*`` or STOW-RS to ``listen.stow_url``; ConfigError when
    neither, or when the node would be open to anyone."""
    listen = config.listen
    if not listen.allowed_calling_aes:
        raise ConfigError("listen.allowed_calling_aes is empty: name the AE titles of the scanners/PACS that send")
    if listen.stow_url:
        return lambda folder: send_outbox(connect(listen.stow_url, config.pacs), folder, config.pacs)
    if listen.destination_host and listen.destination_ae:
        return partial(send_cstore, config=listen)
    raise ConfigError("listen: no destination for the results: set destination_ae + destination_host (+ "
                      "destination_port) for C-STORE, or stow_url for STOW-RS")


def run_listener(model: ModelSource, config: Config, *, host: str, stop: threading.Event) -> None:
    """Receive, triage and send until ``stop`` is set; ConfigError (from :func:`sender`) before
    anything starts when the node would be open to anyone or have nowhere to send."""
    listen = config.listen
    listener = Listener(Spool(Path(listen.spool)), model, sender(config), config=listen, pacs=config.pacs,
                        ingest=config.ingest, monitor=config.monitor)
    server = start_scp(listener.spool, listen, host)
    log.info("listening as %s on %s:%d for %s; a study is complete after %.0f s without a new instance",
             listen.ae_title, host, listen.port, ", ".join(listen.allowed_calling_aes), listen.quiet_s)
    try:
        listener.run(stop)
    finally:
        server.shutdown()
        log.info("stopped; unfinished studies stay in the spool for the next start")
