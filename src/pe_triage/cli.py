"""``pe-triage`` command line: one sub-command per pipeline step, each a call into the library.

Help texts are plain text with an example per command (``tests/test_cli.py`` checks every one), and
logging is set up once here (:mod:`pe_triage.logs`): the project's progress at INFO, others' at WARNING."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from pe_triage import __version__
from pe_triage.config import ConfigError, load_config
from pe_triage.logs import FORMAT_ENV, FORMATS, configured_logging, log_format
from pe_triage.registry.cli import add_commands as add_registry_commands

log = logging.getLogger("pe_triage")

#: arguments naming a hospital's own folders, whose sub-folders are often named after patients
_SOURCE_ARGS = ("source", "dicom", "inputs")
#: what to do about an OSError, by errno, where the kernel's words do not say
_OS_HINTS = {errno.ENOSPC: "; free space on that volume and run again",
             errno.EDQUOT: "; raise the quota or free space and run again"}
DESCRIPTION = """Two-stage chest-CT triage for pulmonary embolism: one command per pipeline step (synth, ingest,
preprocess, split, train, calibrate, evaluate), the model registry (register, promote, rollback,
predict), the Kubeflow pipelines and the end-to-end demo. Each command's --help has an example."""
EXAMPLES = """examples:
  pe-triage demo                      # the whole system on a generated cohort (see README.md)
  pe-triage ingest --help             # what a command reads and writes, with an example
  pe-triage -v --log-format json split --windows windows --out splits.parquet"""


def _synth(args: argparse.Namespace) -> int:
    from pe_triage.dicom import load_key
    from pe_triage.synth import cohort_overview, generate_cohort

    cfg = load_config(args.config).synth
    overrides = {k: getattr(args, k) for k in ("sites", "patients_per_site", "slices", "size", "seed")
                 if getattr(args, k) is not None}
    summary = generate_cohort(Path(args.out), replace(cfg, **overrides), key=load_key(demo=True))  # as ingest --demo
    print(json.dumps(cohort_overview(summary), indent=2))
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from pe_triage.dicom import Pseudonymizer, load_key
    from pe_triage.ingest import ingest_site

    cfg = load_config(args.config).ingest
    if args.workers is not None:
        cfg = replace(cfg, workers=args.workers)
    if args.strict_labels:
        cfg = replace(cfg, strict_labels=True)
    pseudo = Pseudonymizer(load_key(demo=args.demo), args.site)
    report = ingest_site(args.site, args.source, args.out, pseudo=pseudo, labels=args.labels, config=cfg)
    shown = ("site", "files", "duplicates", "quarantine_reasons", "dataset", "timing")
    print(json.dumps({k: report[k] for k in shown}, indent=2))
    labels = report.get("labels") or {}
    for kind in ("unmatched_rows", "inconsistent_patients"):
        if labels.get(kind):
            log.warning("label manifest: %d %s (see ingest_report.json)", len(labels[kind]), kind.replace("_", " "))
    return 0


def _labels_convert(args: argparse.Namespace) -> int:
    from pe_triage.ingest.adapters import convert_labels

    cfg = load_config(args.config).labels
    if args.min_readers is not None:
        cfg = replace(cfg, min_readers=args.min_readers)
    report = convert_labels(args.format, args.inputs, args.out, cfg, patient_id=args.patient_id, report=args.report)
    print(json.dumps({k: v for k, v in report.items() if k != "problems"}, indent=2))
    if report.get("problems_total"):
        log.warning("labels convert: %d input row(s)/file(s) not mapped (reasons counted in the report)",
                    report["problems_total"])
    return 0


def _quarantine(args: argparse.Namespace) -> int:
    from pe_triage.dicom import Pseudonymizer, load_key
    from pe_triage.ingest import quarantined_files

    rows = quarantined_files(args.site, args.source, args.out, pseudo=Pseudonymizer(load_key(demo=args.demo), args.site))
    for row in rows:
        print(f"{row['reason']:<28} {row['path'] or '(no longer in source) ' + row['path_pseudonym']}  {row['detail']}")
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from pe_triage.preprocess import preprocess

    report = preprocess(args.slices, args.out, config=load_config(args.config).preprocess)
    print(json.dumps({k: v for k, v in report.items() if k not in ("slices_skipped", "warnings")}, indent=2))
    for skipped in report["slices_skipped"][:20]:
        log.warning("skipped %s slice %s: %s", skipped["series_uid"], skipped["slice_index"], skipped["reason"])
    for warning in report["warnings"][:20]:
        log.warning("%s", warning)
    return 0


