"""``pe-triage demo``: the whole system on one machine. A synthetic multi-site cohort is onboarded and
a model retrained, evaluated, registered and (gates permitting) promoted by the real pipelines under
kfp.local, tracked by a real MLflow server on SQLite. A second run with the same seed reuses the
cohort and every cached step (ingest and the quality reports run again: they are cheap and the
store is theirs to check), and its retraining is skipped with the reason, since the store is the
champion's training data (``--force`` trains anyway); a run with another ``--seed`` onboards a new cohort into the same
registry, registers the next version and promotes it only if it beats the champion re-evaluated on
the new test data.

Layout of ``--out``: ``mlflow/`` (server state, shared by every seed) and per cohort seed
``seed-<N>/``: ``cohort/`` (DICOM + manifests + ground truth), ``slices/`` (the store), ``kfp/`` (step
outputs and cache), ``results/`` (the evaluation of the version this run registered), ``kfp.log``
(every step's full log; the console shows one line per step, each epoch and the promotion gates).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from pe_triage.config import Config, load_config, to_dict
from pe_triage.dicom import load_key
from pe_triage.evaluation.metrics import format_proportion
from pe_triage.registry.overview import registry_overview
from pe_triage.registry.registry import evaluate_gates
from pe_triage.registry.server import free_port, local_server
from pe_triage.synth import generate_cohort
from pe_triage_pipelines.compile import PIPELINES
from pe_triage_pipelines.console import captured, display_names
from pe_triage_pipelines.local import LOCAL, run_local


@contextmanager
def _step(n: int, title: str, terminal: io.TextIOBase) -> Iterator[None]:
    print(f"[{n}/5] {title}", file=terminal, flush=True)
    started = time.monotonic()
    yield
    print(f"      done in {time.monotonic() - started:.0f} s", file=terminal, flush=True)


def _cohort(folder: Path, config: Config, terminal: io.TextIOBase) -> list[dict[str, str]]:
    """Generate the cohort unless ``folder`` holds one made with the same settings; the onboarding sites."""
    made = folder / "truth" / "cohort.json"
    if made.exists():
        if json.loads(made.read_text())["config"] != json.loads(json.dumps(to_dict(config.synth))):
            raise ValueError(f"{folder} holds a cohort made with other synth settings: use another --out")
        print("      reusing the cohort already generated", file=terminal)
    else:
        generate_cohort(folder, config.synth, key=load_key(demo=True))  # the key the onboarding step ingests with
    return [{"site": d.name, "source": str(d / "dicom"), "labels": str(d / "labels.csv")}
            for d in sorted((folder / "sites").iterdir()) if d.is_dir()]


def _port(remembered: Path) -> int:
    """The local server's port of the previous run when it is free: the tracking URI is a step
    parameter, so a new port would make every step that tracks a cache miss."""
    if remembered.exists():
        port = int(remembered.read_text())
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    port = free_port()
    remembered.parent.mkdir(parents=True, exist_ok=True)
    remembered.write_text(str(port))
    return port


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)])


def study_tables(metrics: dict[str, Any]) -> str:
    """The study's per-slice and per-patient tables (accuracy and sensitivities as ``96.8% (525/542)``)."""
    p = format_proportion
    s1, s2, sc = metrics["slice"]["stage1"], metrics["slice"]["stage2"], metrics["slice"]["cascade"]
    pd_, ppe, pc = metrics["patient"]["disease"], metrics["patient"]["pe"], metrics["patient"]["cascade"]

    def auc(t: dict[str, Any]) -> str:
        return f"{t['auroc']['value']:.3f}" if t["auroc"]["value"] is not None else "—"

    per_slice = _table(["per slice", "accuracy", "sensitivity", "specificity", "AUROC"], [
        ["stage 1: disease vs WNL", p(s1["accuracy"]), p(s1["sensitivity"]), p(s1["specificity"]), auc(s1)],
        ["stage 2: PE vs other", p(s2["accuracy"]), p(s2["sensitivity"]), p(s2["specificity"]), auc(s2)],
        ["cascade: WNL / other / PE", p(sc["accuracy"]), "", "", ""]])
    rule = metrics["patient"]["rule"]
    per_patient = _table([f"per patient (rule: {rule['name']})", "accuracy", "sensitivity", "specificity", "AUROC"], [
        ["disease detection", p(pd_["accuracy"]), p(pd_["sensitivity"]), p(pd_["specificity"]), auc(pd_)],
        ["PE detection", p(ppe["accuracy"]), p(ppe["sensitivity"]), p(ppe["specificity"]), auc(ppe)],
        ["cascade: WNL / other / PE", p(pc["accuracy"]), "", "", ""]])
    sites = _table(["per site", "slice cascade accuracy", "patient PE sensitivity"], [
        [site, p(sub["slice"]["cascade"]["accuracy"]), p(sub["patient"]["pe"]["sensitivity"])]
        for site, sub in metrics["per_site"].items()])
    return f"{per_slice}\n\n{per_patient}\n\n{sites}"


