"""What latent diffusion buys, measured side by side in one run (lesson 07, README).

Three text-to-image models with the same tiny Kandinsky 3 UNet layout (`UNetConfig.tiny_pixel`) and the
same T5, one after the other in this process's subprocesses, one thread each:

* pixel 32²: the shipped pixel_text setting, 3×32² values per image;
* pixel 64²: the same UNet on 64×64 pixels, 3×64²;
* latent 64²: the UNet on the tiny MoVQ's 4×16² latents of 64×64 images (lesson 07's latent_text);
  its sampling time includes the MoVQ decode, and its training step excludes the MoVQ encode
  (the training set is encoded once, before training).

For each: seconds per training step (batch 32, AdamW, Min-SNR loss), the training process's peak RSS
above the model's own footprint, and seconds per image for 50 guided DDIM steps (batch 16).

    python scripts/bench_latent.py            # ~3 min; prints a table and writes runs/bench_latent.json
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {"pixel 32²": ("pixel", 32), "pixel 64²": ("pixel", 64), "latent 64²": ("latent", 64)}


def measure(kind: str, size: int, train_steps: int = 8, sample_images: int = 16, sample_steps: int = 50) -> dict:
    """One setting, in this process (run it in a fresh subprocess for a clean peak RSS)."""
    import torch

    from kandlab import schedules
    from kandlab.diffusion import GaussianDiffusion
    from kandlab.movq import MoVQ, MoVQConfig
    from kandlab.pipeline import Pipeline, TextToImage
    from kandlab.t5 import T5Config
    from kandlab.tokenizer import ShapesTokenizer
    from kandlab.unet import UNetConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = ShapesTokenizer.from_shapes(max_length=16)
    latent = kind == "latent"
    unet = UNetConfig.tiny_latent(out_channels=4) if latent else UNetConfig.tiny_pixel()
    model = TextToImage(unet, T5Config.tiny(vocab_size=tokenizer.vocab_size))
    model.t5.requires_grad_(False)
    movq = MoVQ(MoVQConfig.tiny()).eval() if latent else None
    side = size // 4 if latent else size
    diffusion = GaussianDiffusion(schedules.betas_by_name("cosine"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = tokenizer(["two red circles above one blue square"] * 32)
    x0 = torch.randn(32, unet.in_channels, side, side)  # (B, C, side, side): values do not change the cost

    def step() -> None:
        loss = diffusion.loss(model, x0, min_snr_gamma=5.0, input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocator, kernels)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    for _ in range(train_steps):
        step()
    train_s = (time.perf_counter() - start) / train_steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    pipe = Pipeline(model, tokenizer, diffusion, image_size=size, movq=movq)
    prompts = ["two red circles above one blue square"] * sample_images
    start = time.perf_counter()
    images = pipe(prompts, steps=sample_steps, guidance=4.0, progress=False)
    sample_s = (time.perf_counter() - start) / sample_images
    return {"values_per_image": unet.in_channels * side * side, "output": list(images.shape[1:]),
            "train_step_seconds": round(train_s, 4), "train_peak_rss_growth_bytes": int(peak - base),
            "sample_seconds_per_image": round(sample_s, 4), "train_steps_timed": train_steps,
            "sample_images": sample_images, "sample_steps": sample_steps, "threads": 1}


def main() -> int:
    if len(sys.argv) == 3:  # the child: one setting
        print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
        return 0
    import platform

    import torch

    results = {}
    for name, (kind, size) in SETTINGS.items():
        out = subprocess.run([sys.executable, __file__, kind, str(size)], capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:11s} {results[name]}", flush=True)
    results["_machine"] = {"torch": torch.__version__, "machine": platform.machine(),
                           "note": "one thread per setting, run one after the other"}
    path = Path("runs") / "bench_latent.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'setting':11s} {'values':>7s} {'train s/step':>13s} {'train +RSS':>11s} {'sample s/img':>13s}")
    for name in SETTINGS:
        r = results[name]
        print(f"{name:11s} {r['values_per_image']:7d} {r['train_step_seconds']:13.3f} "
              f"{r['train_peak_rss_growth_bytes'] / 2**20:9.0f} MiB {r['sample_seconds_per_image']:13.3f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
