"""Measure kandlab's full-size Kandinsky 3 UNet against diffusers' Kandinsky3UNet on CPU.

Three parts, all on random weights (no download):

* **parity** (one process): diffusers' ``Kandinsky3UNet`` is built with random init (plus random
  conditional-norm projections, which diffusers zero-initialises), its tensors are shared into kandlab's
  ``UNet`` (``UNet.from_diffusers(state_dict, config)``, no copy) and both run the same input at the
  smallest ``--sizes``: the fp32 outputs must agree; then both are converted to bf16 and each one's gap to
  the fp32 output is measured. A kandlab bf16 gap much larger than diffusers' would mean that kandlab loses
  precision somewhere diffusers does not.
* **timing** (one subprocess per framework, so that the peak RSS is each one's own):
  random init, conversion to bf16, then per latent size one warm-up and one timed
  bf16 forward (batch 1, ``--tokens`` text tokens) under ``torch.inference_mode()``.
* **loading** (one subprocess): a synthetic bf16 checkpoint in the diffusers layout (random weights, sharded
  safetensors with their index) is written to a temporary folder and read back by
  ``kandinsky3.load_safetensors`` + ``UNet.from_diffusers``; peak RSS over the weights' size must stay ≤ 1.2.

Memory: one fp32 copy of the 3,055,348,228 parameters is 12.2 GB, a bf16 copy 6.1 GB.
The parity part holds one copy at a time (about 12.2 GB peak plus activations); the
timing workers initialise directly in bf16 when both classes allow it (checked at tiny
size first, recorded as "init_dtype"), otherwise in fp32 (about 12.2 GB peak). Peak RSS
is VmHWM, not ru_maxrss, which Linux carries from the parent into a subprocess.
diffusers' ``.to(torch.bfloat16)`` warns "modules ... should be kept in float32: []":
the list is empty, nothing is kept in fp32, and the warning can be ignored.

    .venv/bin/python scripts/full_unet_cpu.py                         # full size, both parts
    .venv/bin/python scripts/full_unet_cpu.py --config tiny --out /tmp/tiny.json   # smoke test

Full size on the 2-core, 24 GiB CPU machine (2026-12-07, torch 2.13, diffusers 0.42.1, results in
``scripts/results/full_unet_cpu.json``): the whole run takes about 3 minutes; parity peaks at 12.9 GB, each timing
worker at 6.8 GB, the loading part at 6.4 GB (1.05× the 6.1 GB of bf16 weights).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

# On a shared CPU, OpenMP threads that spin while waiting for each other slow both
# models alike (see bench_unet.py). It must be set before torch loads OpenMP; the
# timing workers inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from kandlab.unet import UNet, UNetConfig, config_from_diffusers, config_to_diffusers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "scripts" / "results" / "full_unet_cpu.json"

ConfigName = Literal["kandinsky3", "tiny"]
Framework = Literal["kandlab", "diffusers"]
InitDtype = Literal["auto", "float32", "bfloat16"]
T = 500  # the timestep of every forward


def unet_config(name: ConfigName) -> UNetConfig:
    """The published model, or a small 4-level model for smoke tests (4.45 M params)."""
    if name == "kandinsky3":
        return UNetConfig.kandinsky3()
    return UNetConfig(
        in_channels=4,
        time_embedding_dim=64,
        groups=8,
        head_dim=16,
        layers_per_block=2,
        block_out_channels=(32, 64, 64, 128),
        cross_attention_dim=32,
        encoder_hid_dim=32,
    )


diffusers_kwargs = config_to_diffusers  # kandlab.unet: the same architecture as diffusers' keyword arguments


# --------------------------------------------------------------------------------------
# Small helpers: inputs, memory, machine facts
# --------------------------------------------------------------------------------------


def make_inputs(config: UNetConfig, size: int, tokens: int, seed: int = 1):
    """Batch 1: latents (1, C, S, S), t = 500, text (1, L, encoder_hid_dim) ~ N(0, 1),
    mask (1, L) bool with the last quarter of the tokens padding."""
    torch.manual_seed(seed)
    x = torch.randn(1, config.in_channels, size, size)  # (1, C, S, S)
    text = torch.randn(1, tokens, config.encoder_hid_dim)  # (1, L, D_text)
    mask = torch.ones(1, tokens, dtype=torch.bool)  # (1, L)
    mask[:, tokens - tokens // 4 :] = False
    return x, torch.tensor(T), text, mask


def peak_rss_bytes() -> int:
    """Peak resident memory of this process's address space (VmHWM in /proc/self/status).

    Not ``ru_maxrss``: Linux carries ru_maxrss over fork and exec, so a worker would
    report at least its parent's RSS at the moment it was started.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def ru_maxrss_bytes() -> int:
    """getrusage's peak RSS (KiB on Linux): includes the parent's RSS at fork, see above."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo: what can be allocated without swapping."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def machine_facts() -> dict:
    import diffusers

    return dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        load_average=list(os.getloadavg()),
        available_ram_bytes=available_ram_bytes(),
    )


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Create parameters in ``dtype`` inside the block (torch.set_default_dtype)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def randomise_conditional_norms(model: torch.nn.Module, std: float = 0.02) -> None:
    """diffusers zero-initialises the projections of its conditional group norms
    (``context_mlp``): a fresh model then ignores t and the text entirely. Randomise them
    in place so that parity covers the time and text paths too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".context_mlp." in name:
                p.normal_(std=std)


