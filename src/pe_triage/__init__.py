"""pe-triage: two-stage chest-CT triage for pulmonary embolism."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pe-triage")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
