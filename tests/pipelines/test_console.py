"""The demo's console and kfp.log, fed by a real kfp.local run of stand-in components that log as the
real ones do: a line per step named by display name and site, epochs relayed, codec chatter and
stdout kept off the console, and the configuration written once instead of once per step."""

import io
import re

import pytest
from kfp import dsl, local
from pe_triage_components.images import CPU_IMAGE
from pe_triage_pipelines.compile import PIPELINES
from pe_triage_pipelines.console import StepConsole, captured, config_digest, display_names, log_record
from pe_triage_pipelines.demo import gate_table
from pe_triage_pipelines.local import LOCAL

CONFIG = "train: {epochs: 2}\n# marker-7f3a: only in the configuration\n"


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)  # no __future__ annotations: kfp reads them
def ingest(site: str, config: str) -> str:
    import logging

    from pe_triage.logs import setup_logging

    setup_logging()
    logging.getLogger("pe_triage_components").info("site %s", site)
    logging.getLogger("openjpeg.encode").info("tile number 1 / 1")  # a codec's INFO chatter
    print("a line on the step's stdout")
    return site


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def train(config: str, after: list) -> int:
    import logging

    from pe_triage.logs import setup_logging

    setup_logging()
    for epoch in (1, 2):
        logging.getLogger("pe_triage.training.train").info("epoch %d/2: loss 0.41, val AUROC 0.88, 61 img/s", epoch)
    logging.getLogger("pe_triage.progress").info("evaluate: 120/360 slice (4.8/s, ETA 50 s)")
    return 2


@dsl.pipeline(name="console-check")
def two_sites(sites: list, config: str) -> None:
    with dsl.ParallelFor(sites, parallelism=LOCAL.parallel_sites) as site:
        ingested = ingest(site=site, config=config)
    train(config=config, after=dsl.Collected(ingested.output)).set_display_name("train stage 1")


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("console")
    terminal = io.StringIO()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "kfp"), raise_on_error=True)
    with captured(root / "kfp.log", terminal, CONFIG, display_names(two_sites)):
        two_sites(sites=["site-a", "site-b"], config=CONFIG)
    return terminal.getvalue(), (root / "kfp.log").read_text()


def test_each_step_is_one_line_named_by_display_name_and_site(ran: tuple[str, str]) -> None:
    console, _ = ran
    steps = re.findall(r"^      (\S.*?) +ok \(\d+ s\)$", console, re.M)
    assert steps == ["ingest site-a", "ingest site-b", "train stage 1"], console


def test_epochs_and_progress_are_relayed_and_nothing_else(ran: tuple[str, str]) -> None:
    console, _ = ran
    assert "      train stage 1: epoch 1/2: loss 0.41, val AUROC 0.88, 61 img/s\n" in console
    assert "      train stage 1: epoch 2/2: loss 0.41" in console
    assert "      train stage 1: evaluate: 120/360 slice (4.8/s, ETA 50 s)\n" in console
    assert "tile number" not in console and "stdout" not in console and "executor" not in console.lower()


def test_the_log_keeps_everything_but_the_configuration_repeated(ran: tuple[str, str]) -> None:
    _, log = ran
    assert "a line on the step's stdout" in log and "epoch 2/2" in log
    assert log.count("marker-7f3a") == 1  # the header; each of the three steps logged a digest instead
    assert log.count(config_digest(CONFIG)) >= 4
    assert "tile number" not in log  # the component's logging set-up replaced kfp's INFO-for-everyone


def test_sites_run_one_at_a_time_on_this_machine() -> None:
    """kfp.local runs up to two loop iterations in threads, whose output interleaves and whose cores
    the ingest's own worker pool already uses."""
    spec = PIPELINES["onboarding"](LOCAL).pipeline_spec
    assert spec.root.dag.tasks["for-loop-1"].iterator_policy.parallelism_limit == LOCAL.parallel_sites == 1


def test_the_retraining_stages_are_named_by_what_they_train() -> None:
    names = display_names(PIPELINES["retraining"](LOCAL))
    assert names["train"] == "train stage 1" and names["train-2"] == "train stage 2"


def test_json_log_lines_are_followed_too() -> None:
    terminal = io.StringIO()
    console = StepConsole(io.StringIO(), terminal, {"train-2": "train stage 2"})
    console.write("Executing task \x1b[96m'train-2'\x1b[0m\n")
    console.write('    {"time": "t", "level": "INFO", "logger": "pe_triage.training.train", "message": "epoch 3/10: loss 0.4"}\n')
    console.write("Task 'train-2' finished with status SUCCESS\n")
    lines = terminal.getvalue().splitlines()
    assert lines[0] == "      train stage 2: epoch 3/10: loss 0.4" and lines[1].split()[:4] == ["train", "stage", "2", "ok"]
    assert log_record("INFO pe_triage.x: hello") == ("pe_triage.x", "hello") and log_record("{not json") is None


def test_the_gate_table_shows_value_threshold_and_verdict() -> None:
    table = gate_table([
        {"name": "min_patient_pe_sensitivity", "value": 0.8125, "threshold": 0.9, "passed": False, "detail": ""},
        {"name": "same_test_data", "value": {"split": "test"}, "threshold": {"split": "test"}, "passed": True, "detail": ""},
    ]).splitlines()
    assert table[0].split() == ["gate", "value", "threshold", "result"]
    assert table[2].split() == ["min_patient_pe_sensitivity", "0.812", "0.900", "FAIL"]
    assert table[3].split() == ["same_test_data", "—", "—", "pass"]
    assert gate_table([]) == "(every gate is off)"
