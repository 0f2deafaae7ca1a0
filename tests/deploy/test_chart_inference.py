"""The triage service in the chart (issue 18, item 4): `inference.enabled` renders a Deployment,
Service, NetworkPolicy, ServiceAccount and (replicas > 1) a PodDisruptionBudget running
`pe-triage serve`; `inference.kserve.enabled` renders a KServe InferenceService instead. Every
scenario lints strictly and validates against the Kubernetes 1.32 schemas; the InferenceService,
a custom resource kubernetes-validate has no schema for, has its predictor validated as a Pod.
"""

from __future__ import annotations

import base64
from types import ModuleType

import kubernetes_validate
import pytest
import test_chart as chart
import yaml

from pe_triage.registry.pyfunc import ALLOWED_PREFIXES_ENV

helm = chart.helm
render = chart.render
find, env_of = chart.find, chart.env_of
CHART, NAMESPACE, RELEASE, KUBE_VERSION = chart.CHART, chart.NAMESPACE, chart.RELEASE, chart.KUBE_VERSION

TRIAGE_LABEL = "pe-triage.io/triage-client"
MLFLOW_CLIENT_LABEL = chart.CLIENT_LABEL
NAME = f"{RELEASE}-pe-triage-inference"
SELECTOR = {"app.kubernetes.io/name": "pe-triage", "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": "inference"}
MLFLOW_URI = f"http://{RELEASE}-pe-triage-mlflow.{NAMESPACE}.svc.cluster.local:5000"

