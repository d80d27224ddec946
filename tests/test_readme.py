"""Every Python block of README.md runs as written, in order, as a reader pasting them would."""

import re
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced ```python block, dedented (blocks inside list items are indented)."""
    blocks = []
    for match in re.finditer(r"^([ \t]*)```python\n(.*?)^\1```", text, flags=re.S | re.M):
        blocks.append((text.count("\n", 0, match.start()) + 1, textwrap.dedent(match.group(2))))
    return blocks


def test_python_blocks_are_found():
    blocks = python_blocks("text\n```python\nx = 1\n```\n- item\n  ```python\n  y = x\n  ```\n")
    assert blocks == [(2, "x = 1\n"), (6, "y = x\n")]


def test_readme_python_blocks_run():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4
    # One namespace, as in a notebook: a block may use what earlier blocks defined.
    namespace: dict = {"__name__": "readme"}
    for line, code in blocks:
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"the README's Python block at line {line} fails: {err!r}") from err
