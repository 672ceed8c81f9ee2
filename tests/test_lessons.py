"""What a reader of the committed lessons sees: the executed solutions in solutions/.

These read the committed outputs (they were produced by ``python -m kandlab.course
execute``, the full run) and the sources, without running anything, so a lesson that
drifts from its own numbers, or carries debug leftovers, fails here."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from kandlab import course, viz

REPO = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((REPO / "solutions").glob("*.ipynb"))


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _output_texts(cell: dict) -> list[str]:
    texts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            texts.append(_text(out["text"]))
        elif out["output_type"] == "error":
            texts.append(f"{out['ename']}: {out['evalue']}")
        else:
            texts.append(_text(out.get("data", {}).get("text/plain", "")))
    return texts


def _code_cells(path: Path) -> list[dict]:
    return [c for c in _cells(path) if c["cell_type"] == "code"]


@pytest.fixture(params=SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def lesson(request) -> Path:
    return request.param


def test_no_absolute_temp_paths(lesson):
    """Run All must work where /tmp does not exist (Windows): lessons write inside the repository."""
    for i, cell in enumerate(_code_cells(lesson)):
        src = _source(cell)
        for bad in ("/tmp/", "gettempdir", "tempfile"):
            assert bad not in src, f"{lesson.name} cell {i} uses {bad!r} (a debug leftover?): {src[:200]}"


def test_committed_outputs_have_no_errors(lesson):
    for i, cell in enumerate(_code_cells(lesson)):
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", f"{lesson.name} cell {i}: {out.get('ename')}: {out.get('evalue')}"


def test_no_stray_reprs_or_frozen_progress_bars(lesson):
    """A ``Text(0.5, 1.0, ...)`` repr or a progress bar frozen at 0 % is noise on the page."""
    stray = re.compile(r"^(\[?<matplotlib\.|Text\(|\[Text\()")
    for i, cell in enumerate(_code_cells(lesson)):
        for out in cell.get("outputs", []):
            assert not course.is_progress_bar(out), f"{lesson.name} cell {i} keeps a frozen progress bar"
            if out["output_type"] == "execute_result" and set(out["data"]) == {"text/plain"}:
                text = _text(out["data"]["text/plain"])
                assert not stray.match(text), f"{lesson.name} cell {i} shows a stray repr {text[:60]!r}; end the line with ';'"


def test_every_figure_was_readable(lesson):
    """`course execute` checks each figure a lesson shows (viz.readability_problems)."""
    for i, cell in enumerate(_code_cells(lesson)):
        for text in _output_texts(cell):
            assert viz.UNREADABLE not in text, f"{lesson.name} cell {i}: {text[:400]}"


def test_every_claim_held_in_the_committed_run(lesson):
    """Claim cells print 'claim holds' in the committed (full) run; a failed one is an error output."""
    for i, cell in enumerate(_code_cells(lesson)):
        calls = _source(cell).count("course.claim(")
        if not calls:
            continue
        shown = "\n".join(_output_texts(cell))
        # a claim in a loop prints once per pass, so at least one "holds" per call, and none skipped as FAST-only
        assert "full mode only" not in shown, (
            f"{lesson.name} cell {i} was committed from a FAST run; execute it with `python -m kandlab.course "
            f"execute` (full mode):\n{shown[:600]}")
        assert shown.count("✔ claim holds") >= calls, (
            f"{lesson.name} cell {i}: {calls} claim(s) but {shown.count('✔ claim holds')} held in the committed "
            f"run (was it executed in full mode with `python -m kandlab.course execute`?):\n{shown[:600]}")


def _defined_names(cells: list[dict]) -> set[str]:
    names = set()
    for cell in cells:
        try:
            tree = ast.parse(_source(cell))
        except SyntaxError:  # a cell with IPython magics
            continue
        names |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return names


def test_three_exercises_each_checked_against_kandlab(lesson):
    """At least three exercises; each check compares with kandlab's reference, not a copy in the notebook."""
    cells = _code_cells(lesson)
    exercises = sum(_source(c).count(course.BEGIN) for c in cells)
    assert exercises >= 3, f"{lesson.name} has {exercises} exercises; every lesson has at least three"
    local = _defined_names(cells)
    checks = 0
    for cell in cells:
        try:
            tree = ast.parse(_source(cell))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "course.check":
                checks += 1
                reference = node.args[1] if len(node.args) > 1 else next(k.value for k in node.keywords if k.arg == "reference")
                used = {n.id for n in ast.walk(reference) if isinstance(n, ast.Name)}
                assert not used & local, (
                    f"{lesson.name}: course.check(..., {ast.unparse(reference)}) compares with "
                    f"{sorted(used & local)} defined in the notebook itself; compare with kandlab's reference")
    assert checks >= exercises, f"{lesson.name}: {exercises} exercises but only {checks} course.check calls"


RUN_TIME = re.compile(r"\*\*Run time\*\* \(measured on a 2-core CPU\): full run (?P<full>.+?) · FAST mode "
                      r"\(the tests' setting\) (?P<fast>.+?)\.(?:\s|$)")


def _readme_row(stem: str) -> list[str]:
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("|") and f"(solutions/{stem}.ipynb)" in line:
            return [c.strip() for c in line.strip().strip("|").split("|")]
    raise AssertionError(f"README.md has no lesson-table row linking solutions/{stem}.ipynb")


def test_header_states_the_run_times_the_readme_gives(lesson):
    """Each lesson's header gives its measured times, the same ones as the README's lesson table."""
    header = _source(_cells(lesson)[0])
    found = RUN_TIME.search(header)
    assert found, (f"{lesson.name}: the first cell must state '**Run time** (measured on a 2-core CPU): full run "
                   f"<time> · FAST mode (the tests' setting) <time>.'")
    row = _readme_row(lesson.stem)  # the table's columns: #, lesson, you build, class, FAST, full, Colab
    fast, full = row[4], row[5]
    assert fast.split(" / ")[0] == found["fast"].strip(), (lesson.name, "README:", fast, "header:", found["fast"])
    assert full == found["full"].strip(), (lesson.name, "README:", full, "header:", found["full"])
