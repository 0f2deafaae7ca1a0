"""Operations in the chart: MLflow's database migration as a hook Job that runs before the MLflow
Deployment changes (pre-upgrade; pre-install too with an external database), `helm test` Pods
(MLflow reachable; a request without credentials gets 401), hardened like every other pod, admitted
where they must go by the NetworkPolicies; the data-by-reference values reach cluster.yaml. Every
scenario lints strictly and validates against the Kubernetes schemas."""

from __future__ import annotations

import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kubernetes_validate
import pytest
import test_chart as chart
import yaml
from pe_triage_pipelines.cluster import ClusterOptions

helm, render, find, env_of = chart.helm, chart.render, chart.find, chart.env_of
CHART, NAMESPACE, RELEASE, KUBE_VERSION = chart.CHART, chart.NAMESPACE, chart.RELEASE, chart.KUBE_VERSION

DATA = {"data": {"root": "/data/pe-triage", "claimName": "pe-data", "mountPath": "/data"}, "gpu": {"count": 2, "evaluate": True}}
SCENARIOS = {"default": None, "external-db": chart.EXTERNAL_DB, "auth-off": chart.AUTH_OFF, "data": DATA}
MLFLOW_URL = f"http://{RELEASE}-pe-triage-mlflow.{NAMESPACE}.svc.cluster.local:5000"


def _hooks(docs: list[dict], hook: str) -> list[dict]:
    return [d for d in docs if hook in d["metadata"].get("annotations", {}).get("helm.sh/hook", "").split(",")]


def _test_pods(helm, values: dict | None = None) -> dict[str, dict]:
    """The `helm test` Pods (`helm template --show-only` would also work; all hooks render by default)."""
    return {d["metadata"]["name"]: d for d in _hooks(render_with(helm, values), "test")}


def render_with(helm, values: dict | None) -> list[dict]:
    out = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION, values=values).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("name", SCENARIOS)
def test_lint_strict_and_every_new_manifest_validates(helm, render, name):
    helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION, values=SCENARIOS[name])
    docs = render(SCENARIOS[name])
    ops = [d for d in docs if d["metadata"]["name"].endswith(("-mlflow-migrate",)) or d["kind"] == "Pod"]
    assert ops
    for doc in ops:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_the_migration_runs_before_the_mlflow_deployment_with_the_database_secret(render):
    docs = render()
    job = find(docs, "Job", "-mlflow-migrate")
    notes = job["metadata"]["annotations"]
    assert notes["helm.sh/hook"] == "pre-upgrade", "bundled PostgreSQL: neither it nor its Secret exist before install"
    assert int(notes["helm.sh/hook-weight"]) < min(int(d["metadata"]["annotations"]["helm.sh/hook-weight"])
                                                   for d in _hooks(docs, "post-upgrade"))
    assert "before-hook-creation" in notes["helm.sh/hook-delete-policy"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["sh", "-c", 'exec mlflow db upgrade "$MLFLOW_BACKEND_STORE_URI"']
    assert "args" not in container, "no database URI on the command line"
    env = env_of(container)
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-pe-triage-postgresql", "key": "password"}
    deployment = find(docs, "Deployment", "-mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert env["MLFLOW_BACKEND_STORE_URI"] == env_of(deployment)["MLFLOW_BACKEND_STORE_URI"], "the server's database"
    assert container["image"] == deployment["image"], "the MLflow version being installed migrates"
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 1
    policy = find(docs, "NetworkPolicy", "-postgresql")
    admitted = [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in policy["spec"]["ingress"][0]["from"]]
    assert admitted == ["mlflow", "mlflow-migration"]
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "mlflow-migration"
    fence = find(docs, "NetworkPolicy", "-mlflow-migrate")["spec"]
    assert fence["ingress"] == [] and fence["egress"][1] == {
        "to": [{"podSelector": policy["spec"]["podSelector"]}], "ports": [{"port": 5432, "protocol": "TCP"}]}


def test_with_an_external_database_the_migration_runs_before_install_too(render):
    job = find(render(chart.EXTERNAL_DB), "Job", "-mlflow-migrate")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert env_of(container)["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db",
                                                                                          "key": "sqlalchemy-uri"}
    docs = render({"mlflow": {"migration": {"enabled": False}}})
    assert not [d for d in docs if d["metadata"]["name"].endswith("-mlflow-migrate")]


def _run(container: dict, url: str) -> subprocess.CompletedProcess:
    """A test Pod's command, run here (``python`` is this interpreter) against ``url``."""
    return subprocess.run([sys.executable, *container["command"][1:], url], capture_output=True, text=True, timeout=30)


class _Status(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(int(self.path.split("/")[1]))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_helm_test_pods_check_mlflow_is_up_and_refuses_anonymous_requests(helm):
    pods = _test_pods(helm)
    names = {"reachable": f"{RELEASE}-pe-triage-test-mlflow-reachable", "auth": f"{RELEASE}-pe-triage-test-mlflow-auth"}
    assert set(pods) == set(names.values())
    for pod in pods.values():
        assert pod["metadata"]["labels"]["pe-triage.io/mlflow-client"] == "true", "the NetworkPolicy admits it"
        assert pod["spec"]["automountServiceAccountToken"] is False and pod["spec"]["restartPolicy"] == "Never"
        (container,) = pod["spec"]["containers"]
        assert not any("valueFrom" in e for e in container["env"]), "no credentials: the check is that none get nothing"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    reachable, auth = (pods[names[k]]["spec"]["containers"][0] for k in ("reachable", "auth"))
    assert reachable["args"] == [f"{MLFLOW_URL}/health"]
    assert auth["args"] == [f"{MLFLOW_URL}/api/2.0/mlflow/experiments/search?max_results=1"]
    assert set(_test_pods(helm, chart.AUTH_OFF)) == {names["reachable"]}, "no auth: nothing to check"

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Status)  # answers GET /<status> with that status
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert _run(reachable, f"{base}/200").returncode == 0
        assert _run(reachable, f"{base}/503").returncode != 0
        assert _run(auth, f"{base}/401").returncode == 0
        for status in (200, 403):
            failed = _run(auth, f"{base}/{status}")
            assert failed.returncode != 0 and f"expected 401, got {status}" in failed.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_data_values_reach_the_pipelines(render):
    docs = render(DATA)
    options = ClusterOptions.from_cluster_config(yaml.safe_load(find(docs, "ConfigMap", "-config")["data"]["cluster.yaml"]))
    assert (options.data_root, options.data_claim, options.data_mount, options.evaluate_gpu) == (
        "/data/pe-triage", "pe-data", "/data", True)
    default = ClusterOptions.from_cluster_config(yaml.safe_load(find(render(), "ConfigMap", "-config")["data"]["cluster.yaml"]))
    assert default.data_root is None and default.evaluate_gpu is False


def test_a_data_root_without_a_claim_is_refused_at_install(helm):
    proc = helm("template", RELEASE, str(CHART), values={"data": {"root": "/data/x", "claimName": "", "mountPath": "/data"}},
                check=False)
    assert proc.returncode != 0 and "claimName" in proc.stderr
