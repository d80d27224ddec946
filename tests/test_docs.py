"""The documentation's pages hold together: every Python block runs, every link resolves.

Covers README.md, examples/README.md and every page of the site (docs/**/*.md). The site's own
build (`make docs`, Sphinx with warnings as errors) checks the API pages and cross-references;
these tests check what a reader pastes and clicks, on GitHub as on the site, in seconds.
"""

import importlib
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def markdown_pages() -> list[Path]:
    """README.md, examples/README.md and the site's pages (not the build output)."""
    pages = [ROOT / "README.md", ROOT / "examples" / "README.md"]
    pages += sorted(path for path in DOCS.rglob("*.md") if "_build" not in path.relative_to(DOCS).parts)
    return pages


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# A block the tests cannot run is marked on the line above its fence, with the reason:
#   <!-- docs-test: skip (needs a GPU) -->
# An HTML comment: invisible on GitHub and on the site (MyST passes it through as raw HTML).
SKIP_MARKER = re.compile(r"^[ \t]*<!-- docs-test: skip \((?P<reason>[^()]*\S[^()]*)\) -->[ \t]*$")
ANY_MARKER = re.compile(r"<!--\s*docs-test")


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    code: str
    skip: str | None  # the reason, for a marked block


def python_blocks(text: str) -> list[Block]:
    """Every fenced ```python block, dedented (blocks inside list items are indented)."""
    lines = text.split("\n")
    blocks = []
    for match in re.finditer(r"^([ \t]*)```python\n(.*?)^\1```", text, flags=re.S | re.M):
        line = text.count("\n", 0, match.start()) + 1
        above = lines[line - 2] if line >= 2 else ""
        marker = SKIP_MARKER.match(above)
        blocks.append(Block(line, textwrap.dedent(match.group(2)), marker["reason"].strip() if marker else None))
    return blocks


def test_python_blocks_are_found():
    text = ("text\n```python\nx = 1\n```\n- item\n  ```python\n  y = x\n  ```\n"
            "<!-- docs-test: skip (needs a GPU) -->\n```python\nz = 2\n```\n```bash\nls\n```\n")
    assert python_blocks(text) == [Block(2, "x = 1\n", None), Block(6, "y = x\n", None),
                                   Block(10, "z = 2\n", "needs a GPU")]


def test_skip_markers_are_well_formed():
    # A marker that does not parse would leave its block to run and fail; one that parses but is
    # not right above a fence would skip nothing. Either way the writer meant something else.
    offenders = []
    for page in markdown_pages():
        lines = page.read_text().split("\n")
        for number, line in enumerate(lines, 1):
            if not ANY_MARKER.search(line) or line.lstrip().startswith("`") or "`<!--" in line:
                continue  # markers quoted in prose (development.md) are not markers
            below = lines[number] if number < len(lines) else ""
            if not SKIP_MARKER.match(line) or not below.strip().startswith("```python"):
                offenders.append(f"{page_id(page)}:{number}: {line.strip()!r}")
    assert not offenders, "malformed or misplaced docs-test markers:\n" + "\n".join(offenders)


RUNNABLE = [page for page in markdown_pages() if any(b.skip is None for b in python_blocks(page.read_text()))]
SKIPPED = [(page, block) for page in markdown_pages() for block in python_blocks(page.read_text()) if block.skip]


def test_the_readme_and_the_guides_have_blocks_to_run():
    names = {page_id(page) for page in RUNNABLE}
    assert {"README.md", "docs/index.md", "docs/op.md", "docs/layers.md"} <= names


# docs/layers.md's blocks (a dozen models compiled) take half a minute: with the slow tests only,
# to keep `make test` within CI's time; every other page's blocks run in `make test`.
@pytest.mark.parametrize("page", [pytest.param(page, marks=pytest.mark.slow) if page_id(page) == "docs/layers.md"
                                  else page for page in RUNNABLE], ids=page_id)
