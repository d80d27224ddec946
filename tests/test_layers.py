"""The layers run one way: ``dpfp_jax`` composes the kernels of ``pallas_kernels``, never back; and
the linen (``dpfp_jax.nn``) and NNX (``dpfp_jax.nnx``) modules stand on the shared math of
``dpfp_jax.core``, which imports neither, and neither imports the other.

The kernels take what they need from the library as arguments (the delta rule's WY inverse) or own
it (the choice of tensor-core dot precision), so ``pallas_kernels`` can be read, tested and moved
to other backends without the library. Checked on the source (every module, every import
statement, also those inside functions), not by importing it.
"""

import ast
from pathlib import Path

import pytest

import dpfp_jax
import pallas_kernels

KERNELS = Path(pallas_kernels.__file__).parent
LIBRARY = "dpfp_jax"


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in a module's syntax tree."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_import_finder_sees_imports_anywhere_in_a_module():
    source = "import os\nfrom dpfp_jax.ops import x\ndef f():\n    import dpfp_jax as dj\nfrom . import y\n"
    assert imported_modules(ast.parse(source)) == [(1, "os"), (2, "dpfp_jax.ops"), (4, "dpfp_jax")]


MODULES = sorted(KERNELS.rglob("*.py"))


def test_every_kernel_backend_is_checked():
    names = {path.relative_to(KERNELS).as_posix() for path in MODULES}
    assert {"__init__.py", "validation.py", "triton/__init__.py", "triton/fused_chunk.py"} <= names, names


@pytest.mark.parametrize("path", MODULES, ids=[p.relative_to(KERNELS).as_posix() for p in MODULES])
def test_pallas_kernels_imports_nothing_of_dpfp_jax(path):
    upward = [f"line {line}: {module}" for line, module in imported_modules(ast.parse(path.read_text()))
              if module == LIBRARY or module.startswith(LIBRARY + ".")]
    assert not upward, f"{path.relative_to(KERNELS.parent)} imports the library: " + "; ".join(upward)


# --- the layers over the shared math: nn and nnx import dpfp_jax.core, never each other -----------

LIBRARY_ROOT = Path(dpfp_jax.__file__).parent


def imports_of(package: str) -> list[tuple[str, int, str]]:
    """(file, line, module) of every absolute import in a dpfp_jax sub-package's files."""
    root = LIBRARY_ROOT / package
    return [(path.relative_to(LIBRARY_ROOT.parent).as_posix(), line, module)
            for path in sorted(root.rglob("*.py")) for line, module in imported_modules(ast.parse(path.read_text()))]


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_shared_core_imports_no_layer_and_no_flax():
    found = [f"{path}:{line}: {module}" for path, line, module in imports_of("core")
             if any(within(module, p) for p in ("dpfp_jax.nn", "dpfp_jax.nnx", "flax"))]
    assert not found, found


def test_the_op_imports_no_layer_and_no_flax():
    # The op (dpfp_jax.ops) sits under the layers' math: the context-parallel op's key sum, say,
    # lives with the op's segments and the core imports it, never the reverse.
    found = [f"{path}:{line}: {module}" for path, line, module in imports_of("ops")
             if any(within(module, p) for p in ("dpfp_jax.core", "dpfp_jax.nn", "dpfp_jax.nnx", "flax"))]
    assert not found, found


@pytest.mark.parametrize("package, other", [("nn", "dpfp_jax.nnx"), ("nnx", "dpfp_jax.nn")])
def test_linen_and_nnx_layers_do_not_import_each_other(package, other):
    found = [f"{path}:{line}: {module}" for path, line, module in imports_of(package) if within(module, other)]
    assert not found, found
    # Both do stand on the shared core.
    assert any(within(module, "dpfp_jax.core") for _, _, module in imports_of(package))


# --- the tests: no test file imports another; what they share is tests/helpers.py ------------------

TESTS = Path(__file__).resolve().parent


def imported_test_modules(path: Path) -> list[str]:
    """The test modules (``tests.test_*`` or a bare ``test_*``) a file imports, in statements or in
    the source of a script it runs (a module-level string holding ``from tests.test_x import ...``)."""
    tree = ast.parse(path.read_text())
    found = [module for _, module in imported_modules(tree)
             if module.startswith("tests.test_") or module.startswith("test_")]
    # Module-level strings: the scripts a test runs in a subprocess.
    scripts = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
               and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)]
    for script in scripts:
        try:
            found += [module for _, module in imported_modules(ast.parse(script))
                      if module.startswith("tests.test_") or module.startswith("test_")]
        except SyntaxError:
            continue
    return sorted(set(found))


def test_the_import_finder_sees_test_modules_in_statements_and_scripts(tmp_path):
    path = tmp_path / "test_probe.py"
    path.write_text('import test_a\nfrom tests.test_b import x\nfrom tests.helpers import y\n'
                    'S = """\nfrom tests.test_c import z\n"""\n')
    assert imported_test_modules(path) == ["test_a", "tests.test_b", "tests.test_c"]


@pytest.mark.parametrize("path", sorted([*TESTS.glob("*.py"), *TESTS.glob("scripts/*.py")]),
                         ids=lambda p: p.relative_to(TESTS).as_posix())
def test_no_test_file_imports_another(path):
    assert imported_test_modules(path) == [], (
        f"{path.name} imports a test module: move what it needs to tests/helpers.py")
