"""Test-suite set-up for every test path (unit tests and the nbval notebooks):
FAST mode, no network (here and in notebook kernels), and a per-notebook timing
table at the end of the run. It lives at the repository root so that it applies
to solutions/ and notebooks/ too."""
from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent
NETBLOCK = REPO / "tests" / "netblock"
NOTEBOOK_BUDGET_S = 90.0

# Environment inherited by nbval's kernels: FAST loops, blocked network, offline hub.
os.environ["KANDLAB_FAST"] = "1"
os.environ["KANDLAB_BLOCK_NETWORK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["MPLBACKEND"] = "Agg"
# PyTorch's OpenMP workers busy-wait by default; on a 2-core machine with a notebook
# kernel beside the test process that can slow small ops 10-100x. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(NETBLOCK), str(REPO), os.environ.get("PYTHONPATH", "")) if p
)
for p in (str(REPO), str(NETBLOCK)):
    if p not in sys.path:
        sys.path.insert(0, p)
import kandlab_netblock  # noqa: E402,F401  (blocks this process too)

_notebook_seconds: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        _notebook_seconds[path] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _notebook_seconds:
        return
    tr = terminalreporter
    tr.section("notebook execution time (slowest first)")
    for path, seconds in sorted(_notebook_seconds.items(), key=lambda kv: -kv[1]):
        flag = "  ⚠ over the 90 s budget" if seconds > NOTEBOOK_BUDGET_S else ""
        tr.write_line(f"{seconds:7.1f} s  {path}{flag}")
    tr.write_line(f"{sum(_notebook_seconds.values()):7.1f} s  total")
