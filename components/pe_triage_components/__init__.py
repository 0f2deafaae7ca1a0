"""KFP components of pe-triage: one per pipeline step, each a thin typed shell over one library call.

The step functions (``data``, ``model``, ``registry``) become lightweight Python components here,
with the project image as ``base_image``: the package is installed there, so nothing is installed
at run time (``install_kfp_package=False``, no ``packages_to_install``), and the image tag (the
package version) is part of every component spec, so a new code version is a cache miss. Images
are arguments of :func:`build` because a hospital usually mirrors them into its own registry.

Configuration travels as a YAML string parameter (the text of a config file, ``""`` for the
defaults): recorded with each run and part of each cache key, unlike a mounted file. Secrets never
do: they arrive as environment variables from Kubernetes secrets (``pe_triage_pipelines.cluster``).

Each step starts with ``pe_triage.logs.setup_logging()``, in place of the handler kfp's executor
installs: the project's lines at INFO, other libraries' at WARNING, JSON lines when the pod's
environment sets ``PE_TRIAGE_LOG_FORMAT=json``. Per-site steps log ``site <name>`` first, which the
demo's console shows beside the step.
"""

from __future__ import annotations

from dataclasses import dataclass

from kfp import dsl
from kfp.dsl.python_component import PythonComponent

from pe_triage_components import data, loso, model, registry, stores
from pe_triage_components.images import CPU_IMAGE, CUDA_IMAGE


@dataclass(frozen=True)
class Components:
    convert_labels: PythonComponent
    ingest: PythonComponent
    data_quality: PythonComponent
    dataset_version: PythonComponent
    preprocess: PythonComponent
    preprocess_store: PythonComponent
    split: PythonComponent
    train: PythonComponent
    calibrate: PythonComponent
    train_exam: PythonComponent
    evaluate: PythonComponent
    register: PythonComponent
    check_gates: PythonComponent
    check_trigger: PythonComponent
    evaluate_champion: PythonComponent
    promote: PythonComponent
    record_outcome: PythonComponent
    loso_folds: PythonComponent
    loso_fold: PythonComponent
    loso_summary: PythonComponent


def build(cpu_image: str = CPU_IMAGE, cuda_image: str = CUDA_IMAGE) -> Components:
    """Every component, on the given images (training on the CUDA one)."""

    def cpu(func):
        return dsl.component(func, base_image=cpu_image, install_kfp_package=False)

    return Components(
        convert_labels=cpu(data.convert_labels),
        ingest=cpu(data.ingest),
        data_quality=cpu(data.data_quality),
        dataset_version=cpu(data.dataset_version),
        preprocess=cpu(data.preprocess),
        preprocess_store=cpu(stores.preprocess_store),
        split=cpu(data.split),
        train=dsl.component(model.train, base_image=cuda_image, install_kfp_package=False),
        calibrate=cpu(model.calibrate),
        train_exam=cpu(model.train_exam),  # embeds slices on CPU threads, as evaluate scores them
        evaluate=cpu(model.evaluate),
        register=cpu(registry.register),
        check_gates=cpu(registry.check_gates),
        check_trigger=cpu(registry.check_trigger),
        evaluate_champion=cpu(registry.evaluate_champion),
        promote=cpu(registry.promote),
        record_outcome=cpu(registry.record_outcome),
        loso_folds=cpu(loso.loso_folds),
        loso_fold=dsl.component(loso.loso_fold, base_image=cuda_image, install_kfp_package=False),  # trains, like train
        loso_summary=cpu(loso.loso_summary),
    )


#: the components on the released images
COMPONENTS = build()