def gate_table(gates: list[dict[str, Any]]) -> str:
    """The gates that decided the promotion: measured value, threshold, pass or fail."""
    def shown(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value) if isinstance(value, int) else "—"

    if not gates:
        return "(every gate is off)"
    return _table(["gate", "value", "threshold", "result"],
                  [[g["name"], shown(g["value"]), shown(g["threshold"]), "pass" if g["passed"] else "FAIL"] for g in gates])


_PRESETS = {
    "conspicuous": "lesion preset 'conspicuous' (central and lobar clots, large lesions): the figures show that "
                   "the pipeline learns, not clinical performance",
    "realistic": "lesion preset 'realistic' (down to segmental clots and small nodules)",
}


def run_demo(out: Path, config_path: str | None, seed: int | None = None, force: bool = False) -> dict[str, Any]:
    out = out.resolve()
    config = load_config(config_path)
    if seed is not None:
        config = replace(config, synth=replace(config.synth, seed=seed))
    data = out / f"seed-{config.synth.seed}"
    data.mkdir(parents=True, exist_ok=True)
    text = Path(config_path).read_text() if config_path else ""
    external = os.environ.get("MLFLOW_TRACKING_URI")
    terminal = sys.stdout
    with ExitStack() as stack:
        with _step(1, f"synthetic cohort, seed {config.synth.seed}", terminal):
            print(f"      {_PRESETS.get(config.synth.lesions, config.synth.lesions)}", file=terminal, flush=True)
            sites = _cohort(data / "cohort", config, terminal)
        with _step(2, "MLflow tracking server", terminal):
            uri = external or stack.enter_context(local_server(out / "mlflow", port=_port(out / "mlflow" / "port")))
            print(f"      {uri} ({'MLFLOW_TRACKING_URI' if external else 'SQLite in ' + str(out / 'mlflow')})", flush=True)
        common = {"slices_store": str(data / "slices"), "config": text, "tracking_uri": uri}
        names = {k: v for pipeline in PIPELINES.values() for k, v in display_names(pipeline(LOCAL)).items()}
        with captured(data / "kfp.log", terminal, text, names):
            with _step(3, f"onboarding pipeline: {len(sites)} sites -> {data / 'slices'}", terminal):
                print(f"      full step logs: {data / 'kfp.log'} (tail -f to follow a step)", file=terminal, flush=True)
                run_local("onboarding", {**common, "sites": sites, "demo_key": True}, pipeline_root=data / "kfp")
            retraining = ("retraining pipeline: preprocess, split, train x2, calibrate, exam model, evaluate, register, gates, "
                          "promote")
            with _step(4, retraining, terminal):
                run_local("retraining", {**common, "truth": str(data / "cohort" / "truth"), "force": force},
                          pipeline_root=data / "kfp")
        with _step(5, "results", terminal):
            result = registry_overview(data / "results", config=config.registry, uri=uri)
    return _report(result, config, out, data, uri, external=bool(external))


def _report(result: dict[str, Any], config: Config, out: Path, data: Path, uri: str, *, external: bool) -> dict[str, Any]:
    """The study's tables, the gates before the promotion verdict, and where to look further."""
    aliases = result["aliases"]
    promoted = aliases.get("champion") == result["latest"]
    print(f"\n{study_tables(result['metrics'])}\n")
    gates = result.get("gates") or [dataclasses.asdict(g) for g in evaluate_gates(result["metrics"], None, config.registry)]
    print(f"promotion gates of version {result['latest']} (registry.gates of the configuration):\n{gate_table(gates)}\n")
    print(f"registered: {result['name']} version {result['latest']}; "
          f"{'champion' if promoted else 'not champion (see the check-gates and promote steps in kfp.log)'}; aliases {aliases}")
    if result.get("decision"):
        print(f"promotion decision: {result['decision']}")
    print(f"HTML report: {Path(result['evaluation']) / 'report.html'}")
    db = out / "mlflow"
    ui = (uri if external
          else f"mlflow ui --backend-store-uri sqlite:///{db / 'mlflow.db'} --artifacts-destination {db / 'artifacts'}")
    print(f"MLflow UI: {ui}")
    print(f"full step logs: {data / 'kfp.log'}" + ("" if external else f"; MLflow server log: {db / 'server.log'}"))
    return {"registered_version": result["latest"], "champion": aliases.get("champion"), "promoted": promoted,
            "aliases": aliases, "metrics": result["metrics"], "tracking_uri": uri}
