"""Every figure in a hand-written page is tied to a generated report (dpfp_devtools/figures.py).

`make check-figures` runs the same check; these run it on the repository as it is, and on small
made-up pages and on a copy of the repository's pages with one report edited, to show it fails.
"""

import re
import shutil
import textwrap
from pathlib import Path

import pytest

from dpfp_devtools import figures

ROOT = Path(__file__).resolve().parent.parent


def test_every_figure_in_the_hand_written_pages_is_tied_to_a_report():
    found, problems = figures.check(ROOT)
    assert len(found) > 100  # the pages hold figures, and the check finds them
    assert not problems, "\n".join(map(str, problems))


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


REPORT = """\
    # Speed
    | impl | fwd ms | fwd+bwd temp MB | time / chunk |
    |---|---:|---:|---:|
    | chunk | 47.72 | 31.5 | 1.00x |
    | scan | 39.19 | 26.3 | 0.93x |
    | jla chunked | 65.65 | 134.9 | 1.76x |
"""


def problems_of(tmp_path: Path, page: str, report: str = REPORT) -> list[str]:
    root = write(tmp_path, {"docs/reports/speed.md": report, "docs/page.md": page})
    found, problems = figures.check(root, [Path("docs/page.md")])
    return [f"{p.figure.text}: {p.reason}" for p in problems]


def test_a_figure_verbatim_in_the_linked_report_is_tied(tmp_path):
    page = """\
        # Speed
        The peer took 1.76x of chunk's time and 134.9 MB ([table](reports/speed.md)).
    """
    assert problems_of(tmp_path, page) == []


def test_a_figure_not_in_the_linked_report_fails(tmp_path):
    page = """\
        # Speed
        The peer took 1.8x of chunk's time and 135 MB ([table](reports/speed.md)).
    """
    assert [p.split(":")[0] for p in problems_of(tmp_path, page)] == ["1.8x", "135 MB"]


def test_a_ratio_matches_only_a_ratio(tmp_path):
    # 47.72 is in the report, but as milliseconds, not as a ratio.
    page = "# Speed\n\nIt took 47.72x ([table](reports/speed.md)).\n"
    assert len(problems_of(tmp_path, page)) == 1


def test_the_section_s_link_ties_a_paragraph_without_one(tmp_path):
    page = """\
        # Speed
        The table: [reports/speed.md](reports/speed.md).

        ## Below
        scan took 0.93x of chunk's time.

        # Another page part
        scan took 0.93x of chunk's time.
    """
    assert [p.split(":")[0] for p in problems_of(tmp_path, page)] == ["0.93x"]  # the last one only


def test_a_derived_figure_follows_from_its_marker(tmp_path):
    page = """\
        # Speed
        chunk took 0.57x of the peer's time, 31.5 MB being 0.03 GB.
        <!-- figure 0.57x = 1 / 1.76 (reports/speed.md) -->
        <!-- figure 0.03 GB = 31.5 / 1000 (reports/speed.md) -->
    """
    assert problems_of(tmp_path, page) == []


def test_a_derived_figure_fails_when_its_operands_or_its_arithmetic_do_not_hold(tmp_path):
    page = """\
        # Speed
        chunk took 0.50x of the peer's time, and scan 0.9x of chunk's.
        <!-- figure 0.50x = 1 / 1.76 (reports/speed.md) -->
        <!-- figure 0.9x = 0.91 (reports/speed.md) -->
    """
    found = problems_of(tmp_path, page)
    assert len(found) == 2
    assert "= 0.5682" in found[0] and "operand 0.91 is not in" in found[1]


def test_markers_are_checked(tmp_path):
    page = """\
        # Speed
        v4 has 16 MiB of VMEM per core; the package is about 690 MB, it took 2 s.
        <!-- not-measured 16 MiB: a spec sheet's figure -->
        <!-- not-measured 690 MB -->
        <!-- not-measured 3 GB: a figure the block does not hold -->
        <!-- figure 2 s = 1 + 1 (reports/nowhere.md) -->
    """
    found = problems_of(tmp_path, page)
    assert any("690 MB" in p and "needs a reason" in p for p in found)
    assert any(p.startswith("3 GB: a marker names this figure") for p in found)
    assert any("names no report" in p or "does not exist" in p for p in found)
    assert not any(p.startswith("16 MiB") for p in found)


def test_what_is_not_a_measurement_is_not_flagged(tmp_path):
    page = """\
        # Shapes, versions, dates, goals, code
        At B = 8, T = 4096, K = 128 (v5e 2x2, 2-core, jax 0.11.2, 2026-12-07), the goal was
        <= 0.35x, at most 1.3x, within 20 minutes, no more than 1 GB; `--budget 3 s`.

        ```bash
        make demo   # the quick preset
        ```
        ```python
        x = 5.0  # 3 ms
        ```
    """
    assert problems_of(tmp_path, page) == []


def test_a_shell_comment_s_figure_is_a_figure(tmp_path):
    page = "# Demo\n\n```bash\nmake demo   # about 5 minutes\n```\n"
    assert [p.split(":")[0] for p in problems_of(tmp_path, page)] == ["5 minutes"]


