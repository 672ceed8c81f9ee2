"""Measure the activation memory of Kandinsky 3's networks at small sizes and fit the model `kandinsky3.plan` uses.

For each network, in fp32 on this CPU (activations scale with the bytes per value: `plan` halves them for 16 bits):
build it on ``meta``, give it random weights (activation memory does not
depend on their values), then run inference at growing sizes and read the process's peak resident memory
(``ru_maxrss``) after each: peak − (memory before the first forward) is the activation peak at that size, since
the sizes grow. Fits, per network, bytes ≈ a + b·pixels (least squares):

* UNet (3.06 B), guided batch of 2, 32 text tokens, latents 8², 16², 24² (pixels = latent pixels);
* MoVQ (Kandinsky 3's, 0.27 B) decoding latents 8², 12², 16², 24² to 64²…192² images (pixels = image pixels);
* T5: Flan-UL2's width with 2 of its 32 layers (layers run one after another, so the peak does not grow with
  depth), 2 × 128 tokens: one number.

Writes ``data/measurements/kandinsky3_activations.json`` (then run ``python -m kandlab.weights`` or the test suite's
manifest check will ask for it). Takes about 10 minutes on one core and ~15 GB of RAM (the fp32 UNet).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
UNET_SIZES = (8, 16, 24)  # latent sides
MOVQ_SIZES = (8, 12, 16, 24)  # latent sides: 64²…192² images
# fp32, not bf16: on this CPU bf16 convolutions at these sizes take minutes (no fast kernel), and activation
# memory scales with the bytes per value, so plan() halves the fp32 numbers for 16-bit.
DTYPE = torch.float32


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def random_weights(build, config):
    torch.set_default_dtype(DTYPE)
    with torch.device("meta"):
        model = build(config)
    torch.set_default_dtype(torch.float32)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for b in model.buffers():
            if b.is_floating_point():
                b.normal_(0, 0.02)
    return model.eval()


def worker(network: str) -> dict:
    from kandlab.movq import MoVQ, MoVQConfig
    from kandlab.t5 import T5Config, T5Encoder
    from kandlab.unet import UNet, UNetConfig

    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        if network == "unet":
            model = random_weights(UNet, UNetConfig.kandinsky3())
            text = torch.randn(2, 32, 4096, dtype=DTYPE)
            mask = torch.ones(2, 32, dtype=torch.bool)
            base = peak_bytes()
            for s in UNET_SIZES:
                start = time.perf_counter()
                model(torch.randn(2, 4, s, s, dtype=DTYPE), torch.tensor([500, 500]), text, mask)
                rows.append({"latent": s, "pixels": s * s, "bytes": peak_bytes() - base,
                             "seconds": time.perf_counter() - start})
        elif network == "movq":
            model = random_weights(MoVQ, MoVQConfig.kandinsky3())
            base = peak_bytes()
            for s in MOVQ_SIZES:
                start = time.perf_counter()
                model.decode(torch.randn(1, 4, s, s, dtype=DTYPE))
                rows.append({"latent": s, "pixels": (8 * s) ** 2, "bytes": peak_bytes() - base,
                             "seconds": time.perf_counter() - start})
        else:
            config = dataclasses.replace(T5Config.flan_ul2(), num_layers=2)
            model = random_weights(T5Encoder, config)
            base = peak_bytes()
            model(torch.randint(0, 32000, (2, 128)), torch.ones(2, 128, dtype=torch.long))
            rows.append({"tokens": 128, "batch": 2, "bytes": peak_bytes() - base})
    return {"rows": rows}


def fit(rows: list[dict]) -> dict:
    x = torch.tensor([float(r["pixels"]) for r in rows], dtype=torch.float64)
    y = torch.tensor([float(r["bytes"]) for r in rows], dtype=torch.float64)
    A = torch.stack([torch.ones_like(x), x], dim=1)
    a, b = torch.linalg.lstsq(A, y[:, None]).solution[:, 0].tolist()
    residual = (A @ torch.tensor([a, b], dtype=torch.float64) - y).abs().max().item()
    return {"a": max(a, 0.0), "b": b, "max_residual_bytes": residual, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["unet", "movq", "text_encoder"])
    parser.add_argument("--out", default=str(ROOT / "data" / "measurements" / "kandinsky3_activations.json"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    result = {"dtype": "fp32",
              "what": "activation memory of Kandinsky 3's networks in fp32 on a CPU, fitted as a + b·pixels "
                      "(scripts/k3_activations.py); an estimate for a GPU, where kernels and the allocator differ",
              "torch": torch.__version__, "measured": time.strftime("%Y-%m-%d")}
    for network in ("text_encoder", "movq", "unet"):
        out = subprocess.run([sys.executable, __file__, "--worker", network], capture_output=True, text=True,
                             check=True, cwd=ROOT)
        rows = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
        result[network] = {"bytes": rows[0]["bytes"], "rows": rows} if network == "text_encoder" else fit(rows)
        print(network, json.dumps(result[network]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
