"""The DICOM node in the chart (issue 19, item 4): `listener.enabled` renders a Deployment (one pod,
Recreate), a Service on the DICOM port, the spool's PersistentVolumeClaim and a NetworkPolicy
admitting the configured peers only, running `pe-triage listen` locked down like the triage service.
Every scenario lints strictly and validates against the Kubernetes 1.32 schemas."""

from __future__ import annotations

import kubernetes_validate
import pytest
import test_chart as chart

helm = chart.helm
render = chart.render
find, env_of = chart.find, chart.env_of
CHART, NAMESPACE, RELEASE, KUBE_VERSION = chart.CHART, chart.NAMESPACE, chart.RELEASE, chart.KUBE_VERSION

NAME = f"{RELEASE}-pe-triage-listener"
SELECTOR = {"app.kubernetes.io/name": "pe-triage", "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": "listener"}
PACS_PEER = {"ipBlock": {"cidr": "10.20.0.0/24"}}
LISTEN = {"listen": {"ae_title": "PE-TRIAGE", "allowed_calling_aes": ["PACS01"], "destination_ae": "PACS01",
                     "destination_host": "pacs.hospital.example", "destination_port": 104}}
ON = {"listener": {"enabled": True, "ingressFrom": [PACS_PEER]}, "config": LISTEN}
OUTSIDE = {"listener": {"enabled": True, "ingressFrom": [PACS_PEER], "destinationTo": [PACS_PEER],
                        "destinationPorts": [104], "service": {"type": "LoadBalancer", "port": 104},
                        "spool": {"existingClaim": "pacs-spool", "size": "10Gi"}},
           "inference": {"enabled": True}, "config": LISTEN}
SCENARIOS = {"on": ON, "outside-existing-claim": OUTSIDE,
             "no-network-policy": {**ON, "networkPolicy": {"enabled": False}}}


def container(docs: list[dict]) -> dict:
    (c,) = find(docs, "Deployment", "-listener")["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("name", SCENARIOS)
def test_lint_strict(helm, name):
    helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION,
         values=SCENARIOS[name])


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_manifest_validates(render, name):
    docs = render(SCENARIOS[name])
    assert [d for d in docs if d["metadata"]["name"] == NAME]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("values", [None, chart.MINIMAL], ids=["default", "minimal"])
def test_off_by_default(render, values):
    assert not [d for d in render(values) if "listener" in d["metadata"]["name"]]


@pytest.mark.parametrize(("values", "message"), [
    ({"listener": {"enabled": True, "ingressFrom": [PACS_PEER]}}, "config.listen.allowed_calling_aes"),
    ({"listener": {"enabled": True}, "config": LISTEN}, "listener.ingressFrom"),
])
def test_an_open_node_does_not_render(helm, values, message):
    proc = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, values=values, check=False)
    assert proc.returncode != 0 and message in proc.stderr


def test_the_pod_runs_listen_locked_down_on_a_persistent_spool(render):
    docs = render(ON)
    deployment = find(docs, "Deployment", "-listener")
    spec = deployment["spec"]["template"]["spec"]
    c = container(docs)
    assert c["command"] == ["pe-triage", "listen"]
    assert c["args"] == ["--model", "models:/pe-triage@champion", "--host", "0.0.0.0", "--port", "11112",
                         "--spool", "/var/lib/pe-triage/spool", "--device", "cpu", "--config", "/etc/pe-triage/config.yaml"]
    assert c["ports"] == [{"name": "dicom", "containerPort": 11112, "protocol": "TCP"}]
    assert c["readinessProbe"]["tcpSocket"] == c["livenessProbe"]["tcpSocket"] == {"port": "dicom"}
    # one pod on one spool, ever: Recreate, not a rolling update
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claim = find(docs, "PersistentVolumeClaim", "-listener-spool")
    assert volumes[mounts["/var/lib/pe-triage/spool"]]["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    for path in ("/tmp", "/home/pe/.cache"):
        assert "emptyDir" in volumes[mounts[path]], path
    assert env_of(c)["MLFLOW_TRACKING_URI"]["value"] == f"http://{RELEASE}-pe-triage-mlflow.{NAMESPACE}.svc.cluster.local:5000"
    # the read-only MLflow user of the triage service, made for the listener alone too
    assert chart._secret_ref(env_of(c), "MLFLOW_TRACKING_PASSWORD")["name"].endswith("-mlflow-inference")
    config = find(docs, "ConfigMap", "-config")["data"]["config.yaml"]
    assert "allowed_calling_aes:\n  - PACS01" in config


def test_an_existing_claim_and_a_load_balancer(render):
    docs = render(OUTSIDE)
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim" and "listener" in d["metadata"]["name"]]
    spool = next(v for v in find(docs, "Deployment", "-listener")["spec"]["template"]["spec"]["volumes"]
                 if v["name"] == "spool")
    assert spool["persistentVolumeClaim"] == {"claimName": "pacs-spool"}
    service = find(docs, "Service", "-listener")["spec"]
    assert service["type"] == "LoadBalancer"
    assert service["ports"] == [{"name": "dicom", "port": 104, "targetPort": "dicom", "protocol": "TCP"}]
    assert service["selector"] == SELECTOR


def test_network_policy_admits_the_peers_on_the_dicom_port_only(render):
    docs = render(ON)
    policy = find(docs, "NetworkPolicy", "-listener")["spec"]
    assert policy["podSelector"] == {"matchLabels": SELECTOR} and policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == [{"from": [PACS_PEER], "ports": [{"port": 11112, "protocol": "TCP"}]}]
    assert policy["egress"][:2] == [chart.DNS_RULE, {"to": [{"podSelector": chart._selector("mlflow")}],
                                                     "ports": [{"port": 5000, "protocol": "TCP"}]}]
    assert policy["egress"][-1] == {"ports": [{"port": p, "protocol": "TCP"} for p in (104, 11112, 443)]}
    narrowed = find(render(OUTSIDE), "NetworkPolicy", "-listener")["spec"]["egress"][-1]
    assert narrowed == {"to": [PACS_PEER], "ports": [{"port": 104, "protocol": "TCP"}]}
    # MLflow's own policy admits the listener pod
    pod_labels = find(docs, "Deployment", "-listener")["spec"]["template"]["metadata"]["labels"]
    (mlflow_rule,) = find(docs, "NetworkPolicy", "-mlflow")["spec"]["ingress"]
    assert any(peer.keys() == {"podSelector"} and peer["podSelector"]["matchLabels"].items() <= pod_labels.items()
               for peer in mlflow_rule["from"])
