"""How the train step runs in its pod: in the step's own process on zero or one GPU, one process per GPU
under ``torch.distributed.run`` (torchrun) on more, each a DistributedDataParallel rank.

The pod says how: the pipelines' ``gpu_step`` sets the environment variables below from the cluster
configuration, as it sets the GPUs the pod gets, so the two cannot disagree.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pe_triage import __version__
from pe_triage.config import parse_config

#: processes (DDP ranks) of the train step: the GPUs of its pod, 1 on a CPU pod
PROCESSES_ENV = "PE_TRIAGE_TRAIN_PROCESSES"
#: a folder that outlives the pod (a PersistentVolumeClaim's mount) for checkpoints; unset: beside the artifact
CHECKPOINT_ROOT_ENV = "PE_TRIAGE_CHECKPOINT_ROOT"


def launcher(processes: int) -> list[str]:
    """The command that starts one rank per GPU on this node (empty: run in this process)."""
    if processes <= 1:
        return []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]


def train_command(processes: int, *, windows: str, splits: str, out: str, stage: int, config_file: str, tracking_uri: str,
                  checkpoint_dir: str) -> list[str]:
    """``pe-triage train`` under :func:`launcher`, resuming from ``checkpoint_dir`` when it holds this run's checkpoint."""
    if processes <= 1:
        raise ValueError("one process trains in the step itself, not under torchrun")
    command = [*launcher(processes), "-m", "pe_triage.cli", "train", "--stage", str(stage), "--windows", windows,
               "--splits", splits, "--out", out, "--config", config_file, "--checkpoint-dir", checkpoint_dir, "--resume"]
    return command + (["--tracking-uri", tracking_uri] if tracking_uri else [])


def checkpoint_dir(root: str, *, stage: int, inputs: tuple[str, ...], config: str, version: str) -> str:
    """A folder under ``root`` keyed by what the step trains on (input URIs, configuration, stage, code
    version): a retried pod of the same step finds its checkpoint there; other inputs, another
    configuration, stage or release get a folder of their own."""
    key = hashlib.sha256("\n".join([*inputs, config, str(stage), version]).encode()).hexdigest()[:20]
    return str(Path(root) / f"stage{stage}-{key}")


def train_step(windows: str, splits: str, out: str, *, stage: int, config: str, tracking_uri: str,
               inputs: tuple[str, ...]) -> dict[str, Any]:
    """The pipeline's train step in its pod: the configuration text checked first, then training in
    this process or under torchrun as :data:`PROCESSES_ENV` says, resuming from the checkpoint folder
    (on :data:`CHECKPOINT_ROOT_ENV`, keyed by ``inputs``, the input URIs; else beside ``out``). Returns
    the model's metadata."""
    # torch only here: the pipelines import this module's names to compile, where torch is not needed
    from pe_triage.artifact import read_meta
    from pe_triage.training.train import checkpoint_dir_for, train

    cfg = parse_config(config)
    processes, root = int(os.environ.get(PROCESSES_ENV, "1")), os.environ.get(CHECKPOINT_ROOT_ENV, "")
    ckpt = (checkpoint_dir(root, stage=stage, inputs=inputs, config=config, version=__version__) if root
            else str(checkpoint_dir_for(out)))
    if processes <= 1:
        return train(windows, splits, out, stage=stage, config=cfg, resume=True, tracking_uri=tracking_uri or None,
                     checkpoint_dir=ckpt)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(config)
        f.flush()
        subprocess.run(train_command(processes, windows=windows, splits=splits, out=out, stage=stage, config_file=f.name,
                                     tracking_uri=tracking_uri, checkpoint_dir=ckpt), check=True)
    return read_meta(out)