def _split(args: argparse.Namespace) -> int:
    from pe_triage.splits import parse_ratios, split_dataset

    cfg = load_config(args.config).split
    if args.ratios:
        cfg = replace(cfg, ratios=parse_ratios(args.ratios))
    if args.seed is not None:
        cfg = replace(cfg, seed=args.seed)
    report = split_dataset(args.windows, args.out, config=cfg, by_site=args.by_site == "leave-one-out")
    print(json.dumps(report, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from pe_triage.training.train import train

    config = load_config(args.config)
    if args.windows_used:
        config = replace(config, train=replace(config.train, windows=tuple(args.windows_used.split(","))))
    meta = train(args.windows, args.splits, args.out, stage=args.stage, config=config, fold=args.fold,
                 resume=args.resume, tracking_uri=args.tracking_uri, checkpoint_dir=args.checkpoint_dir)
    if meta:  # under torchrun, rank 0 reports (the other ranks get no summary)
        print(json.dumps({k: meta[k] for k in ("stage", "threshold", "val", "best_epoch", "epochs_run", "mlflow_run_id")},
                         indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pe_triage.evaluation.evaluate import evaluate

    metrics = evaluate(args.stage1, args.stage2, args.windows, args.splits, args.out, split=args.split, fold=args.fold,
                       config=load_config(args.config), truth=args.truth, tracking_uri=args.tracking_uri, exam=args.exam)
    print(json.dumps(metrics["summary"], indent=2))
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from pe_triage.evaluation.operating_point import calibrate

    record = calibrate(args.stage1, args.stage2, args.windows, args.splits, args.out_stage1, args.out_stage2, split=args.split,
                       fold=args.fold, config=load_config(args.config))
    print(json.dumps(record, indent=2))
    return 0


def _summarize_folds(args: argparse.Namespace) -> int:
    from pe_triage.evaluation.evaluate import summarize_site_folds

    summary = summarize_site_folds(args.evaluations, args.out)
    print(json.dumps({"folds": sorted(summary["folds"]), "mean": summary["mean"]}, indent=2))
    print(f"report: {Path(args.out) / 'leave_one_site_out.html'}")
    return 0


def _plugin_commands(sub: argparse._SubParsersAction) -> None:
    """Sub-commands other distributions (the pipelines package) register under ``pe_triage.commands``:
    the library itself never imports kfp."""
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group="pe_triage.commands"), key=lambda e: e.name):
        entry.load()(sub)


def _data_commands(sub: argparse._SubParsersAction) -> None:
    """The data steps, cohort to splits (floor 3 of the library), in the order they run."""
    p = sub.add_parser("synth", help="generate a synthetic multi-site CTPA cohort (DICOM + label manifests)",
                       epilog="example:\n  pe-triage synth --out cohort --sites 3 --patients-per-site 10 --size 256")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sites", type=int)
    p.add_argument("--patients-per-site", type=int)
    p.add_argument("--slices", type=int, help="slices per series")
    p.add_argument("--size", type=int, help="image size in pixels (512 like a scanner; smaller for tests)")
    p.add_argument("--seed", type=int)
    p.add_argument("--config", help="YAML configuration (section 'synth')")
    p.set_defaults(func=_synth)

    p = sub.add_parser("ingest", help="DICOM folder or s3:// prefix of one site -> slices Parquet dataset",
                       epilog="examples:\n"
                              "  pe-triage ingest --site site-a --source cohort/sites/site-a/dicom \\\n"
                              "      --labels cohort/sites/site-a/labels.csv --out slices --demo   # synthetic data\n"
                              "  pe-triage ingest --site hospital-b --source s3://exports/hospital-b --out s3://pe-triage/slices"
                              "   # key in PE_TRIAGE_PSEUDONYM_KEY")
    p.add_argument("--site", required=True, help="site (hospital) name: lower case, digits, - and _")
    p.add_argument("--source", required=True, help="folder or s3://bucket/prefix, read recursively")
    p.add_argument("--labels", help="label manifest CSV of the site (path or s3:// URI)")
    p.add_argument("--out", required=True, help="slices dataset (folder or s3:// URI)")
    p.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    p.add_argument("--strict-labels", action="store_true", help="fail when a manifest row matches no ingested slice")
    p.add_argument("--demo", action="store_true", help="allow the public demo pseudonym key (synthetic data only)")
    p.add_argument("--config", help="YAML configuration (section 'ingest')")
    p.set_defaults(func=_ingest)

    p = sub.add_parser("preprocess", help="slices -> windows: lung crop, resize, HU windows as uint8",
                       epilog="example:\n  pe-triage preprocess --slices slices --out windows")
    p.add_argument("--slices", required=True, help="slices dataset (folder or s3:// URI)")
    p.add_argument("--out", required=True, help="windows dataset (folder or s3:// URI)")
    p.add_argument("--config", help="YAML configuration (section 'preprocess')")
    p.set_defaults(func=_preprocess)

    p = sub.add_parser("split", help="patient-level train/val/test splits, stratified by site and patient class",
                       epilog="examples:\n  pe-triage split --windows windows --out splits.parquet\n"
                              "  pe-triage split --windows windows --out loso.parquet --by-site leave-one-out")
    p.add_argument("--windows", required=True, help="windows dataset")
    p.add_argument("--out", required=True, help="splits Parquet file")
    p.add_argument("--ratios", help="train:val:test, default 5:3:2 (the study's); checked when the command runs")
    p.add_argument("--by-site", choices=["leave-one-out"], help="one fold per site, that site held out as test")
    p.add_argument("--seed", type=int)
    p.add_argument("--config", help="YAML configuration (section 'split')")
    p.set_defaults(func=_split)

    p = sub.add_parser("quarantine", help="list a site's quarantined files with their clear paths (needs the key)",
                       epilog="example:\n"
                              "  pe-triage quarantine --site site-a --source cohort/sites/site-a/dicom --out slices --demo")
    p.add_argument("--site", required=True)
    p.add_argument("--source", required=True, help="the folder or s3:// prefix that was ingested")
    p.add_argument("--out", required=True, help="the slices dataset")
    p.add_argument("--demo", action="store_true", help="the dataset was made with the public demo key")
    p.set_defaults(func=_quarantine)


def _labels_commands(sub: argparse._SubParsersAction) -> None:
    """Public datasets' label files -> the label manifest ingest reads (``pe_triage.ingest.adapters``)."""
    labels = sub.add_parser("labels", help="label files of public datasets -> the project's label manifest",
                            epilog="example:\n  pe-triage labels convert --help")
    actions = labels.add_subparsers(dest="action", required=True)
    p = actions.add_parser("convert", help="RSPECT train.csv, LIDC-IDRI XML, PE masks or a manifest -> label manifest CSV",
                           epilog="examples:\n"
                                  "  pe-triage labels convert --format rspect train.csv --out rspect.csv --report report.json\n"
                                  "  pe-triage labels convert --format lidc LIDC-IDRI/ --out lidc.csv --min-readers 3\n"
                                  "  pe-triage labels convert --format masks masks/ --out fumpe.csv   # .dcm SEG, .npy + .json")
    p.add_argument("--format", required=True, choices=["rspect", "lidc", "masks", "manifest"])
    p.add_argument("inputs", nargs="+", metavar="IN", help="label files or folders (local or s3://)")
    p.add_argument("--out", required=True, help="manifest CSV to write (atomically)")
    p.add_argument("--report", help="JSON report of what mapped and what did not (counts and row numbers only)")
    p.add_argument("--min-readers", type=int, help="lidc: readers that must mark a nodule (default: config, 2)")
    p.add_argument("--patient-id", help="lidc: the patient of XMLs not under a LIDC-IDRI-NNNN folder")
    p.add_argument("--config", help="YAML configuration (section 'labels')")
    p.set_defaults(func=_labels_convert)


def _pair_inputs(p: argparse.ArgumentParser) -> None:
    """What calibrate and evaluate both read: the two trained stages and the data to run them on."""
    p.add_argument("--stage1", required=True, help="stage 1 model artifact folder")
    p.add_argument("--stage2", required=True, help="stage 2 model artifact folder")
    p.add_argument("--windows", required=True, help="windows dataset")
    p.add_argument("--splits", required=True, help="splits Parquet file")


def _model_commands(sub: argparse._SubParsersAction) -> None:
    """The model steps, training to the leave-one-site-out summary (floor 4 of the library)."""
    p = sub.add_parser("train", help="train one stage (1: WNL vs disease, 2: PE vs other disease) -> model artifact",
                       epilog="example:\n"
                              "  pe-triage train --stage 1 --windows windows --splits splits.parquet --out models/stage1")
    p.add_argument("--stage", type=int, choices=[1, 2], required=True)
    p.add_argument("--windows", required=True, help="windows dataset")
    p.add_argument("--splits", required=True, help="splits Parquet file")
    p.add_argument("--out", required=True, help="model artifact folder")
    p.add_argument("--fold", default="default", help="fold of the splits file (a site name for leave-one-site-out)")
    p.add_argument("--windows-used", help="comma-separated window names, overriding train.windows (e.g. vascular,lung)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint (in --checkpoint-dir), if any")
    p.add_argument("--checkpoint-dir", help="checkpoint folder (default: beside --out), e.g. on a volume that outlives the pod")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI; none: no tracking)")
    p.add_argument("--config", help="YAML configuration (sections model, train, loader, registry)")
    p.set_defaults(func=_train)

    p = sub.add_parser("calibrate", help="set both stages' thresholds on the validation exams (the operating point)",
                       epilog="example:\n"
                              "  pe-triage calibrate --stage1 models/stage1 --stage2 models/stage2 --windows windows \\\n"
                              "      --splits splits.parquet --out-stage1 models/stage1-cal --out-stage2 models/stage2-cal")
    _pair_inputs(p)
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="never test: it would grade its own choice")
    p.add_argument("--fold", default="default", help="fold of the splits file")
    p.add_argument("--out-stage1", required=True, help="calibrated stage 1 model folder")
    p.add_argument("--out-stage2", required=True, help="calibrated stage 2 model folder")
    p.add_argument("--config", help="YAML configuration (sections operating_point, evaluate, loader)")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("evaluate", help="per-slice, per-patient, per-site and cascade metrics + report of both stages",
                       epilog="example:\n"
                              "  pe-triage evaluate --stage1 models/stage1-cal --stage2 models/stage2-cal --windows windows \\\n"
                              "      --splits splits.parquet --out evaluation --truth cohort/truth")
    _pair_inputs(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--fold", default="default", help="fold of the splits file")
    p.add_argument("--out", required=True, help="output folder (metrics.json, report.md, report.html, plots)")
    p.add_argument("--truth", help="synthetic ground truth folder (cohort/truth): evidence maps measured against the lesions")
    p.add_argument("--exam", help="exam model folder of these stages: its per-patient figures beside the slice rules'")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI; none: no tracking)")
    p.add_argument("--config", help="YAML configuration (sections evaluate, loader, registry)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("summarize-folds", help="leave-one-site-out table (mean ± SD) from the evaluations of site folds",
                       epilog="example:\n  pe-triage summarize-folds eval/site-a eval/site-b eval/site-c --out loso")
    p.add_argument("evaluations", nargs="+", help="evaluate output folders, one per held-out site")
    p.add_argument("--out", required=True, help="output folder (leave_one_site_out.json/.md/.html)")
    p.set_defaults(func=_summarize_folds)


