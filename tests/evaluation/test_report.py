"""The report: every file written, HTML self-contained, tables in the study's format, no patient ids."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pe_triage.config import EvalConfig
from pe_triage.evaluation import (
    evaluate_predictions,
    format_proportion,
    leave_one_site_out_summary,
    write_report,
)

SITES = ("north", "H<1>&2")  # a site name that must be escaped in HTML
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_predictions(seed: int = 0) -> pd.DataFrame:
    """Per site: WNL, other-disease and PE patients; lesions span a few slices, the slice after one is
    indeterminate (the lesion's edge); noisy probabilities."""
    rng = np.random.default_rng(seed)
    rows = []
    for site in SITES:
        for p in range(6):
            cls = ("wnl", "other", "pe")[p % 3]
            lesion = range(4, 4 + int(rng.integers(2, 5))) if cls != "wnl" else range(0)
            for i in range(12):
                label = cls if i in lesion else "indeterminate" if lesion and i == lesion.stop else "wnl"
                rows.append({"site": site, "patient_id": f"SECRETPID{p}{site[:1]}", "series_uid": f"ser-{site}-{p}",
                             "slice_index": i, "label": label,
                             "p_disease": float(np.clip(rng.normal(0.75 if label != "wnl" else 0.25, 0.2), 0, 1)),
                             "p_pe": float(np.clip(rng.normal(0.8 if label == "pe" else 0.3, 0.2), 0, 1))})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, pd.DataFrame, dict[str, str], list[dict]]:
    from matplotlib.image import imsave

    pred = synthetic_predictions()
    config = EvalConfig(bootstrap=50)
    metrics = evaluate_predictions(pred, threshold_stage1=0.5, threshold_stage2=0.5, config=config)
    folds = {site: evaluate_predictions(pred[pred["site"] == site], threshold_stage1=0.5, threshold_stage2=0.5, config=config)
             for site in SITES}
    metrics["leave_one_site_out"] = leave_one_site_out_summary(folds)
    out = tmp_path_factory.mktemp("report")
    cams = out / "gradcam"
    cams.mkdir()
    gradcam = []
    for n, (stage, category, frac) in enumerate([(1, "tp", 0.62), (1, "fn", None), (2, "fp", 0.1)]):
        path = cams / f"cam{n}.png"
        imsave(path, np.random.default_rng(n).random((8, 16)))
        gradcam.append({"stage": stage, "category": category, "png": str(path), "inside_fraction": frac,
                        "lesion_area_fraction": None if frac is None else 0.004, "peak_on_lesion": None if frac is None else True,
                        "site": SITES[n % 2], "slice_index": n})
    paths = write_report(metrics, pred, out, gradcam=gradcam, title="Test <report>")
    return metrics, pred, paths, gradcam


def test_every_file_is_written(rendered) -> None:  # type: ignore[no-untyped-def]
    _, _, paths, _ = rendered
    assert {"metrics_json", "report_md", "report_html"} <= set(paths)
    assert {k for k in paths if k.startswith("plot_")} == {"plot_confusion", "plot_roc", "plot_pr", "plot_per_site",
                                                            "plot_histograms"}
    for key, path in paths.items():
        assert Path(path).is_file() and Path(path).stat().st_size > 0, key
        if key.startswith("plot_"):
            assert Path(path).read_bytes()[:8] == PNG_MAGIC


def test_metrics_json_is_the_metrics_with_sorted_keys_and_a_gradcam_summary(rendered) -> None:  # type: ignore[no-untyped-def]
    metrics, _, paths, _ = rendered
    text = Path(paths["metrics_json"]).read_text()
    data = json.loads(text)
    cam = data.pop("gradcam")["stage1"]["tp"]
    assert cam["mean_inside_fraction"] == pytest.approx(0.62) and cam["peak_on_lesion_rate"] == 1.0
    assert data == json.loads(json.dumps(metrics))
    assert text == json.dumps({**metrics, "gradcam": json.loads(text)["gradcam"]}, sort_keys=True, indent=2) + "\n"


def test_html_is_self_contained_with_embedded_pngs(rendered) -> None:  # type: ignore[no-untyped-def]
    _, _, paths, gradcam = rendered
    page = Path(paths["report_html"]).read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 5 + len(gradcam)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert all(base64.b64decode(s.split(",", 1)[1])[:8] == PNG_MAGIC for s in sources)
    assert "<link" not in page and "<script" not in page and "href=" not in page


def test_html_escapes_text(rendered) -> None:  # type: ignore[no-untyped-def]
    _, _, paths, _ = rendered
    page = Path(paths["report_html"]).read_text()
    assert "H&lt;1&gt;&amp;2" in page and "H<1>" not in page
    assert "<title>Test &lt;report&gt;</title>" in page


def test_markdown_has_the_study_tables(rendered) -> None:  # type: ignore[no-untyped-def]
    metrics, _, paths, _ = rendered
    md = Path(paths["report_md"]).read_text()
    s1 = metrics["slice"]["stage1"]
    assert format_proportion(s1["accuracy"], ci=True) in md  # e.g. "88.2% (127/144) [81.9–92.5]"
    assert re.search(r"\d+\.\d% \(\d+/\d+\)", md)
    assert format_proportion(metrics["patient"]["pe"]["sensitivity"], ci=True) in md
    for heading in ("## Per slice", "## Per patient", "## Cascade (three classes)", "## Per site", "## Leave one site out",
                    "## Plots", "## Evidence maps"):
        assert heading + "\n" in md
    for row in ("| Stage 1: WNL vs disease |", "| Stage 2: other vs PE (true disease slices) |", "| Cascade: WNL / other / PE |",
                "| True \\ predicted | WNL | Other disease | PE |", "WNL per-slice sensitivity", "| Mean ± SD |",
                "| Stage 1 | true positives | 1 | 1 | 62.0% | 62.0%–62.0% | 0.4% | 100.0% |"):
        assert row in md
    matrix = metrics["slice"]["cascade"]["confusion"]["matrix"]
    assert "| WNL | " + " | ".join(map(str, matrix[0])) + " |" in md
    for site in SITES:
        assert f"### {site}\n" in md
    assert "](plots/roc.png)" in md and "](gradcam/cam0.png)" in md


def test_indeterminate_slices_are_counted_in_the_report(rendered) -> None:  # type: ignore[no-untyped-def]
    metrics, pred, paths, _ = rendered
    n = int((pred["label"] == "indeterminate").sum())
    assert n == 8 and json.loads(Path(paths["metrics_json"]).read_text())["counts"]["slices"]["indeterminate"] == n
    assert metrics["slice"]["stage1"]["n"] == metrics["summary"]["slices"] == len(pred) - n
    for key in ("report_md", "report_html"):
        text = Path(paths[key]).read_text()
        assert f"indeterminate {n})" in text and "Indeterminate slices are left out of the slice tables" in text


def test_no_patient_ids_in_the_report(rendered) -> None:  # type: ignore[no-untyped-def]
    _, _, paths, _ = rendered
    for key in ("report_md", "report_html"):
        assert "SECRETPID" not in Path(paths[key]).read_text()
