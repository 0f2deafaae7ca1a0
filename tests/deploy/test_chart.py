"""Helm chart charts/pe-triage: `helm lint --strict`, `helm template` with default and non-default
values, every rendered manifest validated against the Kubernetes 1.32 schemas, and values that must
be refused at install time (values.schema.json).

helm comes from scripts/install-helm.sh (.venv/bin/helm); without it these tests fail, not skip.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pe_triage.config import Config, from_dict

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "pe-triage"
KUBE_VERSION = "1.32.0"
NAMESPACE = "ml"
RELEASE = "t"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _helm_binary() -> str:
    local = Path(sys.executable).parent / "helm"
    for candidate in (local, ROOT / ".venv" / "bin" / "helm"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("helm")
    if found is None:
        pytest.fail("helm not found: run scripts/install-helm.sh (scripts/setup.sh does)")
    return found


@pytest.fixture(scope="module")
def helm(tmp_path_factory):
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, **{f"HELM_{k}_HOME": str(home / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}}
    binary = _helm_binary()

    def run(*args: str, values: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [binary, *args]
        if values is not None:
            path = home / "values.yaml"
            path.write_text(yaml.safe_dump(values))
            cmd += ["-f", str(path)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


@pytest.fixture(scope="module")
def render(helm):
    def _render(values: dict | None = None) -> list[dict]:
        out = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION,
                   values=values).stdout
        return [d for d in yaml.safe_load_all(out) if d]

    return _render


def find(docs: list[dict], kind: str, suffix: str = "") -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(hits) == 1, f"expected one {kind} *{suffix}, got {[d['metadata']['name'] for d in hits]}"
    return hits[0]


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    return [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job", "CronJob", "DaemonSet")]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ---- scenarios: every one must lint, render and validate ----

EXTERNAL_DB = {
    "postgresql": {"enabled": False},
    "externalDatabase": {"existingSecret": "mlflow-db", "uriKey": "sqlalchemy-uri"},
    "s3": {"existingSecret": "s3-creds", "endpointUrl": "https://s3.example.org", "region": "eu-west-1"},
    "mlflow": {"auth": {"enabled": True, "existingSecret": "mlflow-admin", "configSecret": "mlflow-auth-ini",
                        "pipelineSecret": "mlflow-pipelines"},
               "allowedHosts": ["mlflow.example.org"], "corsAllowedOrigins": ["https://mlflow.example.org"]},
}
GPU = {
    "gpu": {"resource": "nvidia.com/gpu", "count": 4,
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    "config": {"train": {"epochs": 12, "batch_size": 64, "windows": ["vascular", "mediastinal", "lung"]},
               "registry": {"model_name": "pe-triage-h1"}},
    "schedule": {"multiUser": True, "cron": "0 30 3 * * 1-5", "extraArgs": ["--dry-run"],
                 "slicesStore": "s3://hospital-data/slices"},
    "mlflow": {"auth": {"enabled": True, "existingSecret": "mlflow-admin", "pipelineSecret": "mlflow-pipelines"}},
    "postgresql": {"persistence": {"enabled": False}},
}
CREATED_SECRETS = {
    "pseudonymKey": {"create": True, "value": "pseudonym-key-value-0123456789"},
    "s3": {"create": True, "accessKeyId": "AKIATESTVALUE", "secretAccessKey": "s3-secret-value-xyz"},
    "postgresql": {"auth": {"password": "pg-password-value-42"}},
}
MINIMAL = {"mlflow": {"enabled": False}, "schedule": {"enabled": False}, "networkPolicy": {"enabled": False}}
AUTH_OFF = {"mlflow": {"auth": {"enabled": False, "allowUnauthenticated": True}}}
#: the triage service (tests/deploy/test_chart_inference.py has its own scenarios)
INFERENCE = {"inference": {"enabled": True, "replicas": 2}}
SCENARIOS = {"default": None, "external-db": EXTERNAL_DB, "gpu-multiuser-auth": GPU,
             "created-secrets": CREATED_SECRETS, "minimal": MINIMAL, "auth-off": AUTH_OFF, "inference": INFERENCE}


@pytest.mark.parametrize("name", SCENARIOS)
def test_lint_strict(helm, name):
    helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION,
         values=SCENARIOS[name])


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_manifest_validates_against_kubernetes_schemas(render, name):
    docs = render(SCENARIOS[name])
    assert docs
    for doc in docs:
        # raises ValidationError (strict: unknown fields too) or SchemaNotFoundError
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_validation_catches_a_bad_manifest(render):
    deployment = find(render(), "Deployment", "-mlflow")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def test_default_install_has_every_component(render):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in render()}
    assert kinds >= {
        ("Deployment", "t-pe-triage-mlflow"), ("Service", "t-pe-triage-mlflow"),
        ("StatefulSet", "t-pe-triage-postgresql"), ("Service", "t-pe-triage-postgresql"),
        ("Secret", "t-pe-triage-postgresql"), ("ConfigMap", "t-pe-triage-config"),
        ("Job", "t-pe-triage-schedule"), ("ServiceAccount", "t-pe-triage-mlflow"),
        ("ServiceAccount", "t-pe-triage-scheduler"), ("NetworkPolicy", "t-pe-triage-mlflow"),
        ("NetworkPolicy", "t-pe-triage-postgresql"), ("NetworkPolicy", "t-pe-triage-scheduler"),
    }


@pytest.mark.parametrize("name", SCENARIOS)
def test_pods_are_locked_down_and_sized(render, name):
    specs = pod_specs(render(SCENARIOS[name]))
    if name != "minimal":
        assert specs
    for where, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] > 0, where
        assert spec["automountServiceAccountToken"] is False, where
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (where, kind)
            # a read-only root needs a writable /tmp
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), where


def test_mlflow_server_bundled_postgresql(render):
    docs = render()
    c = find(docs, "Deployment", "-mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "ghcr.io/pe-triage/mlflow:3.17.2"
    assert c["command"] == ["mlflow", "server"]
    args = c["args"]
    assert {"--host=0.0.0.0", "--port=5000", "--workers=2", "--serve-artifacts",
            "--artifacts-destination=s3://pe-triage-mlflow/artifacts"} <= set(args)
    assert "--app-name=basic-auth" in args  # auth is on by default
    hosts = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert {"t-pe-triage-mlflow:5000", "t-pe-triage-mlflow.ml.svc.cluster.local:5000"} <= set(hosts)
    env = env_of(c)
    # the URI carries no password: libpq takes it from PGPASSWORD, a Secret
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == (
        "postgresql+psycopg2://mlflow@t-pe-triage-postgresql.ml.svc.cluster.local:5432/mlflow")
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "t-pe-triage-postgresql", "key": "password"}
    pg = find(docs, "StatefulSet", "-postgresql")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(pg)["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "t-pe-triage-postgresql"
    # generated password (kept across upgrades through lookup)
    secret = find(docs, "Secret", "-postgresql")
    assert len(base64.b64decode(secret["data"]["password"])) == 32


def test_external_database_and_auth(render):
    docs = render(EXTERNAL_DB)
    assert not [d for d in docs if d["kind"] == "StatefulSet" or "postgresql" in d["metadata"]["name"]]
    spec = find(docs, "Deployment", "-mlflow")["spec"]["template"]["spec"]
    c = spec["containers"][0]
    env = env_of(c)
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "sqlalchemy-uri"}
    assert "PGPASSWORD" not in env
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "https://s3.example.org"
    assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert "--app-name=basic-auth" in c["args"]
    assert "--cors-allowed-origins=https://mlflow.example.org" in c["args"]
    assert "mlflow.example.org" in next(a for a in c["args"] if a.startswith("--allowed-hosts="))
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-admin"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-admin"
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == "/etc/mlflow-auth/basic_auth.ini"
    auth_volume = next(v for v in spec["volumes"] if v["name"] == "auth-config")
    assert auth_volume["secret"]["secretName"] == "mlflow-auth-ini"
    # the database is reached on its port, the bundled PostgreSQL's policy is gone
    policy = find(docs, "NetworkPolicy", "-mlflow")
    assert {"port": 5432, "protocol": "TCP"} in [p for rule in policy["spec"]["egress"] for p in rule["ports"]]


def test_auth_with_bundled_postgresql_keeps_users_in_their_own_database(render):
    docs = render(GPU)
    ini = find(docs, "ConfigMap", "-mlflow-auth")["data"]["basic_auth.ini"]
    assert "database_uri = postgresql+psycopg2://mlflow@t-pe-triage-postgresql.ml.svc.cluster.local:5432/mlflow_auth" in ini
    init = find(docs, "ConfigMap", "-postgresql-init")["data"]["10-mlflow-auth.sql"]
    assert "CREATE DATABASE mlflow_auth OWNER mlflow" in init


def test_no_secret_value_outside_secrets(helm):
    out = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION,
               values=CREATED_SECRETS).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert set(secrets) == {"t-pe-triage-pseudonym", "t-pe-triage-s3", "t-pe-triage-postgresql",
                            "t-pe-triage-mlflow-auth", "t-pe-triage-mlflow-client"}
    values = ["pseudonym-key-value-0123456789", "AKIATESTVALUE", "s3-secret-value-xyz", "pg-password-value-42"]
    for v in values:
        assert v not in out  # not in clear anywhere, ConfigMaps and args included
    stored = {base64.b64decode(x).decode() for name, s in secrets.items() if "mlflow" not in name for x in s["data"].values()}
    assert stored == set(values)
    # the pipeline learns the Secret's name and key only
    cluster = yaml.safe_load(find(docs, "ConfigMap", "-config")["data"]["cluster.yaml"])
    assert cluster["secrets"]["pseudonymKey"] == {"name": "t-pe-triage-pseudonym", "key": "pseudonym-key"}
    assert cluster["secrets"]["s3"]["name"] == "t-pe-triage-s3"


def test_schedule_job_runs_the_cli_with_the_configmap(render):
    docs = render(GPU)
    job = find(docs, "Job", "-schedule")
    hooks = job["metadata"]["annotations"]["helm.sh/hook"].split(",")
    assert set(hooks) == {"post-install", "post-upgrade"}
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    c = spec["containers"][0]
    assert c["image"] == f"ghcr.io/pe-triage/pe-triage:{VERSION}"
    assert c["command"] == ["pe-triage", "pipeline", "schedule"]
    args = c["args"]
    flags = dict(zip(args[:-1:2], args[1::2], strict=True))
    assert flags == {"--host": "http://ml-pipeline.kubeflow.svc.cluster.local:8888", "--cron": "0 30 3 * * 1-5",
                     "--config": "/etc/pe-triage/config.yaml", "--experiment": "pe-triage",
                     "--name": "pe-triage-retraining", "--slices-store": "s3://hospital-data/slices",
                     "--namespace": NAMESPACE}
    assert args[-1] == "--dry-run"  # schedule.extraArgs
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["config"] == "/etc/pe-triage"
    config_volume = next(v for v in spec["volumes"] if v["name"] == "config")
    assert config_volume["configMap"]["name"] == "t-pe-triage-config"
    env = env_of(c)
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://t-pe-triage-mlflow.ml.svc.cluster.local:5000"
    assert env["PE_TRIAGE_CLUSTER_CONFIG"]["value"] == "/etc/pe-triage/cluster.yaml"
    # multi-user Kubeflow: a KFP-audience token and the RoleBinding that authorises it
    token = next(v for v in spec["volumes"] if v["name"] == "kfp-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    assert env["KF_PIPELINES_SA_TOKEN_PATH"]["value"] == "/var/run/secrets/kubeflow/pipelines/token"
    binding = find(docs, "RoleBinding", "-scheduler-kfp")
    assert binding["roleRef"]["name"] == "kubeflow-pipelines-edit"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": spec["serviceAccountName"], "namespace": NAMESPACE}]


def test_single_user_kfp_needs_no_rbac_token_or_namespace(render):
    docs = render()
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding", "ClusterRoleBinding")]
    spec = find(docs, "Job", "-schedule")["spec"]["template"]["spec"]
    assert "kfp-token" not in {v["name"] for v in spec["volumes"]}
    assert "--namespace" not in spec["containers"][0]["args"]


def test_schedule_arguments_parse_with_the_cli(render):
    """The Job's command line is accepted by the real `pe-triage pipeline schedule` parser."""
    pytest.importorskip("pe_triage_pipelines.cli", reason="the pipelines package is not installed")
    from pe_triage.cli import build_parser

    for values in (None, GPU):
        c = find(render(values), "Job", "-schedule")["spec"]["template"]["spec"]["containers"][0]
        extra = (values or {}).get("schedule", {}).get("extraArgs", [])
        argv = c["command"][1:] + [a for a in c["args"] if a not in extra]
        args = build_parser().parse_args(argv)
        assert args.cron.split()[0] == "0" and len(args.cron.split()) == 6
        assert args.slices_store.startswith("s3://")