# --------------------------------------------------------------------------------------
# 1. Parity
# --------------------------------------------------------------------------------------


def parity(config_name: ConfigName = "tiny", size: int = 16, tokens: int = 32, seed: int = 0) -> dict:
    r"""fp32 parity and bf16 gaps, kandlab vs diffusers, on shared random weights.

    Holds one copy of the weights at a time: kandlab adopts diffusers' tensors, and the
    bf16 conversion is done in place after the fp32 copy's other holders are dropped.

    Returns max_abs_diff (fp32, kandlab vs diffusers), out_scale = max|out_fp32|,
    their ratio, and for bf16 each framework's mean/max |out_bf16 − out_fp32|.
    """
    from diffusers import Kandinsky3UNet

    config = unet_config(config_name)
    result: dict = dict(config=config_name, size=size, tokens=tokens, batch=1, t=T)

    torch.manual_seed(seed)
    start = time.perf_counter()
    theirs = Kandinsky3UNet(**diffusers_kwargs(config)).eval()
    result["diffusers_init_s"] = time.perf_counter() - start
    if config_from_diffusers(theirs.config) != config:
        raise RuntimeError(f"diffusers_kwargs does not map back to the config: {theirs.config}")
    randomise_conditional_norms(theirs)
    result["params"] = sum(p.numel() for p in theirs.parameters())

    # the state dict is not kept in a variable: kandlab's parameters are its only other holder
    ours = UNet.from_diffusers(theirs.state_dict(), config).eval()
    x, t, text, mask = make_inputs(config, size, tokens)

    # --- fp32: the two outputs must agree -------------------------------------------------
    with torch.no_grad():
        start = time.perf_counter()
        expected = theirs(x, t, text, mask, return_dict=False)[0]  # (1, C, S, S)
        result["fp32_forward_s_diffusers"] = time.perf_counter() - start
        start = time.perf_counter()
        got = ours(x, t, text, mask)  # (1, C, S, S)
        result["fp32_forward_s_kandlab"] = time.perf_counter() - start
    result["fp32_max_abs_diff"] = (got - expected).abs().max().item()
    result["out_scale"] = expected.abs().max().item()
    result["fp32_diff_over_scale"] = result["fp32_max_abs_diff"] / result["out_scale"]
    reference = expected  # the fp32 output both bf16 runs are measured against
    result["rss_after_fp32_bytes"] = current_rss_bytes()

    # --- bf16: convert in place, one copy at a time ------------------------------------------
    del ours, got
    gc.collect()
    start = time.perf_counter()
    theirs.to(torch.bfloat16)  # param by param: each fp32 tensor is freed once converted
    result["bf16_convert_s"] = time.perf_counter() - start
    result["rss_after_bf16_bytes"] = current_rss_bytes()
    ours = UNet.from_diffusers(theirs.state_dict(), config).eval()

    x16, text16 = x.bfloat16(), text.bfloat16()
    with torch.no_grad():
        out_theirs = theirs(x16, t, text16, mask, return_dict=False)[0].float()  # (1, C, S, S)
        out_ours = ours(x16, t, text16, mask).float()  # (1, C, S, S)
    for name, out in (("kandlab", out_ours), ("diffusers", out_theirs)):
        gap = (out - reference).abs()
        result[f"bf16_mean_abs_gap_{name}"] = gap.mean().item()
        result[f"bf16_max_abs_gap_{name}"] = gap.max().item()
    result["bf16_max_abs_diff_kandlab_vs_diffusers"] = (out_ours - out_theirs).abs().max().item()
    result["process_peak_rss_bytes"] = peak_rss_bytes()  # of the whole calling process
    return result


