"""The retraining pipeline (and the onboarding before it) with every step a container of the CPU
image, under kfp.local's DockerRunner, on a small synthetic cohort, against a real MLflow server on
this host: the image's end-to-end check, with per-step wall times.

    images/build.sh cpu -- ...         # the image first (images/README.md)
    python benchmarks/container_run.py --work /tmp/ctr/run [--image ghcr.io/pe-triage/pe-triage:0.1.0]
        [--out benchmarks/results/container-run.json]

NOT in CI: it needs root and a running Docker daemon that holds the image (nothing is pulled), and
it takes about 7 minutes on 2 cores. ``--work`` (empty or new) receives the cohort, the slices
store, MLflow's state (``mlflow server`` on 127.0.0.1; the containers share the host's network),
the step outputs (``kfp/``) and each pipeline's full log (``onboarding.log``, ``retraining.log``).

DockerRunner mounts the pipeline root at its own path, so artifacts flow from step to step as under
SubprocessRunner, provided the step can write there: the image runs as uid 10001, as on the
cluster, so ``--work`` is handed to that user. What the pipelines name by path (cohort, slices
store, truth) is outside the pipeline root: ``--work`` is bind-mounted at its own path too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
import warnings
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import yaml

from pe_triage.config import GateConfig, load_config
from pe_triage.dicom import load_key
from pe_triage.registry.server import local_server
from pe_triage.synth import generate_cohort
from pe_triage_components.images import CPU_IMAGE
from pe_triage_pipelines.compile import PIPELINES
from pe_triage_pipelines.local import LOCAL

#: speed over quality: 3 sites x 30 patients of 8 slices at 96 px, 64 px windows, a 1/8-width 2.5-D
#: model trained on 2 x 128 samples (5 img/s on 2 busy cores), leave-one-site-out off (it trains
#: both stages again per site), every promotion gate off so that the champion's evaluation and the
#: promotion run too (such a model fails them; what is checked here is that every step runs).
CONFIG = """\
synth: {sites: 3, patients_per_site: 30, slices: 8, size: 96, seed: 0, pe_fraction: 0.45, other_fraction: 0.3,
        pe_extent_slices: [3, 8], lesions: conspicuous, write_tissue_maps: false}
preprocess: {size: 64, windows: [vascular, clinical_lung]}
model: {arch: cbam_drn_d_54, width: 0.125, fusion: stacked, context: 1}
train: {epochs: 2, batch_size: 16, samples_per_epoch: 128, warmup_epochs: 0.5, patience: 0, num_workers: 0,
        max_minutes: 5}
evaluate: {bootstrap: 50, gradcam_per_category: 1, gradcam_localisation: 4}
loso: {enabled: false}
""" + yaml.safe_dump({"registry": {"gates": {f.name: None for f in fields(GateConfig) if f.name != "max_regression"}}})

_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d\.\d+) - \w+ - (?:Executing task '([^']+)'|Task '([^']+)' finished with status (\S+))")


def step_times(log: str) -> list[dict[str, Any]]:
    """Wall time of each step, from kfp.local's "Executing task" / "finished with status" lines."""
    started: dict[str, float] = {}
    steps: list[dict[str, Any]] = []
    for line in re.sub(r"\x1b\[[0-9;]*m", "", log).splitlines():  # kfp colours task names
        if not (m := _LINE.match(line)):
            continue
        at = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
        if m.group(4):
            started[m.group(4)] = at
        elif m.group(5) in started:
            seconds = (at - started.pop(m.group(5))) % 86400  # a run across midnight
            steps.append({"step": m.group(5), "status": m.group(6), "seconds": round(seconds, 1)})
    return steps


def run_in_containers(name: str, arguments: dict[str, Any], *, image: str, work: Path) -> None:
    """Run pipeline ``name`` with every step a container of ``image``; raises when a step fails."""
    import docker
    from kfp import local

    runner = local.DockerRunner(network_mode="host",
                                mounts=[docker.types.Mount(target=str(work), source=str(work), type="bind")])
    local.init(runner=runner, pipeline_root=str(work / "kfp"), enable_caching=False, raise_on_error=True)
    options = replace(LOCAL, cpu_image=image, cuda_image=image, retries=0)  # no CUDA image here; a failure is final
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(base image|no effect in the current local runner).*")
        PIPELINES[name](options)(**arguments)


