"""Synthetic multi-site CTPA cohort: DICOM as hospitals export it, label manifests, ground truth.

``generate_cohort(out, SynthConfig(...))`` is the entry point; :mod:`.phantom` draws single slices
and is usable on its own (tests, notebooks).
"""

from .cohort import CohortSummary, SiteSummary, cohort_overview, generate_cohort

__all__ = ["CohortSummary", "SiteSummary", "cohort_overview", "generate_cohort"]
