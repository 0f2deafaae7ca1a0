"""The chart's ``pods`` values: shared memory, the training checkpoints' claim (created, existing or
none), timeouts and retries reach cluster.yaml as the pipelines read them, and the claim the chart
creates validates like every other manifest. GPU count 0 (training on a CPU pod) is a valid value."""

from __future__ import annotations

import kubernetes_validate
import pytest
import test_chart as chart
import yaml
from pe_triage_pipelines.cluster import ClusterOptions

helm, render, find = chart.helm, chart.render, chart.find
KUBE_VERSION, RELEASE = chart.KUBE_VERSION, chart.RELEASE

TUNED = {"gpu": {"resource": "nvidia.com/gpu", "count": 0, "nodeSelector": {}, "tolerations": []},
         "pods": {"shmSize": "8Gi", "retries": 1, "timeouts": {"trainSeconds": 3600, "ioSeconds": 900},
                  "checkpoints": {"existingClaim": "", "create": True, "size": "50Gi", "storageClassName": "cephfs",
                                  "accessModes": ["ReadWriteMany"], "mountPath": "/mnt/ck"}}}


def _options(docs: list[dict]) -> ClusterOptions:
    return ClusterOptions.from_cluster_config(yaml.safe_load(find(docs, "ConfigMap", "-config")["data"]["cluster.yaml"]))


def test_default_install_creates_the_checkpoint_claim_and_names_it_to_the_pipelines(render) -> None:
    docs = render()
    claim = find(docs, "PersistentVolumeClaim", "-checkpoints")
    kubernetes_validate.validate(claim, KUBE_VERSION, strict=True)
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and "storageClassName" not in claim["spec"]
    options = _options(docs)
    assert options.checkpoint_claim == f"{RELEASE}-pe-triage-checkpoints" and options.checkpoint_mount == "/checkpoints"
    assert (options.shm_size, options.retries, options.train_timeout_s, options.io_timeout_s) == ("4Gi", 3, 172800, 43200)


@pytest.mark.parametrize("name", ["tuned", "existing", "none"])
def test_pods_values_reach_the_pipelines(render, helm, name: str) -> None:
    checkpoints = {"tuned": {}, "existing": {"existingClaim": "rwx-ckpts"}, "none": {"create": False}}[name]
    values = {**TUNED, "pods": {**TUNED["pods"], "checkpoints": {**TUNED["pods"]["checkpoints"], **checkpoints}}}
    helm("lint", "--strict", str(chart.CHART), "--namespace", chart.NAMESPACE, "--kube-version", KUBE_VERSION, values=values)
    docs = render(values)
    claims = [d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"].endswith("-checkpoints")]
    options = _options(docs)
    assert (options.gpus, options.shm_size, options.retries, options.train_timeout_s, options.io_timeout_s) == (
        0, "8Gi", 1, 3600, 900)
    if name == "tuned":
        (claim,) = claims
        kubernetes_validate.validate(claim, KUBE_VERSION, strict=True)
        assert claim["spec"]["storageClassName"] == "cephfs" and claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
        assert (options.checkpoint_claim, options.checkpoint_mount) == (f"{RELEASE}-pe-triage-checkpoints", "/mnt/ck")
    else:
        assert claims == []
        assert options.checkpoint_claim == {"existing": "rwx-ckpts", "none": None}[name]


def test_a_bad_shm_size_or_timeout_is_refused_at_install(helm) -> None:
    for pods in ({"shmSize": "lots"}, {"timeouts": {"trainSeconds": 5, "ioSeconds": 900}}):
        values = {"pods": {**TUNED["pods"], **pods}}
        proc = helm("template", RELEASE, str(chart.CHART), values=values, check=False)
        assert proc.returncode != 0 and "pods" in proc.stderr, proc.stderr