def _logging_options(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="-v: the project's debug messages and other libraries' INFO; -vv: every library's debug")
    p.add_argument("--log-format", choices=FORMATS, default=default,
                   help=f"text (default) or json: one JSON object per line for log collectors (or set {FORMAT_ENV})")


def _finish(parser: argparse.ArgumentParser) -> None:
    """Every command: its help line as description, examples kept as written, the logging options
    after the command too (``pe-triage ingest ... -v``; suppressed defaults keep the global ones)."""
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        for name, command in action.choices.items():
            command.formatter_class = argparse.RawDescriptionHelpFormatter
            command.description = command.description or helps.get(name)
            if command._subparsers is None:
                _logging_options(command, argparse.SUPPRESS)
            _finish(command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pe-triage", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pe-triage {__version__}")
    _logging_options(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _data_commands(sub)
    _labels_commands(sub)
    _model_commands(sub)
    add_registry_commands(sub)
    _plugin_commands(sub)
    _finish(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbosity = args.verbose or 0
    try:
        fmt = log_format(args.log_format)
    except ValueError as exc:  # a bad PE_TRIAGE_LOG_FORMAT, said in the format that always works
        with configured_logging(verbosity, "text"):
            log.error("%s", exc)
        return 2
    with configured_logging(verbosity, fmt):
        try:
            return args.func(args)
        except (ConfigError, ValueError, RuntimeError, OSError) as exc:  # bad input or environment; a bug still raises
            log.error("%s", _error_line(args, exc))
            return 2


def _error_line(args: argparse.Namespace, exc: Exception) -> str:
    """The error on one line; an OSError (disk full, permissions) named with its errno, since the
    kernel's words do not say which command failed; any path below a source folder replaced by the
    folder (hospital exports name folders after patients)."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        paths = "".join(f": {p}" for p in (exc.filename, exc.filename2) if p is not None)
        code = errno.errorcode.get(exc.errno, str(exc.errno))
        text = f"{args.command}: {exc.strerror} [{code}]{paths}{_OS_HINTS.get(exc.errno, '')}"
    else:
        text = f"{args.command}: {exc}" if isinstance(exc, OSError) else str(exc)
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    for root in _source_roots(args):
        text = re.sub(re.escape(root) + r"/(?:[^'\"]*(?=['\"])|\S*)", f"a file under {root}", text)
    return text


def _source_roots(args: argparse.Namespace) -> list[str]:
    """The command's source folders, as given and (for URIs) as bucket/prefix, which S3 errors show."""
    given = [getattr(args, name, None) for name in _SOURCE_ARGS]
    roots = [str(v).rstrip("/") for value in given for v in (value if isinstance(value, list) else [value]) if v]
    return roots + [r.split("://", 1)[1] for r in roots if "://" in r]


if __name__ == "__main__":
    sys.exit(main())
