import subprocess
import sys
from pathlib import Path

import pytest

from kandlab import weights
from kandlab.cli import doctor_findings

REPO = Path(__file__).resolve().parent.parent


def test_doctor_runs_and_passes_here():
    result = subprocess.run([sys.executable, "-m", "kandlab", "doctor"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for label in ("torch", "model hub", "ipywidgets", "memory", "gpu"):
        assert label in result.stdout


def test_manifest_lists_every_shipped_file_with_the_right_hash():
    manifest = weights.read_manifest()
    for path in sorted(weights.data_dir().rglob("*")):
        if path.is_file() and path.name != weights.MANIFEST_NAME:
            name = path.relative_to(weights.data_dir()).as_posix()
            assert name in manifest, f"data/{name} is not in the manifest"
            assert weights.sha256_file(path) == manifest[name], f"data/{name} differs from its manifest hash"


def _fake_data(tmp_path, monkeypatch):
    (tmp_path / "m.safetensors").write_bytes(b"weights")
    monkeypatch.setenv("KANDLAB_DATA", str(tmp_path))
    weights.write_manifest(tmp_path)


def test_corrupted_checkpoint_is_reported_by_doctor_and_loader(tmp_path, monkeypatch):
    _fake_data(tmp_path, monkeypatch)
    assert weights.verify("m.safetensors") == "ok"
    (tmp_path / "m.safetensors").write_bytes(b"tampered")
    bad = [f for f in doctor_findings() if not f.ok]
    assert [f.label for f in bad] == ["data/m.safetensors"] and "git checkout" in bad[0].fix
    with pytest.raises(ValueError, match="does not match its sha256"):
        weights.tiny_path("m.safetensors")


def test_missing_checkpoint_says_what_exists(tmp_path, monkeypatch):
    _fake_data(tmp_path, monkeypatch)
    with pytest.raises(FileNotFoundError, match="Shipped checkpoints: m.safetensors"):
        weights.tiny_path("nope.safetensors")
