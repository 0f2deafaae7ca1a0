#!/usr/bin/env bash
# Build the project's images with their release tags, from the repository root:
#   cpu    -> ghcr.io/pe-triage/pe-triage:<package version>       (images/Dockerfile --target cpu)
#   cuda   -> ghcr.io/pe-triage/pe-triage-cuda:<package version>  (images/Dockerfile --target cuda)
#   mlflow -> ghcr.io/pe-triage/mlflow:<mlflow version>           (images/mlflow/Dockerfile)
# The package version comes from pyproject.toml, the MLflow version from images/mlflow/requirements.txt.
#
# usage: images/build.sh [--engine docker|buildah] [--registry REG] [--dry-run] [IMAGE...] [-- BUILD-ARGS...]
#   IMAGE: cpu, cuda, mlflow (default: all three)
#   BUILD-ARGS go to every build, e.g. -- --build-arg BASE_IMAGE=localhost/base:bookworm
#   --dry-run prints the build commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."

engine=${ENGINE:-}
registry=${REGISTRY:-ghcr.io/pe-triage}
dry_run=0
images=()
extra=()
while [ $# -gt 0 ]; do
    case $1 in
        --engine) engine=$2; shift 2 ;;
        --registry) registry=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; extra=("$@"); break ;;
        cpu|cuda|mlflow) images+=("$1"); shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
[ ${#images[@]} -gt 0 ] || images=(cpu cuda mlflow)
if [ -z "$engine" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker; else engine=buildah; fi
fi
case $engine in
    # BuildKit builds only the stages the target needs; the legacy builder (docker without buildx, or
    # DOCKER_BUILDKIT=0) builds every stage before it: `--target cpu` would install build-cuda's torch.
    docker) build=(docker build); export DOCKER_BUILDKIT=1 ;;
    buildah) build=(buildah build --layers) ;;
    *) echo "unknown engine: $engine" >&2; exit 2 ;;
esac

version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n 1)
mlflow_version=$(sed -n 's/^mlflow==//p' images/mlflow/requirements.txt)
[ -n "$version" ] && [ -n "$mlflow_version" ] || { echo "cannot read the versions" >&2; exit 1; }

run() {
    if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
for image in "${images[@]}"; do
    case $image in
        cpu) run "${build[@]}" -f images/Dockerfile --target cpu --build-arg "PE_TRIAGE_VERSION=$version" \
                 -t "$registry/pe-triage:$version" ${extra[@]+"${extra[@]}"} . ;;
        cuda) run "${build[@]}" -f images/Dockerfile --target cuda --build-arg "PE_TRIAGE_VERSION=$version" \
                  -t "$registry/pe-triage-cuda:$version" ${extra[@]+"${extra[@]}"} . ;;
        mlflow) run "${build[@]}" -f images/mlflow/Dockerfile --build-arg "MLFLOW_VERSION=$mlflow_version" \
                    -t "$registry/mlflow:$mlflow_version" ${extra[@]+"${extra[@]}"} . ;;
    esac
done
