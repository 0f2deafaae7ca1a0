"""``pe-triage register | promote | rollback | predict | serve``: the registry sub-commands.

:func:`add_commands` adds them to the main parser. Exit codes: 0 done (a promotion that changes
nothing included), 1 promotion refused (the message names the failed gates) or a conflict (another
promote or rollback won, or holds the champion lock: the message names it), 2 error (tracking server
unreachable, bad input, a version whose files or champion alias fail the integrity checks).
mlflow is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pe_triage.config import Config, ConfigError, load_config

log = logging.getLogger("pe_triage")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML configuration (sections 'registry', 'evaluate')")
    p.add_argument("--tracking-uri", help="MLflow tracking server (default: MLFLOW_TRACKING_URI)")


def _guarded(handler: Callable[[argparse.Namespace, Config], tuple[int, Any]]) -> Callable[[argparse.Namespace], int]:
    """Run a handler: its result as JSON on stdout (whatever MLflow prints goes to stderr, so stdout
    stays machine-readable); errors a user can act on become one log line and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        from mlflow.exceptions import MlflowException

        from pe_triage.artifact import ArtifactError
        from pe_triage.predict import PredictError
        from pe_triage.registry.errors import PromotionConflict, RegistryError
        from pe_triage.tracking import TrackingUnavailable

        try:
            with contextlib.redirect_stdout(sys.stderr):
                code, result = handler(args, load_config(args.config))
            json.dump(result, sys.stdout, indent=2, default=str)
            sys.stdout.write("\n")
            return code
        except PromotionConflict as e:
            log.error("%s", e)
            return 1
        except TrackingUnavailable as e:
            log.error("%s (start the server or check --tracking-uri / MLFLOW_TRACKING_URI)", e)
        except (RegistryError, PredictError, ArtifactError, ConfigError, FileNotFoundError) as e:
            log.error("%s", e)
        except MlflowException as e:
            log.error("MLflow: %s", e.message)
        return 2

    return run


def _register(args: argparse.Namespace, config: Config) -> tuple[int, Any]:
    from pe_triage.registry.registry import register

    return 0, register(args.stage1, args.stage2, args.metrics, config=config.registry, evaluate=config.evaluate,
                       uri=args.tracking_uri, actor=args.actor)


def _promote(args: argparse.Namespace, config: Config) -> tuple[int, Any]:
    from pe_triage.registry.registry import promote

    decision = promote(args.version, config=config.registry, uri=args.tracking_uri, actor=args.actor,
                       champion_metrics=args.champion_metrics)
    if decision["outcome"] == "refused":
        log.error("version %s not promoted: %s", decision["version"], decision["reason"])
        return 1, decision
    return 0, decision


def _rollback(args: argparse.Namespace, config: Config) -> tuple[int, Any]:
    from pe_triage.registry.registry import rollback

    return 0, rollback(config=config.registry, uri=args.tracking_uri, actor=args.actor)


def _predict(args: argparse.Namespace, config: Config) -> tuple[int, Any]:
    from pe_triage.predict import default_device, triage_report
    from pe_triage.registry.registry import load_registered

    model_uri = args.model or f"models:/{config.registry.model_name}@champion"
    triage, version = load_registered(model_uri, uri=args.tracking_uri, config=config.registry)
    triage.to(default_device())
    # the operator's own files, read with their own rights: serve.allowed_prefixes fences network callers
    per_slice, summary = triage.predict_dicom(args.dicom, ingest=config.ingest, allowed_prefixes=None)
    report = triage_report(per_slice, triage, model=model_uri, input_summary=summary)
    report["model_version"] = version
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        return 0, [{k: s[k] for k in ("study", "triage", "slices", "flagged_slices")} for s in report["studies"]]
    return 0, report


