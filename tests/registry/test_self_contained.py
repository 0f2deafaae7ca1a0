"""A registered version is self-contained (issue 18, item 1): it carries the package's own wheel,
named in its requirements by its path in the model folder (never by a name a public index could
answer), exact pins of every run-time dependency, an input example and the signature; the wheel is
covered by the integrity manifest. The slow test installs the version's recorded requirements into
a fresh virtual environment, next to a squatted ``pe-triage`` on the package index, and predicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_integrity import put_artifact
from test_predict import stage_model
from test_registry import write_metrics

from pe_triage import __version__
from pe_triage.config import RegistryConfig
from pe_triage.registry.bundle import (
    CACHED_BUILDS,
    package_wheel,
    pinned_requirements,
    runtime_closure,
    wheel_requirements,
)
from pe_triage.registry.errors import IntegrityError, RegistryError
from pe_triage.registry.integrity import MANIFEST_TAG, sha256_file
from pe_triage.registry.registry import MODEL_DIR, load_registered, register

WHEEL = f"pe_triage-{__version__}-py3-none-any.whl"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("self-contained-models")
    return str(stage_model(root / "stage1", 1, threshold=0.45)), str(stage_model(root / "stage2", 2, threshold=0.5))


@pytest.fixture(scope="module")
def registered(mlflow_server: str, pair: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """A version registered on the real server, and its model folder downloaded as any client would."""
    root = tmp_path_factory.mktemp("self-contained")
    name = f"pe-triage-{uuid.uuid4().hex[:8]}"
    cfg = RegistryConfig(model_name=name, experiment=name, wheel_cache=str(root / "wheels"))
    version = register(*pair, str(write_metrics(root / "metrics")), config=cfg, uri=mlflow_server)
    local = MlflowClient(mlflow_server).download_artifacts(version["run_id"], MODEL_DIR, str(root / "download"))
    return version, Path(local)


def test_the_version_bundles_its_wheel_and_pins_everything(registered: tuple[dict, Path]) -> None:
    _, model = registered
    requirements = (model / "requirements.txt").read_text().split()
    assert requirements[0] == f"artifacts/{WHEEL}" and (model / requirements[0]).is_file()
    assert not [r for r in requirements if r.lower().replace("_", "-").startswith("pe-triage")]  # no name to squat
    closure = runtime_closure(wheel_requirements(model / requirements[0]))
    assert requirements[1:] == pinned_requirements(model / requirements[0]) and len(requirements[1:]) == len(closure)
    assert {"numpy", "pydicom", "torch", "mlflow", "packaging"} <= set(closure)  # the roots and their dependencies
    assert {"torch==2.13.0", "mlflow==" + metadata.version("mlflow"), "pydicom==" + metadata.version("pydicom")} <= set(
        requirements)
    assert all("==" in r for r in requirements[1:]) and not [r for r in requirements if "+" in r]
    with zipfile.ZipFile(model / requirements[0]) as wheel:
        names = wheel.namelist()
    assert "pe_triage/predict.py" in names and "pe_triage/registry/pyfunc.py" in names
    assert "pe_triage_components/__init__.py" in names and not [n for n in names if "__pycache__" in n]
    mlmodel = yaml.safe_load((model / "MLmodel").read_text())
    assert mlmodel["saved_input_example_info"]["type"] == "dataframe"
    example = json.loads((model / "serving_input_example.json").read_text())["dataframe_split"]
    assert "hu" in example["columns"] and mlmodel["signature"]["outputs"]


def test_the_wheel_is_under_the_integrity_manifest(registered: tuple[dict, Path], mlflow_server: str) -> None:
    version, model = registered
    client = MlflowClient(mlflow_server)
    recorded = json.loads(client.get_model_version(version["name"], str(version["version"])).tags[MANIFEST_TAG])
    assert recorded[f"{MODEL_DIR}/artifacts/{WHEEL}"] == sha256_file(model / "artifacts" / WHEEL)
    assert recorded[f"{MODEL_DIR}/requirements.txt"] == sha256_file(model / "requirements.txt")
    put_artifact(mlflow_server, client, version["run_id"], f"{MODEL_DIR}/artifacts/{WHEEL}", b"PK not the registered wheel")
    with pytest.raises(IntegrityError, match=f"artifacts/{WHEEL} \\(digest differs\\)"):
        load_registered(f"models:/{version['name']}/{version['version']}", uri=mlflow_server)


def test_the_wheel_is_built_once_per_source(tmp_path: Path) -> None:
    first = package_wheel(tmp_path)
    built = first.stat().st_mtime_ns
    assert package_wheel(tmp_path) == first and first.stat().st_mtime_ns == built  # cached, not rebuilt
    assert first.name == WHEEL and first.parent.name.startswith(f"{__version__}-")
    assert [p.name for p in tmp_path.iterdir()] == [first.parent.name]  # no half-built folder left
    (tmp_path / "a-file").write_text("")
    with pytest.raises(RegistryError, match="registry.wheel_cache .* is not writable"):
        package_wheel(tmp_path / "a-file" / "cache")


def test_the_cache_keeps_the_latest_builds_only(tmp_path: Path) -> None:
    """Every source change builds a wheel; without pruning the cache grows with every edit."""
    old = [tmp_path / f"{__version__}-{n:02d}" for n in range(CACHED_BUILDS + 2)]
    for age, folder in enumerate(old):
        folder.mkdir()
        (folder / WHEEL).write_bytes(b"")
        os.utime(folder, (1_000_000 + age, 1_000_000 + age))  # old[-1] the newest of them
    (tmp_path / ".in-progress").mkdir()  # another process building: not ours to remove
    fresh = package_wheel(tmp_path)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted([".in-progress", fresh.parent.name, *(f.name for f in old[-(CACHED_BUILDS - 1):])])


def _squatter(index: Path) -> Path:
    """A ``pe-triage`` of the same version on the package index, as a dependency-confusion attacker
    would publish it: importing it writes nothing, but it has no ``predict`` module."""
    index.mkdir()
    info = f"pe_triage-{__version__}.dist-info"
    with zipfile.ZipFile(index / WHEEL, "w") as zf:
        zf.writestr("pe_triage/__init__.py", "SQUATTED = True\n")
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: pe-triage\nVersion: {__version__}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return index


CHECK = textwrap.dedent("""
    import json, sys
    from importlib import metadata
    import mlflow.pyfunc, numpy as np, pandas as pd
    import pe_triage
    from pe_triage.registry.bundle import package_wheel
    model = mlflow.pyfunc.load_model(sys.argv[1])
    hu = np.full((96, 96), -1000, np.int16)
    hu[12:84, 8:88] = 40
    hu[24:72, 16:44] = -850
    hu[24:72, 52:80] = -850
    frame = pd.DataFrame({"study_uid": ["s"] * 2, "series_uid": ["x"] * 2, "slice_index": [0, 1], "rows": [96] * 2,
                          "cols": [96] * 2, "pixel_spacing_row_mm": [4.0] * 2, "pixel_spacing_col_mm": [4.0] * 2,
                          "hu": [hu.astype("<i2").tobytes()] * 2})
    out = model.predict(frame)
    print(json.dumps({"triage": out["triage"].tolist(), "p_disease": out["p_disease"].tolist(),
                      "squatted": hasattr(pe_triage, "SQUATTED"), "file": pe_triage.__file__,
                      "repacked": str(package_wheel(sys.argv[2])),
                      "direct_url": json.loads(metadata.distribution("pe-triage").read_text("direct_url.json"))}))
