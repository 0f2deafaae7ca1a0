"""The compiled pipelines (KFP IR YAML, parsed back): task graphs, ParallelFor, dsl.If, the exit
handler, GPU requests and scheduling, secrets wired as environment variables (never parameters),
versioned images with nothing installed at run time, retries and caching; the CLI that compiles,
submits and schedules (tests/pipelines/test_submit.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp.components import load_component_from_file
from kfp.pipeline_spec import pipeline_spec_pb2
from pe_triage_pipelines.cluster import ClusterOptions
from pe_triage_pipelines.compile import compile_all

from pe_triage import __version__
from pe_triage.cli import main

IO_TASKS = {"convert-labels", "ingest", "data-quality", "dataset-version", "check-trigger", "preprocess", "split", "evaluate",
            "train-exam",
            "register", "evaluate-champion", "promote", "record-outcome", "loso-folds", "loso-summary"}
UNCACHED = {"convert-labels", "ingest", "data-quality", "dataset-version", "check-trigger", "evaluate-champion", "promote",
            "record-outcome"}
SECRETISH = ("key", "secret", "password", "token", "credential")


def _load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _tasks(spec: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every task of the pipeline, nested DAGs included: name -> (enclosing component, task spec)."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}

    def walk(component: str, dag: dict[str, Any]) -> None:
        for name, task in dag["tasks"].items():
            found[name] = (component, task)
            ref = spec["components"][task["componentRef"]["name"]]
            if "dag" in ref:
                walk(task["componentRef"]["name"], ref["dag"])

    walk("root", spec["root"]["dag"])
    return found


def _executor(spec: dict[str, Any], task: dict[str, Any]) -> str:
    return spec["components"][task["componentRef"]["name"]]["executorLabel"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return compile_all(tmp_path_factory.mktemp("ir"))


def test_both_pipelines_compile_and_load_back(compiled: dict[str, Path]) -> None:
    assert set(compiled) == {"onboarding", "retraining"}
    for name, path in compiled.items():
        assert load_component_from_file(str(path)).name == f"pe-triage-{name}"
        spec, _ = yaml.safe_load_all(path.read_text())
        proto = pipeline_spec_pb2.PipelineSpec()
        from google.protobuf import json_format

        json_format.ParseDict(spec, proto)
        assert proto.pipeline_info.name == f"pe-triage-{name}"


def test_onboarding_fans_out_over_sites_ingest_then_quality(compiled: dict[str, Path]) -> None:
    spec, _ = _load(compiled["onboarding"])
    tasks = _tasks(spec)
    loop_component, loop = tasks["for-loop-1"]
    assert loop_component == "root" and loop["taskInfo"]["name"] == "sites"
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--sites"
    assert loop["iteratorPolicy"]["parallelismLimit"] == ClusterOptions().parallel_sites
    assert {n for n, (parent, _) in tasks.items() if parent == "comp-for-loop-1"} == {"convert-labels", "ingest", "data-quality"}
    assert tasks["ingest"][1]["dependentTasks"] == ["convert-labels"]  # ingest reads the manifest it returns
    assert tasks["ingest"][1]["inputs"]["parameters"]["labels"]["taskOutputParameter"]["producerTask"] == "convert-labels"
    convert = tasks["convert-labels"][1]["inputs"]["parameters"]
    assert convert["labels"]["parameterExpressionSelector"] == 'parseJson(string_value)["labels"]'
    assert convert["labels_format"]["componentInputParameter"] == "pipelinechannel--labels_format"
    assert spec["root"]["inputDefinitions"]["parameters"]["labels_format"]["defaultValue"] == "manifest"
    assert tasks["data-quality"][1]["dependentTasks"] == ["ingest"]
    assert tasks["data-quality"][1]["inputs"]["artifacts"]["slices"]["taskOutputArtifact"]["producerTask"] == "ingest"
    selectors = {k: v["parameterExpressionSelector"] for k, v in tasks["ingest"][1]["inputs"]["parameters"].items()
                 if "parameterExpressionSelector" in v}
    assert selectors == {k: f'parseJson(string_value)["{k}"]' for k in ("site", "source")}


def test_retraining_graph(compiled: dict[str, Path]) -> None:
    spec, _ = _load(compiled["retraining"])
    tasks = _tasks(spec)
    deps = {name: set(task.get("dependentTasks", [])) for name, (_, task) in tasks.items()}
    inner = {name for name, (parent, _) in tasks.items() if parent == "comp-condition-2"}  # the retrain-warranted branch
    assert inner == {"importer", "preprocess", "split", "train", "train-2", "calibrate", "train-exam", "evaluate",
                     "register", "check-gates", "condition-4", "loso-folds", "for-loop-3", "loso-summary"}
    # inside the retrain-warranted branch the store's digest arrives as the branch's input, not a dependency
    assert deps["importer"] == set() and deps["preprocess"] == {"importer"}
    digest = tasks["preprocess"][1]["inputs"]["parameters"]["slices_digest"]
    assert digest == {"componentInputParameter": "pipelinechannel--dataset-version-Output"}
    assert deps["split"] == {"preprocess"}
    assert deps["train"] == deps["train-2"] == {"preprocess", "split"}  # the two stages train in parallel
    assert {tasks[t][1]["inputs"]["parameters"]["stage"]["runtimeValue"]["constant"] for t in ("train", "train-2")} == {1, 2}
    assert deps["calibrate"] == {"preprocess", "split", "train", "train-2"}  # one operating point for the pair
    assert deps["train-exam"] == {"preprocess", "split", "calibrate"}  # over the calibrated pair
    assert deps["evaluate"] == {"preprocess", "split", "calibrate", "train-exam"}
    # what is registered is what was evaluated, with its leave-one-site-out summary
    assert deps["register"] == {"evaluate", "calibrate", "loso-summary", "train-exam"}
    assert deps["check-gates"] == {"evaluate", "register", "loso-summary"}
    condition = tasks["condition-4"][1]
    assert condition["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--check-gates-Output'] == true"
    assert tasks["promote"][0] == "comp-condition-4"  # promote runs only inside the gates-passed branch
    importer = spec["deploymentSpec"]["executors"]["exec-importer"]["importer"]
    assert importer["typeSchema"]["schemaTitle"] == "system.Dataset" and "digest" in importer["metadata"]
    assert "reimport" not in importer  # the store is one artifact, versioned by its digest


def test_the_exam_model_is_trained_on_the_calibrated_pair_then_evaluated_and_registered(compiled: dict[str, Path]) -> None:
    spec, _ = _load(compiled["retraining"])
    tasks = _tasks(spec)
    exam = tasks["train-exam"][1]
    assert exam["taskInfo"]["name"] == "train exam model"
    assert {k: v["taskOutputArtifact"] for k, v in exam["inputs"]["artifacts"].items() if k.startswith("stage")} == {
        f"stage{n}": {"producerTask": "calibrate", "outputArtifactKey": f"calibrated_stage{n}"} for n in (1, 2)}
    assert exam["inputs"]["parameters"]["config"]["componentInputParameter"] == "pipelinechannel--config"
    for consumer in ("evaluate", "register"):
        given = tasks[consumer][1]["inputs"]["artifacts"]["exam"]["taskOutputArtifact"]
        assert given == {"producerTask": "train-exam", "outputArtifactKey": "exam"}, consumer
        definition = spec["components"][tasks[consumer][1]["componentRef"]["name"]]["inputDefinitions"]["artifacts"]["exam"]
        assert definition["isOptional"] is True, f"{consumer} runs without an exam model too"
    resources = spec["deploymentSpec"]["executors"][_executor(spec, exam)]["container"]["resources"]
    assert "accelerator" not in resources, "the embedding runs on CPU threads: no GPU held idle"
    image = spec["deploymentSpec"]["executors"][_executor(spec, exam)]["container"]["image"]
    assert image == ClusterOptions().cpu_image


def test_retraining_trains_only_when_the_trigger_says_so_and_force_is_a_parameter(compiled: dict[str, Path]) -> None:
    spec, _ = _load(compiled["retraining"])
    tasks = _tasks(spec)
    assert {n for n, (parent, _) in tasks.items() if parent == "comp-exit-handler-1"} == {
        "dataset-version", "check-trigger", "condition-2"}
    trigger = tasks["check-trigger"][1]
    assert trigger["dependentTasks"] == ["dataset-version"]
    params = trigger["inputs"]["parameters"]
    assert params["slices_digest"]["taskOutputParameter"]["producerTask"] == "dataset-version"
    assert params["force"]["componentInputParameter"] == "pipelinechannel--force"
    assert spec["root"]["inputDefinitions"]["parameters"]["force"] == {
        "defaultValue": False, "isOptional": True, "parameterType": "BOOLEAN"}
    warranted = tasks["condition-2"][1]
    assert warranted["taskInfo"]["name"] == "retrain-warranted"
    assert warranted["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--check-trigger-Output'] == true")
    assert {"train", "train-2", "register", "promote"} <= {n for n, (parent, _) in tasks.items()
                                                          if parent.startswith("comp-condition-")}
    job = "{{$.pipeline_job_uuid}}"  # the trigger's decision and the outcome run name the same pipeline run
    assert params["job"]["runtimeValue"]["constant"] == job
    assert tasks["record-outcome"][1]["inputs"]["parameters"]["job"]["runtimeValue"]["constant"] == job


def test_exit_handler_records_the_outcome_whatever_happened(compiled: dict[str, Path]) -> None:
    spec, _ = _load(compiled["retraining"])
    parent, outcome = _tasks(spec)["record-outcome"]
    assert parent == "root" and outcome["dependentTasks"] == ["exit-handler-1"]
    assert outcome["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert outcome["inputs"]["parameters"]["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}


def test_training_requests_gpus_on_gpu_nodes(compiled: dict[str, Path]) -> None:
    spec, executors = _load(compiled["retraining"])
    options = ClusterOptions()
    for name in ("train", "train-2"):
        label = _executor(spec, _tasks(spec)[name][1])
        resources = spec["deploymentSpec"]["executors"][label]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu" and resources["accelerator"]["resourceCount"] == "1"
        assert resources["resourceCpuRequest"] == options.train_cpu and resources["resourceMemoryRequest"] == options.train_memory
        assert executors[label]["nodeSelector"] == {"labels": {"nvidia.com/gpu.present": "true"}}
        assert executors[label]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    cpu_only = [label for label, ex in spec["deploymentSpec"]["executors"].items()
                if "container" in ex and "accelerator" in ex["container"].get("resources", {})]
    assert sorted(cpu_only) == ["exec-loso-fold", "exec-train", "exec-train-2"]


def test_secrets_come_from_kubernetes_never_from_parameters(compiled: dict[str, Path]) -> None:
    for name, path in compiled.items():
        spec, executors = _load(path)
        definitions = spec["root"]["inputDefinitions"]["parameters"]
        params = set(definitions)
        assert params == ({"sites", "slices_store", "config", "tracking_uri", "demo_key", "labels_format"} if name == "onboarding"
                          else {"slices_store", "config", "tracking_uri", "actor", "truth", "force"})
        # a secret would be a string; demo_key is only the switch that allows the public demo key
        assert not [p for p, d in definitions.items() if d["parameterType"] == "STRING" and any(w in p for w in SECRETISH)]
        for label in spec["deploymentSpec"]["executors"]:
            if label == "exec-importer":
                continue
            env = {e["envVar"]: (s["secretName"], e["secretKey"], s["optional"])
                   for s in executors.get(label, {}).get("secretAsEnv", []) for e in s["keyToEnv"]}
            expected = {"AWS_ACCESS_KEY_ID": ("pe-triage-s3", "AWS_ACCESS_KEY_ID", True),
                        "AWS_SECRET_ACCESS_KEY": ("pe-triage-s3", "AWS_SECRET_ACCESS_KEY", True),
                        "MLFLOW_TRACKING_USERNAME": ("pe-triage-mlflow", "MLFLOW_TRACKING_USERNAME", True),
                        "MLFLOW_TRACKING_PASSWORD": ("pe-triage-mlflow", "MLFLOW_TRACKING_PASSWORD", True)}
            if label == "exec-ingest":  # only ingest sees the pseudonym key, and cannot start without it
                expected["PE_TRIAGE_PSEUDONYM_KEY"] = ("pe-triage-pseudonym-key", "pseudonym-key", False)
            if label == "exec-check-gates":  # reads its input artifact only
                expected = {}
            assert env == expected, label


def test_images_carry_the_package_version_and_nothing_is_installed_at_run_time(compiled: dict[str, Path]) -> None:
    for path in compiled.values():
        spec, _ = _load(path)
        for label, executor in spec["deploymentSpec"]["executors"].items():
            if "container" not in executor:
                continue
            container = executor["container"]
            repo = "pe-triage-cuda" if label in ("exec-train", "exec-train-2", "exec-loso-fold") else "pe-triage"
            assert container["image"] == f"ghcr.io/pe-triage/{repo}:{__version__}", label
            shell, script = container["command"][:2], container["command"][2]
            assert shell == ["sh", "-ec"] and "python3 -m kfp.dsl.executor_main" in script, label
            assert not re.search(r"\bpip\b|install", script), label  # the image has everything


def test_retries_on_io_steps_and_caching_off_where_state_lives_outside_the_inputs(compiled: dict[str, Path]) -> None:
    options = ClusterOptions()
    for path in compiled.values():
        spec, _ = _load(path)
        for name, (_, task) in _tasks(spec).items():
            if "componentRef" not in task or name.startswith(("for-loop", "exit-handler", "condition")):
                continue
            if name in IO_TASKS or name.startswith("train") or name == "loso-fold":
                assert task["retryPolicy"] == {"maxRetryCount": options.retries, "backoffDuration": options.backoff,
                                               "backoffFactor": options.backoff_factor, "backoffMaxDuration": "600s"}, name
            assert task.get("cachingOptions", {}).get("enableCache", False) is (name not in UNCACHED), name


def test_cluster_config_of_the_helm_chart_sets_images_gpus_and_secret_names(tmp_path: Path) -> None:
    chart_cluster_yaml = {
        "images": {"cpu": "registry.example.org/pe-triage:9.9", "cuda": "registry.example.org/pe-triage-cuda:9.9"},
        "mlflowTrackingUri": "http://mlflow:5000",
        "gpu": {"resource": "nvidia.com/gpu", "count": 2, "nodeSelector": {"pool": "a100"},
                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]},
        "secrets": {"pseudonymKey": {"name": "hospital-key", "key": "pseudonym-key"},
                    "s3": {"name": "s3-creds", "accessKeyIdKey": "id", "secretAccessKeyKey": "secret"}},
        "s3": {"endpointUrl": "http://minio:9000", "region": ""},
    }
    compiled = compile_all(tmp_path, ClusterOptions.from_cluster_config(chart_cluster_yaml))
    spec, executors = _load(compiled["retraining"])
    container = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert container["image"] == "registry.example.org/pe-triage-cuda:9.9"
    assert container["resources"]["accelerator"]["resourceCount"] == "2"
    assert {e["name"]: e["value"] for e in container["env"]} == {"AWS_ENDPOINT_URL": "http://minio:9000",
                                                                  "PE_TRIAGE_TRAIN_PROCESSES": "2"}  # a DDP rank per GPU
    assert executors["exec-train"]["nodeSelector"] == {"labels": {"pool": "a100"}}
    assert executors["exec-train"]["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "gpu",
                                                       "effect": "NoSchedule"}]
    assert spec["deploymentSpec"]["executors"]["exec-split"]["container"]["image"] == "registry.example.org/pe-triage:9.9"
    secrets = {s["secretName"]: {e["secretKey"]: e["envVar"] for e in s["keyToEnv"]}
               for s in executors["exec-split"]["secretAsEnv"]}
    assert secrets == {"s3-creds": {"id": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY"}}  # no MLflow secret listed
    _, on_executors = _load(compiled["onboarding"])
    ingest = {s["secretName"]: s for s in on_executors["exec-ingest"]["secretAsEnv"]}
    assert ingest["hospital-key"]["keyToEnv"] == [{"envVar": "PE_TRIAGE_PSEUDONYM_KEY", "secretKey": "pseudonym-key"}]


def test_cli_compiles_every_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(submit and schedule: tests/pipelines/test_submit.py, against a KFP REST server over HTTP)"""
    monkeypatch.delenv("PE_TRIAGE_CLUSTER_CONFIG", raising=False)
    assert main(["pipeline", "compile", "--out", str(tmp_path / "ir")]) == 0
    assert {p.name for p in (tmp_path / "ir").iterdir()} == {"onboarding.yaml", "retraining.yaml"}


def test_demo_prints_one_line_per_step_and_logs_everything() -> None:
    import io

    from pe_triage_pipelines.console import StepConsole

    log, terminal = io.StringIO(), io.StringIO()
    lines = StepConsole(log, terminal, {})
    kfp_output = ("12:00 - INFO - Executing task \x1b[96m'ingest'\x1b[0m\n    streamed step log\n"
                  "12:01 - INFO - Task \x1b[96m'ingest'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m\n"
                  "ERROR root: Task 'ingest' finished with status SUCCESS\n"  # kfp logs some finishes twice
                  "Task split cache hit (key=0123456789ab); skipping execution.\n"
                  "Skipping conditional task condition-2 (condition evaluated to False)\n")
    for part in (kfp_output[:30], kfp_output[30:]):  # lines arrive in pieces
        lines.write(part)
    assert log.getvalue() == kfp_output
    assert [line.split() for line in terminal.getvalue().splitlines()] == [
        ["ingest", "ok", "(0", "s)"], ["split", "cached"], ["promote", "skipped:", "the", "gates", "did", "not", "pass"]]