ON = {"inference": {"enabled": True}}
GPU = {"inference": {"enabled": True, "replicas": 3, "gpu": {
    "count": 2, "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    "nodeSelector": {"pool": "inference"}}}
KSERVE = {"inference": {"enabled": True, "kserve": {"enabled": True}}}
EXTERNAL = {  # an MLflow outside the chart, a read-only user's Secret, s3:// inputs
    "mlflow": {"enabled": False}, "schedule": {"enabled": False},
    "s3": {"existingSecret": "s3-creds", "endpointUrl": "https://s3.example.org"},
    "inference": {"enabled": True, "trackingUri": "https://mlflow.example.org",
                  "existingSecret": "mlflow-reader", "usernameKey": "user", "passwordKey": "password",
                  "model": {"name": "pe-triage-h1", "alias": "staging"}},
    "config": {"serve": {"allowed_prefixes": ["/mnt/exports", "s3://pacs-exports/ct"], "max_concurrency": 1}},
    "networkPolicy": {"mlflowTo": [{"ipBlock": {"cidr": "10.40.0.0/16"}}], "mlflowPorts": [443]},
}
SCENARIOS = {"on": ON, "gpu-replicas": GPU, "kserve": KSERVE, "external-mlflow": EXTERNAL,
             "kserve-serverless-gpu": {"inference": {**GPU["inference"], "kserve": {
                 "enabled": True, "deploymentMode": "Serverless", "minReplicas": 0, "maxReplicas": 4}}}}


def serving_container(docs: list[dict]) -> dict:
    (container,) = find(docs, "Deployment", "-inference")["spec"]["template"]["spec"]["containers"]
    return container


def predictor_as_pod(isvc: dict) -> dict:
    """The InferenceService's predictor without KServe's own fields: a PodSpec."""
    kserve_only = {"minReplicas", "maxReplicas", "timeout", "labels", "annotations"}
    spec = {k: v for k, v in isvc["spec"]["predictor"].items() if k not in kserve_only}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": isvc["metadata"]["name"]}, "spec": spec}


@pytest.mark.parametrize("name", SCENARIOS)
def test_lint_strict(helm, name):
    helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION,
         values=SCENARIOS[name])


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_manifest_validates(render, name):
    docs = render(SCENARIOS[name])
    assert [d for d in docs if d["metadata"]["name"] == NAME]
    for doc in docs:
        if doc["kind"] == "InferenceService":
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            doc = predictor_as_pod(doc)
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_validation_catches_a_bad_predictor(render):
    pod = predictor_as_pod(find(render(KSERVE), "InferenceService", "-inference"))
    pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("values", [None, chart.MINIMAL, {"inference": {"kserve": {"enabled": True}}}],
                         ids=["default", "minimal", "kserve-only"])
def test_off_by_default_and_nothing_rendered_when_off(render, values):
    docs = render(values)
    assert not [d["kind"] for d in docs if "inference" in d["metadata"]["name"]]
    assert not [d for d in docs if d["kind"] in ("InferenceService", "PodDisruptionBudget")]


def test_deployment_runs_the_service_locked_down(render):
    docs = render(ON)
    deployment = find(docs, "Deployment", "-inference")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    c = serving_container(docs)
    assert c["image"] == f"ghcr.io/pe-triage/pe-triage:{chart.VERSION}"
    assert c["command"] == ["pe-triage", "serve"]
    assert c["args"] == ["--model", "models:/pe-triage@champion", "--host", "0.0.0.0", "--port", "8080",
                         "--config", "/etc/pe-triage/config.yaml"]
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    # liveness: the process answers; readiness: the model is loaded and warmed (and may take minutes)
    assert c["livenessProbe"]["httpGet"] == {"path": "/ping", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    startup = c["startupProbe"]
    assert startup["httpGet"] == {"path": "/health", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] == 600
    # non-root, read-only root, no capabilities, seccomp; writable /tmp and ~/.cache only
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == NAME
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    env = env_of(c)
    assert env["TMPDIR"]["value"] == "/tmp" and env["HOME"]["value"] == "/home/pe"
    for path in ("/tmp", "/home/pe/.cache"):
        assert "emptyDir" in volumes[mounts[path]], path
    assert volumes[mounts["/etc/pe-triage"]]["configMap"]["name"] == f"{RELEASE}-pe-triage-config"
    # a changed config restarts the pods
    assert pod["metadata"]["annotations"]["checksum/config"]
    # an upgrade keeps every old pod until a new one has loaded its model
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"cpu", "memory"} <= set(c["resources"]["limits"])
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"]  # one replica: nothing to keep


def test_mlflow_credentials_are_a_read_only_user_from_a_secret(render):
    """The service logs in as its own MLflow user (not the pipeline user, which owns the models and
    may move the champion): the chart generates its Secret and the hook Job creates it."""
    docs = render({**ON, "s3": {"existingSecret": "s3-creds", "endpointUrl": "https://s3.example.org"}})
    env = env_of(serving_container(docs))
    assert env["MLFLOW_TRACKING_URI"]["value"] == MLFLOW_URI
    secret = find(docs, "Secret", "-mlflow-inference")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert chart._secret_ref(env, var) == {"name": secret["metadata"]["name"], "key": var}
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    pipeline = base64.b64decode(find(docs, "Secret", "-mlflow-client")["data"]["MLFLOW_TRACKING_USERNAME"]).decode()
    assert data["MLFLOW_TRACKING_USERNAME"] == "pe-triage-inference" != pipeline
    assert len(data["MLFLOW_TRACKING_PASSWORD"]) == 32
    assert data["MLFLOW_TRACKING_PASSWORD"] not in yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    users_job = env_of(find(docs, "Job", "-mlflow-users")["spec"]["template"]["spec"]["containers"][0])
    for var in ("PE_TRIAGE_INFERENCE_MLFLOW_USERNAME", "PE_TRIAGE_INFERENCE_MLFLOW_PASSWORD"):
        assert chart._secret_ref(users_job, var)["name"] == secret["metadata"]["name"]
    assert env[ALLOWED_PREFIXES_ENV]["value"] == ""  # no server-side paths by default
    # MLflow proxies artifacts behind auth: no object-store credentials in the pod, though the chart has some
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"} & set(env)
    mlflow_env = env_of(find(docs, "Deployment", "-mlflow")["spec"]["template"]["spec"]["containers"][0])
    assert chart._secret_ref(mlflow_env, "AWS_SECRET_ACCESS_KEY")["name"] == "s3-creds"
    # a named Secret replaces the generated user; without the service, no user and no Secret
    named = render({"inference": {"enabled": True, "existingSecret": "mlflow-reader"}})
    assert chart._secret_ref(env_of(serving_container(named)), "MLFLOW_TRACKING_PASSWORD")["name"] == "mlflow-reader"
    for docs in (named, render()):
        assert not [d for d in docs if d["metadata"]["name"].endswith("-mlflow-inference")]
        users_job = env_of(find(docs, "Job", "-mlflow-users")["spec"]["template"]["spec"]["containers"][0])
        assert "PE_TRIAGE_INFERENCE_MLFLOW_USERNAME" not in users_job


def test_external_mlflow_named_secret_prefixes_and_model(render):
    docs = render(EXTERNAL)
    c = serving_container(docs)
    assert c["args"][:2] == ["--model", "models:/pe-triage-h1@staging"]
    env = env_of(c)
    assert env["MLFLOW_TRACKING_URI"]["value"] == "https://mlflow.example.org"
    assert chart._secret_ref(env, "MLFLOW_TRACKING_USERNAME") == {"name": "mlflow-reader", "key": "user"}
    assert chart._secret_ref(env, "MLFLOW_TRACKING_PASSWORD") == {"name": "mlflow-reader", "key": "password"}
    assert env[ALLOWED_PREFIXES_ENV]["value"] == "/mnt/exports,s3://pacs-exports/ct"
    # s3:// inputs (and an MLflow that may not proxy artifacts): the pod reads the store itself
    assert chart._secret_ref(env, "AWS_SECRET_ACCESS_KEY")["name"] == "s3-creds"
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "https://s3.example.org"


def test_model_name_follows_the_registry_config(render):
    c = serving_container(render({**ON, "config": {"registry": {"model_name": "pe-triage-h2"}}}))
    assert c["args"][1] == "models:/pe-triage-h2@champion"


def test_service_reaches_the_pods_on_8080(render):
    docs = render(ON)
    service = find(docs, "Service", "-inference")["spec"]
    assert service["type"] == "ClusterIP"
    assert service["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    pod_labels = find(docs, "Deployment", "-inference")["spec"]["template"]["metadata"]["labels"]
    assert service["selector"] == SELECTOR and SELECTOR.items() <= pod_labels.items()
    mlflow = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-mlflow"))
    assert not mlflow["spec"]["selector"].items() <= pod_labels.items()


def test_network_policy_admits_labelled_callers_and_reaches_mlflow_only(render):
    docs = render(ON)
    policy = find(docs, "NetworkPolicy", "-inference")["spec"]
    assert policy["podSelector"] == {"matchLabels": SELECTOR}
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {TRIAGE_LABEL: "true"}}}]
    assert rule["ports"] == [{"port": 8080, "protocol": "TCP"}]
    assert policy["egress"] == [chart.DNS_RULE, {"to": [{"podSelector": chart._selector("mlflow")}],
                                                 "ports": [{"port": 5000, "protocol": "TCP"}]}]
    # and MLflow's own policy admits the inference pods
    pod_labels = find(docs, "Deployment", "-inference")["spec"]["template"]["metadata"]["labels"]
    (mlflow_rule,) = find(docs, "NetworkPolicy", "-mlflow")["spec"]["ingress"]
    assert any(peer.keys() == {"podSelector"} and peer["podSelector"]["matchLabels"].items() <= pod_labels.items()
               for peer in mlflow_rule["from"])
    # callers from other namespaces and extra peers, when configured
    gateway = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}
    docs = render({**ON, "networkPolicy": {"triageClientNamespaces": ["pacs"], "inferenceIngressFrom": [gateway]}})
    (rule,) = find(docs, "NetworkPolicy", "-inference")["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {TRIAGE_LABEL: "true"}}},
                            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "pacs"}},
                             "podSelector": {"matchLabels": {TRIAGE_LABEL: "true"}}},
                            gateway]


