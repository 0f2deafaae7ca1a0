"""``pe-triage pipeline ...`` and ``pe-triage demo``: registered with the library's CLI through the
``pe_triage.commands`` entry point. kfp is imported when a handler runs, never at parser build."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from pe_triage.config import ConfigError, parse_config

#: where the Helm chart's scheduling Job finds the chart's cluster.yaml
CLUSTER_CONFIG_ENV = "PE_TRIAGE_CLUSTER_CONFIG"


def _config_text(path: str | None) -> str:
    """The configuration file's text (validated first: a typo fails here, not in a pod)."""
    if not path:
        return ""
    text = Path(path).read_text()
    parse_config(text, source=path)
    return text


def _cluster(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """(ClusterOptions, the raw cluster.yaml mapping) from --cluster-config or $PE_TRIAGE_CLUSTER_CONFIG."""
    import yaml

    from pe_triage_pipelines.cluster import ClusterOptions

    path = getattr(args, "cluster_config", None) or os.environ.get(CLUSTER_CONFIG_ENV)
    raw = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
    return ClusterOptions.from_cluster_config(raw) if raw else ClusterOptions(), raw


def _tracking(args: argparse.Namespace, raw: dict[str, Any]) -> str:
    return args.tracking_uri or raw.get("mlflowTrackingUri") or os.environ.get("MLFLOW_TRACKING_URI", "")


def _sites(values: list[list[str]] | None) -> list[dict[str, str]]:
    sites = []
    for value in values or []:
        if len(value) not in (2, 3):
            raise ConfigError(f"--site takes NAME SOURCE [LABELS], got {value}")
        sites.append({"site": value[0], "source": value[1], "labels": value[2] if len(value) == 3 else ""})
    return sites


def _store(args: argparse.Namespace, raw: dict[str, Any]) -> str:
    store = args.slices_store or raw.get("slicesStore")
    if not store:
        raise ConfigError("give --slices-store (or slicesStore in the cluster config)")
    return store


def _arguments(args: argparse.Namespace, tracking_uri: str, store: str) -> dict[str, Any]:
    """Pipeline parameters of ``args.pipeline`` from the command line."""
    params: dict[str, Any] = {"slices_store": store, "config": _config_text(args.config), "tracking_uri": tracking_uri}
    if args.pipeline == "onboarding":
        if not args.site:
            raise ConfigError("onboarding needs at least one --site NAME SOURCE [LABELS]")
        params |= {"sites": _sites(args.site), "demo_key": args.demo_key, "labels_format": args.labels_format}
    elif args.site or args.demo_key or args.labels_format != "manifest":
        raise ConfigError("--site, --demo-key and --labels-format are onboarding parameters")
    if args.force and args.pipeline != "retraining":
        raise ConfigError("--force is a retraining parameter")
    return params | _force(args)


def _force(args: argparse.Namespace) -> dict[str, Any]:
    """``force`` only when asked for: a run or schedule without it keeps the pipeline's default (False)."""
    return {"force": True} if args.force else {}


def _compile(args: argparse.Namespace) -> int:
    from pe_triage_pipelines.compile import compile_all

    options, _ = _cluster(args)
    for name, path in compile_all(args.out, options).items():
        print(f"{name}: {path}")
    return 0


def _run_local(args: argparse.Namespace) -> int:
    from pe_triage_pipelines.local import run_local

    store = _store(args, {})
    params = _arguments(args, args.tracking_uri or "", store if store.startswith("s3://") else str(Path(store).resolve()))
    run_local(args.pipeline, params, pipeline_root=args.root, cache=not args.no_cache)
    print(f"{args.pipeline}: done; step outputs under {Path(args.root).resolve()}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from pe_triage_pipelines.client import submit

    options, raw = _cluster(args)
    run_id = submit(args.host, args.pipeline, _arguments(args, _tracking(args, raw), _store(args, raw)),
                    experiment=args.experiment, run_name=args.run_name, namespace=args.namespace, options=options)
    print(f"run {run_id}")
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from pe_triage_pipelines.client import schedule

    if len(args.cron.split()) != 6:
        raise ConfigError(f"--cron {args.cron!r}: KFP takes six fields, seconds first (e.g. '0 0 2 * * 0': Sundays 02:00)")
    options, raw = _cluster(args)
    params = {"slices_store": _store(args, raw), "config": _config_text(args.config), "tracking_uri": _tracking(args, raw),
              **_force(args)}
    recurring = schedule(args.host, params, cron=args.cron, name=args.name, experiment=args.experiment,
                         namespace=args.namespace, options=options)
    print(f"recurring run {args.name}: {recurring} ({args.cron}, one at a time, no catch-up)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pe_triage_pipelines.demo import run_demo

    summary = run_demo(Path(args.out), args.config, seed=args.seed, force=args.force)
    print(json.dumps({k: summary[k] for k in ("registered_version", "champion", "promoted")}))
    return 0


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", choices=["onboarding", "retraining"])
    _shared_params(p)
    p.add_argument("--site", nargs="+", action="append", metavar="NAME SOURCE [LABELS]",
                   help="onboarding: a site, its DICOM folder or s3:// prefix and its label manifest (repeat per site)")
    p.add_argument("--demo-key", action="store_true", help="onboarding: allow the public pseudonym key (synthetic data only)")
    p.add_argument("--labels-format", choices=["manifest", "rspect", "lidc", "masks"], default="manifest",
                   help="onboarding: what each site's LABELS is (converted first unless a manifest; pe-triage labels convert)")


def _shared_params(p: argparse.ArgumentParser) -> None:
    """The parameters both pipelines take, so every way of starting one (run-local, submit, schedule) offers them."""
    p.add_argument("--slices-store",
                   help="the persistent slices dataset (folder or s3:// URI; default: slicesStore of the cluster config)")
    p.add_argument("--config", help="pe-triage YAML configuration; its text becomes the config parameter")
    p.add_argument("--tracking-uri", default="",
                   help="MLflow tracking URI (default: the cluster config's, else MLFLOW_TRACKING_URI)")
    p.add_argument("--force", action="store_true",
                   help="retraining: train even when nothing warrants it (no new labelled data since the champion's, no drift)")


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster-config",
                   help=f"the Helm chart's cluster.yaml (images, GPUs, secret names; default ${CLUSTER_CONFIG_ENV})")


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline.kubeflow:8888")
    p.add_argument("--experiment", default="pe-triage", help="KFP experiment")
    p.add_argument("--namespace", help="Kubernetes namespace (multi-user Kubeflow)")
    _cluster_args(p)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the ``pipeline`` and ``demo`` sub-commands to the ``pe-triage`` parser."""
    pipeline = sub.add_parser("pipeline", help="compile, run locally, submit or schedule the KFP pipelines",
                              epilog="examples:\n  pe-triage pipeline compile --out compiled\n"
                                     "  pe-triage pipeline run-local --help")
    actions = pipeline.add_subparsers(dest="action", required=True)

    p = actions.add_parser("compile", help="compile every pipeline to KFP IR YAML",
                           epilog="example:\n  pe-triage pipeline compile --out compiled --cluster-config cluster.yaml")
    p.add_argument("--out", required=True, help="folder for onboarding.yaml and retraining.yaml")
    _cluster_args(p)
    p.set_defaults(func=_compile)

    p = actions.add_parser("run-local", help="run a pipeline on this machine with kfp.local (subprocesses, cached steps)",
                           epilog="examples:\n"
                                  "  pe-triage pipeline run-local onboarding --slices-store slices --demo-key \\\n"
                                  "      --site site-a cohort/sites/site-a/dicom cohort/sites/site-a/labels.csv\n"
                                  "  pe-triage pipeline run-local retraining --slices-store slices --config configs/demo.yaml")
    _pipeline_args(p)
    p.add_argument("--root", default="kfp-local", help="pipeline root: step outputs and the step cache")
    p.add_argument("--no-cache", action="store_true", help="run every step, even when its inputs are unchanged")
    p.set_defaults(func=_run_local)

    p = actions.add_parser("submit", help="compile a pipeline and start one run on a KFP server",
                           epilog="example:\n  pe-triage pipeline submit retraining --host http://ml-pipeline.kubeflow:8888 \\\n"
                                  "      --cluster-config cluster.yaml --config pe-triage.yaml")
    _pipeline_args(p)
    _server_args(p)
    p.add_argument("--run-name", help="display name of the run")
    p.set_defaults(func=_submit)

    p = actions.add_parser("schedule", help="create or replace the recurring retraining run (one at a time, no catch-up)",
                           epilog="example:\n  pe-triage pipeline schedule --cron '0 0 2 * * 0' "
                                  "--host http://ml-pipeline.kubeflow:8888 --cluster-config cluster.yaml")
    p.add_argument("--cron", required=True, help="six-field KFP cron, seconds first, e.g. '0 0 2 * * 0'")
    p.add_argument("--name", default="pe-triage-retraining",
                   help="recurring run name (an existing one of this name is replaced)")
    _shared_params(p)
    _server_args(p)
    p.set_defaults(func=_schedule)

    if "demo" in sub.choices:  # the library's older demo (synth -> ingest -> split) until it is retired
        return
    p = sub.add_parser("demo", help="synthetic cohort -> onboarding -> retraining through kfp.local, with a local MLflow server",
                       epilog="examples:\n  pe-triage demo --out demo-output\n"
                              "  pe-triage demo --out demo-output --seed 7   # a new cohort competes with the champion")
    p.add_argument("--out", default="demo-output", help="output folder (a second run reuses it)")
    p.add_argument("--config", default="configs/demo.yaml", help="YAML configuration (small model and cohort)")
    p.add_argument("--seed", type=int, help="cohort seed (default: the configuration's); another seed onboards a new cohort "
                                            "into the same registry and competes with the champion")
    p.add_argument("--force", action="store_true", help="retrain even when the store is the champion's training data")
    p.set_defaults(func=_demo)
