"""Registry steps: register the two-stage model as the challenger, check the promotion gates,
promote, and the exit handler that records every retraining run's outcome in MLflow."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output


def register(stage1: Input[Model], stage2: Input[Model], evaluation: Input[Artifact], config: str, tracking_uri: str,
             actor: str) -> NamedTuple("Registered", name=str, version=int, model_uri=str):
    """Register both stages as one pyfunc model version with alias ``challenger``, its evaluation
    and model card attached."""
    from pe_triage.config import parse_config
    from pe_triage.logs import setup_logging
    from pe_triage.registry.registry import register

    setup_logging()

    cfg = parse_config(config)
    result = register(stage1.path, stage2.path, evaluation.path, config=cfg.registry, evaluate=cfg.evaluate,
                      uri=tracking_uri or None, actor=actor)
    return result["name"], int(result["version"]), result["model_uri"]


def check_gates(evaluation: Input[Artifact], config: str) -> bool:
    """Does the candidate reach the promotion minimums of the configuration? The comparison with the
    champion needs the registry's state at the moment of the move, so ``promote`` makes it (and
    checks the minimums again). One output on purpose: kfp.local resolves a ``dsl.If`` on a task's
    only output, not on a named one."""
    import logging

    from pe_triage.config import parse_config
    from pe_triage.logs import setup_logging
    from pe_triage.registry.registry import evaluate_gates, read_metrics

    setup_logging()

    cfg = parse_config(config)
    gates = evaluate_gates(read_metrics(evaluation.path), None, cfg.registry)
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


def record_outcome(status: dsl.PipelineTaskFinalStatus, pipeline: str, config: str, tracking_uri: str):
    """Exit handler: one MLflow run per pipeline run with its final state, whatever failed before."""
    import logging

    from pe_triage.config import parse_config
    from pe_triage.logs import setup_logging
    from pe_triage.tracking import start_run

    setup_logging()

    cfg = parse_config(config)
    tags = {"pe_triage.kind": "pipeline_outcome", "pe_triage.pipeline": pipeline, "pe_triage.outcome": status.state,
            "kfp.job": status.pipeline_job_resource_name, "kfp.error": status.error_message or "-"}
    with start_run(experiment=f"{cfg.registry.experiment}-pipelines", run_name=f"{pipeline} {status.state.lower()}",
                   tags=tags, uri=tracking_uri or None) as run:
        run.log_metrics({"succeeded": float(status.state == "SUCCEEDED")})
    logging.getLogger("pe_triage_components").info("%s", f"{pipeline}: {status.state} {status.error_message or ''}".strip())
