"""``pe-triage register | promote | rollback | predict | monitor | serve | listen``: the registry sub-commands.

:func:`add_commands` adds them to the main parser. Exit codes: 0 done (a promotion that changes
nothing included), 1 promotion refused (the message names the failed gates) or a conflict (another
promote or rollback won, or holds the champion lock: the message names it), 2 error (tracking server
unreachable, bad input, a version whose files or champion alias fail the integrity checks).
mlflow is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from datetime import date
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
        from pe_triage.monitoring.drift import DriftInputError
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
        except (RegistryError, PredictError, ArtifactError, ConfigError, FileNotFoundError, DriftInputError) as e:
            log.error("%s", e)
        except MlflowException as e:
            log.error("MLflow: %s", e.message)
        return 2

    return run


def _register(args: argparse.Namespace, config: Config) -> tuple[int, Any]:
    from pe_triage.registry.registry import register

    return 0, register(args.stage1, args.stage2, args.metrics, config=config.registry, evaluate=config.evaluate,
                       uri=args.tracking_uri, actor=args.actor, loso=args.loso, exam=args.exam)


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


def _model_uri(args: argparse.Namespace, config: Config) -> str:
    """``--model``, else the registered model's champion."""
    return args.model or f"models:/{config.registry.model_name}@champion"


def _predict(args: argparse.Namespace, config: Config) -> tuple[int, Any]:
    from pe_triage.monitoring import record_triage
    from pe_triage.predict import PredictError, default_device, triage_report
    from pe_triage.registry.registry import load_registered

    if (args.study or args.stow) and not args.dicomweb:
        raise PredictError("--study and --stow go with --dicomweb")
    model_uri = _model_uri(args, config)
    triage, version = load_registered(model_uri, uri=args.tracking_uri, config=config.registry)
    triage.to(default_device())
    if args.dicomweb:
        report = _predict_dicomweb(args, config, triage, model_uri, version)
    else:
        # the operator's own files, read with their own rights: serve.allowed_prefixes fences network callers
        per_slice, summary = triage.predict_dicom(args.dicom, ingest=config.ingest, allowed_prefixes=None)
        report = triage_report(per_slice, triage, model=model_uri, input_summary=summary)
        report["model_version"] = version
    record_triage(config.monitor, report, source="dicomweb" if args.dicomweb else "predict")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        return 0, [{k: s[k] for k in ("study", "triage", "slices", "flagged_slices")} for s in report["studies"]]
    return 0, report


def _predict_dicomweb(args: argparse.Namespace, config: Config, triage: Any, model_uri: str,
                      version: int | None) -> dict[str, Any]:
    """A study fetched over DICOMweb; with --stow its SR and key image stored back (pe_triage.pacs)."""
    from pe_triage.evaluation.gradcam import Attribution
    from pe_triage.pacs import PacsError, triage_dicomweb

    if not args.study:
        raise PacsError("--dicomweb needs --study STUDY_INSTANCE_UID")
    result = triage_dicomweb(args.dicomweb, args.study, triage, model=model_uri,
                             version="unregistered" if version is None else str(version),
                             ingest=config.ingest, config=config.pacs, stow=args.stow,
                             attribution=Attribution.of(config.evaluate))
    return result.report


#: ``pe-triage monitor``'s exit status when a site drifted (0: within the thresholds, 2: bad input)
DRIFT_EXIT = 3


def _monitor(args: argparse.Namespace, config: Config) -> tuple[int, Any]:
    from pe_triage.monitoring.drift import DriftInputError
    from pe_triage.monitoring.report import run_monitor

    if args.store:
        config = dataclasses.replace(config, monitor=dataclasses.replace(config.monitor, store=args.store))
    if not config.monitor.store:
        raise DriftInputError("no monitoring store: give --store or monitor.store in --config")
    if args.until and args.until < args.since:
        raise DriftInputError(f"--until {args.until} is before --since {args.since}")
    report = run_monitor(config, since=args.since, until=args.until, reference=args.reference, out_dir=args.out,
                         tracking_uri=args.tracking_uri)
    summary = {"drift": report["drift"], "studies": report["studies"], "out": args.out,
               "sites": {s: v["flagged"] for s, v in report["sites"].items()}}
    if report["drift"]:
        log.warning("drift flagged: %s", {s: f for s, f in summary["sites"].items() if f})
        return DRIFT_EXIT, summary
    return 0, summary