@pytest.mark.parametrize("values", [
    {**ON, "config": {"serve": {"allowed_prefixes": ["/mnt/exports", "s3://pacs-exports"]}}},
    {**ON, **chart.AUTH_OFF},
], ids=["s3-inputs", "mlflow-without-artifact-proxy"])
def test_object_store_egress_only_where_the_pod_reads_it(render, values):
    docs = render(values)
    egress = find(docs, "NetworkPolicy", "-inference")["spec"]["egress"]
    assert egress[-1] == {"ports": [{"port": 443, "protocol": "TCP"}, {"port": 9000, "protocol": "TCP"}]}
    assert len(egress) == 3


def test_external_mlflow_egress(render):
    egress = find(render(EXTERNAL), "NetworkPolicy", "-inference")["spec"]["egress"]
    assert egress[1] == {"to": [{"ipBlock": {"cidr": "10.40.0.0/16"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
    assert not any(peer.get("podSelector") for rule in egress for peer in rule.get("to", [])
                   if "namespaceSelector" not in peer)


def test_gpu_and_replicas(render):
    docs = render(GPU)
    deployment = find(docs, "Deployment", "-inference")
    spec = deployment["spec"]["template"]["spec"]
    c = serving_container(docs)
    assert c["image"] == f"ghcr.io/pe-triage/pe-triage-cuda:{chart.VERSION}"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert c["resources"]["limits"]["memory"] == "6Gi"  # the CPU limits stay
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true", "pool": "inference"}
    assert spec["tolerations"] == GPU["inference"]["gpu"]["tolerations"]
    assert deployment["spec"]["replicas"] == 3
    pdb = find(docs, "PodDisruptionBudget", "-inference")["spec"]
    assert pdb == {"maxUnavailable": 1, "selector": {"matchLabels": SELECTOR}}
    # CPU: no GPU resource, no GPU scheduling
    cpu = render(ON)
    assert "nvidia.com/gpu" not in serving_container(cpu)["resources"]["limits"]
    assert "nodeSelector" not in find(cpu, "Deployment", "-inference")["spec"]["template"]["spec"]


def test_kserve_runs_the_same_container_as_a_custom_predictor(render):
    docs = render(KSERVE)
    assert not [d for d in docs if d["kind"] in ("Deployment", "Service", "PodDisruptionBudget")
                and d["metadata"]["name"] == NAME]
    isvc = find(docs, "InferenceService", "-inference")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = isvc["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"], predictor["timeout"]) == (1, 1, 300)
    # the pods KServe makes are selected by the chart's NetworkPolicy and admitted by MLflow's
    assert predictor["labels"] == {**SELECTOR, MLFLOW_CLIENT_LABEL: "true"}
    assert find(docs, "NetworkPolicy", "-inference")["spec"]["podSelector"]["matchLabels"] == SELECTOR
    (c,) = predictor["containers"]
    assert c["name"] == "kserve-container"
    assert c["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8080}
    assert c["livenessProbe"]["httpGet"] == {"path": "/ping", "port": 8080}
    # the same image, command, environment, security and volumes as the Deployment
    deployed = serving_container(render(ON))
    for key in ("image", "command", "args", "env", "securityContext", "resources", "volumeMounts"):
        assert c[key] == deployed[key], key
    deployed_spec = find(render(ON), "Deployment", "-inference")["spec"]["template"]["spec"]
    for key in ("securityContext", "volumes", "serviceAccountName", "automountServiceAccountToken"):
        assert predictor[key] == deployed_spec[key], key


@pytest.mark.parametrize("name", ["on", "kserve", "external-mlflow"])
def test_command_line_and_config_are_what_the_service_reads(render, name):
    """The container's command parses with the real `pe-triage serve` parser, and the mounted
    config.yaml loads as the package's Config with the allow-list the environment carries."""
    from pe_triage.cli import build_parser
    from pe_triage.config import Config, from_dict

    docs = render(SCENARIOS[name])
    isvc = [d for d in docs if d["kind"] == "InferenceService"]
    (c,) = isvc[0]["spec"]["predictor"]["containers"] if isvc else [serving_container(docs)]
    args = build_parser().parse_args(c["command"][1:] + c["args"])
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 8080)
    assert args.model.startswith("models:/") and "@" in args.model
    mount = next(m for m in c["volumeMounts"] if args.config.startswith(m["mountPath"] + "/"))
    assert mount["name"] == "config"
    config = from_dict(Config, yaml.safe_load(find(docs, "ConfigMap", "-config")["data"]["config.yaml"]))
    env = env_of(c)[ALLOWED_PREFIXES_ENV]["value"]
    assert config.serve.allowed_prefixes == tuple(p for p in env.split(",") if p)


def test_image_runs_the_service_as_the_chart_expects(render):
    """images/Dockerfile: port 8080 exposed, uid 10001, HOME and TMPDIR where the chart mounts its
    writable emptyDirs (the root filesystem is read-only)."""
    import test_images as images

    all_stages = images.stages(images.IMAGES / "Dockerfile")
    container = serving_container(render(ON))
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for target in ("cpu", "cuda"):
        body = [(i, a) for s in images.lineage(all_stages, target) for i, a in all_stages[s]["body"]]
        assert ("EXPOSE", "8080") in body, target
        env = " ".join(a for i, a in body if i == "ENV").split()
        assert {"HOME=/home/pe", "TMPDIR=/tmp"} <= set(env), target
        assert [a for i, a in body if i == "USER"][-1] == "10001:10001"
    assert {"/tmp", "/home/pe/.cache"} <= mounts


# values -> the JSON pointer (or message) the refusal must name
INVALID = {
    "no mlflow at all": ({"mlflow": {"enabled": False}, "inference": {"enabled": True}}, "/inference/trackingUri"),
    "relative input prefix": ({"config": {"serve": {"allowed_prefixes": ["exports/ct"]}}},
                              "/config/serve/allowed_prefixes/0"),
    "comma in a prefix": ({"config": {"serve": {"allowed_prefixes": ["/a,/b"]}}}, "/config/serve/allowed_prefixes/0"),
    "zero replicas": ({"inference": {"replicas": 0}}, "/inference/replicas"),
    "alias with a slash": ({"inference": {"model": {"alias": "champ/ion"}}}, "/inference/model/alias"),
    "negative gpus": ({"inference": {"gpu": {"count": -1}}}, "/inference/gpu/count"),
    "unknown kserve mode": ({"inference": {"kserve": {"deploymentMode": "Knative"}}},
                            "/inference/kserve/deploymentMode"),
    "service logs in as the pipeline user": ({"inference": {"enabled": True},
                                              "mlflow": {"auth": {"inferenceUsername": "pe-triage-pipeline"}}},
                                             "inferenceUsername must differ"),
    "caller namespace not a name": ({"networkPolicy": {"triageClientNamespaces": ["PACS Net"]}},
                                    "/networkPolicy/triageClientNamespaces/0"),
}


@pytest.mark.parametrize("name", INVALID)
def test_invalid_values_fail_at_install(helm, name):
    values, where = INVALID[name]
    proc = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION,
                values=values, check=False)
    assert proc.returncode != 0, f"{name}: rendered although invalid"
    assert where in proc.stderr, proc.stderr


def _import_test_module(name: str, relative: str) -> ModuleType:
    """A helper module of another test folder (pytest puts only this folder on sys.path)."""
    import importlib.util
    import sys

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, chart.ROOT / relative)
        assert spec and spec.loader
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.slow
def test_the_charts_container_serves_the_champion(render, mlflow_server, tmp_path):
    """The rendered container, run as a real process: its command, arguments and environment (Secret
    references resolved from the rendered Secrets), the ConfigMap's config.yaml at its mount path and
    the emptyDirs as folders. The liveness path answers while the model loads; the readiness path
    turns 200 once the registered champion is loaded, within the startupProbe's budget."""
    import os
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request
    import uuid

    from pe_triage.config import RegistryConfig
    from pe_triage.registry.registry import promote, register
    from pe_triage.registry.server import free_port

    stage_model = _import_test_module("test_predict", "tests/test_predict.py").stage_model
    write_metrics = _import_test_module("test_registry", "tests/registry/test_registry.py").write_metrics
    name = f"pe-triage-{uuid.uuid4().hex[:8]}"
    cfg = RegistryConfig(model_name=name, experiment=name, wheel_cache=str(tmp_path / "wheels"))
    pair = (str(stage_model(tmp_path / "stage1", 1, threshold=0.45, context=1)),
            str(stage_model(tmp_path / "stage2", 2, threshold=0.5)))
    register(*pair, str(write_metrics(tmp_path / "m1")), config=cfg, uri=mlflow_server)
    assert promote(config=cfg, uri=mlflow_server)["outcome"] == "promoted"

    docs = render({**ON, "config": {"registry": {"model_name": name, "experiment": name},
                                    "serve": {"allowed_prefixes": [str(tmp_path / "exports")]}}})
    c = serving_container(docs)
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    mounts = {m["mountPath"]: tmp_path / m["name"] for m in c["volumeMounts"]}
    for folder in mounts.values():
        folder.mkdir()
    (mounts["/etc/pe-triage"] / "config.yaml").write_text(find(docs, "ConfigMap", "-config")["data"]["config.yaml"])
    env = chart._resolve_env(c, secrets)
    assert env["MLFLOW_TRACKING_URI"] == MLFLOW_URI
    env |= {"MLFLOW_TRACKING_URI": mlflow_server, "HOME": str(tmp_path / "home"), "TMPDIR": str(mounts["/tmp"]),
            "OMP_NUM_THREADS": "1"}
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".cache").symlink_to(mounts["/home/pe/.cache"])
    port = free_port()
    local = {"0.0.0.0": "127.0.0.1", "8080": str(port),
             "/etc/pe-triage/config.yaml": str(mounts["/etc/pe-triage"] / "config.yaml")}
    argv = [str(chart.Path(sys.executable).parent / c["command"][0]), *c["command"][1:], *[local.get(a, a) for a in c["args"]]]

    def status(probe: str) -> int:
        path = c[probe]["httpGet"]["path"]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            return 0

    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
        seen = set()
        while status("readinessProbe") != 200:
            seen.add(status("livenessProbe"))
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        assert status("livenessProbe") == 200 and status("startupProbe") == 200
        assert seen <= {0, 200}  # alive (or not yet listening) while loading: never a liveness failure
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log_text = (tmp_path / "serve.log").read_text()
    assert env["MLFLOW_TRACKING_PASSWORD"] not in log_text


