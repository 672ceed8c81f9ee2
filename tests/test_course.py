import json
import re

import numpy as np
import pytest
import torch

from kandlab import course


def test_budget_follows_fast_flag(monkeypatch):
    monkeypatch.setenv("KANDLAB_FAST", "1")
    assert course.budget(full=1000, fast=3) == 3
    monkeypatch.setenv("KANDLAB_FAST", "0")
    assert course.budget(full=1000, fast=3) == 1000


def test_strip_solutions_keeps_signature_docstring_and_hints():
    src = '''def f(x):
    """Double x."""
    # BEGIN SOLUTION
    # HINT: multiply by two
    y = 2 * x
    return y
    # END SOLUTION

print(f(3))'''
    out = course.strip_solutions(src)
    assert 'def f(x):\n    """Double x."""' in out
    assert "    # HINT: multiply by two" in out
    assert "    raise NotImplementedError" in out
    assert "y = 2 * x" not in out and "BEGIN SOLUTION" not in out
    assert out.endswith("print(f(3))")
    ns = {}
    exec(out.replace("print(f(3))", ""), ns)
    with pytest.raises(NotImplementedError):
        ns["f"](1)


@pytest.mark.parametrize("bad", ["# BEGIN SOLUTION\nx=1", "x=1\n# END SOLUTION", "# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION"])
def test_strip_solutions_rejects_unbalanced_markers(bad):
    with pytest.raises(ValueError, match="SOLUTION"):
        course.strip_solutions(bad)


def test_learner_copy_clears_outputs_and_check_tags():
    nb = {"cells": [{"cell_type": "code", "source": "x = 1", "outputs": [{"output_type": "stream", "text": "hi"}],
                     "execution_count": 3, "metadata": {"tags": ["nbval-check-output"]}},
                    {"cell_type": "markdown", "source": "# title", "metadata": {}}],
          "metadata": {"widgets": {"state": {}}}, "nbformat": 4, "nbformat_minor": 5}
    out = course.learner_copy(nb)
    cell = out["cells"][0]
    assert cell["outputs"] == [] and cell["execution_count"] is None and "tags" not in cell["metadata"]
    assert out["cells"][1] == nb["cells"][1] and "widgets" not in out["metadata"]
    assert nb["cells"][0]["outputs"], "the solution notebook must not be modified"


def _double(x):
    return 2 * x


def test_check_pass_not_attempted_and_wrong(capsys):
    cases = [(torch.arange(3.0),), (torch.ones(2, 2),)]
    course.check(lambda x: x + x, _double, cases, name="double")
    assert "passed all 2 cases" in capsys.readouterr().out

    def stub(x):
        raise NotImplementedError
    course.check(stub, _double, cases, name="double")
    assert "not attempted yet" in capsys.readouterr().out

    with pytest.raises(AssertionError, match=r"case 1 of 2.*max abs error 2"):
        course.check(lambda x: 3 * x, _double, cases, name="double")
    with pytest.raises(AssertionError, match=r"shape \(3, 1\) but expected \(3,\)"):
        course.check(lambda x: (2 * x)[:, None], _double, cases, name="double")
    with pytest.raises(AssertionError, match="dtype"):
        course.check(lambda x: (2 * x).long(), _double, cases, name="double")


def test_check_compares_tuples_and_numbers(capsys):
    ref = lambda a: (a * 2, float(a.sum()))  # noqa: E731
    course.check(lambda a: (a * 2, float(a.sum())), ref, [(torch.ones(3),)])
    assert "passed all 1 cases" in capsys.readouterr().out
    with pytest.raises(AssertionError, match=r"output\[1\]"):
        course.check(lambda a: (a * 2, 0.0), ref, [(torch.ones(3),)])


def test_build_and_sync_detect_stale_copies(tmp_path):
    (tmp_path / "solutions").mkdir()
    nb = {"cells": [{"cell_type": "code", "source": "# BEGIN SOLUTION\nx = 1\n# END SOLUTION", "outputs": [],
                     "execution_count": None, "metadata": {}}], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "solutions" / "01_a.ipynb").write_text(json.dumps(nb))
    assert course.check_sync(tmp_path) == ["notebooks/01_a.ipynb is missing"]
    course.build(tmp_path)
    assert course.check_sync(tmp_path) == []
    nb["cells"][0]["source"] = "# BEGIN SOLUTION\nx = 2\n# END SOLUTION\nprint(x)"
    (tmp_path / "solutions" / "01_a.ipynb").write_text(json.dumps(nb))
    assert course.check_sync(tmp_path) == ["notebooks/01_a.ipynb is stale"]


