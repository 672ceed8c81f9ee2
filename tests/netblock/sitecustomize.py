"""Blocks network access in every Python process started by the test suite.

The test suite puts this folder on PYTHONPATH and sets KANDLAB_BLOCK_NETWORK=1,
so notebook kernels started by nbval inherit the block too. Loopback stays open
(Jupyter kernels talk to pytest over it).
"""
import os

if os.environ.get("KANDLAB_BLOCK_NETWORK") == "1":
    import kandlab_netblock  # noqa: F401  (installs the block on import)
