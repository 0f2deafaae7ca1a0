#!/bin/sh
# Build-stage helper of images/Dockerfile; installs into the active virtual environment (/opt/venv).
#   install-venv.sh deps TORCH_INDEX_URL   torch==$TORCH_VERSION from that index, then every runtime
#                                          dependency at its pin in images/constraints.txt
#   install-venv.sh package                the pe-triage wheel(s) from /wheels, `pip check`, and a
#                                          check that the package is $PE_TRIAGE_VERSION (tag + label)
# The two steps are separate layers: a source change rebuilds only the second, seconds instead of
# minutes. Wheels only, except kfp-server-api, which PyPI has only as a pure-Python sdist; the build
# stage has no C compiler, so a native sdist could not slip in: it would fail the build.
set -eu
pip_install() {
    pip install --no-cache-dir --only-binary=:all: --no-binary=kfp-server-api --use-pep517 "$@"
}
case ${1:-} in
    deps)
        pip_install --index-url "$2" --extra-index-url "$PIP_INDEX_URL" "torch==$TORCH_VERSION"
        pip_install --requirement "$PIP_CONSTRAINT"
        ;;
    package)
        pip_install /wheels/*.whl
        pip check
        v=$(python3 -c 'from importlib.metadata import version; print(version("pe-triage"))')
        if [ "$v" != "${PE_TRIAGE_VERSION:-}" ]; then
            echo "build argument PE_TRIAGE_VERSION='${PE_TRIAGE_VERSION:-}' but the package is $v" >&2
            exit 1
        fi
        ;;
    *)
        echo "usage: $0 deps TORCH_INDEX_URL | package" >&2
        exit 2
        ;;
esac
