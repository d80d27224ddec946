"""What the wheel ships: the library (dpfp_jax, pallas_kernels) with its license, type marker and
one version, and none of the dev tooling (dpfp_devtools, benchmarks, tests), which imports one way:
tests and benchmarks use dpfp_devtools, neither uses the other, and no file edits ``sys.path``."""

import ast
import email
import fnmatch
import importlib.metadata
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import dpfp_jax as dj

REPO_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
LIBRARY = {"dpfp_jax", "pallas_kernels"}
DEV_ONLY = ("dpfp_devtools", "benchmarks", "tests")


def packages_found(root: Path, prefix: str = "") -> list[str]:
    """Regular packages under ``root`` as setuptools' ``packages.find`` walks them: directories with
    an ``__init__.py`` whose parents are packages too, names without dots."""
    found = []
    for path in sorted(root.iterdir()):
        if path.is_dir() and "." not in path.name and (path / "__init__.py").is_file():
            found += [prefix + path.name, *packages_found(path, f"{prefix}{path.name}.")]
    return found


def shipped_packages() -> list[str]:
    """The packages pyproject's ``[tool.setuptools.packages.find]`` puts in the wheel."""
    find = SETUPTOOLS["packages"]["find"]
    include, exclude = find.get("include", ["*"]), find.get("exclude", [])

    def matches(name, patterns):
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)

    return [name for name in packages_found(REPO_ROOT) if matches(name, include) and not matches(name, exclude)]


def test_wheel_ships_the_library_packages_only():
    shipped = shipped_packages()
    assert {name.split(".")[0] for name in shipped} == LIBRARY, shipped
    # Dev tooling stays out even if ``include`` were widened (e.g. to "dpfp*").
    assert set(SETUPTOOLS["packages"]["find"]["exclude"]) >= {f"{name}*" for name in DEV_ONLY}


def test_shipped_modules_import_no_dev_tooling_and_no_private_jax():
    # The wheel has no dpfp_devtools, benchmarks or tests to import; jax._src may move in any release.
    offenders = []
    for package in shipped_packages():
        for path in sorted((REPO_ROOT / package.replace(".", "/")).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{path.relative_to(REPO_ROOT)}: {name}" for name in names
                              if name.split(".")[0] in DEV_ONLY or name.startswith("jax._src")]
    assert not offenders


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


def python_files(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (REPO_ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder, forbidden", [("tests", "benchmarks"), ("benchmarks", "tests"),
                                               ("dpfp_devtools", "benchmarks"), ("dpfp_devtools", "tests")])
def test_dev_tooling_imports_one_way(folder, forbidden):
    # A benchmark is a script (python -m benchmarks.NAME), not a library for tests, and the other
    # way round; what both need lives in dpfp_devtools.
    offenders = [f"{path.relative_to(REPO_ROOT)}: {name}" for path in python_files(folder)
                 for name in imported_modules(path) if name.split(".")[0] == forbidden]
    assert not offenders


def distribution(name: str) -> str:
    """A requirement's or a distribution's name, normalised as packaging does (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~;\[@(]", name, maxsplit=1)[0]).lower()


def test_every_runtime_dependency_is_imported_by_the_library():
    # A runtime dependency that the library does not import is one every user installs for nothing;
    # what only the tests use belongs in the ``test`` extra.
    imported = {name.split(".")[0] for path in python_files(*sorted(LIBRARY)) for name in imported_modules(path)}
    providers = importlib.metadata.packages_distributions()  # import name -> distributions
    used = {distribution(dist) for module in imported for dist in providers.get(module, [])}
    declared = {distribution(requirement) for requirement in PYPROJECT["project"]["dependencies"]}
    assert declared <= used, f"declared but not imported by {sorted(LIBRARY)}: {sorted(declared - used)}"


def test_no_file_uses_sys_path():
    # Every script runs from the repository root (python -m, pytest's rootdir), so imports need no
    # path edits; an edit would let one module load under two names.
    offenders = []
    for path in python_files("dpfp_jax", "pallas_kernels", "dpfp_devtools", "benchmarks", "tests", "examples"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not offenders


def test_version_has_one_source():
    assert "version" not in PYPROJECT["project"]
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert SETUPTOOLS["dynamic"]["version"] == {"attr": "dpfp_jax.__version__"}
    # The installed distribution's metadata came from the same attribute.
    assert importlib.metadata.version("dpfp-jax") == dj.__version__


def test_license_and_type_marker_are_packaged():
    assert PYPROJECT["project"]["license"] == "MIT"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    assert "MIT License" in (REPO_ROOT / "LICENSE").read_text()
    assert SETUPTOOLS["package-data"]["dpfp_jax"] == ["py.typed"]
    assert (REPO_ROOT / "dpfp_jax" / "py.typed").is_file()


@pytest.mark.slow
def test_built_wheel_holds_the_library_its_license_type_marker_and_version(tmp_path):
    # A real build (setuptools in pip's isolated build environment, so it needs the package index).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(REPO_ROOT)],
                   check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = tmp_path.glob("dpfp_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"dpfp_jax-{dj.__version__}.dist-info"
    assert {name.split("/")[0] for name in names} == LIBRARY | {dist_info}, sorted(names)
    assert "dpfp_jax/py.typed" in names
    assert "pallas_kernels/triton/fused_chunk.py" in names and "pallas_kernels/triton_lowering.py" not in names
    assert f"{dist_info}/licenses/LICENSE" in names
    metadata = email.message_from_bytes(zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA"))
    assert metadata["Version"] == dj.__version__
    assert metadata["License-Expression"] == "MIT"


# The patterns are spelled so that this file does not match them itself.
OUTSIDE_REFERENCES = ("DESIGN" ".md", ".." "/shared")
ORIGINAL_AS_SEED = re.compile(r"\bthe\s+seed\b|\bseed\'s\b", re.IGNORECASE)


def repository_files() -> list[Path]:
    """The files a clone holds, plus new ones not yet committed: ``git ls-files`` (tracked, and
    untracked ones git does not ignore); without git, a walk that skips what ``.gitignore`` names
    (virtual environments, caches, builds) and ``.git``."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=REPO_ROOT, check=True, capture_output=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError):
        skipped = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "out", ".whl"}
        return sorted(path for path in REPO_ROOT.rglob("*")
                      if path.is_file() and not any(part in skipped or part.startswith(".venv")
                                                    or part.endswith(".egg-info")
                                                    for part in path.relative_to(REPO_ROOT).parts))
    return sorted(REPO_ROOT / name for name in listed.decode().split("\0") if name and (REPO_ROOT / name).is_file())


def test_repository_stands_alone():
    # What a reader needs is in the repository's own docs/: no pointer to notes kept outside it, and
    # the PyTorch package it re-creates is named as such (docs/original_package.md).
    files = repository_files()
    assert REPO_ROOT / "tests" / "test_packaging.py" in files and REPO_ROOT / "README.md" in files
    offenders = []
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            found = [ref for ref in OUTSIDE_REFERENCES if ref in line] + ORIGINAL_AS_SEED.findall(line)
            offenders += [f"{path.relative_to(REPO_ROOT)}:{number}: {hit!r}" for hit in found]
    assert not offenders, "\n".join(offenders)
