"""Course tooling: FAST budgets, exercise checks, and learner-copy generation.

Three things live here, each small:

* ``budget(full=..., fast=...)`` — the one helper that shrinks loops when
  ``KANDLAB_FAST=1`` (set by the test suite), so every code path still runs.
* ``check(fn, reference, cases)`` — what a check cell after an exercise calls.
  It prints a clear pass, "not attempted yet", or raises naming the first
  mismatch. "Not attempted" never raises, so *Run All* on a learner copy always
  completes.
* ``claim(condition, statement, **numbers)`` — what a claim cell calls right
  after a measurement: it prints the lesson's finding with the numbers behind
  it, and raises ``ClaimFailed`` with a teaching message when the numbers no
  longer support the sentence. ``mean_se`` / ``share_se`` give the standard
  errors a comparison states.
* ``build`` / ``check_sync`` — ``notebooks/`` is generated from ``solutions/``:
  code between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` becomes a stub
  (the ``# HINT:`` lines inside are kept, then ``raise NotImplementedError``),
  outputs are cleared, everything else is kept.

Command line::

    python -m kandlab.course build   # regenerate notebooks/ from solutions/
    python -m kandlab.course check   # exit 1 if notebooks/ is stale
    python -m kandlab.course execute [NAME ...]  # run solutions in place, then build
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

BEGIN = "# BEGIN SOLUTION"
END = "# END SOLUTION"
HINT = "# HINT:"
CHECK_OUTPUT_TAG = "nbval-check-output"
REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------
# FAST mode


def is_fast() -> bool:
    """True when ``KANDLAB_FAST`` is set to a true value (the tests set it)."""
    return os.environ.get("KANDLAB_FAST", "0").strip().lower() not in ("", "0", "false", "no")


def budget(full: Any, fast: Any) -> Any:
    """Return ``fast`` in FAST mode, else ``full``.

    Use it for every loop length, sample count or step count that makes a lesson
    slow, e.g. ``steps = budget(full=2000, fast=20)``.
    """
    return fast if is_fast() else full


# ---------------------------------------------------------------------------
# Exercise checks


class NotAttempted(Exception):
    """Raised internally when an exercise still raises NotImplementedError."""


def _describe(x: Any) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{type(x).__name__}(shape={tuple(x.shape)}, dtype={x.dtype})"
    return f"{type(x).__name__}({x!r})" if not isinstance(x, (list, tuple)) else f"{type(x).__name__} of length {len(x)}"


def _to_numpy(x: Any) -> np.ndarray | None:
    if hasattr(x, "detach"):  # torch tensor
        return x.detach().cpu().double().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (int, float, bool, np.number)):
        return np.asarray(x)
    return None


def compare(got: Any, want: Any, atol: float = 1e-5, rtol: float = 1e-5, where: str = "output") -> str | None:
    """Return ``None`` if ``got`` matches ``want``, else a sentence saying how it differs."""
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return f"{where}: expected a {type(want).__name__} of {len(want)} items, got {_describe(got)}"
        for i, (g, w) in enumerate(zip(got, want)):
            problem = compare(g, w, atol, rtol, f"{where}[{i}]")
            if problem:
                return problem
        return None
    w = _to_numpy(want)
    if w is None:
        return None if got == want else f"{where}: expected {want!r}, got {got!r}"
    g = _to_numpy(got)
    if g is None:
        return f"{where}: expected {_describe(want)}, got {_describe(got)}"
    if hasattr(want, "shape") and tuple(np.shape(g)) != tuple(np.shape(w)):
        return f"{where}: shape {tuple(np.shape(g))} but expected {tuple(np.shape(w))}"
    if hasattr(want, "dtype") and hasattr(got, "dtype") and hasattr(want, "is_floating_point"):
        if hasattr(got, "is_floating_point") and got.is_floating_point() != want.is_floating_point():
            return f"{where}: dtype {got.dtype} but expected {want.dtype}"
    if not np.all(np.isfinite(g)) and np.all(np.isfinite(w)):
        return f"{where}: contains NaN or inf"
    err = np.abs(g.astype(np.float64) - w.astype(np.float64))
    tol = atol + rtol * np.abs(w.astype(np.float64))
    if np.any(err > tol):
        return f"{where}: max abs error {err.max():.3g} (tolerance {atol:g})"
    return None


def check(
    fn: Callable,
    reference: Callable,
    cases: Iterable[Sequence[Any] | dict],
    atol: float = 1e-5,
    rtol: float = 1e-5,
    name: str | None = None,
) -> None:
    """Compare an exercise ``fn`` to the ``reference`` on fixed ``cases``.

    Each case is a tuple of positional arguments or a dict of keyword arguments.
    Prints ``✅ passed``; prints *not attempted yet* when ``fn`` raises
    ``NotImplementedError`` (so *Run All* continues); raises ``AssertionError``
    naming the first failing case otherwise. Returns nothing, so a check cell
    shows only the message.
    """
    name = name or getattr(fn, "__name__", "your function")
    cases = list(cases)
    for i, case in enumerate(cases):
        args, kwargs = ((), case) if isinstance(case, dict) else (tuple(case), {})
        want = reference(*copy.deepcopy(args), **copy.deepcopy(kwargs))
        try:
            got = fn(*copy.deepcopy(args), **copy.deepcopy(kwargs))
        except NotImplementedError:
            print(f"⏭  {name}: not attempted yet — the lesson continues with kandlab's version.")
            return
        problem = compare(got, want, atol, rtol)
        if problem:
            shown = ", ".join(_describe(a) for a in args) or ", ".join(f"{k}={_describe(v)}" for k, v in kwargs.items())
            raise AssertionError(f"❌ {name}: case {i + 1} of {len(cases)} ({shown}): {problem}")
    print(f"✅ {name}: passed all {len(cases)} cases.")


# ---------------------------------------------------------------------------
# Claims: a sentence that compares measured things is checked by code


class ClaimFailed(AssertionError):
    """A lesson's claim no longer holds for the numbers its notebook just measured."""


