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
SCENARIOS = {"default": None, "external-db": EXTERNAL_DB, "gpu-multiuser-auth": GPU,
             "created-secrets": CREATED_SECRETS, "minimal": MINIMAL}


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
    assert not any(a.startswith("--app-name") for a in args)
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
    assert set(secrets) == {"t-pe-triage-pseudonym", "t-pe-triage-s3", "t-pe-triage-postgresql"}
    values = ["pseudonym-key-value-0123456789", "AKIATESTVALUE", "s3-secret-value-xyz", "pg-password-value-42"]
    for v in values:
        assert v not in out  # not in clear anywhere, ConfigMaps and args included
    stored = {base64.b64decode(x).decode() for s in secrets.values() for x in s["data"].values()}
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
    assert cluster["gpu"] == GPU["gpu"]
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
        "app.kubernetes.io/component": "mlflow"}}}]
    mlflow = find(docs, "NetworkPolicy", "-mlflow")["spec"]
    assert mlflow["policyTypes"] == ["Ingress", "Egress"]
    assert mlflow["ingress"][0]["ports"] == [{"port": "http", "protocol": "TCP"}]
    scheduler = find(docs, "NetworkPolicy", "-scheduler")["spec"]
    assert scheduler["ingress"] == []
    ports = {p["port"] for rule in scheduler["egress"] for p in rule["ports"]}
    assert ports == {53, 8888, 443}


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
    "zero gpus": ({"gpu": {"count": 0}}, "/gpu/count"),
    "auth without secret": ({"mlflow": {"auth": {"enabled": True}}}, "/mlflow/auth/existingSecret"),
    "auth without pipeline credentials": ({"mlflow": {"auth": {"enabled": True, "existingSecret": "mlflow-admin"}}},
                                          "/mlflow/auth/pipelineSecret"),
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
