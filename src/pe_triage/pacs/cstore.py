"""C-STORE of the result objects to a DICOM destination (a PACS or a router): the DIMSE sibling of
:func:`~pe_triage.pacs.stow.send_outbox`, with the same contract (the folder is emptied only once
the destination stored every object; otherwise they stay for a retry)."""

from __future__ import annotations

import logging
from pathlib import Path

from pynetdicom import AE

from pe_triage.config import ListenConfig
from pe_triage.pacs.dicomweb import PacsUnavailable, StowRejected
from pe_triage.pacs.stow import empty_outbox, outbox_objects

log = logging.getLogger(__name__)

#: C-STORE statuses that mean stored: success, and the warnings "coerced", "elements discarded",
#: "does not match SOP class" (PS3.4 B.2.3), under which the object is stored all the same
STORED = {0x0000, 0xB000, 0xB006, 0xB007}


def send_cstore(folder: Path, config: ListenConfig) -> int:
    """C-STORE every ``*.dcm`` of ``folder`` to ``config.destination_*`` (calling as ``config.ae_title``)."""
    paths, datasets = outbox_objects(folder)
    ae = AE(ae_title=config.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = config.timeout_s
    for context in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}):
        ae.add_requested_context(*context)
    where = f"{config.destination_ae}@{config.destination_host}:{config.destination_port}"
    assoc = ae.associate(config.destination_host, config.destination_port, ae_title=config.destination_ae)
    if not assoc.is_established:
        raise PacsUnavailable(f"C-STORE: no association with {where} (unreachable, or it rejected "
                              f"calling AE {config.ae_title!r}); the {len(paths)} object(s) are kept for a retry")
    try:
        statuses = [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()
    refused = [f"0x{int(s.Status):04X}" if "Status" in s else "no answer" for s in statuses
               if "Status" not in s or int(s.Status) not in STORED]
    if refused:
        raise StowRejected(f"C-STORE: {where} did not store {len(refused)} of {len(paths)} object(s) "
                           f"({', '.join(refused)}); all are kept for a retry")
    empty_outbox(folder, paths)
    log.info("C-STORE: %s stored %d result object(s)", where, len(paths))
    return len(paths)
