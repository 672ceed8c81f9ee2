"""The 300-step probes behind the layout stage (model card data/pixel_text.md, training history): can stage 1's UNet
learn relations quickly, and from which noise levels? Start from stage 1's weights (data/pixel_text.safetensors
at commit b412099; extract it with ``git show b412099:data/pixel_text.safetensors > /tmp/stage1.safetensors``),
train 300 steps on 4,000 two-group captioned images (AdamW 3e-4, batch 32, T5 frozen), then measure the
relation shift and ShapesBench on the first 48 two-group prompts among score_prompts(256) (DDIM 25, seed 7).

    python experiments/relation_probes.py /tmp/stage1.safetensors eps 500    # plain ε-loss, t ~ U[500, 999]: 6.1 px
    python experiments/relation_probes.py /tmp/stage1.safetensors x0 500     # ε-loss × SNR (x̂₀-space), same t: 1.6 px
    python experiments/relation_probes.py /tmp/stage1.safetensors eps logn1  # t/T = σ(u), u ~ N(1, 1): 4.6 px
    python experiments/relation_probes.py /tmp/stage1.safetensors eps uni    # t uniform: 1.7 px

One thread, about 7 minutes each; an optional fourth argument changes the number of steps.
"""
from __future__ import annotations

import sys
import time

import torch
from safetensors.torch import load_file

from kandlab import shapes, train
from kandlab.pipeline import Pipeline
from kandlab.tokenizer import ShapesTokenizer


def draw_t(kind: str, batch: int, g: torch.Generator) -> torch.Tensor:
    if kind == "uni":
        return torch.randint(0, 1000, (batch,), generator=g)
    if kind.startswith("logn"):
        return (torch.sigmoid(torch.randn(batch, generator=g) + float(kind[4:])) * 1000).long().clamp(max=999)
    return torch.randint(int(kind), 1000, (batch,), generator=g)  # U[lo, 999]


def main() -> None:
    path, loss_kind, t_kind = sys.argv[1], sys.argv[2], sys.argv[3]
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 300
    torch.set_num_threads(1)
    torch.manual_seed(0)
    recipe = train.pixel_text()
    model = train.build_model(recipe)
    model.load_state_dict(load_file(path))
    model.t5.requires_grad_(False)
    pipe = Pipeline(model, ShapesTokenizer.from_shapes(max_length=16), train.GaussianDiffusion(recipe.betas()))
    model.train().unet.requires_grad_(True)
    data = shapes.ShapesDataset(size=32, seed=0, length=4000, p_relation=1.0)
    items = [data[i] for i in range(len(data))]
    images = torch.stack([image for image, _ in items])  # (N, 3, 32, 32)
    tokens = ShapesTokenizer.from_shapes(max_length=16)([caption for _, caption in items])
    opt = torch.optim.AdamW(model.unet.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(1)
    start = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(images), (32,), generator=g)
        t = draw_t(t_kind, 32, g)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=g)
        eps = model(pipe.diffusion.q_sample(x0, t, noise), t, tokens["input_ids"][idx], tokens["attention_mask"][idx])
        per_sample = (eps - noise).pow(2).flatten(1).mean(1)  # (B,)
        weight = pipe.diffusion.snr[t] if loss_kind == "x0" else torch.ones_like(per_sample)  # ‖ε−ε̂‖²·SNR = ‖x₀−x̂₀‖²
        loss = (weight * per_sample).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.unet.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(step, round(loss.item(), 5), f"{time.time() - start:.0f} s", flush=True)
    model.eval().requires_grad_(False)
    prompts = [p for p in train.score_prompts(256) if shapes.parse_caption(p).relation][:48]
    drawn = [pipe(batch, steps=25, seed=7, progress=False) for batch in (prompts, [shapes.swap_relation(p) for p in prompts])]
    print(loss_kind, t_kind, "relation shift", shapes.relation_shift(prompts, *drawn),
          "ShapesBench", shapes.score(drawn[0], prompts))


if __name__ == "__main__":
    main()
