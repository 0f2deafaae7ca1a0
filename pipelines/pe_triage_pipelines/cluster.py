"""What a task needs from the cluster: images, secrets as environment variables, GPUs for training,
CPU and memory requests, retries, timeouts, shared memory and the training checkpoints' volume.

Multi-GPU training is one pod: the train step starts one DDP rank per GPU of its pod under torchrun
(``pe_triage.training.launch``). More than one node (a PyTorchJob of the Kubeflow Trainer) is left
out of the pipeline on purpose: a node's GPUs (up to 8) are ample for these small 2-D slice models,
while a PyTorchJob needs the training operator, RBAC for the pipeline's service account to create
and watch custom resources, a step that only waits on it, and storage shared across nodes; none of
it can be tested without a cluster. The CLI runs under a
multi-node torchrun (``--nnodes``, a rendezvous endpoint) for whoever needs it outside the pipeline.

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
from pe_triage.training.launch import CHECKPOINT_ROOT_ENV, PROCESSES_ENV

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
    #: GPUs per training step: one DistributedDataParallel rank per GPU under torchrun (0: train on CPU)
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
    #: leave-one-site-out folds trained at the same time by the retraining ParallelFor: each is a
    #: GPU training pod like the main pair's, so 2 keeps a run from taking every GPU node at once
    parallel_folds: int = 2
    #: /dev/shm of every step, a memory-backed emptyDir (the container default of 64 MB is less than
    #: two loader workers keep in flight: a bus error). 4 GiB: 8 workers x 4 prefetched batches of 32
    #: two-window 256 px float slices are 2 GiB per rank; it counts against the pod's memory only when used
    shm_size: str = "4Gi"
    #: PersistentVolumeClaim for training checkpoints, so a retried pod resumes (None: checkpoints beside
    #: the artifact, lost with the pod). ReadWriteMany when the two stages may train on different nodes
    checkpoint_claim: str | None = None
    checkpoint_mount: str = "/checkpoints"
    #: limits per step: 48 h of training (a full cohort at full size is hours to a day), 12 h for the
    #: others (evaluating a full test split on a CPU pod takes hours)
    train_timeout_s: int = 48 * 3600
    io_timeout_s: int = 12 * 3600
    #: data by reference: the root of the persistent windows store (a folder on ``data_claim``, mounted
    #: at the same path in every step). None: windows are a run's artifact, as under kfp.local. A
    #: folder, not s3://: training memory-maps the windows
    data_root: str | None = None
    #: the ReadWriteMany PersistentVolumeClaim holding ``data_root`` (mounted at ``data_mount``)
    data_claim: str | None = None
    data_mount: str = "/data"
    #: evaluation (the cascade and the champion) on a GPU node with one GPU: a full test split at full
    #: model size takes hours on a CPU pod. Off by default: a GPU node is the scarcer resource
    evaluate_gpu: bool = False

    def __post_init__(self) -> None:
        if self.data_root is not None and not (self.data_claim and self.data_root.startswith(self.data_mount.rstrip("/") + "/")):
            raise ValueError(f"data root {self.data_root!r}: give a folder under the data volume's mount "
                             f"({self.data_mount}) and its claim name (training memory-maps the windows, so not s3://)")

    @classmethod
    def from_cluster_config(cls, cfg: Mapping[str, Any]) -> ClusterOptions:
        """Options from the Helm chart's ``cluster.yaml`` (keys: images, gpu, secrets, s3, pods, data)."""
        images, gpu, secrets, s3 = (cfg.get(k) or {} for k in ("images", "gpu", "secrets", "s3"))
        kw: dict[str, Any] = _pod_options(cfg.get("pods") or {}) | _data_options(cfg.get("data") or {})
        if images:
            kw.update(cpu_image=images.get("cpu", CPU_IMAGE), cuda_image=images.get("cuda", CUDA_IMAGE))
        if gpu:
            kw.update(accelerator=gpu.get("resource", cls.accelerator), gpus=int(gpu.get("count", cls.gpus)),
                      evaluate_gpu=bool(gpu.get("evaluate", cls.evaluate_gpu)),
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


def _pod_options(pods: Mapping[str, Any]) -> dict[str, Any]:
    """The ``pods`` section of ``cluster.yaml``: shared memory, checkpoint volume, timeouts, retries."""
    checkpoints, timeouts = pods.get("checkpoints") or {}, pods.get("timeouts") or {}
    kw = {"shm_size": pods.get("shmSize"), "retries": pods.get("retries"), "checkpoint_claim": checkpoints.get("claimName"),
          "checkpoint_mount": checkpoints.get("mountPath"), "train_timeout_s": timeouts.get("trainSeconds"),
          "io_timeout_s": timeouts.get("ioSeconds")}
    return {k: v for k, v in kw.items() if v not in (None, "")}  # absent or empty: the default


def _data_options(data: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data`` section of ``cluster.yaml``: the windows store's root, its claim and mount."""
    kw = {"data_root": data.get("root"), "data_claim": data.get("claimName"), "data_mount": data.get("mountPath")}
    return {k: v for k, v in kw.items() if v not in (None, "")}


def _data(task: PipelineTask, options: ClusterOptions) -> PipelineTask:
    """The data volume, where the windows store lives (data by reference)."""
    if options.data_claim:
        kubernetes.mount_pvc(task, pvc_name=options.data_claim, mount_path=options.data_mount)
    return task


def _secrets(task: PipelineTask, options: ClusterOptions, *, pseudonym_key: bool) -> PipelineTask:
    """Credentials as environment variables, and the label that lets the pod reach MLflow."""
    kubernetes.add_pod_label(task, MLFLOW_CLIENT_LABEL, "true")
    for secret in (options.s3, options.mlflow, options.pseudonym_key if pseudonym_key else None):
        if secret is not None:
            kubernetes.use_secret_as_env(task, secret.name, dict(secret.env), optional=secret.optional)
    for name, value in options.env.items():
        task.set_env_variable(name, value)
    return task


def _pod(task: PipelineTask, options: ClusterOptions, timeout_s: int) -> PipelineTask:
    """Shared memory for loader workers and the step's time limit."""
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=options.shm_size)
    return kubernetes.set_timeout(task, timeout_s)


def _retry(task: PipelineTask, options: ClusterOptions) -> PipelineTask:
    return task.set_retry(options.retries, backoff_duration=options.backoff, backoff_factor=options.backoff_factor,
                          backoff_max_duration=options.backoff_max)


def io_step(task: PipelineTask, options: ClusterOptions, *, cache: bool = True, pseudonym_key: bool = False) -> PipelineTask:
    """A CPU step that reads or writes the object store or MLflow: requests, retries with backoff,
    credentials. ``cache=False`` for steps whose result depends on state outside their inputs (a
    source folder, the store, the registry)."""
    task.set_cpu_request(options.data_cpu).set_memory_request(options.data_memory)
    task.set_caching_options(cache)
    _pod(_data(task, options), options, options.io_timeout_s)
    return _secrets(_retry(task, options), options, pseudonym_key=pseudonym_key)


def _gpu_node(task: PipelineTask, options: ClusterOptions) -> None:
    for key, value in options.gpu_node_selector.items():
        kubernetes.add_node_selector(task, key, value)
    for toleration in options.gpu_tolerations:
        kubernetes.add_toleration(task, key=toleration.get("key"), operator=toleration.get("operator"),
                                  value=toleration.get("value"), effect=toleration.get("effect"),
                                  toleration_seconds=toleration.get("tolerationSeconds"))


def gpu_step(task: PipelineTask, options: ClusterOptions) -> PipelineTask:
    """A training step: GPUs on a GPU node (selector + tolerations), one DDP rank per GPU, CPU and
    memory for the loader; retried, since a preempted step resumes from its checkpoint (on the
    checkpoint volume, where one is configured). ``gpus`` 0: a CPU pod on any node, one process."""
    if options.gpus > 0:
        _gpu_node(task.set_accelerator_type(options.accelerator).set_accelerator_limit(options.gpus), options)
    task.set_cpu_request(options.train_cpu).set_memory_request(options.train_memory)
    task.set_env_variable(PROCESSES_ENV, str(max(1, options.gpus)))
    if options.checkpoint_claim:
        kubernetes.mount_pvc(task, pvc_name=options.checkpoint_claim, mount_path=options.checkpoint_mount)
        task.set_env_variable(CHECKPOINT_ROOT_ENV, options.checkpoint_mount)
    _pod(_data(task, options), options, options.train_timeout_s)
    return _secrets(_retry(task, options), options, pseudonym_key=False)


def evaluate_step(task: PipelineTask, options: ClusterOptions, *, cache: bool = True) -> PipelineTask:
    """An evaluation: an I/O step, on a GPU node with one GPU when ``evaluate_gpu`` is set."""
    io_step(task, options, cache=cache)
    if options.evaluate_gpu and options.gpus > 0:
        _gpu_node(task.set_accelerator_type(options.accelerator).set_accelerator_limit(1), options)
    return task