# --------------------------------------------------------------------------------------
# 2. Timing and memory, one subprocess per framework
# --------------------------------------------------------------------------------------


def build(framework: Framework, config: UNetConfig) -> torch.nn.Module:
    """A randomly initialised model of either framework, in the current default dtype."""
    if framework == "kandlab":
        return UNet(config)
    from diffusers import Kandinsky3UNet

    return Kandinsky3UNet(**diffusers_kwargs(config))


def bf16_init_check() -> tuple[bool, str]:
    """Can both classes be built with bf16 as the default dtype (all parameters bf16) and
    then run a bf16 forward? Tried on the tiny config; a failure is returned, not raised."""
    config = unet_config("tiny")
    x, t, text, mask = make_inputs(config, 16, 8)
    try:
        for framework in ("kandlab", "diffusers"):
            with default_dtype(torch.bfloat16):
                model = build(framework, config).eval()
            dtypes = {p.dtype for p in model.parameters()} | {b.dtype for b in model.buffers()}
            if dtypes != {torch.bfloat16}:
                return False, f"{framework} built under bf16 default dtype holds {sorted(map(str, dtypes))}"
            with torch.inference_mode():
                args = (x.bfloat16(), t, text.bfloat16(), mask)
                out = model(*args) if framework == "kandlab" else model(*args, return_dict=False)[0]
            if out.dtype != torch.bfloat16 or not torch.isfinite(out).all():
                return False, f"{framework}: bf16 forward gave {out.dtype}, finite={torch.isfinite(out).all()}"
    except Exception as err:  # noqa: BLE001 — any failure means "init in fp32 instead"
        return False, f"{type(err).__name__}: {err}"
    return True, "kandlab and diffusers both build all-bf16 parameters and run a bf16 forward"


def worker(framework: Framework, config_name: ConfigName, sizes: list[int], tokens: int, init_dtype: str) -> dict:
    """Runs in its own process: init → bf16 → per size a warm-up and a timed forward."""
    config = unet_config(config_name)
    # diffusers imports its modules lazily, on first attribute access: do that before the
    # clock starts (in both workers, so that their baseline RSS is alike)
    from diffusers import Kandinsky3UNet  # noqa: F401

    result: dict = dict(framework=framework, init_dtype=init_dtype, rss_before_init_bytes=current_rss_bytes())

    torch.manual_seed(0)
    start = time.perf_counter()
    with default_dtype(getattr(torch, init_dtype)):
        model = build(framework, config).eval()
    result["init_s"] = time.perf_counter() - start
    result["params"] = sum(p.numel() for p in model.parameters())
    result["peak_rss_after_init_bytes"] = peak_rss_bytes()

    start = time.perf_counter()
    model.to(torch.bfloat16)  # a no-op when initialised in bf16
    result["bf16_convert_s"] = time.perf_counter() - start
    result["rss_after_bf16_bytes"] = current_rss_bytes()

    forward_s = {}
    for size in sizes:
        x, t, text, mask = make_inputs(config, size, tokens)
        args = (x.bfloat16(), t, text.bfloat16(), mask)
        with torch.inference_mode():
            for _ in range(2):  # warm-up, then the timed forward
                start = time.perf_counter()
                out = model(*args) if framework == "kandlab" else model(*args, return_dict=False)[0]
                elapsed = time.perf_counter() - start
        assert out.shape == x.shape, (out.shape, x.shape)
        forward_s[str(size)] = elapsed
    result["forward_s"] = forward_s
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["ru_maxrss_bytes"] = ru_maxrss_bytes()
    return result


