"""Data by reference (the cluster pipeline with a ``data`` root): the windows live in a persistent
store keyed by the preprocessing configuration and updated in place, and steps pass its URI and
digests instead of the store itself. ``preprocess_store``'s output is a *reference* artifact: a
small JSON record, its ``uri`` in the metadata, which the steps reading windows follow
(``windows.metadata.get("uri") or windows.path``), so no pod downloads a store through the KFP launcher."""

from kfp.dsl import Dataset, Output


def preprocess_store(slices_store: str, slices_digest: str, config: str, windows_root: str, windows: Output[Dataset]):
    """slices store (URI) at ``slices_digest`` -> the persistent windows store of this configuration
    under ``windows_root``: only series new or changed since the last run are preprocessed, and a
    store already at this digest is reused as is."""
    import json
    import logging

    from pe_triage.config import parse_config
    from pe_triage.logs import setup_logging
    from pe_triage.preprocess import preprocess_into

    setup_logging()

    record = preprocess_into(slices_store, windows_root, slices_digest=slices_digest, config=parse_config(config).preprocess)
    logging.getLogger("pe_triage_components").info("windows store %s: %s", "reused" if record["reused"] else "updated",
                                                   record["series"])
    with open(windows.path, "w") as f:
        json.dump(record, f, indent=2)
    windows.metadata.update(reference=True, uri=record["uri"], slices_digest=slices_digest,
                            windows_digest=record["windows_digest"], config_hash=record["config_hash"],
                            reused=record["reused"], size=record["size"], labels=record["labels"])
