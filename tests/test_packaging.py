"""The set-up a newcomer relies on: README commands, CI, pyproject ↔ environment.yml."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md must open with a ```bash block holding the two commands"
    assert text.index(block.group(0)) < 200, "the two commands must be the README's first lines"
    return [ln for ln in block.group(1).splitlines() if ln.strip()]


def _requirement_names(reqs: list[str]) -> dict[str, str]:
    out = {}
    for r in reqs:
        name = re.split(r"[<>=!~ \[]", r, maxsplit=1)[0].lower().replace("_", "-")
        out[name] = r.replace(" ", "").lower().replace("_", "-")
    return out


def test_readme_has_exactly_two_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert "jupyter lab" in cmds[0] and "pytest" in cmds[1]
    for cmd in cmds:
        assert "torch==2.13.0" in cmd, "pin the CPU torch build so pip does not pull a CUDA build"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert _readme_commands()[1] in ci


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = _requirement_names(project["dependencies"] + project["optional-dependencies"]["dev"])
    env_lines = (REPO / "environment.yml").read_text().splitlines()
    pip_reqs = [ln.strip()[2:] for ln in env_lines if ln.strip().startswith("- ") and ln.startswith("      ")]
    have = _requirement_names([r for r in pip_reqs if not r.startswith("-e")])
    assert have == wanted, f"environment.yml differs from pyproject.toml: {set(have.items()) ^ set(wanted.items())}"


def test_notebooks_in_sync_with_solutions():
    result = subprocess.run([sys.executable, "-m", "kandlab.course", "check"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_solution_has_a_learner_copy_and_a_readme_row():
    readme = (REPO / "README.md").read_text()
    for sol in sorted((REPO / "solutions").glob("*.ipynb")):
        assert (REPO / "notebooks" / sol.name).exists()
        assert sol.stem in readme, f"README lesson table has no row for {sol.stem}"


def _setup_cell(path: Path) -> str:
    import json

    cell = json.loads(path.read_text())["cells"][1]
    return "".join(cell["source"])


def test_colab_setup_cell_keeps_colabs_own_stack():
    """Every lesson's setup cell is the same, installs kandlab with --no-deps (so Colab's torch and
    Jupyter are not reinstalled) and enables the widget manager that ipywidgets 8 needs on Colab."""
    cells = {p.name: _setup_cell(p) for p in sorted((REPO / "solutions").glob("*.ipynb"))}
    first = next(iter(cells.values()))
    assert all(c == first for c in cells.values()), "the lessons' setup cells differ; keep them identical"
    assert "--no-deps -e kandlab" in first and "enable_custom_widget_manager" in first
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(d.startswith(("jupyter", "notebook", "ipykernel")) for d in deps), "Jupyter belongs in the lab extra"


def test_lesson_00_gives_the_readmes_setup_command():
    assert _readme_commands()[0] in _setup_cell_free_text(REPO / "solutions" / "00_welcome.ipynb")


def _setup_cell_free_text(path: Path) -> str:
    import json

    return "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown")