@pytest.mark.slow
def test_the_services_mlflow_user_reads_but_cannot_move_the_champion(render, tmp_path, monkeypatch):
    """The chart's MLflow (its arguments and auth config; SQLite and a folder for PostgreSQL and S3)
    and its user bootstrap Job, run for real: the triage service's user reads the champion by alias
    and downloads its files, but may neither move the alias nor overwrite a model file."""
    import json
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient

    from pe_triage.registry.server import free_port

    docs = render(ON)
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    server = find(docs, "Deployment", "-mlflow")["spec"]["template"]["spec"]["containers"][0]
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    local = {"--host": "127.0.0.1", "--port": str(port), "--workers": "1",
             "--artifacts-destination": str(tmp_path / "artifacts")}
    args = [f"{a.split('=')[0]}={local[a.split('=')[0]]}" if a.split("=")[0] in local else a for a in server["args"]]
    ini = find(docs, "ConfigMap", "-mlflow-auth")["data"]["basic_auth.ini"]
    (tmp_path / "basic_auth.ini").write_text("\n".join(
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}" if line.startswith("database_uri") else line
        for line in ini.splitlines()))
    env = chart._resolve_env({"env": [e for e in server["env"] if e["name"] != "PGPASSWORD"]}, secrets)
    env |= {"MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "HOME": str(tmp_path),
            "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen([str(chart.Path(sys.executable).parent / "mlflow"), "server", *args],
                                env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        job = find(docs, "Job", "-mlflow-users")["spec"]["template"]["spec"]["containers"][0]
        (tmp_path / "create_user.py").write_text(find(docs, "ConfigMap", "-mlflow-users")["data"]["create_user.py"])
        job_env = chart._resolve_env(job, secrets) | {"MLFLOW_TRACKING_URI": uri}
        run = subprocess.run([sys.executable, str(tmp_path / "create_user.py")], env={**os.environ, **job_env},
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "server.log").read_text()[-3000:]
        assert "created MLflow user pe-triage-inference" in run.stdout
        pipeline = (job_env["PE_TRIAGE_MLFLOW_USERNAME"], job_env["PE_TRIAGE_MLFLOW_PASSWORD"])
        service_env = chart._resolve_env(serving_container(docs), secrets)
        service = (service_env["MLFLOW_TRACKING_USERNAME"], service_env["MLFLOW_TRACKING_PASSWORD"])

        # the pipeline registers a version and makes it champion
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", pipeline[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", pipeline[1])
        tracking = MlflowClient(uri)
        run_id = tracking.create_run(tracking.create_experiment("pe-triage")).info.run_id
        (tmp_path / "model.bin").write_bytes(b"weights")
        tracking.log_artifact(run_id, str(tmp_path / "model.bin"), "model")
        tracking.create_registered_model("pe-triage")
        tracking.create_model_version("pe-triage", f"runs:/{run_id}/model", run_id=run_id)
        tracking.set_registered_model_alias("pe-triage", "champion", "1")

        api = f"{uri}/api/2.0/mlflow"
        alias = f"{api}/registered-models/alias?name=pe-triage&alias=champion"
        artifact = f"{uri}/api/2.0/mlflow-artifacts/artifacts/1/{run_id}/artifacts/model/model.bin"
        assert chart._status(alias, auth=service) == 200
        assert chart._status(artifact, auth=service) == 200
        moved = json.dumps({"name": "pe-triage", "alias": "champion", "version": "1"}).encode()
        assert chart._status(f"{api}/registered-models/alias", "POST", auth=service, body=moved) == 403
        assert chart._status(artifact, "PUT", auth=service, body=b"crafted") == 403
        assert chart._status(f"{api}/registered-models/alias", "POST", auth=pipeline, body=moved) == 200
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
