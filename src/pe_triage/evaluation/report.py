"""The evaluation report: ``metrics.json``, ``report.md`` (tables in the study's layout) and a
self-contained ``report.html`` (same tables, PNG plots embedded as base64, evidence-map overlays).

Tables and plots are built once into a small document model and rendered twice (Markdown, HTML), so
the two files never disagree. No patient identifiers are printed: sites and counts only. Plots use
matplotlib ``Figure`` objects directly (no pyplot, no global backend switch).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pe_triage.evaluation.gradcam import CATEGORIES, gradcam_summary
from pe_triage.evaluation.metrics import CLASSES, INDETERMINATE, LABELS, format_proportion
from pe_triage.schema import STAGES

NAMES = {"wnl": "WNL", "other": "Other disease", "pe": "PE", "disease": "Disease", "no_pe": "No PE",
         INDETERMINATE: "Indeterminate"}
CATEGORY_NAMES = {"tp": "true positives", "fp": "false positives", "fn": "false negatives"}
SITE_BARS = (  # (label, table path) of the per-site bar chart
    ("Stage 1 accuracy", ("slice", "stage1", "accuracy")),
    ("Disease sens.", ("slice", "stage1", "sensitivity")),
    ("WNL sens.", ("slice", "stage1", "specificity")),
    ("Stage 2 accuracy", ("slice", "stage2", "accuracy")),
    ("PE sens. (slice)", ("slice", "stage2", "sensitivity")),
    ("PE sens. (patient)", ("patient", "pe", "sensitivity")),
)


@dataclass
class Table:
    caption: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    name: str
    caption: str
    png: bytes
    #: where the PNG lies, relative to the report (Markdown links to it; HTML embeds the bytes)
    href: str


@dataclass
class Section:
    title: str
    blocks: list[Any] = field(default_factory=list)
    #: rendered as a collapsed <details> in HTML (long per-site breakdowns)
    collapsed: bool = False


# ----------------------------------------------------------------------------- cells

def _p(p: dict[str, Any] | None) -> str:
    return "—" if p is None else format_proportion(p, ci=True)


def _auc(a: dict[str, Any]) -> str:
    if a["value"] is None:
        return "—"
    text = f"{a['value']:.3f}"
    return text + (f" [{a['ci'][0]:.3f}–{a['ci'][1]:.3f}]" if a["ci"] else "")


def _rate(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _rule_text(rule: dict[str, Any]) -> str:
    if rule["name"] == "any":
        return "any positive slice (the study)"
    if rule["name"] == "k_consecutive":
        return f"{rule['k']} consecutive positive slices"
    return f"mean of the {rule['k']} highest slice probabilities"


# ----------------------------------------------------------------------------- tables

def _slice_tables(sub: dict[str, Any]) -> list[Table]:
    s1, s2, sc = sub["slice"]["stage1"], sub["slice"]["stage2"], sub["slice"]["cascade"]
    main = Table(
        "Per slice: accuracy and class-wise sensitivity",
        ["Task", "Slices", "Accuracy", "WNL", "Disease", "Other disease", "PE"],
        [
            ["Stage 1: WNL vs disease", str(s1["n"]), _p(s1["accuracy"]), _p(s1["class_sensitivity"]["wnl"]),
             _p(s1["class_sensitivity"]["disease"]), "—", "—"],
            ["Stage 2: other vs PE (true disease slices)", str(s2["n"]), _p(s2["accuracy"]), "—", "—",
             _p(s2["class_sensitivity"]["other"]), _p(s2["class_sensitivity"]["pe"])],
            ["Cascade: WNL / other / PE", str(sc["n"]), _p(sc["accuracy"]), _p(sc["class_sensitivity"]["wnl"]), "—",
             _p(sc["class_sensitivity"]["other"]), _p(sc["class_sensitivity"]["pe"])],
        ],
    )
    return [main, _binary_table("Per slice: binary metrics of each stage",
                                [("Stage 1: disease", s1), ("Stage 2: PE (true disease slices)", s2)])]


def _binary_table(caption: str, tables: list[tuple[str, dict[str, Any]]]) -> Table:
    return Table(caption, ["Task", "Sensitivity", "Specificity", "PPV", "NPV", "AUROC", "AUPRC"],
                 [[name, _p(t["sensitivity"]), _p(t["specificity"]), _p(t["ppv"]), _p(t["npv"]), _auc(t["auroc"]),
                   _auc(t["auprc"])] for name, t in tables])


def _patient_tables(sub: dict[str, Any]) -> list[Table]:
    pa = sub["patient"]
    main = Table(
        "Per patient",
        ["Rule", "Patients", "Accuracy", "Disease sensitivity", "WNL sensitivity", "PE sensitivity",
         "WNL per-slice sensitivity", "Cascade accuracy"],
        [[_rule_text(pa["rule"]), str(pa["n"]), _p(pa["disease"]["accuracy"]), _p(pa["disease"]["sensitivity"]),
          _p(pa["disease"]["specificity"]), _p(pa["pe"]["sensitivity"]), _p(pa["wnl_slice_sensitivity"]),
          _p(pa["cascade"]["accuracy"])]],
    )
    by_class = Table(
        "Per patient, by true class",
        ["True class", "Patients", "Disease-positive", "PE-positive", "Triaged correctly", "WNL per-slice sensitivity"],
        [[NAMES[c], str(b["patients"]), _p(b["disease_positive"]), _p(b["pe_positive"]), _p(b["correct"]),
          _p(b["wnl_slice_sensitivity"])] for c, b in pa["by_class"].items()],
    )
    return [main, by_class, _binary_table("Per patient: binary metrics",
                                          [("Disease (stage 1 rule)", pa["disease"]), ("PE (cascade rule)", pa["pe"])])]


def _exam_section(comparison: dict[str, Any]) -> Section:
    """The rules and the exam model on the same patients, each at thresholds chosen on the
    calibration patients, and which of them the triage decides with."""
    rule = comparison["triage_rule"]
    triage = "the exam model" if rule == "exam" else _rule_text({"name": rule, "k": comparison["rows"][rule]["k"]})
    text = (f"The triage decides with {triage} (evaluate.patient_rule). Each row's thresholds are chosen on the "
            f"{comparison['calibration']} patients at the operating point's sensitivity targets and measured on the "
            f"{comparison['evaluated']} patients, so the rows compare decisions, not thresholds.")
    names = {"exam_model": "exam model"}
    table = Table("Per-patient decision: rules vs exam model",
                  ["Decision", "Patients", "Disease AUROC", "Disease sensitivity", "WNL sensitivity", "PE AUROC",
                   "PE sensitivity", "PE specificity"],
                  [[names.get(name) or _rule_text({"name": name, "k": row["k"]}), str(row["patients"]),
                    _auc({"value": row["disease"]["auroc"], "ci": row["disease"]["auroc_ci"]}),
                    _p(row["disease"]["sensitivity"]), _p(row["disease"]["specificity"]),
                    _auc({"value": row["pe"]["auroc"], "ci": row["pe"]["auroc_ci"]}), _p(row["pe"]["sensitivity"]),
                    _p(row["pe"]["specificity"])] for name, row in comparison["rows"].items()])
    return Section("Per-patient decision: rules vs exam model", [text, table])


def _confusion_table(caption: str, table: dict[str, Any]) -> Table:
    m = np.asarray(table["confusion"]["matrix"])
    rows = [[NAMES[c], *[str(v) for v in m[i]], str(int(m[i].sum())), _p(table["class_sensitivity"][c])]
            for i, c in enumerate(CLASSES)]
    rows.append(["PPV", *[_p(table["class_ppv"][c]) for c in CLASSES], str(int(m.sum())), _p(table["accuracy"])])
    return Table(caption, ["True \\ predicted", *[NAMES[c] for c in CLASSES], "Total", "Sensitivity"], rows)


def _cascade_tables(sub: dict[str, Any]) -> list[Table]:
    return [_confusion_table("Cascade, per slice (rows: truth; columns: triage output; last cell: accuracy)",
                             sub["slice"]["cascade"]),
            _confusion_table("Cascade, per patient", sub["patient"]["cascade"])]


def _site_table(per_site: dict[str, Any]) -> Table:
    rows = []
    for site, sub in per_site.items():
        sl, pa = sub["slice"], sub["patient"]
        rows.append([site, str(sub["summary"]["slices"]), str(sub["summary"]["patients"]),
                     *[format_proportion(p) for p in (sl["stage1"]["accuracy"], sl["stage1"]["sensitivity"],
                                                      sl["stage1"]["specificity"], sl["stage2"]["accuracy"],
                                                      sl["stage2"]["sensitivity"], sl["cascade"]["accuracy"],
                                                      pa["disease"]["accuracy"], pa["pe"]["sensitivity"])],
                     _auc(sl["stage1"]["auroc"])])
    return Table("Per site", ["Site", "Slices", "Patients", "Stage 1 accuracy", "Disease sens.", "WNL sens.",
                              "Stage 2 accuracy", "PE sens. (slice)", "Cascade accuracy", "Patient accuracy",
                              "Patient PE sens.", "Stage 1 AUROC"], rows)


def _loso_table(loso: dict[str, Any]) -> Table:
    keys = loso["keys"]

    def value(k: str, v: float | None) -> str:  # AUROC as a number, rates in percent
        return _rate(v) if "auroc" not in k or v is None else f"{v:.3f}"

    def mean_sd(k: str) -> str:
        s = loso["std"][k]
        return value(k, loso["mean"][k]) + ("" if s is None else f" ± {value(k, s).rstrip('%')}")

    rows = [[site, str(f["slices"]), str(f["patients"]), *[value(k, f.get(k)) for k in keys]]
            for site, f in loso["folds"].items()]

    rows.append(["Mean ± SD", str(loso["total"]["slices"]), str(loso["total"]["patients"]), *[mean_sd(k) for k in keys]])
    return Table("Leave one site out (each row: the model trained without that site, tested on it)",
                 ["Held-out site", "Slices", "Patients", *[k.replace("_", " ") for k in keys]], rows)


# ----------------------------------------------------------------------------- plots

def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _confusion_plot(metrics: dict[str, Any]) -> bytes:
    panels = [("Stage 1, per slice", metrics["slice"]["stage1"]), ("Stage 2, per slice", metrics["slice"]["stage2"]),
              ("Cascade, per slice", metrics["slice"]["cascade"]), ("Cascade, per patient", metrics["patient"]["cascade"])]
    fig = _figure(4.0 * len(panels), 3.8)
    for ax, (title, table) in zip(fig.subplots(1, len(panels)), panels, strict=True):
        m = np.asarray(table["confusion"]["matrix"], float)
        totals = m.sum(1, keepdims=True)
        share = np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        names = [NAMES[c] for c in table["confusion"]["labels"]]
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{int(v)}\n{100 * share[i, j]:.0f}%", ha="center", va="center", fontsize=9,
                    color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=10)
    return _png(fig)


def _curve_plot(metrics: dict[str, Any], kind: str) -> bytes:
    fig = _figure(9.0, 4.2)
    for ax, stage, title in zip(fig.subplots(1, 2), ("stage1", "stage2"), ("Stage 1: disease", "Stage 2: PE"), strict=True):
        curve, table = (metrics.get("curves") or {}).get(stage), metrics["slice"][stage]
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        if curve is None:
            ax.text(0.5, 0.5, "undefined: one class absent", ha="center", va="center")
        elif kind == "roc":
            ax.plot(curve["roc"]["fpr"], curve["roc"]["tpr"], drawstyle="steps-post", label=f"AUROC {_auc(table['auroc'])}")
            ax.plot([0, 1], [0, 1], ls=":", color="grey")
            sens, spec = table["sensitivity"]["value"], table["specificity"]["value"]
            if sens is not None and spec is not None:
                ax.plot([1 - spec], [sens], "o", color="crimson", label=f"threshold {table['threshold']:.3g}")
            ax.set_xlabel("1 − specificity")
            ax.set_ylabel("sensitivity")
        else:
            ax.plot(curve["pr"]["recall"], curve["pr"]["precision"], drawstyle="steps-post",
                    label=f"AUPRC {_auc(table['auprc'])}")
            sens, ppv = table["sensitivity"]["value"], table["ppv"]["value"]
            if sens is not None and ppv is not None:
                ax.plot([sens], [ppv], "o", color="crimson", label=f"threshold {table['threshold']:.3g}")
            ax.set_xlabel("recall (sensitivity)")
            ax.set_ylabel("precision (PPV)")
        ax.set_title(title, fontsize=10)
        if curve is not None:
            ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=8)
    return _png(fig)


def _site_plot(per_site: dict[str, Any]) -> bytes:
    sites = list(per_site)
    fig = _figure(max(6.0, 1.6 * len(sites) + 3.0), 4.2)
    ax = fig.subplots()
    width = 0.8 / len(SITE_BARS)
    for j, (label, path) in enumerate(SITE_BARS):
        values, lo, hi = [], [], []
        for site in sites:
            p = per_site[site][path[0]][path[1]][path[2]]
            v = np.nan if p["value"] is None else p["value"]
            values.append(v)
            # max(0, ...): a Wilson bound equal to the value can come out a rounding error beyond it
            lo.append(0.0 if p["ci"] is None else max(0.0, v - p["ci"][0]))
            hi.append(0.0 if p["ci"] is None else max(0.0, p["ci"][1] - v))
        x = np.arange(len(sites)) + (j - (len(SITE_BARS) - 1) / 2) * width
        ax.bar(x, values, width, yerr=[lo, hi], capsize=2, label=label)
    ax.set_xticks(range(len(sites)), sites)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("proportion (bars: 95% CI)")
    ax.legend(fontsize=8, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.set_title("Per site", fontsize=10)
    return _png(fig)


def _histogram_plot(pred: pd.DataFrame, thresholds: dict[str, float]) -> bytes:
    fig = _figure(10.0, 3.8)
    bins = np.linspace(0, 1, 26)
    panels = [(STAGES[1].column, "Stage 1: P(disease), all slices", LABELS, thresholds["stage1"]),
              (STAGES[2].column, "Stage 2: P(PE), true disease slices", STAGES[2].labels, thresholds["stage2"])]
    for ax, (col, title, classes, t) in zip(fig.subplots(1, 2), panels, strict=True):
        for cls in classes:
            v = pred.loc[pred["label"] == cls, col].to_numpy(float)
            if v.size:
                ax.hist(v, bins=bins, histtype="step", linewidth=1.5, weights=np.full(v.size, 1 / v.size),
                        label=f"{NAMES[cls]} (n={v.size})")
        ax.axvline(t, color="black", ls="--", linewidth=1, label=f"threshold {t:.3g}")
        ax.set_xlabel(col)
        ax.set_ylabel("fraction of the class's slices")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    return _png(fig)


def _plots(metrics: dict[str, Any], pred: pd.DataFrame) -> list[tuple[str, str, bytes]]:
    """(name, caption, PNG bytes) of every plot."""
    return [
        ("confusion", "Confusion matrices (colour: share of the true class)", _confusion_plot(metrics)),
        ("roc", "ROC curves per slice (dot: operating threshold)", _curve_plot(metrics, "roc")),
        ("pr", "Precision-recall curves per slice (dot: operating threshold)", _curve_plot(metrics, "pr")),
        ("per_site", "Per-site proportions with 95% Wilson intervals", _site_plot(metrics["per_site"])),
        ("histograms", "Predicted probabilities per true class", _histogram_plot(pred, metrics["thresholds"])),
    ]


# ----------------------------------------------------------------------------- document

def _subset_blocks(sub: dict[str, Any]) -> list[Any]:
    return [Section("Per slice", _slice_tables(sub)), Section("Per patient", _patient_tables(sub)),
            Section("Cascade (three classes)", _cascade_tables(sub))]


def _overview(metrics: dict[str, Any]) -> str:
    c, cfg, t = metrics["counts"], metrics["config"], metrics["thresholds"]
    sl, pa = c["slices"], c["patients"]
    pct = round(100 * cfg["confidence"])
    mode = cfg["indeterminate"]
    scored = "left out of" if mode == "exclude" else f"scored as {NAMES[mode]} in"
    return (f"{sum(sl.values())} slices (WNL {sl['wnl']}, other disease {sl['other']}, PE {sl['pe']}, indeterminate "
            f"{sl[INDETERMINATE]}) of {sum(pa.values())} patients (WNL {pa['wnl']}, other disease {pa['other']}, PE "
            f"{pa['pe']}, indeterminate only {pa[INDETERMINATE]}) in {c['sites']} site(s). Indeterminate slices are "
            f"{scored} the slice tables; patients whose only finding is indeterminate are left out of the patient "
            f"tables. Thresholds: stage 1 {t['stage1']:.4g}, stage 2 {t['stage2']:.4g}. Patient rule: "
            f"{_rule_text(metrics['patient']['rule'])}. Proportions as k/n with the {pct}% Wilson interval in "
            f"brackets; AUROC/AUPRC with a {pct}% bootstrap interval over patients ({cfg['bootstrap']} resamples)."
            + _synthetic_text(metrics.get("synthetic")))


def _synthetic_text(synthetic: dict[str, Any] | None) -> str:
    if not synthetic:
        return ""
    text = f" Synthetic cohort (seed {synthetic['seed']}, lesion preset '{synthetic['lesions']}')"
    if synthetic["lesions"] == "conspicuous":
        return text + (": central and lobar clots and large lesions only, so these figures show that the pipeline "
                       "learns, not clinical performance.")
    return text + "."


def _gradcam_section(items: list[dict[str, Any]], out_dir: Path) -> Section:
    summary = gradcam_summary(items)
    method = items[0].get("method", "Grad-CAM")
    table = Table(f"Evidence maps ({method}) on the lesion: mass inside the mask (vs the lesion's share of the image, "
                  "what an even map would score) and the pointing game (map peak on the lesion)",
                  ["Stage", "Category", "Overlays", "With mask", "Mean inside fraction", "Range", "Lesion area",
                   "Peak on lesion"],
                  [[stage.replace("stage", "Stage "), CATEGORY_NAMES[cat], str(v["overlays"]), str(v["with_mask"]),
                    _rate(v["mean_inside_fraction"]),
                    "—" if v["min_inside_fraction"] is None else
                    f"{_rate(v['min_inside_fraction'])}–{_rate(v['max_inside_fraction'])}",
                    _rate(v["mean_lesion_area_fraction"]), _rate(v["peak_on_lesion_rate"])]
                   for stage, cats in summary.items() for cat, v in cats.items()])
    blocks: list[Any] = [table]
    for stage in sorted({int(i["stage"]) for i in items}):
        for cat in CATEGORIES:
            chosen = [i for i in items if int(i["stage"]) == stage and i["category"] == cat]
            images = []
            for n, item in enumerate(chosen):
                path = Path(item["png"])
                frac = item.get("inside_fraction")
                caption = (f"Stage {stage}, {CATEGORY_NAMES[cat][:-1]}, site {item.get('site', '?')}, slice "
                           f"{item.get('slice_index', '?')}" + ("" if frac is None else f", inside mask {100 * frac:.0f}%"))
                images.append(Image(f"gradcam-{stage}-{cat}-{n}", caption, path.read_bytes(),
                                    Path(os.path.relpath(path.resolve(), out_dir.resolve())).as_posix()))
            if images:
                blocks.append(Section(f"Stage {stage}: {CATEGORY_NAMES[cat]}", images))
    return Section("Evidence maps", blocks)


def _document(metrics: dict[str, Any], images: list[Image], gradcam: list[dict[str, Any]] | None,
              out_dir: Path) -> list[Any]:
    doc: list[Any] = [_overview(metrics), *_subset_blocks(metrics)]
    if metrics.get("patient_rules"):
        doc.append(_exam_section(metrics["patient_rules"]))
    sites: list[Any] = [_site_table(metrics["per_site"])]
    sites += [Section(str(site), _subset_blocks(sub), collapsed=True) for site, sub in metrics["per_site"].items()]
    doc.append(Section("Per site", sites))
    if metrics.get("leave_one_site_out"):
        doc.append(Section("Leave one site out", [_loso_table(metrics["leave_one_site_out"])]))
    doc.append(Section("Plots", images))
    if metrics.get("localisation"):
        doc.append(Section("Evidence-map localisation", [_localisation_table(metrics["localisation"])]))
    if gradcam:
        doc.append(_gradcam_section(gradcam, out_dir))
    return doc


def _localisation_table(loc: dict[str, Any]) -> Table:
    first = next(iter(loc.values()))
    # evaluations before the attribution setting drew Grad-CAM, first at the branch output, then at a set level
    method = first.get("method") or f"Grad-CAM (branch level {first.get('layer', 'output')})"
    return Table(f"Evidence maps ({method}) on the lesion over a seeded sample of true positives: map peak on "
                 f"the lesion (pointing game, within {first['tolerance_px']:g} px) and mass inside the mask vs the "
                 "lesion's share of the image",
                 ["Stage", "True positives", "Peak on lesion", "Blank maps (misses)", "Mean inside fraction", "Lesion area"],
                 [[stage.replace("stage", "Stage "), str(v["true_positives"]), format_proportion(v["peak_on_lesion"], ci=True),
                   str(v["blank_maps"]), _rate(v["mean_inside_fraction"]), _rate(v["mean_lesion_area_fraction"])]
                  for stage, v in loc.items()])


# ----------------------------------------------------------------------------- renderers

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(blocks: list[Any], level: int) -> list[str]:
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, str):
            lines += [b, ""]
        elif isinstance(b, Table):
            lines += [f"**{b.caption}**", "", "| " + " | ".join(map(_md_cell, b.header)) + " |",
                      "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b.rows]
            lines.append("")
        elif isinstance(b, Image):
            lines += [f"![{b.caption}]({b.href})", "", f"*{b.caption}*", ""]
        elif isinstance(b, Section):
            lines += [f"{'#' * min(level, 6)} {b.title}", "", *_markdown(b.blocks, level + 1)]
    return lines


def _html(blocks: list[Any], level: int) -> list[str]:
    e = html.escape
    out: list[str] = []
    for b in blocks:
        if isinstance(b, str):
            out.append(f"<p>{e(b)}</p>")
        elif isinstance(b, Table):
            out.append(f"<table><caption>{e(b.caption)}</caption><thead><tr>"
                       + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b.rows]
            out.append("</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.png).decode("ascii")
            out.append(f'<figure><img alt="{e(b.caption)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{e(b.caption)}</figcaption></figure>")
        elif isinstance(b, Section):
            h = f"h{min(level, 6)}"
            inner = "\n".join(_html(b.blocks, level + 1))
            if b.collapsed:
                out.append(f"<details><summary>{e(b.title)}</summary>\n{inner}\n</details>")
            else:
                out.append(f"<section><{h}>{e(b.title)}</{h}>\n{inner}\n</section>")
    return out


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}caption{font-weight:bold;text-align:left;padding:0.3em 0}
th,td{border:1px solid #ccc;padding:0.3em 0.6em;text-align:left}th{background:#f3f3f3}
figure{display:inline-block;margin:0.5em}img{max-width:100%}details{margin:0.5em 0}summary{font-weight:bold;cursor:pointer}"""


