"""The model registry: register a composite version, promote it through gates, roll back.

One registered model (``RegistryConfig.model_name``); each version is the pyfunc of
:mod:`pe_triage.registry.pyfunc` (a consistent pair of stage models + the triage configuration, and
optionally the exam-level model trained on that pair: tag :data:`EXAM_TAG`),
logged by a ``register`` run together with its evaluation (``evaluation/metrics.json``, the report)
and its model card. Aliases, not stages: ``challenger`` (the latest registration), ``champion``
(what radiology IT loads), ``previous-champion`` (what :func:`rollback` restores).

Promotion gates (``RegistryConfig.gates``) read the ``summary`` of the version's metrics: the minimums
of :data:`MIN_GATES` (sensitivity, specificity at the operating point and the AUROC's lower confidence
bound, so that a model flagging everything or scoring at random is refused; a metric not measured
fails its gate), and, when a champion exists, at most ``max_regression`` lost on each of
:data:`REGRESSION_METRICS`. A regression is only judged on the same test data (``test_data`` of both
metrics files equal); a champion evaluated on other data fails the ``same_test_data`` gate, and the
remedy is to evaluate the champion's stage models on the candidate's test data and pass that metrics
folder as ``champion_metrics``.

Every decision is recorded on the version(s) it concerns: ``decision.<UTC time>`` (JSON, kept as
history) and ``last_decision.*`` (action, outcome, actor, time, reason, gates).

Integrity (:mod:`pe_triage.registry.integrity`): a version's files are checked against the digests
recorded at registration before anything of it is read (the model at load, the metrics at promote),
and ``models:/name@champion`` loads only while the recorded decision behind the alias explains it.
Champion moves (promote, rollback) hold :func:`pe_triage.registry.lock.champion_lock`; one that finds
the champion moved since it looked raises :class:`PromotionConflict` naming the winner.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pe_triage import __version__
from pe_triage.artifact import ModelMeta
from pe_triage.config import Config, EvalConfig, RegistryConfig
from pe_triage.evaluation.evaluate import EvaluationError, evaluate
from pe_triage.evaluation.exam import EXAM_SUMMARY_KEYS, check_pair
from pe_triage.evaluation.loso import WORST, read_summary
from pe_triage.evaluation.metrics import SUMMARY_KEYS
from pe_triage.models.exam import ExamArtifactError, load_exam_model
from pe_triage.predict import EXAM_RULE, DecisionRule, Triage, exam_description
from pe_triage.provenance import config_hash, git_commit
from pe_triage.registry.card import fmt, model_card, training_sites
from pe_triage.registry.errors import IntegrityError, PromotionConflict, RegistryError
from pe_triage.registry.integrity import (
    MANIFEST_TAG,
    champion_record,
    describe,
    download_verified,
    explained_champion,
    explains,
    manifest,
    record_champion,
)
from pe_triage.registry.lock import champion_lock
from pe_triage.tracking import start_run, tracking_uri, wait_for_server

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
METRICS_FILE = "metrics.json"
#: the leave-one-site-out summary in a version's metrics, and its report's folder in the evaluation
LOSO_KEY = "leave_one_site_out"
EVALUATION_DIR = "evaluation"
MODEL_DIR = "model"
CARD_FILE = "model_card.md"
#: beside a champion's re-evaluation: which version was evaluated (promote checks it is still champion)
EVALUATED_FILE = "evaluated_version.json"
#: version tag: the champion a version replaced when it was promoted (rollback walks this chain)
REPLACED_TAG = "champion.replaced"
#: version tag: JSON ``{arch, features, thresholds}`` of the exam model the version carries, "none" without one
EXAM_TAG = "pe_triage.exam_model"
#: the minimum gates: ``GateConfig`` field (the gate's name) and the summary key it bounds
MIN_GATES = (
    ("min_patient_pe_sensitivity", "patient_pe_sensitivity"),
    ("min_patient_disease_sensitivity", "patient_disease_sensitivity"),
    ("min_slice_disease_sensitivity", "slice_disease_sensitivity"),
    ("min_slice_disease_specificity", "slice_wnl_sensitivity"),
    ("min_slice_pe_specificity", "slice_pe_specificity"),
    ("min_patient_pe_specificity", "patient_pe_specificity"),
    ("min_stage1_auroc_ci_low", "slice_stage1_auroc_ci_low"),
    ("min_stage2_auroc_ci_low", "slice_stage2_auroc_ci_low"),
    # the exam model's per-patient figures (``evaluation.exam.EXAM_SUMMARY_KEYS``): off unless set
    ("min_exam_patient_pe_sensitivity", "exam_patient_pe_sensitivity"),
    ("min_exam_patient_disease_sensitivity", "exam_patient_disease_sensitivity"),
    ("min_exam_patient_pe_specificity", "exam_patient_pe_specificity"),
    ("min_exam_patient_pe_auroc_ci_low", "exam_patient_pe_auroc_ci_low"),
)
#: metrics on which a candidate may lose at most ``gates.max_regression`` against the champion (the
#: AUROC point estimates: on the same test data a drop is real, not interval width). Per exam, not
#: per slice: each version sets its own operating point on the exams, so its slice sensitivity moves
#: with it and says nothing about a regression
REGRESSION_METRICS = (
    "patient_pe_sensitivity", "patient_disease_sensitivity", "patient_cascade_accuracy", "slice_cascade_accuracy",
    "slice_stage1_auroc", "slice_stage2_auroc",
)
# the summary keys are defined by the evaluation: a renamed metric fails here, not as a gate that never passes
if _unknown := sorted(({key for _, key in MIN_GATES} | set(REGRESSION_METRICS)) - {*SUMMARY_KEYS, *EXAM_SUMMARY_KEYS}):
    raise ImportError(f"gates name metrics that the evaluation's summary keys (metrics.SUMMARY_KEYS, "
                      f"exam.EXAM_SUMMARY_KEYS) lack: {_unknown}")
_EPS = 1e-9  # a metric exactly at its threshold passes despite float rounding


@dataclasses.dataclass(frozen=True)
class GateResult:
    """One gate's verdict on a promotion; recorded as its ``dataclasses.asdict`` in the decision tags."""

    name: str
    #: what was measured (a number, or the test data compared; None when nothing was)
    value: Any
    #: what it had to reach
    threshold: Any
    passed: bool
    #: the verdict in words, quoted in a refusal's reason
    detail: str


