"""The network is blocked in the test process and in every child Python process."""
import socket
import subprocess
import sys
import time

import pytest

from kandlab import weights


def test_non_loopback_connection_fails_loudly():
    with pytest.raises(OSError, match="network is blocked"):
        socket.create_connection(("93.184.216.34", 443), timeout=1)


def test_loopback_still_works():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=1)
    client.close()
    server.close()


def test_child_processes_inherit_the_block():
    code = "import socket\ntry:\n socket.create_connection(('8.8.8.8', 53), timeout=1)\nexcept OSError as e:\n print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "network is blocked" in out


def test_real_tier_offline_message_is_clear_and_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    assert weights.hub_reachable(timeout=2.0) is False
    with pytest.raises(weights.OfflineError, match="hf download kandinsky-community/kandinsky-3"):
        weights.require_hub("kandinsky-community/kandinsky-3")
    assert time.perf_counter() - start < 6


def test_notebook_kernels_get_fast_mode_and_the_block():
    import os

    assert os.environ["KANDLAB_FAST"] == "1" and os.environ["KANDLAB_BLOCK_NETWORK"] == "1"
    assert "netblock" in os.environ["PYTHONPATH"]
