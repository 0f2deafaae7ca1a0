"""benchmarks/drift_shift.py at a smoke size (seconds): the shifted site's HU bin masses are flagged
and the calibrated sites' are not, so a change of the records, the reference or the report breaks
the suite, not the next measurement."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "drift_shift.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_drift_shift", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_drift_shift_benchmark_flags_the_shifted_site_at_smoke_size(tmp_path: Path) -> None:
    out = tmp_path / "drift.json"
    result = load_script().main(["--patients", "4", "--slices", "8", "--size", "96", "--work", str(tmp_path / "work"),
                                 "--out", str(out)])
    assert json.loads(out.read_text()) == result
    sites = result["sites"]
    assert set(sites) == {"site-a", "site-b", "site-c", "site-d"} and all(s["studies"] == 4 for s in sites.values())
    shifted = sites["site-d"]["input"]["hu_fractions"]
    assert "hu_fractions" in sites["site-d"]["flagged"] and shifted["psi"] > 0.5 and shifted["value"] > shifted["reference"] + 50
    for name in ("site-a", "site-b", "site-c"):  # four studies a site: only the pooled HU masses are stable enough to assert
        assert "hu_fractions" not in sites[name]["flagged"], (name, sites[name]["input"]["hu_fractions"])