def timing(config_name: ConfigName, sizes: list[int], tokens: int, init_dtype: InitDtype = "auto") -> dict:
    """Both frameworks, each in a fresh subprocess (its JSON comes back on stdout)."""
    result: dict = {}
    if init_dtype == "auto":
        ok, reason = bf16_init_check()
        init_dtype = "bfloat16" if ok else "float32"
        result["bf16_init_check"] = dict(ok=ok, reason=reason)
    result["init_dtype"] = init_dtype
    for framework in ("kandlab", "diffusers"):
        cmd = [sys.executable, __file__, "--worker", framework, "--config", config_name,
               "--sizes", *map(str, sizes), "--tokens", str(tokens), "--init-dtype", init_dtype]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr passes through
        if done.returncode != 0:
            raise RuntimeError(f"the {framework} worker failed (exit {done.returncode}); its stderr is above")
        result[framework] = json.loads(done.stdout.strip().splitlines()[-1])
        result[framework]["process_wall_s"] = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def write_synthetic_checkpoint(folder: Path, config_name: ConfigName, shards: int = 3) -> int:
    """A random bf16 UNet in the hub's layout: ``config.json``, ``diffusion_pytorch_model-0000k-of-0000n.safetensors``
    and their ``.index.json``. Returns the weights' bytes."""
    from safetensors.torch import save_file

    config = unet_config(config_name)
    with default_dtype(torch.bfloat16), torch.device("meta"):
        model = UNet(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    state = model.to_diffusers_state_dict()
    del model
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    weight_map, total = {}, 0
    for k in range(shards):
        name = f"diffusion_pytorch_model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[k * len(keys) // shards: (k + 1) * len(keys) // shards]
        save_file({key: state[key].contiguous() for key in part}, str(folder / name))
        weight_map.update({key: name for key in part})
        total += sum(state[key].numel() * state[key].element_size() for key in part)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"_class_name": "Kandinsky3UNet", **diffusers_kwargs(config)}))
    return total


def loading_worker(folder: Path) -> dict:
    """In a fresh process: `kandinsky3.load_unet` on the synthetic folder, every weight touched once."""
    from kandlab import kandinsky3

    before = peak_rss_bytes()
    start = time.perf_counter()
    unet = kandinsky3.load_unet(folder)
    loaded_s = time.perf_counter() - start
    with torch.no_grad():
        touched = sum(float(p.float().abs().sum()) for p in unet.parameters())  # reads every page once
    return {"load_s": loaded_s, "touch_s": time.perf_counter() - start - loaded_s, "peak_rss_before_bytes": before,
            "peak_rss_bytes": peak_rss_bytes(), "finite": touched == touched,
            "dtype": str(next(unet.parameters()).dtype)}