#: one line per Python source of the three packages, "path digest", run on the host and in the image
_SOURCES = """
import hashlib, importlib, pathlib
for name in ("pe_triage", "pe_triage_components", "pe_triage_pipelines"):
    root = pathlib.Path(importlib.import_module(name).__file__).parent
    for f in sorted(root.rglob("*.py")):
        print(name + "/" + f.relative_to(root).as_posix(), hashlib.sha256(f.read_bytes()).hexdigest())
"""


def check_image_current(image: str) -> None:
    """The host compiles the steps, the image runs them, under the same tag whatever the code: fail
    early when the daemon lacks the image or the image a module of this tree (the step would die on an import error), and
    name the modules that differ (rebuilding takes a minute: only the package layer changes)."""
    import subprocess

    import docker

    client = docker.from_env()
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise SystemExit(f"{image} is not in the Docker daemon (nothing is pulled): build it, images/build.sh cpu") from None
    ours = dict(line.split() for line in subprocess.run([sys.executable, "-c", _SOURCES], capture_output=True,
                                                         text=True, check=True).stdout.splitlines())
    out = client.containers.run(image, ["python", "-c", _SOURCES], remove=True).decode()
    theirs = dict(line.split() for line in out.splitlines())
    if missing := sorted(set(ours) - set(theirs)):
        raise SystemExit(f"{image} lacks {', '.join(missing)}: rebuild it from this tree (images/build.sh cpu)")
    if differ := sorted(f for f in ours if ours[f] != theirs[f]):
        print(f"warning: {image} was built from other versions of {', '.join(differ)}", file=sys.stderr)


def hand_over(work: Path, image: str) -> None:
    """Make ``work`` the image user's: the steps run as that user (uid 10001, as on the cluster) and
    write their outputs under the pipeline root, which kfp.local creates as this (root) process."""
    import docker

    user = docker.from_env().images.get(image).attrs["Config"]["User"] or "0:0"
    uid, _, gid = user.partition(":")
    (work / "kfp").mkdir(exist_ok=True)
    for path in [work, *work.rglob("*")]:
        os.chown(path, int(uid), int(gid or uid), follow_symlinks=False)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="empty folder for cohort, store, MLflow and step outputs")
    p.add_argument("--image", default=CPU_IMAGE, help="the CPU image, already in the Docker daemon")
    p.add_argument("--out", type=Path, help="JSON with the step timings")
    args = p.parse_args(argv)
    check_image_current(args.image)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(CONFIG)
    config = load_config(str(work / "config.yaml"))
    result: dict[str, Any] = {"image": args.image, "config": CONFIG, "phases": {}}
    t0 = time.monotonic()
    generate_cohort(work / "cohort", config.synth, key=load_key(demo=True))
    result["phases"]["cohort_s"] = round(time.monotonic() - t0, 1)
    sites = [{"site": d.name, "source": str(d / "dicom"), "labels": str(d / "labels.csv")}
             for d in sorted((work / "cohort" / "sites").iterdir()) if d.is_dir()]
    hand_over(work, args.image)
    with local_server(work / "mlflow") as uri:
        common = {"slices_store": str(work / "slices"), "config": CONFIG, "tracking_uri": uri}
        for name, extra in (("onboarding", {"sites": sites, "demo_key": True}),
                            ("retraining", {"truth": str(work / "cohort" / "truth")})):
            started = time.monotonic()
            log = work / f"{name}.log"
            try:
                with open(log, "w") as stream, contextlib.redirect_stdout(stream):  # kfp.local logs to stdout
                    run_in_containers(name, {**common, **extra}, image=args.image, work=work)
            finally:
                result["phases"][f"{name}_s"] = round(time.monotonic() - started, 1)
                result[name] = step_times(log.read_text())
                _write(result, args.out)
    result["total_s"] = round(time.monotonic() - t0, 1)
    _write(result, args.out)
    return result


def _write(result: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(result, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text if out is None else f"step timings: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
