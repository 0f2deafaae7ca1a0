"""Training: the loop for the two stages (the dataset and the model artifact it writes live below,
in ``pe_triage.dataset`` and ``pe_triage.artifact``, shared with evaluation and prediction)."""
