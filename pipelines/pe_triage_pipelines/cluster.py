"""What a task needs from the cluster: images, secrets as environment variables, GPUs for training,
CPU and memory requests, retries.

All of it is a compile-time :class:`ClusterOptions` (defaults below, or the ``cluster.yaml`` the Helm
chart writes into its ConfigMap), never read from the environment at import, and no secret value
ever becomes a pipeline parameter: tasks get secret *names*, and Kubernetes injects the values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kfp import kubernetes
from kfp.dsl import PipelineTask
from pe_triage_components.images import CPU_IMAGE, CUDA_IMAGE

from pe_triage.dicom import KEY_ENV

#: the pod label the Helm chart's NetworkPolicy admits to MLflow (charts/pe-triage, networkPolicy)
MLFLOW_CLIENT_LABEL = "pe-triage.io/mlflow-client"


@dataclass(frozen=True)
class SecretEnv:
    """A Kubernetes secret and which of its keys become which environment variables."""

    name: str
    env: Mapping[str, str]  # secret key -> environment variable
    optional: bool = False


@dataclass(frozen=True)
class ClusterOptions:
    cpu_image: str = CPU_IMAGE
    cuda_image: str = CUDA_IMAGE
    #: ingest only; required (ingest refuses to run without a key)
    pseudonym_key: SecretEnv = SecretEnv("pe-triage-pseudonym-key", {"pseudonym-key": KEY_ENV})
    #: optional: a pod identity (IRSA, workload identity) may stand in for keys
    s3: SecretEnv | None = SecretEnv("pe-triage-s3", {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                                                      "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}, optional=True)
    #: optional here; required where the chart's cluster.yaml names it (its auth is on by default)
    mlflow: SecretEnv | None = SecretEnv("pe-triage-mlflow", {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                                                              "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"},
                                         optional=True)
    #: plain (non-secret) environment of every task, e.g. AWS_ENDPOINT_URL of an S3-compatible store
    env: Mapping[str, str] = field(default_factory=dict)
    accelerator: str = "nvidia.com/gpu"
    #: GPUs per training step (training uses every GPU of its pod with DistributedDataParallel)
    gpus: int = 1
    gpu_node_selector: Mapping[str, str] = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    gpu_tolerations: tuple[Mapping[str, Any], ...] = ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)
    train_cpu: str = "8"
    train_memory: str = "32G"
    data_cpu: str = "2"
    data_memory: str = "8G"
    #: retries of I/O steps (object store, MLflow) and of training (preemption), exponential backoff
    retries: int = 3
    backoff: str = "30s"
    backoff_factor: float = 2.0
    backoff_max: str = "10m"
    #: sites ingested at the same time by the onboarding ParallelFor
    parallel_sites: int = 4

    @classmethod
    def from_cluster_config(cls, cfg: Mapping[str, Any]) -> ClusterOptions:
        """Options from the Helm chart's ``cluster.yaml`` (keys: images, gpu, secrets, s3)."""
        images, gpu, secrets, s3 = (cfg.get(k) or {} for k in ("images", "gpu", "secrets", "s3"))
        kw: dict[str, Any] = {}
        if images:
            kw.update(cpu_image=images.get("cpu", CPU_IMAGE), cuda_image=images.get("cuda", CUDA_IMAGE))
        if gpu:
            kw.update(accelerator=gpu.get("resource", cls.accelerator), gpus=int(gpu.get("count", cls.gpus)),
                      gpu_node_selector=dict(gpu.get("nodeSelector") or {}), gpu_tolerations=tuple(gpu.get("tolerations") or ()))
        if key := secrets.get("pseudonymKey"):
            kw["pseudonym_key"] = SecretEnv(key["name"], {key.get("key", "pseudonym-key"): KEY_ENV})
        if secrets:  # the chart lists exactly the secrets that exist
            s3_secret, ml = secrets.get("s3"), secrets.get("mlflow")
            kw["s3"] = (SecretEnv(s3_secret["name"], {s3_secret["accessKeyIdKey"]: "AWS_ACCESS_KEY_ID",
                                                      s3_secret["secretAccessKeyKey"]: "AWS_SECRET_ACCESS_KEY"})
                        if s3_secret else None)
            kw["mlflow"] = (SecretEnv(ml["name"], {ml["usernameKey"]: "MLFLOW_TRACKING_USERNAME",
                                                   ml["passwordKey"]: "MLFLOW_TRACKING_PASSWORD"}, optional=False)
                            if ml else None)
        kw["env"] = {k: v for k, v in (("AWS_ENDPOINT_URL", s3.get("endpointUrl")), ("AWS_DEFAULT_REGION", s3.get("region")))
                     if v}
        return cls(**kw)


def _secrets(task: PipelineTask, options: ClusterOptions, *, pseudonym_key: bool) -> PipelineTask:
    """Credentials as environment variables, and the label that lets the pod reach MLflow."""
    kubernetes.add_pod_label(task, MLFLOW_CLIENT_LABEL, "true")
    for secret in (options.s3, options.mlflow, options.pseudonym_key if pseudonym_key else None):
        if secret is not None:
            kubernetes.use_secret_as_env(task, secret.name, dict(secret.env), optional=secret.optional)
    for name, value in options.env.items():
        task.set_env_variable(name, value)
    return task


def _retry(task: PipelineTask, options: ClusterOptions) -> PipelineTask:
    return task.set_retry(options.retries, backoff_duration=options.backoff, backoff_factor=options.backoff_factor,
                          backoff_max_duration=options.backoff_max)


def io_step(task: PipelineTask, options: ClusterOptions, *, cache: bool = True, pseudonym_key: bool = False) -> PipelineTask:
    """A CPU step that reads or writes the object store or MLflow: requests, retries with backoff,
    credentials. ``cache=False`` for steps whose result depends on state outside their inputs (a
    source folder, the store, the registry)."""
    task.set_cpu_request(options.data_cpu).set_memory_request(options.data_memory)
    task.set_caching_options(cache)
    return _secrets(_retry(task, options), options, pseudonym_key=pseudonym_key)


def gpu_step(task: PipelineTask, options: ClusterOptions) -> PipelineTask:
    """A training step: GPUs on a GPU node (selector + tolerations), CPU and memory for the loader;
    retried, since a preempted step resumes from its checkpoint."""
    task.set_accelerator_type(options.accelerator).set_accelerator_limit(options.gpus)
    task.set_cpu_request(options.train_cpu).set_memory_request(options.train_memory)
    for key, value in options.gpu_node_selector.items():
        kubernetes.add_node_selector(task, key, value)
    for toleration in options.gpu_tolerations:
        kubernetes.add_toleration(task, key=toleration.get("key"), operator=toleration.get("operator"),
                                  value=toleration.get("value"), effect=toleration.get("effect"),
                                  toleration_seconds=toleration.get("tolerationSeconds"))
    return _secrets(_retry(task, options), options, pseudonym_key=False)
