"""What we ship is what we test: requirements.lock, the torch pin (requirements-torch.txt), the
Makefile and the Dockerfile against each other and against the environment these tests run in.

`make` installs this environment from the lock, so every test here fails when one of them drifts:
pyproject.toml changed without `make lock`, the lock or the torch pin changed without a reinstall,
or the Makefile or the Dockerfile pins a torch or a Python of its own.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
TORCH_PIN = REPO / "requirements-torch.txt"
CUDA_ONLY = re.compile(r"^(torch|nvidia-.*|cuda-.*)$")  # what the lock leaves to torch's own pin


def locked() -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, hashes)} from the lock."""
    pins: dict[str, tuple[str, list[str]]] = {}
    name = None
    for line in LOCK.read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", line):
            name = canonicalize_name(match[1])
            pins[name] = (match[2], [])
        elif name and (digest := re.search(r"--hash=(sha256:[0-9a-f]{64})", line)):
            pins[name][1].append(digest[1])
    return pins


def public(version: str) -> Version:
    """2.13.0+cpu -> 2.13.0: CPU and CUDA builds of one release differ only in the local suffix."""
    return Version(Version(version).public)


def torch_pin() -> str:
    [pin] = re.findall(r"^torch==(\S+)$", TORCH_PIN.read_text(), re.M)
    return pin


def make_variable(name: str) -> str:
    """A variable's value as make evaluates the Makefile, untouched by this run's own make or env."""
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", name}}
    result = subprocess.run(["make", "-s", "--no-print-directory", "--eval", f"print-var: ; @echo $({name})",
                             "print-var"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_every_locked_version_is_installed_here() -> None:
    drift = {}
    for name, (version, _) in locked().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or public(installed) != Version(version):
            drift[name] = (version, installed)
    assert not drift, f"locked vs installed (reinstall with `make install`): {drift}"


def test_the_lock_is_hashed_and_leaves_torch_and_its_cuda_libraries_out() -> None:
    pins = locked()
    assert len(pins) > 20
    assert all(hashes for _, hashes in pins.values()), [n for n, (_, h) in pins.items() if not h]
    assert not [name for name in pins if CUDA_ONLY.match(name)]


def test_the_lock_satisfies_pyproject() -> None:
    """Catches a pyproject.toml edited without `make lock`."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = locked()
    for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(spec)
        if CUDA_ONLY.match(canonicalize_name(req.name)) or (req.marker and not req.marker.evaluate()):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{spec} is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(pins[name][0], prereleases=True), f"{spec} vs locked {pins[name][0]}"


def test_torch_is_pinned_once_and_installed_at_that_version() -> None:
    pin = torch_pin()
    assert public(importlib.metadata.version("torch")) == Version(pin)
    assert make_variable("TORCH") == f"torch=={pin}"
    # the lock was resolved together with this torch
    assert re.search(rf"\(torch=={re.escape(pin)}, requirements-torch\.txt", LOCK.read_text())
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "-r requirements-torch.txt" in dockerfile
    assert not re.search(r"torch[=~<>!]=", dockerfile), "the Dockerfile must take torch's version from requirements-torch.txt"


def test_the_lock_python_is_this_one_and_the_images() -> None:
    lock_python = make_variable("LOCK_PYTHON")
    assert f"{sys.version_info.major}.{sys.version_info.minor}" == lock_python
    assert re.search(rf"^RUN uv venv --python {re.escape(lock_python)} ", (REPO / "Dockerfile").read_text(), re.M)