def write_report(metrics: dict[str, Any], pred: pd.DataFrame, out_dir: str | Path, *,
                 gradcam: list[dict[str, Any]] | None = None, title: str = "PE triage evaluation") -> dict[str, str]:
    """Write ``metrics.json`` (plus a ``gradcam`` summary when overlays are given, and the
    ``leave_one_site_out`` table when ``metrics`` has one), ``report.md``, ``report.html`` and the plots
    under ``plots/``; returns ``{name: path}`` of everything written."""
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    images = []
    for name, caption, png in _plots(metrics, pred):
        path = out / "plots" / f"{name}.png"
        path.write_bytes(png)
        written[f"plot_{name}"] = str(path)
        images.append(Image(name, caption, png, f"plots/{name}.png"))
    doc = {**metrics, "gradcam": gradcam_summary(gradcam)} if gradcam else metrics
    written.update(_write_documents(doc, _document(metrics, images, gradcam, out), out, "metrics", "report", title))
    return written


def write_loso_report(summary: dict[str, Any], out_dir: str | Path,
                      title: str = "PE triage: leave one site out") -> dict[str, str]:
    """``leave_one_site_out.json`` / ``.md`` / ``.html`` of a site-fold summary (see
    :func:`~pe_triage.evaluation.metrics.leave_one_site_out_summary`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "leave_one_site_out"
    if summary.get("skipped"):
        return _write_documents(summary, [f"Not run: {summary['skipped']}."], out, name, name, title)
    blocks: list[Any] = [_loso_table(summary)]
    if summary.get("drops") is not None:
        blocks.insert(0, _loso_drop_table(summary))
    return _write_documents(summary, blocks, out, name, name, title)


def _loso_drop_table(loso: dict[str, Any]) -> Table:
    """Each held-out site against the pooled test split (``evaluation.loso.summarize``): the drop of
    every figure shown, the gated ones marked, and the worst gated drop, which the promotion gate reads."""
    keys, gated, worst = loso["shown"], set(loso["gate_metrics"]), loso.get("worst")

    def cell(k: str, v: float | None) -> str:
        return "—" if v is None else (f"{v:+.3f}" if "auroc" in k else f"{100 * v:+.1f} pt")

    rows = [["pooled test split", *[_loso_value(k, loso["pooled"].get(k)) for k in keys]]]
    rows += [[f"{site} (held out)", *[f"{_loso_value(k, loso['folds'][site].get(k))} (drop {cell(k, d.get(k))})"
                                      for k in keys]] for site, d in loso["drops"].items()]
    verdict = ("no gated figure measured at any site" if worst is None else
               f"worst gated drop: {worst['metric'].replace('_', ' ')} at {worst['site']}, {worst['drop']:+.3f}")
    return Table(f"Held-out sites against the pooled test split; gated: {', '.join(sorted(gated))}; {verdict}",
                 ["", *[k.replace("_", " ") + (" (gated)" if k in gated else "") for k in keys]], rows)


def _loso_value(k: str, v: float | None) -> str:
    return _rate(v) if "auroc" not in k or v is None else f"{v:.3f}"


def _write_documents(doc: dict[str, Any], blocks: list[Any], out: Path, json_name: str, report_name: str,
                     title: str) -> dict[str, str]:
    paths = {f"{json_name}_json": out / f"{json_name}.json", f"{report_name}_md": out / f"{report_name}.md",
             f"{report_name}_html": out / f"{report_name}.html"}
    paths[f"{json_name}_json"].write_text(json.dumps(doc, sort_keys=True, indent=2, allow_nan=False) + "\n")
    paths[f"{report_name}_md"].write_text("\n".join([f"# {title}", "", *_markdown(blocks, 2)]).rstrip() + "\n")
    body = "\n".join(_html(blocks, 2))
    paths[f"{report_name}_html"].write_text(
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")
    return {k: str(v) for k, v in paths.items()}
