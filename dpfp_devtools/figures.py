"""Every figure in a hand-written page is tied to a generated report (``make check-figures``).

The hand-written pages (README.md, docs/*.md, examples/README.md) say what the generated reports
under docs/reports/ show; the reports are what the benchmark scripts printed. This check finds
every measured figure in the hand-written pages and fails unless it is tied to a report, so a
table that is re-measured without its summaries being updated (or a summary edited without its
table) fails here::

    python -m dpfp_devtools.figures            # the repository this file is in
    python -m dpfp_devtools.figures --list     # also every figure found, page and line

What counts as a figure: a number with a unit of measurement (``0.53x``, ``31.5 MB``, ``124 s``,
``4,176 tokens/s``; the units are ``UNITS``), in prose, in a heading, in a table cell (the unit
may stand in the column's header) or in a comment of a shell code block. Not figures, by rule:

- numbers without a unit: shapes (``T = 4096``, ``K = 128``), versions, dates, counts;
- anything in code (inline code spans, code blocks other than their shell comments);
- a figure right after a bound (``at most 1.3x``, ``<= 0.35x``, ``at least 2x``, ``within 20
  minutes``): a goal, a limit or a test's threshold, not a result. ("up to", "under" and "over"
  often state results, so they are not bounds here.)

A figure is tied when its number appears verbatim (as a whole token; a ratio with its ``x``, or
in a table column whose header is a ratio, "a / b") in a
report that its block (paragraph, list, table) links to or, when the block links to none, that
its section (the lines under its heading) links to. Anything else needs one of three markers, an
HTML comment on its own line at the end of the block, or after it with a blank line between
(invisible on GitHub and in the built site):

- ``<!-- figure 0.41 GB = 409.5 / 1000 (reports/tpu_memory.md) -->``: a derived figure (a unit
  conversion, a ratio of two cells, a rounding). Every number in the expression must appear
  verbatim in the named report, except 1 (a reciprocal) and the unit constants 1000 and 1024, and
  the expression must round to the figure at the figure's own precision. The report then counts
  as linked from the block.
- ``<!-- not-measured 16 MiB, 227 KiB: hardware limits -->``: the listed figures are not
  measurements (a spec sheet, a setting, an installed size); the reason is required.
- ``<!-- quoted: the maintainers' notes from one H200; no script here reproduces them -->``:
  every figure of the block is quoted from outside this repository, as the page says.

A table of figures in a hand-written page fails whatever it holds: generated tables belong under
docs/reports/, where the scripts' output is kept as printed. The one exception is a region a
script writes into a page itself, between ``<!-- NAME: written by PATH ... -->`` and
``<!-- end of NAME -->`` (PATH a file of the repository holding that opening comment, e.g. the capacity tables
``examples/paper_figures.py`` puts in docs/paper_figures.md and the README): it is the script's
output, not hand-written, and is not checked.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import operator
import re
import sys
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
REPORTS_DIR = Path("docs/reports")

# Units of measured quantities: ratios, times, memory, throughputs, losses.
UNITS = ("%", "ms", "s", "min", "minutes", "hours", "seconds", "MB", "GB", "KB", "MiB", "GiB", "KiB",
         "tokens/s", "bits/byte")
_UNIT = "|".join(sorted((re.escape(u) for u in UNITS), key=len, reverse=True))
# A ratio's x sticks to its number (0.53x); the other units follow a space or not (31.5 MB, 5%).
# Not preceded by a letter, digit, '.', '-' or '=' (names like v5e, ranges like 2-core, flags).
FIGURE = re.compile(
    rf"(?<![\w.\-/=])(?P<number>\d{{1,3}}(?:,\d{{3}})+|\d+(?:\.\d+)?)"
    rf"(?:(?P<ratio>x)|\s?(?P<unit>{_UNIT}))(?![\w/])"
)
NUMBER = r"\d{1,3}(?:,\d{3})+(?!\d)|\d+(?:\.\d+)?"
# Numbers listed before a figure's number, sharing its unit: "105.0, 109.2 and ", "33 to ".
LISTED = re.compile(rf"(?<![\w.\-/=])(?:(?:{NUMBER})(?:,\s+|\s+and\s+|\s+to\s+))+$")
# Goals, limits and thresholds: a figure right after one of these is not a result.
COMPARISON = re.compile(
    r"(?:at most|at least|no more than|no less than|within|<=|>=|≤|≥|<|>)\s*(?:about\s+)?$",
    re.IGNORECASE,
)
UNIT_CONSTANTS = {"1", "1000", "1024"}  # a reciprocal, unit conversions
MARKER = re.compile(r"<!--\s*(?P<kind>figure|not-measured|quoted)\b(?P<body>.*?)-->", re.DOTALL)
COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
INLINE_CODE = re.compile(r"(`+).*?\1", re.DOTALL)
HEADING = re.compile(r"^(#{1,6})\s")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*(?P<info>\S*)")
SHELL_COMMENT = re.compile(r"(?:^\s*|\s)#.*")
# A region a script writes into a hand-written page: its opening and closing comments.
GENERATED_BEGIN = re.compile(r"^<!--\s*(?P<name>[^:>]+):\s*written by\s+(?P<path>\S+?)[\s,;].*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Figure:
    page: Path
    line: int
    text: str  # as written, e.g. "0.53x", "31.5 MB"
    number: str  # e.g. "0.53", "31.5"
    unit: str  # e.g. "x", "MB"


@dataclasses.dataclass
class Block:
    """A paragraph, list, table or heading: the lines between blank lines (or a code block's comments)."""

    page: Path
    first_line: int
    lines: list[str]
    section: int  # index of the section (heading) the block sits in
    in_code: bool = False
    markers: list[str] = dataclasses.field(default_factory=list)  # from a markers-only block after it

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def _attach_marker_blocks(page_blocks: list[Block]) -> list[Block]:
    """A block of nothing but markers belongs to the block before it (after a table, a blank line
    must come first: Markdown would read the marker as one more row)."""
    kept: list[Block] = []
    for block in page_blocks:
        if kept and not block.in_code and MARKER.search(block.text) and not COMMENT.sub("", block.text).strip():
            kept[-1].markers.extend(block.lines)
        else:
            kept.append(block)
    return kept


@dataclasses.dataclass
class Problem:
    figure: Figure
    reason: str

    def __str__(self) -> str:
        return f"{self.figure.page}:{self.figure.line}: {self.figure.text!r}: {self.reason}"


def hand_written_pages(root: Path) -> list[Path]:
    """README.md, docs/*.md (the reports excluded) and examples/README.md, relative to ``root``."""
    pages = [Path("README.md"), *sorted(p.relative_to(root) for p in (root / "docs").glob("*.md")),
             Path("examples/README.md")]
    return [p for p in pages if (root / p).is_file()]


def _generated_end(line: str, root: Path | None) -> re.Pattern | None:
    """For a line that opens a region a script writes (``GENERATED_BEGIN``, naming a file under
    ``root`` that holds this very comment, as the script that writes it does), the pattern of its
    end comment; else None."""
    begin = GENERATED_BEGIN.match(line.strip())
    if begin is None or root is None or not (root / begin.group("path")).is_file():
        return None
    if line.strip() not in (root / begin.group("path")).read_text(errors="replace"):
        return None
    return re.compile(rf"<!--\s*end of (?:the )?{re.escape(begin.group('name').strip())}\s*-->")


def blocks(page: Path, text: str, parents: dict[int, int], root: Path | None = None,
           unclosed: list[tuple[int, str]] | None = None) -> Iterator[Block]:
    """The page's blocks in order; a code block yields only its shell comments, and a region a
    script writes (between ``GENERATED_BEGIN`` naming a file under ``root`` and its end comment)
    none.

    Sections are numbered from 1 in the order of their headings (0: the page above the first);
    ``parents`` is filled with each section's enclosing one. A region still open at the page's end
    (it would hide the rest of the page from the check) is added to ``unclosed`` as its opening
    line and the end comment it wants.
    """
    section, open_sections = 0, [(0, 0)]  # (heading level, section) from the page down
    current: Block | None = None
    fence: str | None = None
    shell = False
    generated: re.Pattern | None = None  # the end comment of the generated region we are in
    for number, line in enumerate(text.splitlines(), 1):
        if generated is not None:
            if generated.fullmatch(line.strip()):
                generated = None
            continue
        generated = _generated_end(line, root) if fence is None else None
        if generated is not None:
            opened = number
            if current:
                yield current
            current = None
            continue
        opening = FENCE.match(line)
        if fence is not None:
            if opening and opening.group(1).startswith(fence) and not opening.group("info"):
                fence = None
            elif shell and (comment := SHELL_COMMENT.search(line)):
                yield Block(page, number, [comment.group(0)], section, in_code=True)
            continue
        if opening:
            if current:
                yield current
                current = None
            fence, info = opening.group(1), opening.group("info").lower()
            shell = info in ("bash", "sh", "shell", "console")
            continue
        heading = HEADING.match(line)
        if heading:
            if current:
                yield current
            section += 1
            level = len(heading.group(1))
            while open_sections[-1][0] >= level:
                open_sections.pop()
            parents[section] = open_sections[-1][1]
            open_sections.append((level, section))
            yield Block(page, number, [line], section)
            current = None
            continue
        if not line.strip():
            if current:
                yield current
            current = None
            continue
        if current is None:
            current = Block(page, number, [], section)
        current.lines.append(line)
    if current:
        yield current
    if generated is not None and unclosed is not None:
        unclosed.append((opened, generated.pattern))


def report_links(block_text: str, page: Path, root: Path) -> set[Path]:
    """The reports (under docs/reports/) a block links to, relative to ``root``."""
    found = set()
    for match in LINK.finditer(block_text):
        target = match.group("target").split("#", 1)[0]
        if not target.endswith(".md") or "://" in target:
            continue
        resolved = (root / page.parent / target).resolve()
        try:
            relative = resolved.relative_to(root.resolve())
        except ValueError:
            continue
        if relative.parent == REPORTS_DIR:
            found.add(relative)
    return found


def _prose(text: str) -> str:
    """The text with comments and inline code blanked, same length (offsets stay line-true)."""
    blank = lambda m: re.sub(r"[^\n]", " ", m.group(0))  # noqa: E731
    return INLINE_CODE.sub(blank, COMMENT.sub(blank, text))


def _table_header_units(lines: list[str]) -> list[str] | None:
    """For a Markdown table, the unit each column's header names ('' if none); None if not a table."""
    if len(lines) < 2 or not all(line.lstrip().startswith("|") for line in lines):
        return None
    if not re.fullmatch(r"\s*\|?[\s:|-]+\|?\s*", lines[1]):
        return None
    units = []
    for cell in _cells(LINK.sub("]", lines[0])):
        named = [u for u in UNITS if re.search(rf"(?<![\w/]){re.escape(u)}(?![\w/])", cell)]
        units.append(named[0] if named else "")
    return units


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def figures_in(block: Block) -> tuple[list[Figure], bool]:
    """The block's figures, and whether it is a table holding any."""
    prose = _prose(block.text)
    found = []
    for match in FIGURE.finditer(prose):
        before = prose[:match.start()]
        if COMPARISON.search(before[-40:]):
            continue
        unit = "x" if match.group("ratio") else match.group("unit")
        # A list that ends in the unit shares it: "105.0, 109.2 and 153.2 MB", "33 to 159 s".
        chain = LISTED.search(before) if unit != "x" else None
        if chain:
            for number in re.finditer(NUMBER, chain.group(0)):
                start = chain.start() + number.start()
                if not COMPARISON.search(prose[:start][-40:]):
                    found.append(Figure(block.page, block.first_line + prose[:start].count("\n"),
                                        f"{number.group(0)} {unit}", number.group(0), unit))
        line = block.first_line + before.count("\n")
        found.append(Figure(block.page, line, match.group(0), match.group("number"), unit))
    # A table of figures: a cell that is nothing but a figure, or a bare number under a unit.
    units = None if block.in_code else _table_header_units(block.lines)
    is_table_of_figures = False
    if units is not None:
        seen = {(f.line, f.number) for f in found}
        for offset, row in enumerate(block.lines[2:], 2):
            line = block.first_line + offset
            for cell, unit in zip(_cells(_prose(row)), units, strict=False):
                whole = FIGURE.fullmatch(cell)
                bare = re.fullmatch(r"\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?", cell)
                if whole or (bare and unit):
                    is_table_of_figures = True
                if bare and unit and (line, cell) not in seen:
                    found.append(Figure(block.page, line, cell, cell, unit))
    return found, is_table_of_figures


@functools.lru_cache(maxsize=64)
def _ratio_cells(text: str) -> str:
    """The cells of a report's ratio columns (a header with a '/': "critical path / single's"),
    each with an x appended, so that "0.71x" in a page matches such a column's "0.71"."""
    cells, header = [], None
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            header = None
            continue
        row = _cells(line)
        if header is None:
            header = row
        elif not re.fullmatch(r"[\s:|-]+", line.strip()):
            cells += [f"{cell}x" for cell, name in zip(row, header, strict=False) if "/" in name]
    return " ".join(cells)


def _token_in(number: str, unit: str, text: str) -> bool:
    # A ratio matches a ratio (0.53x, or a number in a ratio column); anything else a number that
    # is not one (31.5, not 31.5x).
    if unit == "x":
        text = f"{text} {_ratio_cells(text)}"
    pattern = re.escape(number) + ("x" if unit == "x" else r"(?!\d|\.\d|x)")
    return re.search(rf"(?<![\d.]){pattern}(?!\d|\.\d)", text) is not None


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    raise ValueError(f"only numbers and + - * / are allowed in a figure's expression; got {ast.dump(node)}")


@dataclasses.dataclass(frozen=True)
class Derivation:
    figure: str  # as in the page, e.g. "0.41 GB"
    expression: str
    report: Path


def parse_markers(block: Block, page: Path, root: Path) -> tuple[list[Derivation], set[str], bool, list[str]]:
    """A block's markers: derivations, not-measured figure texts, whether quoted, and marker errors."""
    derivations, not_measured, quoted, errors = [], set(), False, []
    for match in MARKER.finditer(INLINE_CODE.sub("", "\n".join([block.text, *block.markers]))):
        kind, body = match.group("kind"), " ".join(match.group("body").split())
        if kind == "quoted":
            if not body.strip(": "):
                errors.append("a quoted marker needs its source")
            quoted = True
        elif kind == "not-measured":
            listed, _, reason = body.partition(":")
            if not reason.strip():
                errors.append(f"not-measured {listed.strip()!r} needs a reason after ':'")
            not_measured.update(t.strip() for t in listed.split(",") if t.strip())
        else:
            m = re.fullmatch(r"(?P<figure>.+?)\s*=\s*(?P<expr>[\d\s.+*/()-]+?)\s*\((?P<report>[^)]+\.md)\)", body)
            if not m:
                errors.append(f"cannot read the figure marker {body!r}: want 'FIGURE = EXPRESSION (REPORT)'")
                continue
            report = report_links(f"]({m.group('report')})", page, root)
            if not report:
                errors.append(f"figure marker {body!r} names no report under {REPORTS_DIR}")
                continue
            derivations.append(Derivation(m.group("figure"), m.group("expr"), report.pop()))
    return derivations, not_measured, quoted, errors


def check_derivation(figure: Figure, derivation: Derivation, root: Path) -> str | None:
    """Why a derived figure does not follow from its report, or None when it does."""
    report_path = root / derivation.report
    if not report_path.is_file():
        return f"its marker names {derivation.report}, which does not exist"
    report = report_path.read_text()
    for operand in re.findall(r"\d+(?:\.\d+)?", derivation.expression):
        if operand not in UNIT_CONSTANTS and not (_token_in(operand, "", report) or _token_in(operand, "x", report)):
            return f"its marker's operand {operand} is not in {derivation.report}"
    try:
        value = _evaluate(ast.parse(derivation.expression, mode="eval"))
    except ZeroDivisionError:
        return f"its marker's {derivation.expression} divides by zero"
    written = float(figure.number.replace(",", ""))
    decimals = len(figure.number.partition(".")[2])
    if abs(value - written) > 0.5 * 10 ** -decimals + 1e-9:
        return f"its marker's {derivation.expression} = {value:.{decimals + 2}f}, not {figure.number}"
    return None


def _figure_problems(figure: Figure, derivations: list[Derivation], sources: set[Path], root: Path) -> list[str]:
    """Why one figure is not tied: its derivations fail, or its linked reports do not hold it."""
    mine = [d for d in derivations if d.figure == figure.text]
    if mine:
        return [reason for d in mine if (reason := check_derivation(figure, d, root))]
    texts = [(root / s).read_text() for s in sources if (root / s).is_file()]
    if not texts:
        return [f"neither its block nor its sections link a report under {REPORTS_DIR}/ "
                "(or give a marker: see dpfp_devtools/figures.py)"]
    if not any(_token_in(figure.number, figure.unit, t) for t in texts):
        return [f"not in {', '.join(str(s) for s in sorted(sources))} (what its block or section links)"]
    return []


def check_page(root: Path, page: Path) -> tuple[list[Figure], list[Problem]]:
    """One page's figures, and those tied to no report (with why)."""
    parents: dict[int, int] = {}
    unclosed: list[tuple[int, str]] = []
    page_blocks = _attach_marker_blocks(list(blocks(page, (root / page).read_text(), parents, root, unclosed)))
    section_links: dict[int, set[Path]] = {}
    for block in page_blocks:
        section_links.setdefault(block.section, set()).update(report_links(block.text, page, root))
    everything = []
    problems = [Problem(Figure(page, opened, "<!-- -->", "", ""),
                        f"a region a script writes opens here and never closes (want {pattern!r})")
                for opened, pattern in unclosed]
    for block in page_blocks:
        found, is_table = figures_in(block)
        everything.extend(found)
        derivations, not_measured, quoted, errors = parse_markers(block, page, root)
        problems += [Problem(Figure(page, block.first_line, "<!-- -->", "", ""), e) for e in errors]
        if is_table and not quoted:
            problems.append(Problem(found[0], f"a table of {len(found)} figures in a hand-written page: "
                                              f"move it under {REPORTS_DIR}/, as its script printed it"))
            continue
        sources = report_links(block.text, page, root) | {d.report for d in derivations}
        section = block.section
        while not sources and section is not None:  # the nearest enclosing section that links one
            sources, section = section_links.get(section, set()), parents.get(section)
        for figure in found:
            if not (quoted or figure.text in not_measured):
                problems += [Problem(figure, reason) for reason in _figure_problems(figure, derivations, sources, root)]
        for text in sorted(({d.figure for d in derivations} | not_measured) - {f.text for f in found}):
            problems.append(Problem(Figure(page, block.first_line, text, "", ""),
                                    "a marker names this figure, but its block does not hold it"))
    return everything, problems


def check(root: Path = REPO_ROOT, pages: list[Path] | None = None) -> tuple[list[Figure], list[Problem]]:
    """Every figure of the hand-written pages, and the problems: figures tied to no report."""
    root = Path(root)
    everything, problems = [], []
    for page in pages if pages is not None else hand_written_pages(root):
        found, wrong = check_page(root, page)
        everything += found
        problems += wrong
    return everything, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", type=Path, default=REPO_ROOT, help="the repository (default: this one)")
    parser.add_argument("--list", action="store_true", help="print every figure found")
    args = parser.parse_args(argv)
    figures, problems = check(args.root)
    if args.list:
        for figure in figures:
            print(f"{figure.page}:{figure.line}: {figure.text}")
    for problem in problems:
        print(problem)
    pages = len({f.page for f in figures})
    print(f"{len(figures)} figures in {pages} hand-written pages; {len(problems)} not tied to a report")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
