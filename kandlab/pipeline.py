"""Text → image: the T5 encoder and the UNet joined, and a sampling pipeline around them.

``TextToImage`` is the trainable pair (Kandinsky 3's layout at tiny width):

    caption ─tokenizer→ ids (B, L) ─T5→ tokens (B, L, D) ─┬→ UNet cross-attention (every attention level)
                                                           └→ UNet attention pooling → added to t_emb

Condition dropout (GLIDE, Ho & Salimans 2022) trains the same network to be
unconditional too: a dropped caption becomes Kandinsky 3's (diffusers')
unconditional context — zero token embeddings with an all-zero mask, so
cross-attention and pooling see nothing.

``Pipeline`` samples from a trained pair with classifier-free guidance, both
branches in one batched forward, any sampler of `kandlab.diffusion`, and an
optional threshold of x̂₀ (lesson 06). Given a MoVQ (lesson 07) it samples *latents*
and decodes them, as Kandinsky 2.2 and 3 do: ``movq.decode(z / scale)`` without the
codebook.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from kandlab import schedules, weights
from kandlab.shapes import VOCABULARY, dataset_mean
from kandlab.diffusion import GaussianDiffusion, cfg_eps, dynamic_threshold, static_threshold
from kandlab.t5 import T5Config, T5Encoder
from kandlab.tokenizer import ShapesTokenizer
from kandlab.unet import UNet, UNetConfig

MAX_STEPS = 1000  # the trained schedule has T = 1000 timesteps
Start = Literal["noise", "data_mean"]  # where sampling starts: N(0, I), or around the data mean (lesson 02)


def _check_start(start: str) -> None:
    if start not in ("noise", "data_mean"):
        raise ValueError(f"start={start!r} must be 'noise' (N(0, I), as diffusers) or 'data_mean' (see lesson 02)")


def start_mean(start: Start, image_size: int) -> torch.Tensor | None:
    """The ``start_mean`` for `GaussianDiffusion.sample`: None for ``"noise"`` (N(0, I), as
    Kandinsky 3 and diffusers), `shapes.dataset_mean` for ``"data_mean"`` (lesson 02)."""
    _check_start(start)
    return dataset_mean(image_size) if start == "data_mean" else None


class TextToImage(nn.Module):
    """A T5 encoder feeding a text-conditioned UNet; ε̂ = model(x_t, t, ids, mask)."""

    def __init__(self, unet: UNetConfig, t5: T5Config) -> None:
        super().__init__()
        if unet.encoder_hid_dim != t5.d_model:
            raise ValueError(
                f"the UNet expects text of width encoder_hid_dim={unet.encoder_hid_dim} but the T5 "
                f"encoder gives d_model={t5.d_model}; make them equal"
            )
        self.t5 = T5Encoder(t5)
        self.unet = UNet(unet)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) → (text tokens (B, L, D), bool mask (B, L))."""
        mask = attention_mask.bool()
        text = self.t5(input_ids, attention_mask) * mask[..., None]  # padding → exact zeros
        return text, mask

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """ε̂ (B, C, H, W). ``drop`` (B,) bool marks captions replaced by the empty context."""
        text, mask = self.encode(input_ids, attention_mask)  # (B, L, D), (B, L)
        if drop is not None:
            keep = ~drop.bool()  # (B,)
            text, mask = text * keep[:, None, None], mask & keep[:, None]
        return self.unet(x_t, t, text, mask)


