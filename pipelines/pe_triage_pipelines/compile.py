"""Compile the pipelines to KFP IR YAML (pipeline spec + the kfp-kubernetes platform spec)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kfp import compiler

from pe_triage_pipelines.cluster import ClusterOptions
from pe_triage_pipelines.onboarding import build_onboarding
from pe_triage_pipelines.retraining import build_retraining

#: pipeline name (file stem) -> builder taking the cluster options
PIPELINES: dict[str, Callable] = {"onboarding": build_onboarding, "retraining": build_retraining}


def compile_pipeline(name: str, path: str | Path, options: ClusterOptions = ClusterOptions()) -> Path:
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; known: {sorted(PIPELINES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(PIPELINES[name](options), str(path))
    return path


def compile_all(out_dir: str | Path, options: ClusterOptions = ClusterOptions()) -> dict[str, Path]:
    """``<out_dir>/<name>.yaml`` for every pipeline."""
    return {name: compile_pipeline(name, Path(out_dir) / f"{name}.yaml", options) for name in PIPELINES}
