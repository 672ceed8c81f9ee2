"""scripts/ holds what a maintainer runs, experiments/ the one-off experiments (each listed in its README);
the rebuild of data/pixel_text_joint_t5 (a copy out of the repository's history) reproduces the shipped file."""
import importlib.util
import py_compile
import re
import subprocess
from pathlib import Path

import pytest
import torch

from kandlab import weights

ROOT = Path(__file__).resolve().parent.parent
MAINTAINER = {"bench_unet.py", "bench_latent.py", "keep_joint_t5.py", "score_progress.py", "full_unet_cpu.py",
              "k3_activations.py", "latent_guidance.py", "decoder_polish.py", "decoder_guidance.py",
              "make_lesson08.py"}
MOVED = ("relation_experiments", "relation_probes", "count_experiments", "layout_probe", "export_layout_stage")


def test_scripts_hold_maintainer_tools_and_every_experiment_has_a_readme_line(tmp_path):
    assert {p.name for p in (ROOT / "scripts").glob("*.py")} == MAINTAINER
    readme = (ROOT / "experiments" / "README.md").read_text()
    listed = set(re.findall(r"^\| `([\w.]+\.py)` \|", readme, flags=re.M))
    assert listed == {p.name for p in (ROOT / "experiments").glob("*.py")}
    for path in [*(ROOT / "scripts").glob("*.py"), *(ROOT / "experiments").glob("*.py")]:
        py_compile.compile(str(path), cfile=str(tmp_path / f"{path.stem}.pyc"), doraise=True)  # it parses


def test_code_and_tests_refer_to_moved_scripts_where_they_are_now():
    stale = re.compile(r"scripts/(" + "|".join(MOVED) + r")\.py")
    for folder in ("kandlab", "tests", "scripts", "experiments"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                assert not stale.search(line), f"{path.relative_to(ROOT)}:{n} names a moved script: {line.strip()}"


def _keep_joint_t5():
    spec = importlib.util.spec_from_file_location("keep_joint_t5", ROOT / "scripts" / "keep_joint_t5.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_joint_t5_rebuild_takes_the_shipped_encoder_out_of_the_history(tmp_path):
    if "pixel_text_joint_t5.safetensors" not in weights.read_manifest():
        pytest.skip("pixel_text_joint_t5 not shipped")
    keep = _keep_joint_t5()
    try:
        source, card = keep.from_git(tmp_path)
    except (subprocess.CalledProcessError, FileNotFoundError) as err:  # a shallow clone, or no git
        pytest.skip(f"commit {keep.COMMIT} is not in this checkout's history ({err}); `git fetch --unshallow`")
    shipped = weights.load_card("pixel_text_joint_t5.safetensors")
    assert weights.sha256_file(source) == shipped["source"]["sha256"]
    from safetensors.torch import load_file

    whole = load_file(str(source))
    t5 = weights.load_tiny_state_dict("pixel_text_joint_t5.safetensors")
    assert t5.keys() == {k.removeprefix("t5.") for k in whole if k.startswith("t5.")}
    assert all(torch.equal(whole[f"t5.{k}"], v) for k, v in t5.items())


def test_the_latent_benchmark_measures_one_setting():
    spec = importlib.util.spec_from_file_location("bench_latent", ROOT / "scripts" / "bench_latent.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        out = bench.measure("latent", 64, train_steps=1, sample_images=1, sample_steps=2)
    finally:
        torch.set_num_threads(threads)
    assert out["values_per_image"] == 4 * 16 * 16 and out["output"] == [3, 64, 64]
    assert out["train_step_seconds"] > 0 and out["sample_seconds_per_image"] > 0