def null_context(batch: int, length: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The unconditional context: zero tokens (B, L, D) with an all-False mask (B, L)."""
    return torch.zeros(batch, length, width), torch.zeros(batch, length, dtype=torch.bool)


@torch.no_grad()
def guided_ddim_step(unet: nn.Module, x_t: torch.Tensor, t: int, t_prev: int, text: torch.Tensor,
                     mask: torch.Tensor, scale: float, alpha_bar: torch.Tensor) -> torch.Tensor:
    r"""One deterministic DDIM step (η = 0) with classifier-free guidance, written out (lesson 05).

    Both branches go through ``unet`` in one forward of batch 2B, the empty context first; then
    :math:`\hat\varepsilon = \varepsilon_u + s(\varepsilon_c - \varepsilon_u)`,
    :math:`\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon)/\sqrt{\bar\alpha_t}` and
    :math:`x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0 + \sqrt{1-\bar\alpha_{t'}}\,\hat\varepsilon`
    (Song et al. 2021, eq. 12 with σ = 0; ᾱ = 1 for ``t_prev = -1``, the clean image). No threshold.
    ``Pipeline`` takes the same step through `Pipeline.eps_fn` and `GaussianDiffusion.ddim_step`.

    x_t: (B, C, H, W); text (B, L, D), mask (B, L); alpha_bar: (T,). Returns x_{t'}: (B, C, H, W).
    """
    if not t > t_prev >= -1:
        raise ValueError(f"need t > t_prev >= -1 (the reverse process goes towards t = -1, clean), "
                         f"got t={t}, t_prev={t_prev}")
    B, L, D = text.shape
    null_text, null_mask = null_context(B, L, D)  # (B, L, D), (B, L)
    t_both = torch.full((2 * B,), t, dtype=torch.long)  # (2B,)
    eps = unet(torch.cat([x_t, x_t]), t_both, torch.cat([null_text, text]), torch.cat([null_mask, mask]))  # (2B, C, H, W)
    eps_u, eps_c = eps.chunk(2)  # (B, C, H, W) each
    eps = cfg_eps(eps_u, eps_c, scale)
    a_t = alpha_bar[t]
    a_prev = alpha_bar[t_prev] if t_prev >= 0 else alpha_bar.new_ones(())
    x0_hat = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps


def check_prompts(prompts: str | Sequence[str], tokenizer: ShapesTokenizer) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given; pass e.g. 'two red circles above a blue square'")
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"prompts must be str, got {type(p).__name__}")
        if not p.strip():
            raise ValueError("a prompt is empty; describe a scene, e.g. 'one large green triangle'")
        unknown = tokenizer.unknown_words(p)
        if unknown:
            suggestions = {w: tokenizer.suggest(w) for w in unknown}
            hints = ", ".join(f"{w!r} (did you mean {' / '.join(near)}?)" if near else repr(w)
                              for w, near in suggestions.items())
            raise ValueError(f"prompt {p!r} has words the tiny model never saw: {hints}. "
                             f"It knows only: {' '.join(VOCABULARY)}")
        if len(tokenizer.split(p)) + 1 > tokenizer.max_length:
            raise ValueError(f"prompt {p!r} is longer than {tokenizer.max_length - 1} words; shorten it")
    return prompts


class Pipeline:
    """Sample images for prompts from a `TextToImage` model.

    ``guidance`` is the common classifier-free scale s in ε̂ = ε_u + s·(ε_c − ε_u):
    0 = unconditional, 1 = conditional only (no guidance), Kandinsky 3's w = s − 1.
    """

    def __init__(self, model: TextToImage, tokenizer: ShapesTokenizer, diffusion: GaussianDiffusion,
                 image_size: int = 32, movq: nn.Module | None = None, latent_scale: float = 1.0,
                 guidance: float = 4.0) -> None:
        """``image_size``: the output's side in pixels. With a ``movq`` the UNet runs on latents of side
        ``image_size / movq.config.downsample_factor``, multiplied by ``latent_scale`` (1.0 as Kandinsky;
        1/σ of the training latents as Stable Diffusion). ``guidance``: the scale a call uses when it names
        none (`from_tiny` takes the model card's)."""
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.diffusion = diffusion
        self.image_size = image_size
        self.movq = movq.eval().requires_grad_(False) if movq is not None else None
        self.latent_scale = float(latent_scale)
        self.guidance = float(guidance)
        if movq is not None and image_size % movq.config.downsample_factor:
            raise ValueError(f"image_size={image_size} is not divisible by the MoVQ's factor "
                             f"{movq.config.downsample_factor}")

    @property
    def sample_size(self) -> int:
        """Side of what the UNet denoises: the image, or its latent."""
        return self.image_size // self.movq.config.downsample_factor if self.movq is not None else self.image_size

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, s, s) → images (B, 3, S, S) in [-1, 1]: ``movq.decode(z / scale)``, no codebook
        (diffusers' ``force_not_quantize=True``, as every Kandinsky 2.2 / 3 pipeline decodes)."""
        return self.movq.decode(latents / self.latent_scale, quantize=False).clamp(-1, 1)

    @classmethod
    def from_tiny(cls, name: str = "pixel_text") -> Pipeline:
        """The shipped tiny model ``data/<name>.safetensors`` with its card's configs."""
        weights.tiny_path(f"{name}.safetensors")  # missing or corrupted: says how to restore it
        card = weights.load_card(f"{name}.safetensors")
        if "movq_config" in card:
            raise ValueError(f"data/{name} is a MoVQ autoencoder, not a text-to-image model; the latent model that "
                             "generates in its latent space is Pipeline.from_tiny('latent_text') (--model latent_text)")
        if "t5_config" not in card:
            raise ValueError(f"data/{name} is not a text-to-image checkpoint (its card has no t5_config); "
                             "use kandlab.train.load_tiny_unet for unconditional models")
        model = TextToImage(UNetConfig(**card["unet_config"]), T5Config(**card["t5_config"]))
        model.load_state_dict(weights.load_tiny_state_dict(f"{name}.safetensors"))
        recipe = card["recipe"]
        tokenizer = ShapesTokenizer.from_shapes(max_length=recipe["max_length"])
        movq = None
        if recipe.get("latent"):
            from kandlab.train_movq import load_tiny_movq

            movq = load_tiny_movq(recipe["latent"])
        return cls(model, tokenizer, GaussianDiffusion(schedules.betas_by_name(recipe["schedule"])), recipe["image_size"],
                   movq=movq, latent_scale=recipe.get("latent_scale") or 1.0, guidance=recipe.get("guidance", 4.0))

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts → (text tokens (B, L, D), mask (B, L)); raises on words outside the vocabulary."""
        return self._encode_checked(check_prompts(prompts, self.tokenizer))

    def _encode_checked(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(prompts)
        return self.model.encode(batch["input_ids"], batch["attention_mask"])

    def eps_fn(self, text: torch.Tensor, mask: torch.Tensor, guidance: float,
               negative: tuple[torch.Tensor, torch.Tensor] | None = None):
        """A ``model_fn(x_t, t) -> ε̂`` with guidance; both branches in one forward of batch 2B.

        ``negative`` (tokens, mask) replaces the empty context as the unconditional branch.
        """
        B, L, D = text.shape
        un_text, un_mask = negative if negative is not None else null_context(B, L, D)
        unet = self.model.unet
        if guidance == 1.0:  # no guidance: one branch is enough
            return lambda x_t, t: unet(x_t, t, text, mask)
        both_text, both_mask = torch.cat([un_text, text]), torch.cat([un_mask, mask])  # (2B, L, D), (2B, L)

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            eps = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), both_text, both_mask)  # (2B, C, H, W)
            eps_u, eps_c = eps.chunk(2)
            return cfg_eps(eps_u, eps_c, guidance)

        return model_fn

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | Sequence[str],
        steps: int = 50,
        guidance: float | None = None,
        sampler: Literal["ddim", "ddpm"] = "ddim",
        eta: float = 0.0,
        seed: int = 0,
        images_per_prompt: int = 1,
        threshold: Literal["static", "dynamic", "none"] | None = None,
        percentile: float = 0.995,
        max_value: float | None = None,
        negative_prompt: str | None = None,
        start: Start = "noise",
        progress: bool = True,
        return_trajectory: bool = False,
    ):
        """Images (B·images_per_prompt, 3, S, S) in [-1, 1], prompt-major order.

        ``threshold`` (of x̂₀, lesson 06): None = ``"static"`` (clip to [-1, 1]) for a pixel model,
        ``"none"`` for a latent model, whose latents have no fixed range. A latent pipeline's
        ``return_trajectory`` gives the latents (decode them with `decode`).

        ``start="noise"`` begins from N(0, I) as Kandinsky 3 and diffusers do;
        ``"data_mean"`` begins from the forward marginal around the shapes world's
        mean pixel (`shapes.dataset_mean`), which removes the sampler's bias
        towards too much foreground (lesson 02, "signal leak").
        """
        if threshold is None:
            threshold = "static" if self.movq is None else "none"
        if guidance is None:
            guidance = self.guidance  # the model card's (4 unless the card says otherwise)
        check_sampling_args(steps, guidance, sampler, images_per_prompt, threshold, start)
        if self.movq is not None and start != "noise":
            raise ValueError(f"start={start!r}: a latent model starts from N(0, I) (start='noise'); the data-mean "
                             "start of lesson 02 is a pixel-space idea")
        prompts = check_prompts(prompts, self.tokenizer)
        check_memory(len(prompts) * images_per_prompt, self.model.unet.config, self.sample_size, guidance, steps,
                     return_trajectory)  # a batch is sampled at once: refuse what cannot fit, before any work
        prompts = [p for p in prompts for _ in range(images_per_prompt)]
        text, mask = self._encode_checked(prompts)  # (B, L, D), (B, L); prompts checked above
        negative = None
        if negative_prompt is not None:
            neg_text, neg_mask = self.encode([negative_prompt])
            negative = (neg_text.expand_as(text), neg_mask.expand_as(mask))
        x0_fn = {"static": static_threshold, "none": None,
                 "dynamic": lambda x0: dynamic_threshold(x0, percentile, max_value)}[threshold]
        g = torch.Generator().manual_seed(seed)
        shape = (len(prompts), self.model.unet.config.in_channels, self.sample_size, self.sample_size)
        out = self.diffusion.sample(self.eps_fn(text, mask, guidance, negative), shape, num_steps=steps,
                                    method=sampler, eta=eta, generator=g, x0_fn=x0_fn, progress=progress,
                                    return_trajectory=return_trajectory,
                                    start_mean=None if self.movq is not None else start_mean(start, self.image_size))
        if return_trajectory:
            return out
        return self.decode(out) if self.movq is not None else out.clamp(-1, 1)


def check_sampling_args(steps: int, guidance: float, sampler: str, images_per_prompt: int = 1,
                        threshold: str = "static", start: str = "noise") -> None:
    """Teaching errors for the sampling options (shared by the CLI)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps={steps!r} must be an int from 1 to {MAX_STEPS} (the model was trained with "
                         f"T = {MAX_STEPS}); 50 DDIM steps is a good default")
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance={guidance!r} must be a number >= 0 (0 = unconditional, 1 = no guidance, "
                         f"4 = the default; Kandinsky 3's w is guidance − 1)")
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler={sampler!r} must be 'ddim' or 'ddpm'")
    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise ValueError(f"images_per_prompt={images_per_prompt!r} must be an int >= 1")
    if threshold not in ("static", "dynamic", "none"):
        raise ValueError(f"threshold={threshold!r} must be 'static', 'dynamic' or 'none'")
    _check_start(start)


# ---------------------------------------------------------------------------
# Memory: refuse a request that cannot fit before sampling it (a batch is sampled at once)

FLOAT_BYTES = 4  # fp32
ALLOCATOR_SLACK = 1.25  # the allocator holds more than the live tensors `activation_bytes` counts; 1.25 makes
# the estimate cover the growth measured below (documented in `activation_bytes`)
MEMORY_SHARE = 0.8  # of the available memory a request may plan to use; the rest is the headroom of the
# allocator, the weights and Python itself


def activation_bytes(config: UNetConfig, image_size: int, text_length: int = 16) -> int:
    """Estimated peak activation memory (bytes) of one image in one UNet forward without gradients (fp32).

    Walks the UNet level by level: a ResNet block holds its input, the 9-fold unfolded input of its 3×3
    convolution (im2col, as the CPU convolution does), its widest intermediate twice (a result and the norm or
    activation made from it) and its output; an attention block its input, its q, k, v and the scores
    (heads × queries × keys, twice: scores and softmax) or its feed-forward (4C, twice), and its output. The
    skips saved for the decoder stay alive throughout. The peak is the largest block's live set plus the skips,
    times `ALLOCATOR_SLACK` for what the allocator keeps besides.

    Measured as the growth of peak RSS per image (``resource.getrusage``, one thread), for the shipped
    ``pixel_text`` UNet at 32×32: one forward, batch 64 → 256: 2.05 MiB per image; sampling with guidance
    (both branches in one batch), 128 → 512 images: 2.81 MiB per image. This estimate: 2.42 MiB per image and
    forward, 4.9 MiB per guided image (`sampling_bytes_per_image`), so it errs on the safe side;
    ``tests/test_pipeline.py`` measures a small UNet the same way and checks the estimate against it.
    """
    c = config
    widths = [c.init_channels, *c.block_out_channels]
    heads_of = lambda ch: max(1, ch // c.head_dim)  # noqa: E731
    last = c.num_levels - 1

    def resnet(c_in: int, c_out: int, n_in: int, n_out: int) -> int:  # n: pixels at input / output
        h = max(c_in, c_out) // c.compression_ratio
        n = max(n_in, n_out)
        im2col = 9 * h * n  # a 3×3 convolution on the CPU unfolds its input into 9 × channels × pixels
        return c_in * n_in + im2col + 2 * max(h, c_out, c_in) * n + c_out * n_out

    def attention(ch: int, n: int, keys: int) -> int:
        h = heads_of(ch)
        scores = 2 * h * n * keys
        return ch * n + max(3 * ch * n + scores, 2 * c.expansion_ratio * ch * n) + ch * n

    peaks, skips = [], 0
    for level in range(c.num_levels):  # encoder
        n = (image_size // 2 ** level) ** 2
        n_out = n // 4 if level != last else n
        c_in, c_out = widths[level], widths[level + 1]
        attend = c.attention_levels[level]
        block = max(resnet(c_in, c_out, n, n), resnet(c_out, c_out, n, n_out))
        if attend:
            block = max(block, attention(c_in, n, n))
            if c.text_conditioned:
                block = max(block, attention(c_out, n, text_length))
        peaks.append(block + skips)
        if level != last:
            skips += c_out * n_out
    for level in reversed(range(c.num_levels)):  # decoder: input at the coarser size, output at this one
        n_out = (image_size // 2 ** level) ** 2
        n_in = n_out // 4 if level != last else n_out
        c_skip = widths[level + 1] if level != last else 0
        if level != last:
            skips -= c_skip * n_in
        c_cat = widths[level + 1] + c_skip
        attend = c.attention_levels[level]
        block = max(resnet(c_cat, c_cat, n_in, n_out), resnet(c_cat, widths[level], n_out, n_out))
        if attend:
            block = max(block, attention(widths[level], n_out, n_out))
            if c.text_conditioned:
                block = max(block, attention(c_cat, n_out, text_length))
        peaks.append(block + skips)
    return int(ALLOCATOR_SLACK * FLOAT_BYTES * max(peaks))


def sampling_bytes_per_image(config: UNetConfig, image_size: int, guidance: float = 4.0, steps: int = 50,
                             return_trajectory: bool = False) -> int:
    """Memory (bytes) one image of a `Pipeline.__call__` batch adds: its UNet activations, twice with guidance
    (both branches run in one batch), the sample and its noise, and the trajectory when one is returned
    (x_t and x̂₀ of every step)."""
    image = FLOAT_BYTES * config.in_channels * image_size ** 2
    branches = 1 if guidance == 1.0 else 2
    trajectory = 2 * (steps + 1) * image if return_trajectory else 0
    return branches * activation_bytes(config, image_size) + 4 * image + trajectory


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation: ``MemAvailable`` of /proc/meminfo (Linux), else the
    free physical pages (``os.sysconf``); None where neither can be read (then nothing is refused)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    """'3.2 GiB' or '480.0 MiB': a memory size for an error message."""
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def max_images(config: UNetConfig, image_size: int, guidance: float = 4.0, steps: int = 50,
               return_trajectory: bool = False, available: int | None = None) -> int | None:
    """The most images one `Pipeline.__call__` may sample here (`MEMORY_SHARE` of the available memory
    over `sampling_bytes_per_image`); None when the available memory is unknown."""
    available = available_memory() if available is None else available
    if available is None:
        return None
    per_image = sampling_bytes_per_image(config, image_size, guidance, steps, return_trajectory)
    return max(0, int(MEMORY_SHARE * available // per_image))


def check_memory(num_images: int, config: UNetConfig, image_size: int, guidance: float = 4.0, steps: int = 50,
                 return_trajectory: bool = False) -> None:
    """Refuse, before any work, a batch of images that would not fit in memory: a ValueError that says how
    much it needs and the largest number that fits (shared by `Pipeline.__call__` and ``kandlab generate``)."""
    available = available_memory()
    most = max_images(config, image_size, guidance, steps, return_trajectory, available)
    if most is None or num_images <= most:
        return
    per_image = sampling_bytes_per_image(config, image_size, guidance, steps, return_trajectory)
    what = "UNet activations" + (" of both guidance branches" if guidance != 1.0 else "") + (
        f" and the {steps}-step trajectory" if return_trajectory else "")
    raise ValueError(
        f"{num_images} images at once (prompts × images_per_prompt; -n in kandlab generate) need about "
        f"{format_bytes(num_images * per_image)} of memory ({format_bytes(per_image)} per image: {what} at "
        f"{image_size}×{image_size}), but only {format_bytes(available)} is available here: at most {most} images fit. "
        + (f"Ask for {most} or fewer, or sample in several calls with different seeds." if most else
           "Close other programs to free memory first."))


def config_card(model: TextToImage) -> dict:
    """The configs a card needs to rebuild ``model``."""
    return {"unet_config": asdict(model.unet.config), "t5_config": asdict(model.t5.config)}