def test_cluster_config_is_what_the_pipelines_read(render):
    """cluster.yaml round-trips through the pipelines' ClusterOptions: images, GPUs, secret names."""
    cluster = pytest.importorskip("pe_triage_pipelines.cluster", reason="the pipelines package is not installed")
    docs = render({**GPU, **{"s3": {"existingSecret": "s3-creds", "endpointUrl": "https://s3.example.org"}}})
    raw = yaml.safe_load(find(docs, "ConfigMap", "-config")["data"]["cluster.yaml"])
    options = cluster.ClusterOptions.from_cluster_config(raw)
    assert options.cpu_image == f"ghcr.io/pe-triage/pe-triage:{VERSION}"
    assert options.cuda_image == f"ghcr.io/pe-triage/pe-triage-cuda:{VERSION}"
    assert (options.accelerator, options.gpus) == ("nvidia.com/gpu", 4)
    assert dict(options.gpu_node_selector) == GPU["gpu"]["nodeSelector"]
    assert list(options.gpu_tolerations) == GPU["gpu"]["tolerations"]
    assert options.pseudonym_key.name == "pe-triage-pseudonym-key"
    assert options.s3.name == "s3-creds" and options.mlflow.name == "mlflow-pipelines"
    assert options.env["AWS_ENDPOINT_URL"] == "https://s3.example.org"