def _serve(args: argparse.Namespace) -> int:
    """Run the service until SIGINT/SIGTERM (it logs and returns 2 only when it cannot start)."""
    from pe_triage.registry.serve_http import run

    try:
        config = load_config(args.config)
        model_uri = _model_uri(args, config)
        run(model_uri, config, host=args.host, port=args.port, tracking_uri=args.tracking_uri, device=args.device)
    except (ConfigError, ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    return 0


def _listen(args: argparse.Namespace) -> int:
    """Run the DICOM node until SIGINT/SIGTERM (it logs and returns 2 only when it cannot start).
    The model is held as ``serve`` holds it: reloaded when its alias moves, or at once on SIGHUP."""
    import signal
    import threading

    from pe_triage.pacs.listen import Model
    from pe_triage.pacs.listen_scp import run_listener, sender
    from pe_triage.registry.serve import ModelHolder

    try:
        config = load_config(args.config)
        overrides = {k: v for k, v in (("port", args.port), ("spool", args.spool)) if v}
        config = dataclasses.replace(config, listen=dataclasses.replace(config.listen, **overrides))
        sender(config)  # a node open to anyone, or with nowhere to send, stops here: before loading a model
        model_uri = _model_uri(args, config)
        holder = ModelHolder(model_uri, tracking_uri=args.tracking_uri, registry=config.registry, device=args.device)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        holder.start(stop, config.serve.reload_poll_s)

        def model() -> Model | None:
            served = holder.current
            return None if served is None else Model(served.triage, served.name or "pe-triage",
                                                     "unregistered" if served.version is None else str(served.version))

        run_listener(model, config, host=args.host, stop=stop)
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
gets one line per study (study, triage, slices, flagged slices). Nothing else is written, except
with --dicomweb --stow: a DICOM SR and (for a PE-flagged study) a key image go back to that PACS,
carrying the study's own patient/study identifiers (they wait in pacs.outbox if the PACS refuses).
Credentials for the PACS: PE_TRIAGE_PACS_USER + PE_TRIAGE_PACS_PASSWORD, or PE_TRIAGE_PACS_TOKEN."""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``register``, ``promote``, ``rollback``, ``predict``, ``serve`` and ``listen`` to the ``pe-triage`` parser."""
    p = subparsers.add_parser("register", help="register a stage 1 + stage 2 pair as a new composite version (challenger)",
                              epilog="example:\n  pe-triage register --stage1 models/stage1-cal --stage2 models/stage2-cal "
                                     "--metrics evaluation \\\n      --tracking-uri http://127.0.0.1:5000")
    p.add_argument("--stage1", required=True, help="stage 1 model artifact folder")
    p.add_argument("--stage2", required=True, help="stage 2 model artifact folder")
    p.add_argument("--metrics", required=True, help="metrics folder of pe-triage evaluate (metrics.json, report)")
    p.add_argument("--actor", help="who registers (default: PE_TRIAGE_ACTOR or USER)")
    p.add_argument("--loso", help="leave-one-site-out summary folder, judged by promote's max_site_auroc_drop gate")
    p.add_argument("--exam", help="exam-level model folder trained on this stage pair: the version carries it")
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
                                     "--out report.json\n"
                                     "  pe-triage predict --dicomweb http://pacs:8042/dicom-web --study 1.2.840.1 --stow")
    p.add_argument("--model", help="model URI (default: models:/<registry.model_name>@champion) or a local model folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dicom", nargs="+", help="DICOM folder(s), file(s) or s3:// prefix(es)")
    source.add_argument("--dicomweb", metavar="URL", help="DICOMweb root of a PACS (QIDO/WADO-RS); with --study")
    p.add_argument("--study", metavar="STUDY_UID", help="Study Instance UID to fetch with --dicomweb (never logged)")
    p.add_argument("--stow", action="store_true", help="with --dicomweb: store the DICOM SR and key image back "
                                                        "(STOW-RS; section 'pacs' of --config)")
    p.add_argument("--out", help="write the full JSON report here (default: print it)")
    _common(p)
    p.set_defaults(func=_guarded(_predict))

    p = subparsers.add_parser("monitor", help="drift report of the monitoring records of a period",
                              description="Input drift (acquisition fields vs. the champion's training slices) and "
                                          "output drift (score summaries and flag rate vs. the records before "
                                          "--since) per site label; thresholds: section 'monitor' of --config.",
                              epilog="example:\n  pe-triage monitor --since 2026-11-01 --reference s3://data/slices "
                                     "--out drift/ --config site.yaml\n"
                                     "exit status: 0 within the thresholds, 3 drift flagged, 2 bad input")
    p.add_argument("--since", required=True, type=date.fromisoformat, help="first day (YYYY-MM-DD, UTC)")
    p.add_argument("--until", type=date.fromisoformat, help="last day, inclusive (default: today)")
    p.add_argument("--reference", required=True, help="the champion's training slices dataset (folder or s3://)")
    p.add_argument("--store", help="monitoring store (default: monitor.store)")
    p.add_argument("--out", required=True, help="folder for drift.json, drift.md, drift.html")
    _common(p)
    p.set_defaults(func=_guarded(_monitor))

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

    p = subparsers.add_parser("listen", help="a DICOM node: receive studies by C-STORE, triage, send the SR back",
                              description="C-STORE SCP (section 'listen' of --config: AE title, port, allowed calling "
                                          "AEs, quiet period, spool, destination). A study is triaged once no "
                                          "instance of it came for listen.quiet_s; its SR and key image go back by "
                                          "C-STORE or STOW-RS, once per model version; a failing study is retried, "
                                          "then kept in <spool>/failed/ with its reason.",
                              epilog="example:\n  pe-triage listen --model models:/pe-triage@champion --config site.yaml "
                                     "--host 0.0.0.0 --tracking-uri http://127.0.0.1:5000")
    p.add_argument("--model", help="model URI (default: models:/<registry.model_name>@champion) or a local model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--port", type=int, help="DICOM port (default: listen.port, 11112)")
    p.add_argument("--spool", help="spool folder (default: listen.spool); persistent, so a restart resumes")
    p.add_argument("--device", choices=["cpu", "cuda"], help="where the model runs (default: cuda when available)")
    _common(p)
    p.set_defaults(func=_listen)
