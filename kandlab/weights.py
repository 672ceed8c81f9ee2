"""Where weights come from: the shipped tiny tier (``data/``) and the opt-in real tier.

Tiny checkpoints are safetensors files in ``data/``, each with a JSON card beside
it and a line in ``data/MANIFEST.sha256`` (``<sha256>  <file name>``). Loading
verifies the hash, so a corrupted or half-downloaded file is caught with a
message instead of producing a silently wrong picture.

Real published weights (the model hub) are only touched when a learner asks for
them; offline, ``require_hub`` raises a message that says what to download.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from pathlib import Path
from typing import Literal

HUB_HOST = "huggingface.co"
MANIFEST_NAME = "MANIFEST.sha256"

Status = Literal["ok", "missing", "mismatch", "unlisted"]


def data_dir() -> Path:
    """The folder holding shipped checkpoints (``$KANDLAB_DATA`` overrides it)."""
    env = os.environ.get("KANDLAB_DATA")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(root: Path | None = None) -> dict[str, str]:
    """Map file name → expected sha256, from ``data/MANIFEST.sha256``."""
    path = (root or data_dir()) / MANIFEST_NAME
    if not path.exists():
        return {}
    entries = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ValueError(f"{path}:{lineno}: expected '<sha256>  <file name>', got {line!r}")
        entries[parts[1]] = parts[0]
    return entries


def write_manifest(root: Path | None = None) -> Path:
    """Rewrite the manifest from every checkpoint and asset in ``data/``."""
    root = root or data_dir()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    lines = [f"{sha256_file(p)}  {p.relative_to(root).as_posix()}" for p in files]
    path = root / MANIFEST_NAME
    path.write_text("# sha256 of every file in data/ — rebuild with kandlab.weights.write_manifest()\n" + "\n".join(lines) + "\n")
    return path


def verify(name: str, root: Path | None = None) -> Status:
    """Check one shipped file against the manifest."""
    root = root or data_dir()
    expected = read_manifest(root).get(name)
    path = root / name
    if not path.exists():
        return "missing"
    if expected is None:
        return "unlisted"
    return "ok" if sha256_file(path) == expected else "mismatch"


def shipped_checkpoints(root: Path | None = None) -> dict[str, Status]:
    """Status of every checkpoint named in the manifest or present in ``data/``."""
    root = root or data_dir()
    names = set(read_manifest(root)) | {p.name for p in root.glob("*.safetensors")}
    return {n: verify(n, root) for n in sorted(names) if n.endswith(".safetensors")}


def tiny_path(name: str) -> Path:
    """Path of a shipped tiny checkpoint, verified; raises with what to do otherwise."""
    root = data_dir()
    status = verify(name, root)
    if status == "missing":
        known = ", ".join(sorted(shipped_checkpoints(root))) or "none"
        raise FileNotFoundError(
            f"tiny checkpoint {name!r} is not in {root}. Shipped checkpoints: {known}. "
            f"Restore it with `git checkout -- data/{name}` or rebuild it with `kandlab train`."
        )
    if status == "mismatch":
        raise ValueError(
            f"data/{name} does not match its sha256 in data/{MANIFEST_NAME} (corrupted or replaced). "
            f"Restore it with `git checkout -- data/{name}`, or, if you retrained it on purpose, "
            "run `python -c 'import kandlab.weights as w; w.write_manifest()'`."
        )
    if status == "unlisted":
        raise ValueError(f"data/{name} is not listed in data/{MANIFEST_NAME}; run kandlab.weights.write_manifest().")
    return root / name


def load_card(name: str) -> dict:
    """The JSON card beside a shipped checkpoint (``foo.safetensors`` → ``foo.json``)."""
    path = data_dir() / (Path(name).stem + ".json")
    if not path.exists():
        raise FileNotFoundError(f"no card {path.name} beside data/{name}")
    return json.loads(path.read_text())


def load_tiny_state_dict(name: str) -> dict:
    """Load a verified tiny checkpoint's tensors (CPU)."""
    from safetensors.torch import load_file

    return load_file(str(tiny_path(name)))


# ---------------------------------------------------------------------------
# The real tier (online, opt-in)


def hub_reachable(timeout: float = 2.0) -> bool:
    """True if the model hub answers a TCP connect within ``timeout`` seconds.

    Runs in a daemon thread so that a slow DNS lookup cannot hang the caller.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    result = [False]

    def probe() -> None:
        try:
            with socket.create_connection((HUB_HOST, 443), timeout=timeout):
                result[0] = True
        except OSError:
            pass

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return result[0]


class OfflineError(RuntimeError):
    """The real-weights path was asked for, but the model hub cannot be reached."""


def require_hub(repo_id: str, what: str = "weights") -> None:
    """Raise :class:`OfflineError` with instructions if the hub is unreachable."""
    if hub_reachable():
        return
    raise OfflineError(
        f"The model hub ({HUB_HOST}) is not reachable, so the real {what} of {repo_id!r} cannot be loaded. "
        f"On a machine with internet run `hf download {repo_id}` (older huggingface_hub: "
        f"`huggingface-cli download {repo_id}`) and copy the cache "
        "(~/.cache/huggingface) here, or open this lesson in Colab. "
        "The lesson continues with the shipped tiny model."
    )
