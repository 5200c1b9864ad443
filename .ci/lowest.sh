#!/usr/bin/env bash
# CI job: the floors in pyproject.toml's [project.dependencies] are true.
#
# A floor nobody installs is a guess: code starts using a newer API and the floor silently lies
# (it did: FastAPI(strict_content_type=...) under "fastapi>=0.110"). This job installs every direct
# dependency at the LOWEST version its floor allows (uv's --resolution lowest-direct: direct
# dependencies at their floors, what they pull in at the newest that fits them), adds the test
# tools at versions that keep those floors (the floors are passed as constraints), and runs the
# tests that exercise these dependencies: the API and serving layer (fastapi, starlette,
# sse-starlette, pydantic, pydantic-settings, prometheus-client, jinja2 via chat templates), a real
# server process (uvicorn), the runtime against transformers' reference models (torch,
# transformers, tokenizers, safetensors) and the engine.
#
# torch comes from PyPI at its floor (the CUDA build with its nvidia-* wheels, ~3 GB, cached by uv
# after the first run): the floor is not the CPU build pinned elsewhere, and PyPI has no CPU-only
# Linux wheels. Tests run on the CPU all the same.
#
# Usage: .ci/lowest.sh [pytest args]   (default: the test files below, quietly)
# The environment lives in .venv-lowest/ (git-ignored); reruns reuse it and uv's cache.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${LOWEST_VENV:-.venv-lowest}
PYTHON=${PYTHON:-python3}
UV_VERSION=0.13.9  # pinned so that a resolver change cannot move what "lowest" means under us
# The drafter's checkpoint and data tests cover safetensors and tqdm; its training tests add
# minutes and no dependency.
TESTS=(tests/test_api_*.py tests/test_engine.py tests/test_runtime.py tests/test_detokenizer.py
       tests/test_e2e_server.py tests/test_drafters.py::test_checkpoint_round_trip_and_mismatch_refused
       tests/test_drafters.py::test_distilled_data_from_several_directories_loads_as_one_set)

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
# --system-certs: the operating system's CA store, as pip uses (behind a proxy with its own CA too)
uv() { "$VENV/bin/uv" "$@" --system-certs --python "$VENV/bin/python"; }

# 1. The floors: direct dependencies at their lowest, resolved for this interpreter. (uv compile
# prefers the pins already in its output file: start from none, or an old run would decide.)
rm -f "$VENV/floors.txt" "$VENV/requirements.txt"
uv pip compile pyproject.toml --resolution lowest-direct --quiet --no-header -o "$VENV/floors.txt"
# 2. Plus the test tools, newest that keep every pin of step 1.
uv pip compile pyproject.toml --extra test --constraint "$VENV/floors.txt" --quiet --no-header \
  -o "$VENV/requirements.txt"
# 3. Exactly that environment (sync removes whatever an earlier run left), then this checkout.
uv pip sync --quiet "$VENV/requirements.txt"
uv pip install --quiet --no-deps -e .

# A floor below what the other floors allow (transformers 5.0 needs safetensors 0.4.3, say) is
# never installed here, so it would go unchecked: refuse it.
echo "direct dependencies under test, at their floors:"
"$VENV/bin/python" - <<'EOF'
import sys
from importlib.metadata import requires, version

from packaging.requirements import Requirement
from packaging.version import Version

untested = []
for req in map(Requirement, requires("ctc-serve")):
    if req.marker is not None and "extra" in str(req.marker):
        continue
    installed = version(req.name)
    floors = [s.version for s in req.specifier if s.operator == ">="]
    print(f"  {req.name}=={installed}  ({req})")
    if not floors or Version(installed) != Version(floors[0]):
        untested.append(f"{req.name}: declared '{req.specifier}', the floors resolve to {installed}")
if untested:
    sys.exit("floors that this job cannot install, so cannot check (raise them):\n  " + "\n  ".join(untested))
EOF

if [ $# -eq 0 ]; then
  set -- -q -p no:cacheprovider "${TESTS[@]}"
fi
exec "$VENV/bin/python" -m pytest "$@"