def test_configmap_holds_a_loadable_pipeline_config_and_gpu_settings(render):
    docs = render(GPU)
    data = find(docs, "ConfigMap", "-config")["data"]
    config = yaml.safe_load(data["config.yaml"])
    assert config == GPU["config"]
    parsed = from_dict(Config, config)  # what `pe-triage ... --config` will do
    assert parsed.train.epochs == 12 and parsed.registry.model_name == "pe-triage-h1"
    cluster = yaml.safe_load(data["cluster.yaml"])
    assert cluster["gpu"] == {**GPU["gpu"], "evaluate": False}
    assert cluster["images"] == {"cpu": f"ghcr.io/pe-triage/pe-triage:{VERSION}",
                                 "cuda": f"ghcr.io/pe-triage/pe-triage-cuda:{VERSION}"}
    assert cluster["mlflowTrackingUri"] == "http://t-pe-triage-mlflow.ml.svc.cluster.local:5000"
    # default: an empty config = the package defaults
    default = yaml.safe_load(find(render(), "ConfigMap", "-config")["data"]["config.yaml"])
    assert from_dict(Config, default) == Config()


def test_network_policies(render):
    docs = render()
    pg = find(docs, "NetworkPolicy", "-postgresql")["spec"]
    assert pg["egress"] == []
    (rule,) = pg["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "pe-triage", "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": component}}} for component in ("mlflow", "mlflow-migration")]
    mlflow = find(docs, "NetworkPolicy", "-mlflow")["spec"]
    assert mlflow["policyTypes"] == ["Ingress", "Egress"]
    assert mlflow["ingress"][0]["ports"] == [{"port": "http", "protocol": "TCP"}]
    scheduler = find(docs, "NetworkPolicy", "-scheduler")["spec"]
    assert scheduler["ingress"] == []
    ports = {p["port"] for rule in scheduler["egress"] for p in rule["ports"]}
    assert ports == {53, 8888}


def test_values_and_chart_metadata_pass_yamllint():
    config = ("{extends: default, rules: {line-length: {max: 120}, document-start: disable, "
              "comments: {min-spaces-from-content: 1}}}")
    proc = subprocess.run([str(Path(sys.executable).parent / "yamllint"), "-s", "-d", config,
                           str(CHART / "values.yaml"), str(CHART / "Chart.yaml")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_chart_versions_match_the_package_and_images():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == VERSION
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["repository"] == "ghcr.io/pe-triage/pe-triage"
    assert values["cudaImage"]["repository"] == "ghcr.io/pe-triage/pe-triage-cuda"
    mlflow_pin = next(line.split("==")[1] for line in (ROOT / "images/mlflow/requirements.txt").read_text().splitlines()
                      if line.startswith("mlflow=="))
    assert values["mlflow"]["image"]["tag"] == mlflow_pin


def test_schema_config_sections_match_the_config_dataclass():
    schema = json.loads((CHART / "values.schema.json").read_text())
    sections = set(schema["properties"]["config"]["propertyNames"]["enum"])
    assert sections == {f.name for f in dataclasses.fields(Config)}


# values -> the JSON pointer the schema error must name
INVALID = {
    "unknown top-level key": ({"mlfow": {"enabled": True}}, "additional properties 'mlfow'"),
    "zero workers": ({"mlflow": {"workers": 0}}, "/mlflow/workers"),
    "five-field cron": ({"schedule": {"cron": "0 2 * * 0"}}, "/schedule/cron"),
    "cron word": ({"schedule": {"cron": "@daily"}}, "/schedule/cron"),
    "no database at all": ({"postgresql": {"enabled": False}}, "/externalDatabase/existingSecret"),
    "two databases": ({"externalDatabase": {"existingSecret": "mlflow-db"}}, "/externalDatabase/existingSecret"),
    "root pods": ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    "privilege escalation": ({"securityContext": {"allowPrivilegeEscalation": True}},
                             "/securityContext/allowPrivilegeEscalation"),
    "added capability": ({"securityContext": {"capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}}},
                         "/securityContext/capabilities/add"),
    "short pseudonym key": ({"pseudonymKey": {"create": True, "value": "short"}}, "/pseudonymKey/value"),
    "no pseudonym key secret": ({"pseudonymKey": {"existingSecret": ""}}, "/pseudonymKey/existingSecret"),
    "unknown config section": ({"config": {"trian": {"epochs": 3}}}, "invalid propertyName 'trian'"),
    "bad toleration": ({"gpu": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Maybe"}]}},
                       "/gpu/tolerations/0/operator"),
    "negative gpus": ({"gpu": {"count": -1}}, "/gpu/count"),  # 0 is valid: training on a CPU pod
    "auth off without saying so": ({"mlflow": {"auth": {"enabled": False}}}, "/mlflow/auth/allowUnauthenticated"),
    "client namespace not a name": ({"networkPolicy": {"clientNamespaces": ["Kubeflow User"]}},
                                    "/networkPolicy/clientNamespaces/0"),
    "relative slices store": ({"schedule": {"slicesStore": "data/slices"}}, "/schedule/slicesStore"),
    "auth on external db without its config": (
        {"postgresql": {"enabled": False}, "externalDatabase": {"existingSecret": "mlflow-db"},
         "mlflow": {"auth": {"enabled": True, "existingSecret": "mlflow-admin", "pipelineSecret": "p"}}},
        "/mlflow/auth/configSecret"),
    "bad pull policy": ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    "artifacts without scheme": ({"mlflow": {"artifactsDestination": "my-bucket/artifacts"}},
                                 "/mlflow/artifactsDestination"),
    "bad kfp host": ({"schedule": {"kfpHost": "ml-pipeline:8888"}}, "/schedule/kfpHost"),
    "bad secret name": ({"s3": {"existingSecret": "S3_Creds"}}, "/s3/existingSecret"),
    "bad volume size": ({"postgresql": {"persistence": {"size": "ten gigs"}}}, "/postgresql/persistence/size"),
    "s3 secret without values": ({"s3": {"create": True}}, "/s3/accessKeyId"),
}


@pytest.mark.parametrize("name", INVALID)
def test_invalid_values_fail_at_install(helm, name):
    values, where = INVALID[name]
    proc = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION,
                values=values, check=False)
    assert proc.returncode != 0, f"{name}: rendered although invalid"
    assert "don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert where in proc.stderr, proc.stderr


def test_lint_strict_fails_on_invalid_values(helm):
    proc = helm("lint", "--strict", str(CHART), values=INVALID["five-field cron"][0], check=False)
    assert proc.returncode != 0 and "/schedule/cron" in proc.stdout + proc.stderr


# ---- issue 16: the registry is closed by default (auth, credentials from Secrets, NetworkPolicies) ----

#: the label the chart's NetworkPolicy admits to MLflow; pe_triage_pipelines.cluster sets it on pipeline pods
CLIENT_LABEL = "pe-triage.io/mlflow-client"
CLIENT_PEER = {"podSelector": {"matchLabels": {CLIENT_LABEL: "true"}}}
DNS_RULE = {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
            "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}


def _selector(component: str) -> dict:
    return {"matchLabels": {"app.kubernetes.io/name": "pe-triage", "app.kubernetes.io/instance": RELEASE,
                            "app.kubernetes.io/component": component}}


def _pods(docs: list[dict]) -> list[tuple[str, dict, dict]]:
    """(where, pod labels, pod spec) of every workload."""
    return [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["metadata"]["labels"], d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job", "CronJob", "DaemonSet")]


def _secret_ref(env: dict[str, dict], name: str) -> dict:
    assert "value" not in env[name], f"{name} in clear"
    return env[name]["valueFrom"]["secretKeyRef"]


def test_default_install_turns_auth_on_with_generated_credentials(render):
    docs = render()
    c = find(docs, "Deployment", "-mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert "--app-name=basic-auth" in c["args"] and "--serve-artifacts" in c["args"]
    env = env_of(c)
    assert _secret_ref(env, "MLFLOW_AUTH_ADMIN_PASSWORD") == {"name": "t-pe-triage-mlflow-auth", "key": "admin-password"}
    assert _secret_ref(env, "MLFLOW_FLASK_SERVER_SECRET_KEY") == {"name": "t-pe-triage-mlflow-auth", "key": "flask-secret-key"}
    admin = find(docs, "Secret", "-mlflow-auth")
    client = find(docs, "Secret", "-mlflow-client")
    for secret in (admin, client):  # random, kept across upgrades (lookup) and uninstall (the auth DB outlives it)
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    data = {k: base64.b64decode(v).decode() for k, v in {**admin["data"], **client["data"]}.items()}
    assert len(data["admin-password"]) == 32 and len(data["flask-secret-key"]) == 64
    assert data["MLFLOW_TRACKING_USERNAME"] == "pe-triage-pipeline" and len(data["MLFLOW_TRACKING_PASSWORD"]) == 32
    cluster = yaml.safe_load(find(docs, "ConfigMap", "-config")["data"]["cluster.yaml"])
    assert cluster["secrets"]["mlflow"] == {"name": "t-pe-triage-mlflow-client", "usernameKey": "MLFLOW_TRACKING_USERNAME",
                                            "passwordKey": "MLFLOW_TRACKING_PASSWORD"}


@pytest.mark.parametrize("name", ["default", "external-db", "gpu-multiuser-auth"])
def test_credentials_reach_clients_only_through_secret_key_refs(render, name):
    docs = render(SCENARIOS[name])
    secrets = [d for d in docs if d["kind"] == "Secret"]
    assert {s["metadata"]["name"] for s in secrets} >= ({"t-pe-triage-mlflow-auth", "t-pe-triage-mlflow-client"}
                                                       if name == "default" else set())
    values = {base64.b64decode(v).decode() for s in secrets for v in s["data"].values()}
    values.discard("pe-triage-pipeline")  # a user name, not a credential
    others = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    assert not [v for v in values if v in others]  # no generated credential in a ConfigMap, an arg or an env value
    clients = [(where, spec) for where, labels, spec in _pods(docs) if labels.get(CLIENT_LABEL) == "true"]
    assert [where for where, _ in clients] == ["Job/t-pe-triage-mlflow-users"]
    for where, spec in clients:
        for c in spec["containers"]:
            env = env_of(c)
            assert not any("password" in a.lower() for a in c.get("args", []) + c["command"]), where
            # the admin logs in to create the pipeline's user; both passwords only from Secrets
            assert env["MLFLOW_TRACKING_USERNAME"]["value"] == "admin"
            assert _secret_ref(env, "MLFLOW_TRACKING_PASSWORD")["key"] == "admin-password"
            client = "t-pe-triage-mlflow-client" if name == "default" else "mlflow-pipelines"  # generated or named
            for var in ("PE_TRIAGE_MLFLOW_USERNAME", "PE_TRIAGE_MLFLOW_PASSWORD"):
                assert _secret_ref(env, var)["name"] == client, (where, var)
    # the scheduler only talks to the KFP API: no MLflow credentials, not admitted to MLflow
    (sched_labels, sched) = next((labels, spec) for where, labels, spec in _pods(docs) if where.endswith("-schedule"))
    assert CLIENT_LABEL not in sched_labels
    assert not {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} & set(env_of(sched["containers"][0]))


def test_pipeline_pods_carry_the_client_label_and_the_client_secret(render, tmp_path):
    """The compiled pipelines (from the chart's cluster.yaml) put every MLflow-using step in the
    NetworkPolicy's client group and give it the credentials from the chart's Secret (not optional)."""
    cluster = pytest.importorskip("pe_triage_pipelines.cluster", reason="the pipelines package is not installed")
    from pe_triage_pipelines.compile import compile_all

    assert cluster.MLFLOW_CLIENT_LABEL == CLIENT_LABEL
    raw = yaml.safe_load(find(render(), "ConfigMap", "-config")["data"]["cluster.yaml"])
    for path in compile_all(tmp_path, cluster.ClusterOptions.from_cluster_config(raw)).values():
        _, platform = yaml.safe_load_all(path.read_text())
        executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        mlflow_users = {label: ex for label, ex in executors.items()
                        if any(s["secretName"] == "t-pe-triage-mlflow-client" for s in ex.get("secretAsEnv", []))}
        assert mlflow_users, path.name
        for label, ex in mlflow_users.items():
            assert ex["podMetadata"]["labels"][CLIENT_LABEL] == "true", label
            (secret,) = [s for s in ex["secretAsEnv"] if s["secretName"] == "t-pe-triage-mlflow-client"]
            assert secret["optional"] is False, label
            assert {e["envVar"] for e in secret["keyToEnv"]} == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}


def test_mlflow_admits_only_labelled_client_pods(render):
    policy = find(render(), "NetworkPolicy", "-mlflow")["spec"]
    (rule,) = policy["ingress"]
    assert rule["from"] == [CLIENT_PEER]  # not `podSelector: {}` (every pod of the namespace)
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    docs = render({"networkPolicy": {"clientNamespaces": ["kubeflow-user"]}})
    (rule,) = find(docs, "NetworkPolicy", "-mlflow")["spec"]["ingress"]
    assert rule["from"] == [CLIENT_PEER, {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow-user"}},
                                          **CLIENT_PEER}]


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_pod_of_the_chart_is_fenced_in_both_directions(render, name):
    docs = render(SCENARIOS[name])
    policies = [d["spec"] for d in docs if d["kind"] == "NetworkPolicy"]
    for where, labels, _ in _pods(docs):
        covering = [p for p in policies if p["podSelector"]["matchLabels"].items() <= labels.items()]
        if name == "minimal":
            assert not covering
            continue
        assert len(covering) == 1, where
        assert covering[0]["policyTypes"] == ["Ingress", "Egress"], where


def test_egress_is_what_each_pod_needs(render):
    docs = render()
    mlflow = find(docs, "NetworkPolicy", "-mlflow")["spec"]["egress"]
    assert mlflow == [DNS_RULE,
                      {"to": [{"podSelector": _selector("postgresql")}], "ports": [{"port": 5432, "protocol": "TCP"}]},
                      {"ports": [{"port": 443, "protocol": "TCP"}, {"port": 9000, "protocol": "TCP"}]}]
    scheduler = find(docs, "NetworkPolicy", "-scheduler")["spec"]
    assert scheduler["ingress"] == []
    assert scheduler["egress"] == [DNS_RULE, {
        "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow"}},
                "podSelector": {"matchLabels": {"app": "ml-pipeline"}}}],
        "ports": [{"port": 8888, "protocol": "TCP"}]}]
    users = find(docs, "NetworkPolicy", "-mlflow-users")["spec"]
    assert users["ingress"] == []
    assert users["egress"] == [DNS_RULE, {"to": [{"podSelector": _selector("mlflow")}],
                                          "ports": [{"port": 5000, "protocol": "TCP"}]}]
    # narrower peers for the object store and an external database, when the operator knows them
    s3_peer = {"ipBlock": {"cidr": "10.20.0.0/16"}}
    db_peer = {"ipBlock": {"cidr": "10.30.0.5/32"}}
    docs = render({**EXTERNAL_DB, "networkPolicy": {"s3To": [s3_peer], "databaseTo": [db_peer], "dnsTo": []}})
    egress = find(docs, "NetworkPolicy", "-mlflow")["spec"]["egress"]
    assert egress == [{"ports": DNS_RULE["ports"]}, {"to": [db_peer], "ports": [{"port": 5432, "protocol": "TCP"}]},
                      {"to": [s3_peer], "ports": [{"port": 443, "protocol": "TCP"}, {"port": 9000, "protocol": "TCP"}]}]


def test_turning_auth_off_is_an_explicit_choice(helm, render):
    proc = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION,
                values={"mlflow": {"auth": {"enabled": False}}}, check=False)
    assert proc.returncode != 0, "auth turned off without mlflow.auth.allowUnauthenticated"
    assert "/mlflow/auth/allowUnauthenticated" in proc.stderr, proc.stderr
    docs = render(AUTH_OFF)
    c = find(docs, "Deployment", "-mlflow")["spec"]["template"]["spec"]["containers"][0]
    # no artifact proxy without auth: clients reach the object store with their own credentials
    assert "--no-serve-artifacts" in c["args"] and "--serve-artifacts" not in c["args"]
    assert "--default-artifact-root=s3://pe-triage-mlflow/artifacts" in c["args"]
    assert not any(a.startswith(("--app-name", "--artifacts-destination")) for a in c["args"])
    names = {d["metadata"]["name"] for d in docs}
    assert not names & {"t-pe-triage-mlflow-auth", "t-pe-triage-mlflow-client", "t-pe-triage-mlflow-users"}
    assert "mlflow" not in yaml.safe_load(find(docs, "ConfigMap", "-config")["data"]["cluster.yaml"])["secrets"]
    (rule,) = find(docs, "NetworkPolicy", "-mlflow")["spec"]["ingress"]
    assert rule["from"] == [CLIENT_PEER]  # still only the labelled clients
    assert all("to" in r for r in find(docs, "NetworkPolicy", "-mlflow")["spec"]["egress"])  # no object store egress


def _resolve_env(container: dict, secrets: dict[str, dict]) -> dict[str, str]:
    """A container's environment as Kubernetes would give it, from the rendered Secrets."""
    out = {}
    for e in container.get("env", []):
        if "value" in e:
            out[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            out[e["name"]] = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
    return out


def _status(url: str, method: str = "GET", auth: tuple[str, str] | None = None, body: bytes | None = None) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
def test_the_charts_mlflow_server_refuses_unauthenticated_calls(render, tmp_path, monkeypatch):
    """The chart's own server arguments, auth config and user bootstrap, on a real `mlflow server`
    (SQLite instead of PostgreSQL, a folder instead of S3): the REST and artifact APIs refuse callers
    without credentials (401), the pipeline user works but is no admin, /health stays open for probes."""
    from pe_triage.registry.server import free_port

    docs = render()
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    server = find(docs, "Deployment", "-mlflow")["spec"]["template"]["spec"]["containers"][0]
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    replace = {"--host": "127.0.0.1", "--port": str(port), "--workers": "1",
               "--artifacts-destination": str(tmp_path / "artifacts")}
    args = [f"{a.split('=')[0]}={replace[a.split('=')[0]]}" if a.split("=")[0] in replace else a for a in server["args"]]
    ini = find(docs, "ConfigMap", "-mlflow-auth")["data"]["basic_auth.ini"]
    (tmp_path / "basic_auth.ini").write_text("\n".join(
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}" if line.startswith("database_uri") else line
        for line in ini.splitlines()))
    env = _resolve_env({"env": [e for e in server["env"] if e["name"] != "PGPASSWORD"]}, secrets)
    env |= {"MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"), "HOME": str(tmp_path),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow = str(Path(sys.executable).parent / "mlflow")
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen([mlflow, *server["command"][1:], *args], env={**os.environ, **env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        users_job = find(docs, "Job", "-mlflow-users")["spec"]["template"]["spec"]["containers"][0]
        script = find(docs, "ConfigMap", "-mlflow-users")["data"]["create_user.py"]
        (tmp_path / "create_user.py").write_text(script)
        job_env = _resolve_env(users_job, secrets) | {"MLFLOW_TRACKING_URI": uri}
        for _ in range(2):  # install, then upgrade: the user exists and keeps the Secret's password
            run = subprocess.run([sys.executable, str(tmp_path / "create_user.py")], env={**os.environ, **job_env},
                                 capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "server.log").read_text()[-3000:]
            assert job_env["PE_TRIAGE_MLFLOW_PASSWORD"] not in run.stdout + run.stderr
            assert job_env["MLFLOW_TRACKING_PASSWORD"] not in run.stdout + run.stderr
        client = secrets["t-pe-triage-mlflow-client"]["data"]
        pipeline = tuple(base64.b64decode(client[k]).decode() for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))
        api = f"{uri}/api/2.0/mlflow"
        assert _status(f"{uri}/health") == 200
        created = json.dumps({"name": "pe-triage"}).encode()
        assert _status(f"{api}/experiments/create", "POST", body=created) == 401
        assert _status(f"{api}/experiments/create", "POST", auth=(pipeline[0], "wrong"), body=created) == 401
        assert _status(f"{api}/experiments/create", "POST", auth=pipeline, body=created) == 200
        from mlflow import MlflowClient

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", pipeline[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", pipeline[1])
        tracking = MlflowClient(uri)
        run_info = tracking.create_run(tracking.get_experiment_by_name("pe-triage").experiment_id).info
        artifact = (f"{uri}/api/2.0/mlflow-artifacts/artifacts/{run_info.experiment_id}/{run_info.run_id}"
                    "/artifacts/model/python_model.pkl")
        assert _status(artifact, "PUT", body=b"crafted") == 401  # the issue's PUT of a hostile pickle
        assert _status(artifact, "PUT", auth=pipeline, body=b"model") == 200
        assert _status(artifact) == 401
        assert _status(artifact, auth=pipeline) == 200
        alias = json.dumps({"name": "pe-triage", "alias": "champion", "version": "1"}).encode()
        assert _status(f"{api}/registered-models/alias", "POST", body=alias) == 401
        # the pipeline user is no admin: it cannot create users or grant itself anything
        user = json.dumps({"username": "mallory", "password": "x" * 24}).encode()
        assert _status(f"{api}/users/create", "POST", auth=pipeline, body=user) == 403
        admin = (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"])
        assert _status(f"{api}/users/create", "POST", auth=admin, body=user) == 200
        # another user may read (defaultPermission READ) but not overwrite the pipeline's model files
        assert _status(artifact, auth=("mallory", "x" * 24)) == 200
        assert _status(artifact, "PUT", auth=("mallory", "x" * 24), body=b"crafted") == 403
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_pipeline_user_cannot_be_the_admin(helm):
    proc = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION,
                values={"mlflow": {"auth": {"pipelineUsername": "admin"}}}, check=False)
    assert proc.returncode != 0 and "pipelineUsername must differ from mlflow.auth.adminUsername" in proc.stderr