""")


@pytest.mark.slow
def test_the_version_loads_in_a_fresh_environment_from_its_own_requirements(
        registered: tuple[dict, Path], tmp_path: Path) -> None:
    """Only the recorded requirements, installed as an operator would (``pip install -r`` in the model
    folder), with a squatted ``pe-triage`` on the index: the bundled wheel is what gets installed. There,
    without a source tree, registering would bundle the installed package repacked: the same files."""
    _, model = registered
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # --no-compile: byte-compiling torch & co. is most of the install time and changes nothing installed
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-compile", "--find-links",
                              str(_squatter(tmp_path / "index")), "-r", "requirements.txt"],
                             cwd=model, capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    run = subprocess.run([str(python), "-c", CHECK, str(model), str(tmp_path / "cache")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert not got["squatted"] and got["file"].startswith(str(venv))  # the fresh environment's, not this checkout's
    assert got["direct_url"]["url"] == (model / "artifacts" / WHEEL).as_uri()
    assert got["direct_url"]["archive_info"]["hashes"]["sha256"] == sha256_file(model / "artifacts" / WHEEL)
    assert len(got["triage"]) == 2 and set(got["triage"]) <= {"wnl", "other", "pe"}
    assert all(0.0 <= p <= 1.0 for p in got["p_disease"])
    # installed without a source tree (as in the image), the package repacks itself into the same wheel
    with zipfile.ZipFile(got["repacked"]) as again, zipfile.ZipFile(model / "artifacts" / WHEEL) as bundled:
        assert sorted(again.namelist()) == sorted(bundled.namelist())
        differ = [n for n in bundled.namelist() if again.read(n) != bundled.read(n)]
        assert differ == [f"pe_triage-{__version__}.dist-info/RECORD"]