def test_a_table_of_figures_in_a_hand_written_page_fails_unless_quoted(tmp_path):
    table = """\
        # Speed
        [table](reports/speed.md)

        | impl | fwd ms |
        |---|---:|
        | chunk | 47.72 |
    """
    assert len(problems_of(tmp_path, table)) == 1 and "a table of 1 figures" in problems_of(tmp_path, table)[0]
    quoted = table + "\n        <!-- quoted: a peer's notes, no script here -->\n"
    assert problems_of(tmp_path, quoted) == []
    words = "# Status\n\n| part | state |\n|---|---|\n| kernel | compiled, not run |\n"
    assert problems_of(tmp_path, words) == []


def test_a_region_a_script_writes_is_not_checked_but_a_made_up_script_does_not_exempt(tmp_path):
    region = """\
        # Capacity
        <!-- capacities: written by tools/draw.py from the CSVs; edits here are overwritten -->
        | method | capacity | runtime (s) |
        |---|---:|---:|
        | dpfp | 100 | 209 |

        All took 12.5 s.
        <!-- end of the capacities -->

        After it, 3.5 s is checked again.
    """
    begin = "<!-- capacities: written by tools/draw.py from the CSVs; edits here are overwritten -->"
    write(tmp_path, {"tools/draw.py": f"BEGIN = {begin!r}\n"})
    assert problems_of(tmp_path, region) == ["3.5 s: neither its block nor its sections link a report under "
                                             "docs/reports/ (or give a marker: see dpfp_devtools/figures.py)"]
    write(tmp_path, {"tools/draw.py": "print()\n"})  # a file that does not write this region
    assert [p.split(":")[0] for p in problems_of(tmp_path, region)] == ["12.5 s", "3.5 s"]
    (tmp_path / "tools/draw.py").unlink()  # no such script: the region is hand-written after all
    assert [p.split(":")[0] for p in problems_of(tmp_path, region)] == ["12.5 s", "3.5 s"]
    write(tmp_path, {"tools/draw.py": f"BEGIN = {begin!r}\n"})
    unclosed = region.replace("<!-- end of the capacities -->", "<!-- end of the capacitys -->")
    assert [p.split(":", 1)[1].strip()[:45] for p in problems_of(tmp_path, unclosed)] == [
        "a region a script writes opens here and never"]


def copy_pages(tmp_path: Path) -> Path:
    for page in figures.hand_written_pages(ROOT):
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / page, tmp_path / page)
        for line in (ROOT / page).read_text().splitlines():  # the scripts that write regions of it
            if begin := figures.GENERATED_BEGIN.match(line.strip()):
                (tmp_path / begin.group("path")).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / begin.group("path"), tmp_path / begin.group("path"))
    shutil.copytree(ROOT / "docs" / "reports", tmp_path / "docs" / "reports")
    return tmp_path


def test_editing_a_copy_of_a_report_breaks_the_figures_that_quote_it(tmp_path):
    root = copy_pages(tmp_path)
    found, problems = figures.check(root)
    assert not problems
    report = root / "docs" / "reports" / "cpu_benchmarks.md"
    text = report.read_text()
    # Every time and ratio in the CPU tables re-measured: each cell's last digit changed.
    changed = re.sub(r"(?<=\| )(\d+\.\d*)(\d)(?=x? \|)", lambda m: m.group(1) + str((int(m.group(2)) + 1) % 10), text)
    assert changed != text
    report.write_text(changed)
    _, problems = figures.check(root)
    broken = {p.figure.page for p in problems}
    assert Path("docs/benchmarks.md") in broken, problems
    assert all("not in" in p.reason or "operand" in p.reason or "=" in p.reason for p in problems)


@pytest.mark.parametrize("text, want", [
    ("0.53x", ("0.53", "x")), ("31.5 MB", ("31.5", "MB")), ("4,176 tokens/s", ("4,176", "tokens/s")),
    ("124 s", ("124", "s")), ("5%", ("5", "%")), ("v5e", None), ("2x2", None), ("0.11.2", None),
    ("2-core", None), ("--steps 300", None), ("3 x 300", None),
])
def test_what_a_figure_is(text, want):
    match = figures.FIGURE.search(text)
    got = (match.group("number"), "x" if match.group("ratio") else match.group("unit")) if match else None
    assert got == want


def test_numbers_listed_before_a_unit_share_it(tmp_path):
    page = "# Speed\n\nIts figures are 31.5, 26.3 and 134.9 MB, then 47.72 to 39.20 ms ([t](reports/speed.md)).\n"
    assert [p.split(":")[0] for p in problems_of(tmp_path, page)] == ["39.20 ms"]


def test_a_marker_in_inline_code_is_an_example_not_a_marker(tmp_path):
    page = "# Rules\n\nWrite `<!-- not-measured 16 MiB: a spec -->` below the paragraph.\n"
    assert problems_of(tmp_path, page) == []


def test_the_command_exits_1_with_a_line_per_untied_figure(tmp_path, capsys):
    root = copy_pages(tmp_path)
    assert figures.main([str(root)]) == 0
    page = root / "docs" / "benchmarks.md"
    page.write_text(page.read_text().replace("1.76x", "1.67x", 1))
    assert figures.main([str(root)]) == 1
    out = capsys.readouterr().out
    assert "docs/benchmarks.md:" in out and "'1.67x': not in docs/reports/cpu_benchmarks.md" in out
