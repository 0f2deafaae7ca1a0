"""What a model version carries so that it loads anywhere: the package's own wheel and exact pins of
everything it needs.

``pe-triage`` is on no public index, so a version that only named ``pe-triage==X`` would fail to
install, or install whoever published that name publicly (dependency confusion). The version instead
bundles the wheel of the code that registered it and names it by its path inside the model folder;
every other requirement is pinned to the version installed here. The wheel is built once per
(package version, source digest) and cached, so registration stays fast.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pe_triage import __version__
from pe_triage.registry.errors import RegistryError

DIST = "pe-triage"
#: what the wheel is built from, relative to the source root (``pyproject.toml`` lists the packages)
SOURCE_FILES = ("pyproject.toml", "README.md")
SOURCE_DIRS = ("src", "components", "pipelines")
_SKIP = ("__pycache__", ".egg-info", ".pyc")
#: wheels kept in the cache (~280 KiB each): the last few source trees of a developer's checkout,
#: so switching between branches does not rebuild, and the cache does not grow without bound
CACHED_BUILDS = 8


def wheel_requirements(wheel: str | Path) -> list[str]:
    """The ``Requires-Dist`` of a wheel: what the bundled code, not an older install of it, needs."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        text = zf.read(name).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def runtime_closure(requirements: list[str]) -> dict[str, str]:
    """Canonical name -> installed version of every distribution ``requirements`` need at run time
    (markers evaluated for this interpreter, extras followed), ``pe-triage`` itself excluded."""
    found: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": extra}):  # over this interpreter's environment
            continue
        try:
            installed = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise RegistryError(f"{req.name} (a run-time dependency of {DIST}) is not installed: install the project "
                                "first") from None
        found[canonicalize_name(req.name)] = installed.version
        for wanted in sorted(req.extras) or [""]:
            if (canonicalize_name(req.name), wanted) not in seen:
                seen.add((canonicalize_name(req.name), wanted))
                todo += [(Requirement(r), wanted) for r in installed.requires or []]
    found.pop(canonicalize_name(DIST), None)
    return found


def pinned_requirements(wheel: str | Path) -> list[str]:
    """``name==version`` (as installed here) for the whole run-time closure of ``wheel``. A local
    version label (torch's ``+cpu``) is dropped: ``torch==2.13.0`` takes the CPU build where the index
    offers it (a local label sorts above the plain release) and stays installable from an index that
    has only the plain one."""
    closure = runtime_closure(wheel_requirements(wheel))
    return [f"{name}=={version.split('+')[0]}" for name, version in sorted(closure.items())]


def _source_root() -> Path | None:
    """The project folder the package runs from (an editable install or a checkout), if any."""
    root = Path(__file__).resolve().parents[3]
    pyproject = root / "pyproject.toml"
    return root if pyproject.is_file() and f'name = "{DIST}"' in pyproject.read_text() else None


def _source_files(root: Path) -> list[Path]:
    files = [root / f for f in SOURCE_FILES]
    for folder in SOURCE_DIRS:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and not any(s in part for part in path.relative_to(root).parts for s in _SKIP):
                files.append(path)
    return files


def _digest(items: list[tuple[str, bytes]]) -> str:
    digest = hashlib.sha256()
    for name, data in items:
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:16]


def _build_from_source(root: Path, dst: Path) -> None:
    """``pip wheel`` of a copy of the source files (the checkout gets no build folders; offline:
    the running environment's setuptools, no build isolation)."""
    with tempfile.TemporaryDirectory(prefix="pe-triage-wheel-") as tmp:
        for path in _source_files(root):
            target = Path(tmp) / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
               "--wheel-dir", str(dst), tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RegistryError(f"building the {DIST} wheel failed (pip wheel exit {done.returncode}): "
                                f"{done.stderr.strip()[-2000:]}")


def _repack_installed(dst: Path) -> None:
    """The installed (non-editable) distribution as a wheel again: its files as ``RECORD`` lists them,
    a fresh ``RECORD``; console scripts come back from ``entry_points.txt`` at install."""
    dist = metadata.distribution(DIST)
    base = Path(str(dist.locate_file("")))
    info = next(f for f in dist.files or [] if f.name == "METADATA").parent.as_posix()
    skip = {f"{info}/{n}" for n in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    names = sorted({f.as_posix() for f in dist.files or []} - skip)
    names = [n for n in names if not n.startswith("..") and "__pycache__" not in n]
    wheel = dst / f"{DIST.replace('-', '_')}-{dist.version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in names:
            data = (base / name).read_bytes()
            zf.writestr(name, data)
            hashed = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={hashed},{len(data)}")
        zf.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")


def package_wheel(cache_dir: str | Path) -> Path:
    """The wheel of the running package, from ``cache_dir`` when this (version, source digest) was
    built before. Built from the checkout when there is one, else repacked from the installed files."""
    root = _source_root()
    if root is not None:
        key = _digest([(p.relative_to(root).as_posix(), p.read_bytes()) for p in _source_files(root)])
    else:
        key = _digest([("RECORD", (metadata.distribution(DIST).read_text("RECORD") or "").encode())])
    folder = Path(cache_dir).expanduser() / f"{__version__}-{key}"
    found = sorted(folder.glob("*.whl"))
    if found:
        return found[0]
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError as e:
        raise RegistryError(f"registry.wheel_cache {folder.parent} is not writable ({e.strerror}): point it at a "
                            "writable folder") from None
    try:
        if root is not None:
            _build_from_source(root, building)
        else:
            _repack_installed(building)
        os.replace(building, folder)  # atomic: a concurrent registration sees all of it or nothing
    except OSError:
        if not any(folder.glob("*.whl")):
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    _prune(folder.parent, keep=CACHED_BUILDS)
    return sorted(folder.glob("*.whl"))[0]


def _prune(cache: Path, *, keep: int) -> None:
    """Keep the ``keep`` most recently built wheels: each source change of a checkout builds one, and
    nothing else would ever remove them. In-progress builds (dot folders) are not touched."""
    built = sorted((p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for old in built[keep:]:
        shutil.rmtree(old, ignore_errors=True)
