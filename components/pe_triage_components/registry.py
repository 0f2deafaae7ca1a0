"""Registry steps: register the two-stage model as the challenger, check the promotion gates,
promote, and the exit handler that records every retraining run's outcome in MLflow."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output


def register(stage1: Input[Model], stage2: Input[Model], evaluation: Input[Artifact], config: str, tracking_uri: str,
             actor: str, loso: Input[Artifact] = None,
             exam: Input[Model] = None) -> NamedTuple("Registered", name=str, version=int, model_uri=str):
    """Register both stages as one pyfunc model version with alias ``challenger``, its evaluation
    and model card attached, the leave-one-site-out summary ``loso`` when the run made one, and the
    exam model ``exam`` when the run trained one (a disabled step's marker: none)."""
    from pe_triage.config import parse_config
    from pe_triage.logs import setup_logging
    from pe_triage.registry.registry import register

    setup_logging()

    cfg = parse_config(config)
    result = register(stage1.path, stage2.path, evaluation.path, config=cfg.registry, evaluate=cfg.evaluate,
                      uri=tracking_uri or None, actor=actor, loso=loso.path if loso is not None else None,
                      exam=exam.path if exam is not None and exam.metadata.get("enabled", True) else None)
    return result["name"], int(result["version"]), result["model_uri"]


def check_gates(evaluation: Input[Artifact], config: str, loso: Input[Artifact] = None) -> bool:
    """Does the candidate reach the promotion minimums of the configuration (and, given the run's
    leave-one-site-out summary ``loso``, its worst-site gate)? The comparison with the
    champion needs the registry's state at the moment of the move, so ``promote`` makes it (and
    checks the minimums again). One output on purpose: kfp.local resolves a ``dsl.If`` on a task's
    only output, not on a named one."""
    import logging

    from pe_triage.config import parse_config
    from pe_triage.evaluation.loso import read_summary
    from pe_triage.logs import setup_logging
    from pe_triage.registry.registry import LOSO_KEY, evaluate_gates, read_metrics

    setup_logging()

    cfg = parse_config(config)
    metrics = read_metrics(evaluation.path) | ({LOSO_KEY: read_summary(loso.path)} if loso is not None else {})
    gates = evaluate_gates(metrics, None, cfg.registry)
    for gate in gates:
        logging.getLogger("pe_triage_components").info("gate %s: %s (%s)", gate.name, "passed" if gate.passed else "FAILED",
                                                       gate.detail)
    return all(gate.passed for gate in gates)


def evaluate_champion(windows: Input[Dataset], splits: Input[Dataset], config: str, tracking_uri: str,
                      evaluation: Output[Artifact]) -> int:
    """Evaluate the current champion on this run's test split, for ``promote`` to compare on the same
    patients; 0 (and an empty folder) when there is no champion yet."""
    from pe_triage.config import parse_config
    from pe_triage.logs import setup_logging
    from pe_triage.registry.registry import evaluate_champion

    setup_logging()

    source = windows.metadata.get("uri") or windows.path  # a reference to the store, or the artifact
    return evaluate_champion(source, splits.path, evaluation.path, config=parse_config(config),
                             uri=tracking_uri or None) or 0


def promote(version: int, champion_evaluation: Input[Artifact], config: str, tracking_uri: str, actor: str) -> bool:
    """Move alias ``champion`` to ``version`` if every gate passes, including no regression against
    the current champion on the same test data; the decision is recorded on the version either way."""
    import logging

    from pe_triage.config import parse_config
    from pe_triage.logs import setup_logging
    from pe_triage.registry.registry import promote

    setup_logging()

    cfg = parse_config(config)
    decision = promote(version, config=cfg.registry, uri=tracking_uri or None, actor=actor,
                       champion_metrics=champion_evaluation.path)
    logging.getLogger("pe_triage_components").info("version %s: %s: %s", version, decision["outcome"], decision["reason"])
    return bool(decision["promoted"])


def check_trigger(store: str, slices_digest: str, force: bool, config: str, tracking_uri: str, job: str) -> bool:
    """Does anything warrant training (new labelled data since the champion's, drift, no champion, or
    ``force``)? The decision and its reason are logged here and recorded in MLflow under ``job``. One
    output, for a ``dsl.If`` (see ``check_gates``)."""
    import logging

    from pe_triage.config import parse_config
    from pe_triage.logs import setup_logging
    from pe_triage.registry.trigger import record_decision, should_retrain

    setup_logging()

    cfg = parse_config(config)
    decision = should_retrain(slices_digest, store=store, config=cfg, uri=tracking_uri or None, force=force)
    record_decision(decision, config=cfg, uri=tracking_uri or None, job=job)
    logging.getLogger("pe_triage_components").info("%s: %s", "train" if decision.train else "skip", decision.reason)
    return decision.train


def record_outcome(status: dsl.PipelineTaskFinalStatus, pipeline: str, config: str, tracking_uri: str, job: str = ""):
    """Exit handler: one MLflow run per pipeline run with its final state, whatever failed before;
    SKIPPED (with the reason) when the trigger recorded under ``job`` decided not to train."""
    import logging

    from pe_triage.config import parse_config
    from pe_triage.logs import setup_logging
    from pe_triage.registry.trigger import recorded_skip
    from pe_triage.tracking import start_run

    setup_logging()

    cfg = parse_config(config)
    skipped = recorded_skip(job, config=cfg, uri=tracking_uri or None) if job and status.state == "SUCCEEDED" else None
    state = "SKIPPED" if skipped else status.state
    tags = {"pe_triage.kind": "pipeline_outcome", "pe_triage.pipeline": pipeline, "pe_triage.outcome": state,
            "kfp.job": job or status.pipeline_job_resource_name, "kfp.error": status.error_message or "-",
            **({"pe_triage.trigger.reason": skipped} if skipped else {})}
    with start_run(experiment=f"{cfg.registry.experiment}-pipelines", run_name=f"{pipeline} {state.lower()}",
                   tags=tags, uri=tracking_uri or None) as run:
        run.log_metrics({"succeeded": float(status.state == "SUCCEEDED")})
    logging.getLogger("pe_triage_components").info("%s", f"{pipeline}: {state} {skipped or status.error_message or ''}".strip())
