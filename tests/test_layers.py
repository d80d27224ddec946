"""The layers run one way: ``dpfp_jax`` composes the kernels of ``pallas_kernels``, never back.

The kernels take what they need from the library as arguments (the delta rule's WY inverse) or own
it (the choice of tensor-core dot precision), so ``pallas_kernels`` can be read, tested and moved
to other backends without the library. Checked on the source (every module, every import
statement, also those inside functions), not by importing it.
"""

import ast
from pathlib import Path

import pytest

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