def _serve(args: argparse.Namespace) -> int:
    """Run the service until SIGINT/SIGTERM (it logs and returns 2 only when it cannot start)."""
    from pe_triage.registry.serve_http import run

    try:
        config = load_config(args.config)
        model_uri = args.model or f"models:/{config.registry.model_name}@champion"
        run(model_uri, config, host=args.host, port=args.port, tracking_uri=args.tracking_uri, device=args.device)
    except (ConfigError, ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    return 0


PREDICT_DESCRIPTION = """Triage DICOM studies with a registered model (default: the champion).

Writes one JSON report: the model and its version, the decision rule and thresholds, a summary of
the input read, and per study
its triage (wnl, other or pe), slice counts per class, the flagged slices and every slice's
p_disease and p_pe. Studies and series are named study-1, series-1, ...: no patient names, UIDs or
paths. Without --out the report goes to stdout; with --out it is written to that file and stdout
gets one line per study (study, triage, slices, flagged slices). Nothing else is written."""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``register``, ``promote``, ``rollback``, ``predict`` and ``serve`` to the ``pe-triage`` parser."""
    p = subparsers.add_parser("register", help="register a stage 1 + stage 2 pair as a new composite version (challenger)",
                              epilog="example:\n  pe-triage register --stage1 models/stage1-cal --stage2 models/stage2-cal "
                                     "--metrics evaluation \\\n      --tracking-uri http://127.0.0.1:5000")
    p.add_argument("--stage1", required=True, help="stage 1 model artifact folder")
    p.add_argument("--stage2", required=True, help="stage 2 model artifact folder")
    p.add_argument("--metrics", required=True, help="metrics folder of pe-triage evaluate (metrics.json, report)")
    p.add_argument("--actor", help="who registers (default: PE_TRIAGE_ACTOR or USER)")
    _common(p)
    p.set_defaults(func=_guarded(_register))

    p = subparsers.add_parser("promote", help="promote a version to champion if it passes the gates",
                              epilog="example:\n  pe-triage promote --version 3 --tracking-uri http://127.0.0.1:5000\n"
                                     "exit status: 0 promoted or unchanged, 1 refused by a gate or a conflict, 2 error")
    p.add_argument("--version", type=int, help="version to promote (default: the challenger)")
    p.add_argument("--champion-metrics", help="metrics of the current champion evaluated on the candidate's test data")
    p.add_argument("--actor", help="who decides (default: PE_TRIAGE_ACTOR or USER)")
    _common(p)
    p.set_defaults(func=_guarded(_promote))

    p = subparsers.add_parser("rollback", help="move champion back to the previous champion",
                              epilog="example:\n  pe-triage rollback --actor alice --tracking-uri http://127.0.0.1:5000")
    p.add_argument("--actor", help="who decides (default: PE_TRIAGE_ACTOR or USER)")
    _common(p)
    p.set_defaults(func=_guarded(_rollback))

    p = subparsers.add_parser("predict", help="triage DICOM studies with a registered model (no PHI in the output)",
                              description=PREDICT_DESCRIPTION,
                              epilog="examples:\n  pe-triage predict --dicom exports/study-1 --tracking-uri http://127.0.0.1:5000\n"
                                     "  pe-triage predict --model models:/pe-triage/3 --dicom s3://exports/today/ "
                                     "--out report.json")
    p.add_argument("--model", help="model URI (default: models:/<registry.model_name>@champion) or a local model folder")
    p.add_argument("--dicom", required=True, nargs="+", help="DICOM folder(s), file(s) or s3:// prefix(es)")
    p.add_argument("--out", help="write the full JSON report here (default: print it)")
    _common(p)
    p.set_defaults(func=_guarded(_predict))

    p = subparsers.add_parser("serve", help="serve a registered model over HTTP (reloaded when its alias moves)",
                              description="HTTP triage service: GET /ping, /health, /version; POST /invocations "
                                          "(MLflow scoring protocol), POST /v1/triage (DICOM files). Limits and the "
                                          "alias poll period: section 'serve' of --config.",
                              epilog="example:\n  pe-triage serve --model models:/pe-triage@champion --port 8080 "
                                     "--tracking-uri http://127.0.0.1:5000")
    p.add_argument("--model", help="model URI (default: models:/<registry.model_name>@champion) or a local model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--port", type=int, help="TCP port (default: serve.port, 8080)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="where the model runs (default: cuda when available)")
    _common(p)
    p.set_defaults(func=_serve)