def loading(config_name: ConfigName) -> dict:
    """Write a synthetic sharded checkpoint, load it in a subprocess, report peak RSS against the weights' size."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="k3unet-")) / "unet"
    try:
        start = time.perf_counter()
        total = write_synthetic_checkpoint(folder, config_name)
        written_s = time.perf_counter() - start
        gc.collect()
        out = subprocess.run([sys.executable, __file__, "--loading-worker", str(folder)], capture_output=True,
                             text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)
    return {"weights_bytes": total, "write_s": written_s, **result,
            "peak_over_weights": result["peak_rss_bytes"] / total,  # the process's whole peak, imports included
            "growth_over_weights": (result["peak_rss_bytes"] - result["peak_rss_before_bytes"]) / total}


def print_table(report: dict) -> None:
    gb = 1e9
    if "parity" in report:
        p = report["parity"]
        print(f"parity ({p['config']}, {p['params']:,} params, latents 1×4×{p['size']}², {p['tokens']} tokens)")
        print(f"  diffusers init            {p['diffusers_init_s']:10.2f} s")
        print(f"  fp32 max|Δ|               {p['fp32_max_abs_diff']:10.3g}   (max|out| {p['out_scale']:.3g}, "
              f"ratio {p['fp32_diff_over_scale']:.2g})")  # fmt: skip
        print(f"  bf16 vs fp32 ref  mean|Δ|  max|Δ|")
        for name in ("kandlab", "diffusers"):
            print(f"    {name:<10}      {p[f'bf16_mean_abs_gap_{name}']:9.3g} {p[f'bf16_max_abs_gap_{name}']:7.3g}")
        print(f"  peak RSS                  {p['process_peak_rss_bytes'] / gb:10.2f} GB")
    if "timing" in report:
        tm = report["timing"]
        sizes = list(tm["kandlab"]["forward_s"])
        print(f"timing (bf16, batch 1, init in {tm['init_dtype']}; forward seconds per latent size)")
        head = "".join(f"{'S=' + s:>9}" for s in sizes)
        print(f"  {'':<10}{'init s':>8}{'→bf16 s':>9}{head}{'peak RSS':>10}")
        for name in ("kandlab", "diffusers"):
            w = tm[name]
            cells = "".join(f"{w['forward_s'][s]:9.3f}" for s in sizes)
            print(f"  {name:<10}{w['init_s']:8.2f}{w['bf16_convert_s']:9.2f}{cells}{w['peak_rss_bytes'] / gb:8.2f} GB")
    m = report["machine"]
    print(f"torch {m['torch']}, diffusers {m['diffusers']}, {m['torch_threads']} threads on {m['cpu_count']} CPUs, "
          f"load {', '.join(f'{v:.1f}' for v in m['load_average'])}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["kandinsky3", "tiny"], default="kandinsky3")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64], help="latent sizes S (latents 4×S×S)")
    parser.add_argument("--tokens", type=int, default=32, help="text tokens (the last quarter is padding)")
    parser.add_argument("--part", choices=["all", "parity", "timing", "loading"], default="all")
    parser.add_argument("--loading-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--init-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="dtype the timing workers initialise in; auto = bf16 if both classes allow it")  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", choices=["kandlab", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    factor = unet_config(args.config).downsample_factor
    for size in args.sizes:
        if size % factor:
            parser.error(f"latent size {size} is not divisible by {factor} (the UNet halves it 3 times)")

    if args.loading_worker:  # the loading subprocess: one JSON line on stdout
        print(json.dumps(loading_worker(args.loading_worker)))
        return
    if args.worker:  # a timing subprocess: one JSON line on stdout, nothing else
        print(json.dumps(worker(args.worker, args.config, args.sizes, args.tokens, args.init_dtype)))
        return

    report: dict = dict(machine=machine_facts(), config=args.config, sizes=args.sizes, tokens=args.tokens)
    start = time.perf_counter()
    if args.part in ("all", "parity"):
        report["parity"] = parity(args.config, min(args.sizes), args.tokens)
        gc.collect()
    if args.part in ("all", "timing"):
        # the workers' memory adds to what this process still holds after the parity part
        report["rss_before_timing_bytes"] = current_rss_bytes()
        report["timing"] = timing(args.config, args.sizes, args.tokens, args.init_dtype)
    if args.part in ("all", "loading"):
        report["loading"] = loading(args.config)
        print(f"loading: {report['loading']['weights_bytes'] / 1e9:.2f} GB of bf16 weights in 3 shards, peak RSS "
              f"{report['loading']['peak_rss_bytes'] / 1e9:.2f} GB = {report['loading']['peak_over_weights']:.2f}× "
              f"(load {report['loading']['load_s']:.1f} s, first touch {report['loading']['touch_s']:.1f} s)")
    report["total_wall_s"] = time.perf_counter() - start

    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