# ------------------------------------------------------------------------------------ helpers
def registry_client(uri: str | None) -> Any:
    """An MlflowClient on a reachable server (health check with backoff: safe to retry)."""
    from mlflow.tracking import MlflowClient

    resolved = tracking_uri(uri)
    if resolved is None:
        raise RegistryError("no MLflow tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    wait_for_server(resolved)
    return MlflowClient(tracking_uri=resolved, registry_uri=resolved)


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        fallback = getpass.getuser()
    except (KeyError, OSError):
        fallback = "unknown"
    return os.environ.get("PE_TRIAGE_ACTOR") or os.environ.get("USER") or fallback


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _alias(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        # no such model, or a model without that alias (MLflow reports the latter as an invalid parameter)
        missing_alias = e.error_code == "INVALID_PARAMETER_VALUE" and "not found" in e.message
        if e.error_code == "RESOURCE_DOES_NOT_EXIST" or missing_alias:
            return None
        raise


def _version(client: Any, name: str, version: int | str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"model {name!r} has no version {version}") from None
        raise


def read_metrics(metrics_dir: str | Path) -> dict[str, Any]:
    """``metrics.json`` of ``pe-triage evaluate``, checked for what the gates and the card need."""
    path = Path(metrics_dir) / METRICS_FILE
    if not path.is_file():
        raise RegistryError(f"{metrics_dir}: no {METRICS_FILE} (run pe-triage evaluate first)")
    metrics = json.loads(path.read_text())
    for key in ("summary", "test_data"):
        if not isinstance(metrics.get(key), dict):
            raise RegistryError(f"{path}: no {key!r} section; not a pe-triage evaluation")
    return metrics


def _version_metrics(client: Any, version: Any) -> dict[str, Any] | None:
    """The metrics logged with a version's registration run, checked against their registered digest
    (None: a version without metrics)."""
    path = f"{EVALUATION_DIR}/{METRICS_FILE}"
    if not version.run_id or path not in {a.path for a in client.list_artifacts(version.run_id, EVALUATION_DIR)}:
        return None  # registered by other means than register()
    with tempfile.TemporaryDirectory() as tmp:
        return read_metrics(download_verified(client, version.name, version, path, tmp).parent)


def _record(client: Any, name: str, version: str, decision: Mapping[str, Any]) -> None:
    """History tag (one per decision, never overwritten) + the readable latest decision."""
    stamp = re.sub(r"[^0-9TZ]", "", decision["time"])
    client.set_model_version_tag(name, version, f"decision.{stamp}", json.dumps(decision, sort_keys=True))
    for key in ("action", "outcome", "actor", "time", "reason"):
        client.set_model_version_tag(name, version, f"last_decision.{key}", str(decision[key]))
    client.set_model_version_tag(name, version, "last_decision.gates", json.dumps(decision.get("gates", [])))


# ------------------------------------------------------------------------------------ register
def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Two-stage chest-CT PE triage (stage 1 WNL vs disease, stage 2 "
                                                          "PE vs other disease); each version's model card is in its run.")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _check_pair(meta1: ModelMeta, meta2: ModelMeta, metrics: Mapping[str, Any]) -> None:
    """Both stages from the same data, and metrics computed for these models at their operating points."""
    d1, d2 = meta1.raw.get("data") or {}, meta2.raw.get("data") or {}
    for key in ("windows_digest", "splits_digest", "fold"):
        if d1.get(key) != d2.get(key):
            raise RegistryError(f"the stage models were trained on different data ({key}: {d1.get(key)} vs {d2.get(key)})")
    measured, evaluated = metrics.get("thresholds") or {}, metrics.get("models") or {}
    for stage, meta in (("stage1", meta1), ("stage2", meta2)):
        if stage in measured and abs(float(measured[stage]) - meta.threshold) > _EPS:
            raise RegistryError(f"the metrics were computed at {stage} threshold {measured[stage]}, the model operates at "
                                f"{meta.threshold}: evaluate these models")
        for key in ("mlflow_run_id", "config_hash"):
            if stage in evaluated and evaluated[stage].get(key) != meta.raw.get(key):
                raise RegistryError(f"the metrics are of another {stage} model ({key} {evaluated[stage].get(key)} vs "
                                    f"{meta.raw.get(key)}): evaluate these models")


def _rule(metrics: Mapping[str, Any], evaluate: EvalConfig) -> DecisionRule:
    """The rule the metrics were computed with (what the version is judged on), else the config's.
    Under the rule "exam" the evaluation's slice tables keep "any" and record the triage's rule beside
    the exam model's comparison (``patient_rules.triage_rule``)."""
    stored = metrics.get("config") or {}
    rule = (metrics.get("patient_rules") or {}).get("triage_rule") or stored.get("patient_rule", evaluate.patient_rule)
    return DecisionRule(rule, int(stored.get("k", evaluate.k)))


def _version_tags(triage: Triage, metrics: Mapping[str, Any], actor: str, when: str) -> dict[str, str]:
    tags: dict[str, str] = {"registered_by": actor, "registered_at": when, "package_version": __version__,
                            "config_hash": config_hash(triage.config()), EXAM_TAG: "none"}
    if triage.exam is not None:
        tags[EXAM_TAG] = json.dumps(exam_description(triage.exam), sort_keys=True)
    for stage, model in (("stage1", triage.stage1), ("stage2", triage.stage2)):
        meta = model.meta
        tags |= {f"{stage}.git_commit": str(meta.raw.get("git_commit")), f"{stage}.config_hash": str(meta.raw.get("config_hash")),
                 f"{stage}.training_run_id": str(meta.raw.get("mlflow_run_id")), f"{stage}.threshold": repr(meta.threshold),
                 f"{stage}.windows": ",".join(meta.window_names), f"{stage}.arch": meta.model.arch}
    data = triage.stage1.meta.raw.get("data") or {}
    tags |= {f"dataset.{k}": str(data.get(k)) for k in ("windows_digest", "splits_digest", "fold", "slices_digest")}
    tags["dataset.sites"] = ",".join(training_sites(triage.stage1.meta.raw, triage.stage2.meta.raw))
    tags |= {f"test_data.{k}": str(v) for k, v in metrics["test_data"].items()}
    tags |= {f"metric.{k}": repr(v) for k, v in metrics["summary"].items() if v is not None}
    if worst := (metrics.get(LOSO_KEY) or {}).get(WORST):
        tags |= {f"loso.worst_{k}": str(v) for k, v in worst.items()}
    return tags


def _check_exam(exam: str, stage1: str, stage2: str) -> None:
    """The exam model reads the features of exactly these stage models (``evaluation.exam.check_pair``)."""
    try:
        check_pair(load_exam_model(exam), stage1, stage2)
    except (EvaluationError, ExamArtifactError) as e:
        raise RegistryError(f"exam model {exam}: {e}; refusing to register it with this stage pair") from None


def _composite(stage1: str, stage2: str, exam: str | None, rule: DecisionRule, metrics: Mapping[str, Any]) -> Triage:
    """The model to register, every consistency check done before anything is logged."""
    if exam is not None:
        _check_exam(exam, stage1, stage2)
    elif rule.rule == EXAM_RULE:
        raise RegistryError('the patient rule is "exam" but no exam model was given: pass the exam model folder '
                            "(exam=...) or evaluate with a slice rule")
    triage = Triage.load(stage1, stage2, rule=rule, exam=exam)  # fails early on an inconsistent pair
    _check_pair(triage.stage1.meta, triage.stage2.meta, metrics)
    return triage


def register(stage1: str, stage2: str, metrics_dir: str, *, config: RegistryConfig = RegistryConfig(),
             evaluate: EvalConfig = EvalConfig(), uri: str | None = None, actor: str | None = None,
             loso: str | None = None, exam: str | None = None) -> dict[str, Any]:
    """Log the composite model of ``stage1`` + ``stage2`` with its metrics and card, register it as a
    new version of ``config.model_name`` and point ``challenger`` at it. ``exam``: the exam model
    folder (trained on this stage pair) the version carries. ``loso``: a leave-one-site-out
    summary folder (``evaluation.loso.summarize``) that joins the version's evaluation, where ``promote``
    finds it for the ``max_site_auroc_drop`` gate."""
    if loso:
        with tempfile.TemporaryDirectory() as merged:
            return register(stage1, stage2, attach_loso(metrics_dir, loso, merged), config=config, evaluate=evaluate,
                            uri=uri, actor=actor, exam=exam)
    metrics = read_metrics(metrics_dir)
    rule = _rule(metrics, evaluate)
    triage = _composite(stage1, stage2, exam, rule, metrics)
    client = registry_client(uri)
    name, who, when = config.model_name, _actor(actor), _now()
    card = model_card(triage.stage1.meta.raw, triage.stage2.meta.raw, metrics, rule=rule, name=name,
                      exam=None if triage.exam is None else exam_description(triage.exam))
    run_tags = {"step": "register", "registered_model": name, "git_commit": git_commit(), "package_version": __version__}
    with tempfile.TemporaryDirectory() as tmp, start_run(experiment=config.experiment, run_name=f"register-{name}",
                                                          tags=run_tags, uri=client.tracking_uri) as tracker:
        from pe_triage.registry.bundle import package_wheel
        from pe_triage.registry.pyfunc import save_composite

        model_dir = save_composite(Path(tmp) / MODEL_DIR, stage1, stage2, triage, wheel=package_wheel(config.wheel_cache),
                                   exam=exam)
        (model_dir / CARD_FILE).write_text(card)
        (Path(tmp) / CARD_FILE).write_text(card)
        tracker.log_params({"triage": triage.config(), "stage1": {"arch": triage.stage1.meta.model.arch},
                            "stage2": {"arch": triage.stage2.meta.model.arch}})
        tracker.log_metrics({k: v for k, v in metrics["summary"].items() if isinstance(v, (int, float))})
        tracker.log_artifacts(model_dir, MODEL_DIR)
        tracker.log_artifacts(metrics_dir, EVALUATION_DIR)
        tracker.log_artifact(Path(tmp) / CARD_FILE)
        digests = manifest([(model_dir, MODEL_DIR), (Path(metrics_dir), EVALUATION_DIR), (Path(tmp) / CARD_FILE, CARD_FILE)])
        _ensure_registered_model(client, name)
        summary = metrics["summary"]
        description = (f"{triage.stage1.meta.model.arch} + {triage.stage2.meta.model.arch}; test patient PE "
                       f"sensitivity {fmt(summary.get('patient_pe_sensitivity'))}, slice disease sensitivity "
                       f"{fmt(summary.get('slice_disease_sensitivity'))}. Model card: {CARD_FILE} in the run's artifacts.")
        tags = _version_tags(triage, metrics, who, when) | {MANIFEST_TAG: json.dumps(digests)}
        version = client.create_model_version(name, f"runs:/{tracker.run_id}/{MODEL_DIR}", run_id=tracker.run_id,
                                              tags=tags, description=description)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    _record(client, name, version.version, {"action": "register", "outcome": "registered", "actor": who, "time": when,
                                            "reason": f"registered as {CHALLENGER}", "gates": []})
    log.info("registered %s version %s (run %s) as %s", name, version.version, tracker.run_id, CHALLENGER)
    return {"name": name, "version": int(version.version), "run_id": tracker.run_id, "alias": CHALLENGER,
            "model_uri": f"models:/{name}/{version.version}", "rule": triage.config()["rule"], "summary": metrics["summary"]}


def attach_loso(metrics_dir: str, loso: str, out: str) -> str:
    """A copy of the evaluation folder ``metrics_dir`` in ``out`` with the leave-one-site-out summary
    ``loso`` merged into its metrics (key :data:`LOSO_KEY`) and its report beside them; refused when
    the summary's drops were measured against another test evaluation."""
    import shutil

    summary, metrics = read_summary(loso), read_metrics(metrics_dir)
    pooled = summary.get("pooled_test_data")
    if pooled is not None and dict(pooled) != dict(metrics["test_data"]):
        raise RegistryError(f"{loso}: the leave-one-site-out drops were measured against other test data ({pooled}) "
                            f"than this evaluation's ({metrics['test_data']})")
    shutil.copytree(metrics_dir, out, dirs_exist_ok=True)
    shutil.copytree(loso, Path(out) / LOSO_KEY, dirs_exist_ok=True)
    (Path(out) / METRICS_FILE).write_text(json.dumps({**metrics, LOSO_KEY: summary}, sort_keys=True, indent=2) + "\n")
    return out


# ------------------------------------------------------------------------------------ promote
def _loso_gate(candidate: Mapping[str, Any], threshold: float | None) -> list[GateResult]:
    """The worst held-out site's AUROC drop (``evaluation.loso``), when the version carries a summary:
    one recorded as not run (too few sites, or switched off) passes on its reason."""
    loso = candidate.get(LOSO_KEY)
    if threshold is None or loso is None:
        return []
    name = "max_site_auroc_drop"
    if loso.get("skipped"):
        return [GateResult(name, None, threshold, True, f"leave one site out not run: {loso['skipped']}")]
    worst = loso.get(WORST)
    if worst is None:
        return [GateResult(name, None, threshold, False, "leave one site out measured no gated figure at any site")]
    passed = worst["drop"] <= threshold + _EPS
    return [GateResult(name, worst["drop"], threshold, passed,
                       f"worst held-out site {worst['site']}: {worst['metric']} {fmt(worst['drop'])} below the pooled "
                       f"test split {'<=' if passed else '>'} {threshold}")]


def _loso_sensitivity_gate(candidate: Mapping[str, Any], threshold: float | None) -> list[GateResult]:
    """The largest patient PE sensitivity drop at a held-out site (``gates.max_site_pe_sensitivity_drop``)."""
    loso, name, key = candidate.get(LOSO_KEY), "max_site_pe_sensitivity_drop", "patient_pe_sensitivity"
    if threshold is None or loso is None:
        return []
    if loso.get("skipped"):
        return [GateResult(name, None, threshold, True, f"leave one site out not run: {loso['skipped']}")]
    measured = [(d[key], site) for site, d in (loso.get("drops") or {}).items() if _number(d.get(key)) is not None]
    if not measured:
        return [GateResult(name, None, threshold, False, f"leave one site out measured no {key} at any held-out site")]
    drop, site = max(measured)
    passed = drop <= threshold + _EPS
    return [GateResult(name, drop, threshold, passed, f"worst held-out site {site}: {key} {fmt(drop)} below the pooled "
                                                      f"test split {'<=' if passed else '>'} {threshold}")]


def _number(value: Any) -> float | None:
    """A summary value as a float; None for a missing or non-numeric one (a failed gate, not a crash)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _min_gate(name: str, key: str, summary: Mapping[str, Any], threshold: float) -> GateResult:
    value = _number(summary.get(key))
    passed = value is not None and value + _EPS >= threshold
    if value is not None:
        detail = f"{key} {fmt(value)} {'>=' if passed else '<'} {threshold}"
    elif key not in summary:
        detail = f"{key} missing from the metrics summary: evaluate the models with this pe-triage version"
    else:
        detail = f"{key} not measured on the test data (a class absent, or no bootstrap interval)"
    return GateResult(name, value, threshold, passed, detail)


def evaluate_gates(candidate: Mapping[str, Any], champion: Mapping[str, Any] | None,
                   config: RegistryConfig) -> list[GateResult]:
    """Gate results of candidate metrics against the
    thresholds (gates set to None are off) and, when a champion is given, against the champion's metrics."""
    g, summary = config.gates, candidate["summary"]
    gates = [_min_gate(name, key, summary, threshold) for name, key in MIN_GATES
             if (threshold := getattr(g, name)) is not None]
    gates += _loso_gate(candidate, g.max_site_auroc_drop) + _loso_sensitivity_gate(candidate, g.max_site_pe_sensitivity_drop)
    if champion is None:
        return gates
    same = dict(candidate["test_data"]) == dict(champion["test_data"])
    gates.append(GateResult(
        "same_test_data", candidate["test_data"], champion["test_data"], same,
        "same test data" if same else "the champion was evaluated on other test data: evaluate its stage models "
        "on the candidate's test data and pass that metrics folder as the champion's metrics",
    ))
    if not same:
        return gates
    for key in REGRESSION_METRICS:
        new, old = _number(summary.get(key)), _number(champion["summary"].get(key))
        if old is None:
            continue  # nothing measured to regress from
        delta = None if new is None else new - old
        passed = delta is not None and delta + _EPS >= -g.max_regression
        gates.append(GateResult(f"max_regression.{key}", delta, -g.max_regression, passed,
                                f"{fmt(new)} vs champion {fmt(old)} (change {fmt(delta)}, allowed -{g.max_regression})"))
    return gates


def _gates(client: Any, candidate: Any, current: Any | None, config: RegistryConfig,
           champion_metrics: str | None) -> list[GateResult]:
    """The gates of promoting ``candidate`` over ``current``; a missing metrics file is a failed gate."""
    metrics = _version_metrics(client, candidate)
    if metrics is None:
        return [GateResult("metrics", None, None, False, f"version {candidate.version} has no {EVALUATION_DIR}/{METRICS_FILE}: "
                                                         "register it with pe-triage register --metrics")]
    if current is None:
        return evaluate_gates(metrics, None, config)  # the first champion: thresholds only
    if champion_metrics and (Path(champion_metrics) / EVALUATED_FILE).is_file():  # evaluate_champion's output
        evaluated = json.loads((Path(champion_metrics) / EVALUATED_FILE).read_text())["version"]
        if evaluated != int(current.version):
            return [GateResult("champion_metrics", evaluated, int(current.version), False,
                               f"the champion moved to version {current.version} after {evaluated or 'no champion'} "
                               "was evaluated on the candidate's test data: run again")]
        if not (Path(champion_metrics) / METRICS_FILE).is_file():  # it could not be evaluated on this data
            champion_metrics = None
    champion = read_metrics(champion_metrics) if champion_metrics else _version_metrics(client, current)
    if champion is None:
        return [GateResult("champion_metrics", None, None, False,
                           f"the champion (version {current.version}) has no metrics to compare with: pass its "
                           "metrics on the candidate's test data")]
    return evaluate_gates(metrics, champion, config)


def evaluate_champion(windows: str, splits: str, out: str, *, config: Config = Config(), uri: str | None = None) -> int | None:
    """Evaluate the current champion's stage models on the candidate's test data (``windows`` and
    ``splits``) into ``out``: its registration metrics come from the data of its own day, and a
    regression can only be judged on the same patients. Returns the champion's version, also written
    to ``out`` (promote checks it is still the champion); None when there is none. No Grad-CAM: only
    the numbers are compared. The champion's files are checked against their registered digests."""
    from pe_triage.registry.pyfunc import EXAM, STAGE1, STAGE2, composite_artifacts

    client = registry_client(uri)
    name = config.registry.model_name
    Path(out).mkdir(parents=True, exist_ok=True)
    current = _alias(client, name, CHAMPION)
    if current is None:
        (Path(out) / EVALUATED_FILE).write_text(json.dumps({"version": None}))
        return None
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = composite_artifacts(download_verified(client, name, current, MODEL_DIR, tmp))
        quiet = dataclasses.replace(config, evaluate=dataclasses.replace(config.evaluate, gradcam_per_category=0))
        try:
            exam = str(artifacts[EXAM]) if EXAM in artifacts else None  # its rows beside the rules', like the candidate's
            evaluate(str(artifacts[STAGE1]), str(artifacts[STAGE2]), windows, splits, out, config=quiet, exam=exam)
        except EvaluationError as e:  # e.g. other windows: promote then refuses for want of comparable metrics
            log.warning("%s: champion version %s cannot be evaluated on this data: %s", name, current.version, e)
    (Path(out) / EVALUATED_FILE).write_text(json.dumps({"version": int(current.version)}))
    log.info("%s: champion version %s evaluated on the candidate's test data -> %s", name, current.version, out)
    return int(current.version)


# ------------------------------------------------------------------------------------ champion moves
def _number_of(version: Any | None) -> int | None:
    return int(version.version) if version is not None else None


def _moved(client: Any, name: str, what: str, observed: Any | None, current: Any | None) -> str:
    """The conflict of a move that found the champion moved since it looked (another move won)."""
    record = describe(champion_record(client.get_registered_model(name).tags))
    before, after = (f"version {v.version}" if v is not None else "no champion" for v in (observed, current))
    return (f"conflict: {what} not done: the champion moved from {before} to {after} (last recorded decision: {record}) "
            f"while it waited for the champion lock; nothing changed: look at {after} and run it again")


def _verify_aliases(client: Any, name: str, expected: Mapping[str, str | None]) -> None:
    """Verify-after-write: the aliases read back as written (None: absent)."""
    aliases = client.get_registered_model(name).aliases
    if wrong := {a: aliases.get(a) for a, v in expected.items() if aliases.get(a) != v}:
        raise PromotionConflict(f"conflict: after moving {name}'s aliases they read {wrong}, not {dict(expected)}: another "
                                "writer moved them meanwhile (outside pe-triage?); check the registry")


def _last_explained(client: Any, name: str, candidate: Any, current: Any | None) -> str | None:
    """The champion a promotion replaces in the rollback chain: the one the recorded decision put in
    place (normally the current champion; never a version the alias was moved to by hand)."""
    record = champion_record(client.get_registered_model(name).tags)
    if current is None or record is None or str(record.get("champion")) == candidate.version:
        return None
    return str(record["champion"]) if explains(record, str(record.get("champion"))) else None


def _move_champion(client: Any, name: str, candidate: Any, current: Any | None, decision: dict[str, Any]) -> None:
    """The writes of a promotion, decision first: an interrupted move leaves an alias the record does
    not explain, refused at load until promote runs again, never an unrecorded champion."""
    replaced = _last_explained(client, name, candidate, current)
    if current is None:
        reason = " (first champion: thresholds only)"
    else:
        reason = f"; replaces version {current.version}"
        if replaced != current.version:
            reason += f" (which no recorded decision put there: version {replaced or 'none'} is the one to roll back to)"
    decision |= {"outcome": "promoted", "promoted": True, "reason": f"every gate passed{reason}",
                 "previous_champion": int(replaced) if replaced else None}
    _record(client, name, candidate.version, decision)
    record_champion(client, name, decision | {"champion": int(candidate.version)})
    if replaced:
        client.set_model_version_tag(name, candidate.version, REPLACED_TAG, replaced)
    client.set_registered_model_alias(name, CHAMPION, candidate.version)
    if replaced:
        client.set_registered_model_alias(name, PREVIOUS, replaced)
    elif PREVIOUS in client.get_registered_model(name).aliases:
        client.delete_registered_model_alias(name, PREVIOUS)
    challenger = _alias(client, name, CHALLENGER)
    if challenger is not None and challenger.version == candidate.version:
        client.delete_registered_model_alias(name, CHALLENGER)
    _verify_aliases(client, name, {CHAMPION: candidate.version, PREVIOUS: replaced})


def promote(version: int | None = None, *, config: RegistryConfig = RegistryConfig(), uri: str | None = None,
            actor: str | None = None, champion_metrics: str | None = None) -> dict[str, Any]:
    """Promote ``version`` (default: the ``challenger``) to ``champion`` when every gate passes;
    the replaced champion becomes ``previous-champion``. Returns (and records) the decision:
    ``outcome`` promoted | refused | unchanged, ``gates``, ``reason``. Runs under the champion lock;
    if the champion moved after this call first read it (a concurrent promote or rollback won), a
    ``conflict`` is recorded on the version and :class:`PromotionConflict` names the winner."""
    client = registry_client(uri)
    name, who = config.model_name, _actor(actor)
    if version is None:
        challenger = _alias(client, name, CHALLENGER)
        if challenger is None:
            raise RegistryError(f"model {name!r} has no {CHALLENGER}: register a version or pass --version")
        version = int(challenger.version)
    candidate = _version(client, name, version)
    observed = _alias(client, name, CHAMPION)  # the champion this promotion is decided against
    with champion_lock(client, name, config, actor=who, action=f"promote of version {version}") as still_held:
        current = _alias(client, name, CHAMPION)
        decision: dict[str, Any] = {"action": "promote", "name": name, "version": int(version), "actor": who,
                                    "time": _now(), "champion_before": _number_of(current), "gates": []}
        if _number_of(current) != _number_of(observed):
            reason = _moved(client, name, f"promotion of version {version}", observed, current)
            _record(client, name, candidate.version, decision | {"outcome": "conflict", "promoted": False, "reason": reason})
            raise PromotionConflict(reason)
        if current is not None and current.version == candidate.version:
            decision |= {"outcome": "unchanged", "promoted": False, "reason": f"version {version} is already {CHAMPION}"}
            _record(client, name, candidate.version, decision)
            return decision
        gates = _gates(client, candidate, current, config, champion_metrics)
        decision["gates"] = [dataclasses.asdict(g) for g in gates]
        if failed := [g for g in gates if not g.passed]:
            reason = "refused: " + "; ".join(f"gate {g.name} failed ({g.detail})" for g in failed)
            decision |= {"outcome": "refused", "promoted": False, "reason": reason}
            _record(client, name, candidate.version, decision)
            log.warning("%s version %s not promoted: %s", name, version, reason)
            return decision
        still_held()
        _move_champion(client, name, candidate, current, decision)
    log.info("%s version %s is now %s", name, version, CHAMPION)
    return decision


def rollback(*, config: RegistryConfig = RegistryConfig(), uri: str | None = None,
             actor: str | None = None) -> dict[str, Any]:
    """Move ``champion`` back to ``previous-champion``; the alias then walks one step further back
    (the version that one replaced), or is removed. Recorded on both versions and as the champion's
    decision; under the champion lock, and only along the chain promote recorded."""
    client = registry_client(uri)
    name, who = config.model_name, _actor(actor)
    observed = _alias(client, name, CHAMPION)
    if observed is None:
        raise RegistryError(f"model {name!r} has no {CHAMPION}: nothing to roll back")
    with champion_lock(client, name, config, actor=who, action="rollback") as still_held:
        current, previous = _alias(client, name, CHAMPION), _alias(client, name, PREVIOUS)
        if current is None or current.version != observed.version:
            raise PromotionConflict(_moved(client, name, "rollback", observed, current))
        if previous is None:
            raise RegistryError(f"model {name!r} has no {PREVIOUS}: version {current.version} is the first champion")
        if current.tags.get(REPLACED_TAG) != previous.version:
            raise IntegrityError(f"{name}: {PREVIOUS} points at version {previous.version}, but the champion (version "
                                 f"{current.version}) replaced version {current.tags.get(REPLACED_TAG) or 'none'}: the alias "
                                 "was moved outside pe-triage; refusing to roll back")
        before = previous.tags.get(REPLACED_TAG)
        before = before if before and before != current.version else None
        decision = {"action": "rollback", "name": name, "actor": who, "time": _now(), "champion_before": int(current.version),
                    "champion": int(previous.version), "previous_champion": int(before) if before else None,
                    "reason": f"rolled back from version {current.version} to version {previous.version}", "gates": []}
        still_held()
        _record(client, name, previous.version, decision | {"outcome": "restored"})
        _record(client, name, current.version, decision | {"outcome": "rolled_back"})
        record_champion(client, name, decision | {"outcome": "restored"})
        client.set_registered_model_alias(name, CHAMPION, previous.version)
        if before:
            client.set_registered_model_alias(name, PREVIOUS, before)
        else:
            client.delete_registered_model_alias(name, PREVIOUS)
        _verify_aliases(client, name, {CHAMPION: previous.version, PREVIOUS: before})
    log.info("%s: %s moved back from version %s to %s", name, CHAMPION, current.version, previous.version)
    return decision | {"outcome": "rolled_back"}


def load_registered(model_uri: str, *, uri: str | None = None,
                    config: RegistryConfig = RegistryConfig()) -> tuple[Triage, int | None]:
    """The :class:`Triage` of a composite model and its registered version (None for a local folder,
    loaded as it is: the operator's own disk). ``models:/name/N`` and ``models:/name@alias``: every
    file of the version is checked against its registration digest first, and ``@champion`` must be
    explained by the recorded decision behind it. Nothing of the model is unpickled or run."""
    from pe_triage.registry.pyfunc import load_triage

    if Path(model_uri).is_dir():
        return load_triage(model_uri), None
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", model_uri)
    if match is None:
        raise RegistryError(f"{model_uri}: give models:/<name>@<alias>, models:/<name>/<version> or a local model folder "
                            "(other URIs would bypass the registry's integrity checks)")
    client = registry_client(uri)
    name, alias, number = match.groups()
    if alias == CHAMPION:
        number = str(explained_champion(client, name, config))
    elif alias:
        found = _alias(client, name, alias)
        if found is None:
            raise RegistryError(f"{model_uri}: model {name!r} has no alias {alias!r}")
        number = found.version
    version = _version(client, name, number)
    with tempfile.TemporaryDirectory() as tmp:
        return load_triage(download_verified(client, name, version, MODEL_DIR, tmp)), int(version.version)