def value_and_grad(fn: Callable) -> Callable:
    """Wrap ``fn`` so that a check compares its gradients too: the wrapped function returns
    ``(fn(*args), grads)``, where ``grads`` holds d sum(fn(*args)) / d a for every tensor argument ``a``
    (in order). For exercises whose point is the backward pass (a straight-through estimator, where a loss
    puts its weights), which equal outputs alone would not test."""

    def wrapped(*args: Any) -> tuple[Any, tuple]:
        import torch

        args = [a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                else a for a in args]
        out = fn(*args)
        inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        grads = torch.autograd.grad(out.sum(), inputs, allow_unused=True)
        return out.detach(), tuple(torch.zeros_like(a) if g is None else g for a, g in zip(inputs, grads))

    wrapped.__name__ = getattr(fn, "__name__", "your function")
    return wrapped


def mean_se(values: Any) -> tuple[float, float]:
    r"""Mean and standard error of the mean, :math:`s / \sqrt{n}` with the sample std (ddof = 1).

    ``values``: anything ``np.asarray`` takes (a list, an array, a tensor), at least 2 numbers.
    """
    x = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"a standard error needs at least 2 values, got {x.size}; measure more samples")
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(x.size))


def share_se(share: float, n: int) -> float:
    r"""Standard error of a share (a proportion) measured on ``n`` items: :math:`\sqrt{p(1-p)/n}`."""
    if n < 1:
        raise ValueError(f"n = {n}: a share needs at least one item")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share = {share} is not a proportion in [0, 1]")
    return float(np.sqrt(share * (1.0 - share) / n))


def _format_number(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2:  # (mean, standard error)
        return f"{_format_number(value[0])} ± {_format_number(value[1])}"
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, bool) or isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return f"{v:.3g}" if v != 0 and (abs(v) < 0.01 or abs(v) >= 1000) else f"{v:.3f}".rstrip("0").rstrip(".") or "0"
    return str(value)


