"""Benchmark: training steps of kandlab's UNet vs diffusers' Kandinsky3UNet on CPU.

Same config (``UNetConfig.tiny_pixel()``, text-conditioned), same weights, same
batch. One measurement = ``--steps`` training steps (forward + backward + AdamW
step); measurements alternate between the two models so that background load
hits both alike; the median of ``--repeats`` measurements is reported.

    .venv/bin/python scripts/bench_unet.py [--steps 3] [--repeats 7] [--batch 16]

This is a benchmark, not a test: on a shared machine the absolute times move
with the load (printed at the end), the ratio much less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# On a shared CPU, OpenMP threads that spin while waiting for each other make small
# models 10-100× slower (both models alike). Passive waiting avoids that; it must be
# set before torch loads OpenMP. An OMP_WAIT_POLICY already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from kandlab.unet import UNet, UNetConfig, config_to_diffusers  # noqa: E402


def build_models(config: UNetConfig, seed: int = 0):
    """A diffusers Kandinsky3UNet with every parameter randomised, and kandlab's copy of it."""
    from diffusers import Kandinsky3UNet

    torch.manual_seed(seed)
    theirs = Kandinsky3UNet(**config_to_diffusers(config))
    with torch.no_grad():
        for p in theirs.parameters():  # diffusers zero-inits the norm projections
            torch.nn.init.normal_(p, std=0.02)
    ours = UNet.from_diffusers(theirs)
    return ours, theirs


def make_batch(config: UNetConfig, batch: int, size: int, text_len: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    text = torch.randn(batch, text_len, config.encoder_hid_dim, generator=g)
    lengths = torch.randint(1, text_len + 1, (batch,), generator=g)
    mask = torch.arange(text_len)[None, :] < lengths[:, None]  # (B, L) padded at the end
    eps = torch.randn_like(x)
    return x, t, text, mask, eps


def time_steps(step, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=7, help="measurements per model (median reported)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = UNetConfig.tiny_pixel()
    ours, theirs = build_models(config)
    x, t, text, mask, eps = make_batch(config, args.batch, args.size, args.text_len)

    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

    def step_ours():
        loss = (ours(x, t, text, mask) - eps).square().mean()
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs():
        loss = (theirs(x, t, text, mask).sample - eps).square().mean()
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    n_params = sum(p.numel() for p in ours.parameters())
    print(
        f"config tiny_pixel ({n_params / 1e6:.2f} M params), batch {args.batch}×{config.in_channels}×"
        f"{args.size}×{args.size}, text {args.text_len} tokens, {args.threads} threads, "
        f"{args.steps} steps × {args.repeats} repeats"
    )
    step_ours(), step_theirs()  # warm-up (allocator, optimizer state)
    times_ours, times_theirs = [], []
    for r in range(args.repeats):
        # alternate which model goes first so drifting load does not favour one
        pair = [(times_ours, step_ours), (times_theirs, step_theirs)]
        for times, step in pair if r % 2 == 0 else reversed(pair):
            times.append(time_steps(step, args.steps))
        print(
            f"  repeat {r + 1}: kandlab {times_ours[-1] * 1e3:7.0f} ms/step   "
            f"diffusers {times_theirs[-1] * 1e3:7.0f} ms/step"
        )

    ours_ms, theirs_ms = statistics.median(times_ours) * 1e3, statistics.median(times_theirs) * 1e3
    print(f"kandlab   UNet:           {ours_ms:7.0f} ms/step (median)")
    print(f"diffusers Kandinsky3UNet: {theirs_ms:7.0f} ms/step (median)")
    print(f"speed-up: {theirs_ms / ours_ms:.2f}×  (diffusers time / kandlab time)")
    print(
        f"load average (1, 5, 15 min): {', '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs; "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )


if __name__ == "__main__":
    main()
