"""pe-triage: two-stage chest-CT triage for pulmonary embolism.

The modules stand on floors, in the order the data flows; a module imports only from its own floor
or below, and siblings on one floor or in one package import each other in one direction only
(``tests/test_architecture.py`` checks both, and that kfp and mlflow stay where they belong):

0. contracts: ``schema``, ``config``, ``storage``, ``parallel``, ``windows``, ``provenance``, ``progress``, ``logs``
1. building blocks: ``dicom``, ``labels``, ``lung_crop``, ``models``, ``stats``, ``tracking``, ``synth``
2. shared artifacts: ``artifact`` (the model folder), ``dataset`` (the windows as a torch dataset)
3. data steps: ``ingest``, ``preprocess``, ``splits``, ``quality``, ``hu_summary`` (a study's HU histogram, for monitoring)
4. model steps: ``training``, ``evaluation``, ``predict``, ``pacs`` (DICOMweb in, DICOM SR out, on ``predict``),
   ``monitoring`` (a record per triage, the drift report)
5. ``registry``
6. entry point: ``cli``

This root module (``__version__``, ``LAYERS``) imports nothing of the package, so every floor may use it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pe-triage")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

#: the floors above, lowest first: the top-level modules and packages of each
LAYERS: tuple[tuple[str, ...], ...] = (
    ("schema", "config", "storage", "parallel", "windows", "provenance", "progress", "logs"),
    ("dicom", "labels", "lung_crop", "models", "stats", "tracking", "synth"),
    ("artifact", "dataset"),
    ("ingest", "preprocess", "splits", "quality", "hu_summary"),
    ("training", "evaluation", "predict", "pacs", "monitoring"),
    ("registry",),
    ("cli",),
)