def claim(condition: Any, statement: str, *, full_only: bool = False, **numbers: Any) -> None:
    r"""State a finding of the lesson and check it against the numbers just measured.

    ``condition`` is the comparison written in code (``ddim_score >= ddpm_score - 2 * se``);
    ``statement`` is the sentence the lesson's prose makes; ``numbers`` are the measured
    values it rests on (a ``(mean, se)`` pair prints as ``mean ± se``). The cell prints the
    statement with its numbers when it holds and raises :class:`ClaimFailed` when it does
    not, so a sentence that stops being true fails the test suite instead of misleading
    the next reader.

    ``full_only=True`` marks a claim whose sample is too small to decide it in FAST mode
    (``KANDLAB_FAST=1``, the test suite's setting): there it prints what was measured
    without raising. Returns nothing, so a claim cell shows only its message (nbval runs cells
    without history, where a trailing ``;`` would not hide a return value).
    """
    held = bool(condition)
    measured = ", ".join(f"{k} = {_format_number(v)}" for k, v in numbers.items())
    measured_line = f"\n   measured: {measured}" if measured else ""
    if held:
        print(f"✔ claim holds: {statement}{measured_line}")
        return
    if full_only and is_fast():
        print(f"⏭ claim checked in full mode only (FAST mode measures too few samples to decide it): "
              f"{statement}{measured_line}\n   (in this FAST run it does not hold — expected with so few samples)")
        return
    raise ClaimFailed(
        f"❌ This lesson says: {statement!r} — but the numbers just measured do not support it.{measured_line}\n"
        "If you changed the model, the sampler, the seed or the number of samples, that is the likely reason "
        "(rerun with the lesson's settings). If not, the sentence is wrong: rewrite the prose to say what was "
        "measured and explain why, then change this claim to match."
    )


# ---------------------------------------------------------------------------
# Learner-copy generation


def _stub(lines: list[str], indent: str) -> list[str]:
    hints = [indent + ln.strip() for ln in lines if ln.strip().startswith(HINT)]
    return [indent + "# YOUR CODE HERE", *hints, indent + 'raise NotImplementedError("exercise not attempted yet")']


def strip_solutions(source: str) -> str:
    """Replace every ``# BEGIN SOLUTION`` … ``# END SOLUTION`` block by a stub."""
    out: list[str] = []
    block: list[str] | None = None
    indent = ""
    for lineno, line in enumerate(source.split("\n"), 1):
        stripped = line.strip()
        if stripped == BEGIN:
            if block is not None:
                raise ValueError(f"line {lineno}: nested '{BEGIN}' — close the previous block with '{END}' first")
            block, indent = [], line[: len(line) - len(line.lstrip())]
        elif stripped == END:
            if block is None:
                raise ValueError(f"line {lineno}: '{END}' without a matching '{BEGIN}'")
            out.extend(_stub(block, indent))
            block = None
        elif block is not None:
            block.append(line)
        else:
            out.append(line)
    if block is not None:
        raise ValueError(f"'{BEGIN}' is never closed by '{END}'")
    return "\n".join(out)


def learner_copy(nb: dict) -> dict:
    """Return the learner version of a solution notebook (a JSON dict)."""
    nb = copy.deepcopy(nb)
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        cell["source"] = strip_solutions(src)
        cell["outputs"] = []
        cell["execution_count"] = None
        tags = cell.get("metadata", {}).get("tags", [])
        # Check-cell outputs differ in a learner copy ("not attempted" vs "passed").
        if CHECK_OUTPUT_TAG in tags:
            cell["metadata"]["tags"] = [t for t in tags if t != CHECK_OUTPUT_TAG]
            if not cell["metadata"]["tags"]:
                del cell["metadata"]["tags"]
        cell.get("metadata", {}).pop("execution", None)
    nb.get("metadata", {}).pop("widgets", None)  # no widget state in learner copies
    return nb