def test_page_python_blocks_run(page):
    # One namespace per page, as in a notebook: a block may use what earlier blocks of its page
    # defined. Marked blocks are left out here and reported by test_marked_block_is_skipped.
    namespace: dict = {"__name__": "docs"}
    for block in python_blocks(page.read_text()):
        if block.skip:
            continue
        try:
            exec(compile(block.code, f"{page_id(page)}:{block.line}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"the Python block at {page_id(page)}:{block.line} fails: {err!r}") from err


@pytest.mark.parametrize("page, block", SKIPPED, ids=[f"{page_id(p)}:{b.line}" for p, b in SKIPPED])
def test_marked_block_is_skipped(page, block):
    pytest.skip(f"{page_id(page)}:{block.line} is marked: {block.skip}")


# Links: [text](target) and ![alt](target), outside code. Only relative targets are checked (the
# network is not); a target outside the repository or a missing heading anchor fails.
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[^\n]*$", flags=re.S | re.M)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", flags=re.S)


def without_fences(text: str) -> str:
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def prose(text: str) -> str:
    """The text without fenced blocks and inline code (links there are examples, not links)."""
    return INLINE_CODE.sub("", without_fences(text))


def heading_anchor(title: str) -> str:
    """The anchor GitHub and MyST (``myst_heading_anchors``) give a heading."""
    title = re.sub(r"`([^`]*)`", r"\1", title).strip().lower()
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link's text
    return re.sub(r"[^\w\- ]", "", title).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    headings = re.finditer(r"^#{1,6} (.+)$", without_fences(page.read_text()), flags=re.M)
    return {heading_anchor(match.group(1)) for match in headings}


def test_heading_anchor():
    assert heading_anchor("The chunkwise-parallel form") == "the-chunkwise-parallel-form"
    assert heading_anchor("Memory against `chunk` and `scan`") == "memory-against-chunk-and-scan"
    assert heading_anchor("`dj.fast_weight`") == "djfast_weight"


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    broken = []
    name = page.relative_to(root)
    for match in LINK.finditer(prose(page.read_text())):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_relative_to(root) or not resolved.exists():
            broken.append(f"{name}: {target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{name}: {target} (no heading with that anchor)")
    return broken


def test_broken_links_are_found(tmp_path):
    (tmp_path / "b.md").write_text("# Some title\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#some-title) [no](c.md) [bad](b.md#other) `[code](x.md)` [web](https://x.org)\n")
    assert broken_links(page, tmp_path) == ["a.md: c.md (no such file)",
                                            "a.md: b.md#other (no heading with that anchor)"]


def test_relative_links_resolve():
    broken = [line for page in markdown_pages() for line in broken_links(page)]
    assert not broken, "\n".join(broken)


def toctree_entries(page: Path) -> set[Path]:
    """The pages a MyST ```{toctree} block of ``page`` names."""
    entries = set()
    for match in re.finditer(r"^```\{toctree\}\n(.*?)^```", page.read_text(), flags=re.S | re.M):
        for line in match.group(1).splitlines():
            line = line.strip()
            if line and not line.startswith(":"):
                entries.add((page.parent / f"{line}.md").resolve())
    return entries


def test_every_page_is_in_a_toctree():
    # Sphinx fails a page left out (the build runs with -W); this says which, without a build.
    site = [page for page in markdown_pages() if page.is_relative_to(DOCS) and page.name != "README.md"]
    listed = set().union(*(toctree_entries(page) for page in site))
    missing = [page_id(page) for page in site if page.resolve() not in listed and page != DOCS / "index.md"]
    assert not missing, f"pages in no toctree (add one line to docs/index.md's): {missing}"
    assert all(entry.exists() for entry in listed), [str(e) for e in listed if not e.exists()]


@pytest.mark.parametrize("module, page", [("dpfp_jax", "op.md"), ("pallas_kernels", "kernels.md")])
def test_every_public_name_is_on_its_api_page(module, page):
    # dpfp_jax.nn and dpfp_jax.nnx are documented with `automodule :members:`, which follows their
    # __all__; the op and the kernels are listed by name, so a new public name must be added there.
    text = (DOCS / "api" / page).read_text()
    documented = set(re.findall(r"^\.\. auto(?:function|data|class):: (\w+)", text, flags=re.M))
    # The linen classes are re-exported at the top level and documented on the linen page.
    nn = importlib.import_module("dpfp_jax.nn")
    linen = {name for name in nn.__all__ if isinstance(getattr(nn, name), type)} if module == "dpfp_jax" else set()
    public = set(importlib.import_module(module).__all__) - linen
    assert public - documented == set(), f"public names of {module} missing from docs/api/{page}"
    assert documented - public == set(), f"docs/api/{page} documents names {module} does not export"


@pytest.mark.parametrize("module, page", [("dpfp_jax.nn", "linen.md"), ("dpfp_jax.nnx", "nnx.md")])
def test_layer_api_pages_follow_all(module, page):
    page = DOCS / "api" / page
    assert re.search(rf"^\.\. automodule:: {re.escape(module)}\n   :members:", page.read_text(), flags=re.M)
