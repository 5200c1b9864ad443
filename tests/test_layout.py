"""No module of ours may be named like a standard-library module or an installed package's.

Some of our folders land at the front of sys.path: pytest prepends tests/ (it has no __init__.py,
so its test modules are imported as top-level modules), `python bench/x.py` prepends bench/ and
`python models/build_demo_model.py` prepends models/. A file there named like another module
replaces that module for the whole process: tests/statistics.py (now tests/chi_square.py) made
bench_gpu's `statistics.median` raise AttributeError, but only in the runs that imported it.
The packages at the repo root (server, drafter, kernels) are checked too, against everything
installed except this project itself. `kernels` is also a PyPI name (Hugging Face's); that is
only a clash where that package is installed, which this test then reports.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OWN_DISTRIBUTION = "ctc-serve"
SCRIPT_FOLDERS = ("tests", "bench", "models")  # folders whose files are imported as top-level modules


def taken_names() -> dict[str, str]:
    """Top-level module names that are not ours to use: {name: who owns it}."""
    taken = {name: "the standard library" for name in (*sys.stdlib_module_names, *sys.builtin_module_names)}
    for name, dists in importlib.metadata.packages_distributions().items():
        others = sorted({d for d in dists if d.lower().replace("_", "-") != OWN_DISTRIBUTION})
        if others:
            taken.setdefault(name, "installed " + ", ".join(others))
    return taken


def top_level_names(folder: Path) -> set[str]:
    """Names `import x` would find in `folder` when it is on sys.path: modules and packages."""
    modules = {p.stem for p in folder.glob("*.py")}
    packages = {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return modules | packages


def clashes(names: set[str], taken: dict[str, str]) -> list[str]:
    return sorted(f"{name} (taken by {taken[name]})" for name in names if name in taken)


def test_clash_check_sees_the_standard_library_and_installed_packages() -> None:
    # Negative control: the check must flag the clash that motivated it, and an installed package.
    taken = taken_names()
    assert clashes({"statistics", "torch", "chi_square"}, taken) == [
        "statistics (taken by the standard library)", f"torch (taken by {taken['torch']})"]
    assert OWN_DISTRIBUTION not in taken.get("server", "")


def test_no_script_folder_module_shadows_another_module() -> None:
    taken = taken_names()
    for folder in SCRIPT_FOLDERS:
        assert clashes(top_level_names(REPO / folder), taken) == [], f"rename these files in {folder}/"


def test_no_root_package_shadows_another_module() -> None:
    assert clashes(top_level_names(REPO), taken_names()) == []