def _dumps(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def _pairs(root: Path = REPO) -> list[tuple[Path, Path]]:
    sols = sorted((root / "solutions").glob("*.ipynb"))
    return [(s, root / "notebooks" / s.name) for s in sols]


def build(root: Path = REPO) -> list[Path]:
    """Regenerate ``notebooks/`` from ``solutions/``; return the files written."""
    written = []
    (root / "notebooks").mkdir(exist_ok=True)
    for sol, nbk in _pairs(root):
        text = _dumps(learner_copy(json.loads(sol.read_text())))
        if not nbk.exists() or nbk.read_text() != text:
            nbk.write_text(text)
            written.append(nbk)
    return written


def check_sync(root: Path = REPO) -> list[str]:
    """Return a list of problems: stale, missing or orphaned learner copies."""
    problems = []
    pairs = _pairs(root)
    for sol, nbk in pairs:
        want = _dumps(learner_copy(json.loads(sol.read_text())))
        if not nbk.exists():
            problems.append(f"{nbk.relative_to(root)} is missing")
        elif nbk.read_text() != want:
            problems.append(f"{nbk.relative_to(root)} is stale")
    names = {s.name for s, _ in pairs}
    for orphan in sorted((root / "notebooks").glob("*.ipynb")):
        if orphan.name not in names:
            problems.append(f"{orphan.relative_to(root)} has no solution in solutions/")
    return problems


def execute(path: Path, timeout: int = 1200) -> float:
    """Run a solution notebook in place (outputs committed for readers); return seconds.

    Widget state is dropped afterwards: it is large and a repository page cannot
    use it anyway (each lesson shows a static frame of every widget).
    """
    import time

    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    os.environ["KANDLAB_CHECK_FIGURES"] = "1"  # the kernel inherits it: kandlab.viz checks every figure shown
    # The kernel talks over IPC sockets in a folder of its own: two lessons executed side by side (one per
    # core) picked clashing TCP ports once, which left a client waiting forever on a finished kernel.
    with tempfile.TemporaryDirectory(prefix="kandlab-kernel-") as sockets:
        kernel = KernelManager(kernel_name="python3", transport="ipc", ip=str(Path(sockets) / "kernel"))
        start = time.perf_counter()
        NotebookClient(nb, km=kernel, timeout=timeout, resources={"metadata": {"path": str(path.parent)}}).execute()
        seconds = time.perf_counter() - start
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not is_progress_bar(o)]
    nbformat.write(nb, path)
    return seconds


PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm's "  0%|          | 0/50 [00:00<?, ?it/s]"


def is_progress_bar(output: dict) -> bool:
    """True for a tqdm progress widget in a cell's outputs.

    Without its widget state (which is not committed) a repository page shows such a bar
    frozen at its first frame, "0%", so executed lessons drop them.
    """
    data = output.get("data", {})
    text = data.get("text/plain", "")
    text = "".join(text) if isinstance(text, list) else text
    return "application/vnd.jupyter.widget-view+json" in data and bool(PROGRESS_BAR.search(text))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "check"
    if cmd == "build":
        for path in build():
            print(f"wrote {path.relative_to(REPO)}")
        print("notebooks/ is up to date with solutions/")
        return 0
    if cmd == "execute":
        names = argv[1:] or [s.name for s, _ in _pairs()]
        for name in names:
            path = (REPO / "solutions" / Path(name).name).with_suffix(".ipynb")  # "04_x" or "04_x.ipynb"
            if not path.exists():
                known = ", ".join(s.stem for s, _ in _pairs())
                print(f"no solution {path.name}; choose one of: {known}", file=sys.stderr)
                return 2
            print(f"{path.name}: {execute(path):.1f} s")
        build()
        return 0
    if cmd == "check":
        problems = check_sync()
        if problems:
            print("\n".join(problems))
            print("Run `python -m kandlab.course build` and commit notebooks/.")
            return 1
        print("notebooks/ is in sync with solutions/")
        return 0
    print(f"unknown command {cmd!r}; use `build`, `check` or `execute`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