def test_no_control_characters_in_lesson_sources():
    """A LaTeX string written without r"" turns \\bar into a backspace and \\approx
    into a bell; the notebook then renders "arlpha". Catch it in every lesson."""
    bad = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
    problems = []
    for path in sorted((course.REPO / "solutions").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            hit = bad.search("".join(cell["source"]))
            if hit:
                problems.append(f"{path.name} cell {i}: {hit.group()!r} near {''.join(cell['source'])[max(0, hit.start() - 20):hit.end() + 20]!r}")
    assert not problems, "control characters in lesson text:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------
# claim(): a sentence that compares measured things is checked by code


def test_claim_prints_statement_and_numbers_when_it_holds(capsys, monkeypatch):
    monkeypatch.setenv("KANDLAB_FAST", "0")
    assert course.claim(0.82 > 0.75, "the decay stage scores higher", decay=0.82, anneal=(0.75, 0.019)) is None
    out = capsys.readouterr().out
    assert "claim holds: the decay stage scores higher" in out
    assert "decay = 0.82" in out and "anneal = 0.75 ± 0.019" in out


def test_claim_raises_a_teaching_error_when_the_numbers_disagree(monkeypatch):
    monkeypatch.setenv("KANDLAB_FAST", "0")
    with pytest.raises(course.ClaimFailed, match=r"(?s)DDIM holds up.*ddim = 0.6.*rewrite the prose"):
        course.claim(0.6 > 0.7, "DDIM holds up", ddim=0.6, ddpm=0.7)


def test_full_only_claims_never_raise_in_fast_mode_but_do_in_full(capsys, monkeypatch):
    monkeypatch.setenv("KANDLAB_FAST", "1")
    course.claim(False, "needs many samples", full_only=True, n=8)
    assert "full mode only" in capsys.readouterr().out
    with pytest.raises(course.ClaimFailed):  # not marked: checked in FAST mode too
        course.claim(False, "holds at any n", n=8)
    monkeypatch.setenv("KANDLAB_FAST", "0")
    with pytest.raises(course.ClaimFailed):
        course.claim(False, "needs many samples", full_only=True, n=512)


def test_claim_accepts_tensor_and_numpy_conditions(capsys):
    course.claim(torch.tensor(True), "a tensor condition", x=torch.tensor(0.5))
    course.claim(np.bool_(True), "a numpy condition", x=np.float32(0.25))
    assert "x = 0.25" in capsys.readouterr().out


def test_mean_se_and_share_se_match_their_formulas():
    values = [1.0, 2.0, 3.0, 4.0]
    mean, se = course.mean_se(values)
    assert mean == 2.5
    assert se == pytest.approx(np.std(values, ddof=1) / 2)
    assert course.mean_se(torch.tensor(values)) == (mean, se)
    assert course.share_se(0.5, 100) == pytest.approx(0.05)
    assert course.share_se(1.0, 10) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        course.mean_se([1.0])
    with pytest.raises(ValueError, match="proportion"):
        course.share_se(1.5, 10)


def test_progress_bars_are_recognised_and_other_widgets_kept():
    bar = {"output_type": "display_data", "data": {"application/vnd.jupyter.widget-view+json": {},
                                                    "text/plain": "  0%|          | 0/50 [00:00<?, ?it/s]"}}
    slider = {"output_type": "display_data", "data": {"application/vnd.jupyter.widget-view+json": {},
                                                       "text/plain": "VBox(children=(IntSlider(value=0),))"}}
    assert course.is_progress_bar(bar) and not course.is_progress_bar(slider)


def test_execute_runs_a_lesson_in_place_and_drops_frozen_progress_bars(tmp_path):
    """`course execute` (the committed outputs' run): outputs written back, tqdm bars dropped, claims shown."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from tqdm.auto import tqdm\nfor _ in tqdm(range(3)): pass"),
                nbformat.v4.new_code_cell("from kandlab import course\ncourse.claim(2 > 1, 'two beats one', a=2)")]
    path = tmp_path / "lesson.ipynb"
    nbformat.write(nb, path)
    course.execute(path, timeout=120)
    cells = nbformat.read(path, as_version=4).cells
    assert not any(course.is_progress_bar(o) for o in cells[0].outputs)
    assert "✔ claim holds: two beats one" in "".join(o.get("text", "") for o in cells[1].outputs)
