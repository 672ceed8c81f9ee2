r"""The two-stage unCLIP pipeline of Kandinsky 2.1/2.2 (and DALL-E 2), on the course's tiny models.

.. math::

    \text{caption} \xrightarrow{\text{CLIP text tower}} (h, \bar h)
    \xrightarrow{\text{prior}} e_{img} \xrightarrow{\text{decoder}} z_0
    \xrightarrow{\text{MoVQ}} \text{image}

The prior samples a CLIP *image* embedding for the caption (`kandlab.prior`: x₀ prediction,
``UnCLIPSampler``, guidance 4, 25 steps); the decoder (`kandlab.decoder`) turns the embedding into MoVQ
latents with DDIM and classifier-free guidance; the MoVQ decodes them without the codebook, as every
Kandinsky pipeline does. Because the decoder only ever sees an image embedding, the same decoder makes
*variations* of an image (image → CLIP → decoder) and *mixtures* (Kandinsky 2.1's ``interpolate``:
Σ wᵢ·eᵢ over images and prompts).

``UnCLIPPipeline.from_tiny()`` loads ``data/clip_tiny``, ``prior_tiny``, ``decoder_tiny`` and ``movq_tiny``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from kandlab import schedules, shapes, weights
from kandlab.clip import CLIP
from kandlab.decoder import ImageConditionedUNet, guided_eps
from kandlab.diffusion import GaussianDiffusion
from kandlab.pipeline import check_memory, check_prompts, check_sampling_args
from kandlab.prior import PriorTransformer, UnCLIPSampler, prior_model_fn
from kandlab.tokenizer import ShapesTokenizer

MAX_IMAGES = 1024  # per call: 64² images, a doubled batch of 4×16² latents; beyond this, split the list


class UnCLIPPipeline:
    """Text → prior → decoder → MoVQ, and image → CLIP → decoder (variations, mixing)."""

    def __init__(self, clip: CLIP, prior: PriorTransformer, decoder: ImageConditionedUNet, movq: torch.nn.Module,
                 latent_scale: float, tokenizer: ShapesTokenizer, image_size: int = 64) -> None:
        self.clip = clip.eval().requires_grad_(False)
        self.prior = prior.eval().requires_grad_(False)
        self.decoder = decoder.eval().requires_grad_(False)
        self.movq = movq.eval().requires_grad_(False)
        self.latent_scale = float(latent_scale)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.prior_sampler = UnCLIPSampler()
        self.diffusion = GaussianDiffusion(schedules.betas_by_name("cosine"))
        width = clip.image_tower.config.projection_dim
        if prior.config.out_dim != width or decoder.config.image_embed_dim != width:
            raise ValueError(f"the CLIP space is {width} wide but the prior outputs {prior.config.out_dim} and the "
                             f"decoder reads {decoder.config.image_embed_dim}; load models trained together")

    @classmethod
    def from_tiny(cls, clip: str = "clip_tiny", prior: str = "prior_tiny", decoder: str = "decoder_tiny") -> UnCLIPPipeline:
        """The shipped lesson-08 models from ``data/`` (each checked against the manifest)."""
        from kandlab.train_movq import load_tiny_movq
        from kandlab.train_unclip import MAX_LENGTH, load_tiny_clip, load_tiny_decoder, load_tiny_prior

        card = weights.load_card(f"{decoder}.safetensors")
        recipe = card["recipe"]
        return cls(load_tiny_clip(clip), load_tiny_prior(prior), load_tiny_decoder(decoder),
                   load_tiny_movq(recipe["latent"]), recipe["latent_scale"],
                   ShapesTokenizer.from_shapes(max_length=MAX_LENGTH))

    # -- stage 0: CLIP ----------------------------------------------------------------

    def encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Prompts → CLIP text hidden states (B, L, D), pooled embeddings (B, P), bool mask (B, L)."""
        return embed_texts(self.clip, check_prompts(prompts, self.tokenizer), self.tokenizer)

    def embed_images(self, images: Tensor) -> Tensor:
        """Images (B, 3, 64, 64) in [-1, 1] → CLIP image embeddings (B, P), as the decoder was trained on."""
        S = self.image_size
        if not isinstance(images, Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (3, S, S):
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, 3, {S}, {S}) tensor in [-1, 1] (the shapes world at {S} px), "
                             f"got {got}; render one with kandlab.shapes.render(scene, {S})")
        return embed_images(self.clip, images.float())

    # -- stage 1: the prior -------------------------------------------------------------

    @torch.no_grad()
    def prior_embeddings(self, prompts: str | Sequence[str], steps: int = 25, guidance: float = 4.0,
                         seed: int = 0, progress: bool = False) -> Tensor:
        """Sample one CLIP image embedding per prompt (B, P): guided x₀-prediction (Kandinsky 2.2's 25 steps,
        guidance 4), the empty caption as the unconditional branch, mapped back with ``clip_mean``/``clip_std``."""
        prompts = check_prompts(prompts, self.tokenizer)
        _check_count(len(prompts))
        return sample_prior(self.prior, self.clip, self.tokenizer, prompts, steps, guidance, seed, progress)

    # -- stage 2: the decoder -------------------------------------------------------------

    @torch.no_grad()
    def decode_embeddings(self, image_embeds: Tensor, steps: int = 50, guidance: float = 4.0, seed: int = 0,
                          progress: bool = False, return_latents: bool = False) -> Tensor:
        """CLIP image embeddings (B, P) → images (B, 3, 64, 64) in [-1, 1]: DDIM (η = 0) on the decoder with
        guidance against the zero embedding it was trained to treat as "no image", then MoVQ without the codebook."""
        P = self.decoder.config.image_embed_dim
        if not isinstance(image_embeds, Tensor) or image_embeds.ndim != 2 or image_embeds.shape[1] != P:
            got = tuple(image_embeds.shape) if isinstance(image_embeds, Tensor) else type(image_embeds).__name__
            raise ValueError(f"image_embeds must be (B, {P}) CLIP image embeddings (from prior_embeddings or "
                             f"embed_images), got {got}")
        _check_count(len(image_embeds))
        check_sampling_args(steps, guidance, "ddim")
        side = self.image_size // self.movq.config.downsample_factor
        check_memory(len(image_embeds), self.decoder.config.unet, side, guidance, steps)
        e = image_embeds.float()

        def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
            return guided_eps(self.decoder, x_t, t, e, guidance)

        g = torch.Generator().manual_seed(seed)
        z = self.diffusion.sample(model_fn, (len(e), 4, side, side), num_steps=steps, method="ddim", eta=0.0,
                                  generator=g, progress=progress)
        if return_latents:
            return z
        return self.movq.decode(z / self.latent_scale, quantize=False).clamp(-1, 1)

    # -- the three uses ----------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompts: str | Sequence[str], steps: int = 50, guidance: float = 4.0,
                 prior_steps: int = 25, prior_guidance: float = 4.0, seed: int = 0,
                 progress: bool = False) -> Tensor:
        """Text → images (B, 3, 64, 64): the prior's embedding, decoded."""
        embeds = self.prior_embeddings(prompts, prior_steps, prior_guidance, seed, progress)
        return self.decode_embeddings(embeds, steps, guidance, seed, progress)

    @torch.no_grad()
    def variations(self, images: Tensor, n: int = 4, steps: int = 50, guidance: float = 4.0, seed: int = 0) -> Tensor:
        """n new images per input image, from its CLIP embedding alone: (B, 3, 64, 64) → (B·n, 3, 64, 64)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} is the number of variations per image; use a positive int, e.g. 4")
        embeds = self.embed_images(images).repeat_interleave(n, dim=0)  # (B·n, P)
        return self.decode_embeddings(embeds, steps, guidance, seed)

    @torch.no_grad()
    def mix_embeddings(self, items: Sequence[str | Tensor], weights_: Sequence[float], prior_steps: int = 25,
                       prior_guidance: float = 4.0, seed: int = 0) -> Tensor:
        r"""Kandinsky 2.1's ``interpolate``: :math:`e = \sum_i w_i e_i` (1, P), each eᵢ the CLIP embedding of an
        image (a (3, 64, 64) tensor) or the prior's embedding of a prompt (a str). The weights are used as given
        (diffusers does not renormalise them either); weights summing to 1 keep e at the embeddings' scale."""
        if len(items) != len(weights_) or not items:
            raise ValueError(f"got {len(items)} items and {len(weights_)} weights; pass one weight per image or "
                             "prompt, e.g. mix_embeddings([image, 'a red circle'], [0.5, 0.5])")
        if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights_):
            raise ValueError(f"weights must be finite numbers, got {list(weights_)}")
        embeds = []
        for item in items:
            if isinstance(item, str):
                embeds.append(self.prior_embeddings([item], prior_steps, prior_guidance, seed)[0])
            elif isinstance(item, Tensor) and item.ndim == 3:
                embeds.append(self.embed_images(item[None])[0])
            else:
                raise TypeError(f"each item is a prompt (str) or one image (3, {self.image_size}, "
                                f"{self.image_size}) tensor, got {type(item).__name__}"
                                + (f" of shape {tuple(item.shape)}" if isinstance(item, Tensor) else ""))
        return mix(torch.stack(embeds), weights_)[None]  # (1, P)


@torch.no_grad()
def embed_images(clip: CLIP, images: Tensor, batch: int = 256) -> Tensor:
    """Images (N, 3, 64, 64) in [-1, 1] → CLIP image embeddings (N, P), not normalised (what the prior models and
    the decoder reads), ``batch`` images at a time."""
    return torch.cat([clip.image_tower(images[i:i + batch])[1] for i in range(0, len(images), batch)])


@torch.no_grad()
def embed_texts(clip: CLIP, captions: list[str], tokenizer: ShapesTokenizer | None = None,
                batch: int = 1024) -> tuple[Tensor, Tensor, Tensor]:
    """Captions → CLIP text hidden states (N, L, D), pooled embeddings (N, P), bool mask (N, L); the shapes
    tokenizer padded to the text tower's context length unless ``tokenizer`` is given."""
    tokenizer = tokenizer or ShapesTokenizer.from_shapes(max_length=clip.text_tower.config.max_position_embeddings)
    tok = tokenizer(list(captions))
    hidden, pooled = [], []
    for i in range(0, len(tok["input_ids"]), batch):
        h, p = clip.text_tower(tok["input_ids"][i:i + batch], tok["attention_mask"][i:i + batch])
        hidden.append(h)
        pooled.append(p)
    return torch.cat(hidden), torch.cat(pooled), tok["attention_mask"].bool()


def empty_caption(batch: int, length: int) -> dict[str, Tensor]:
    """The tokens of the empty caption "" (only the end token), Kandinsky 2.2's unconditional prompt for the prior:
    ``{"input_ids", "attention_mask"}`` (batch, length). The shapes tokenizer refuses "" as a prompt on purpose."""
    from kandlab.tokenizer import EOS_ID, PAD_ID

    ids = torch.full((batch, length), PAD_ID, dtype=torch.long)
    ids[:, 0] = EOS_ID
    mask = torch.zeros(batch, length, dtype=torch.long)
    mask[:, 0] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def sample_prior(prior: PriorTransformer, clip: CLIP, tokenizer: ShapesTokenizer, prompts: list[str], steps: int = 25,
                 guidance: float = 4.0, seed: int = 0, progress: bool = False) -> Tensor:
    """The prior's sampling for checked prompts: CLIP text features of the prompts and of the empty caption
    (the unconditional branch, as Kandinsky 2.2 uses ""), guided `UnCLIPSampler`, then ``post_process_latents``."""
    _check_guidance(guidance, "prior guidance")
    B = len(prompts)
    text, empty = tokenizer(list(prompts)), empty_caption(B, tokenizer.max_length)
    ids = torch.cat([empty["input_ids"], text["input_ids"]])  # (2B, L): unconditional rows first, as diffusers
    mask = torch.cat([empty["attention_mask"], text["attention_mask"]])
    hidden, pooled = clip.text_tower(ids, mask)
    fn = prior_model_fn(prior, pooled, hidden, mask.bool())
    g = torch.Generator().manual_seed(seed)
    x0 = UnCLIPSampler().sample(fn, (B, prior.config.out_dim), steps=steps, generator=g, guidance_scale=guidance,
                                progress=progress)
    return prior.post_process_latents(x0)  # (B, P)


@torch.no_grad()
def regress_prior(prior: PriorTransformer, clip: CLIP, tokenizer: ShapesTokenizer, prompts: list[str]) -> Tensor:
    """The regression baseline's one deterministic pass (x_t = 0, t = T − 1; `train_unclip.prior_loss`)."""
    batch = tokenizer(list(prompts))
    hidden, pooled = clip.text_tower(batch["input_ids"], batch["attention_mask"])
    B = len(prompts)
    x0 = prior(torch.zeros(B, prior.config.out_dim), UnCLIPSampler().num_train_timesteps - 1, pooled, hidden,
               batch["attention_mask"].bool())
    return prior.post_process_latents(x0)  # (B, P)


def _check_count(n: int) -> None:
    if n > MAX_IMAGES:
        raise ValueError(f"{n} images in one call; the pipeline samples a batch at once and caps it at {MAX_IMAGES}: "
                         f"split the prompts into chunks of {MAX_IMAGES}")


def _check_guidance(scale: float, what: str) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{what}={scale!r} must be a finite number ≥ 0 (1 = none; Kandinsky 2.2 uses 4)")


def mix(embeds: Tensor, weights_: Sequence[float]) -> Tensor:
    r"""Kandinsky 2.1's mixing rule: :math:`\sum_i w_i e_i` of K embeddings (K, P) → (P,), the weights as given."""
    if embeds.ndim != 2 or len(embeds) != len(weights_):
        raise ValueError(f"embeds must be (K, P) with one weight per row; got {tuple(embeds.shape)} and "
                         f"{len(weights_)} weights")
    w = torch.as_tensor(list(weights_), dtype=embeds.dtype, device=embeds.device)  # (K,)
    return (w[:, None] * embeds).sum(0)  # (P,)


def slerp(a: Tensor, b: Tensor, w: float) -> Tensor:
    r"""Spherical interpolation between two embeddings (P,) or (B, P): the arc from a (w = 0) to b (w = 1) with
    the norm interpolated linearly, :math:`\frac{\sin((1-w)\theta)}{\sin\theta}\hat a + \frac{\sin(w\theta)}{\sin\theta}\hat b`
    (Shoemake 1985; DALL-E 2 §3.1 interpolates CLIP embeddings this way)."""
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na, b / nb
    theta = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    direction = (torch.sin((1 - w) * theta) * ua + torch.sin(w * theta) * ub) / torch.sin(theta)
    return direction * ((1 - w) * na + w * nb)


@torch.no_grad()
def unclip_scores(pipe: UnCLIPPipeline, n: int = 512, batch: int = 64, progress: bool = True) -> dict:
    """ShapesBench of the two-stage pipeline on the n fixed prompts (`kandlab.train.score_prompts`), and its
    binding outcomes (`shapes.binding_rates`) on those of them with two groups of different shapes."""
    from tqdm.auto import tqdm

    from kandlab.train import score_prompts

    prompts = score_prompts(n)
    images = torch.cat([pipe(prompts[i:i + batch], seed=1234 + i)
                        for i in tqdm(range(0, n, batch), desc="unCLIP ShapesBench", disable=not progress, leave=False)])
    stats = shapes.score(images, prompts)
    return {**{f"shapesbench_{k}": round(v, 4) for k, v in stats.items()}, "prompts": n,
            "count_confusion": shapes.count_confusion(images, prompts).tolist(),  # asked (rows 1-3) × drawn (0-4+)
            "binding": shapes.binding_rates(images, prompts),
            "sampler": "prior 25 steps guidance 4; decoder DDIM 50 steps, eta 0, guidance 4; seed 1234 + batch start",
            "prompt_set": "kandlab.train.score_prompts(n) = captions of ShapesDataset(seed=2024)"}


@torch.no_grad()
def redraw(pipe: UnCLIPPipeline, images: Tensor, batch: int = 64, guidance: float = 4.0,
           progress: bool = False) -> Tensor:
    """Each image (N, 3, 64, 64) redrawn once from its own CLIP embedding (image → CLIP → decoder), in batches
    whose noise seeds are 1234 + the batch's start: the same images give the same noise at any guidance."""
    from tqdm.auto import tqdm

    return torch.cat([pipe.decode_embeddings(pipe.embed_images(images[i:i + batch]), guidance=guidance, seed=1234 + i)
                      for i in tqdm(range(0, len(images), batch), desc="variations", disable=not progress, leave=False)])


@torch.no_grad()
def variation_scores(pipe: UnCLIPPipeline, n: int = 512, batch: int = 64, progress: bool = True,
                     seed: int = 2024, guidance: float = 4.0) -> dict:
    """What the image embedding keeps: ShapesBench of held-out images re-drawn from their CLIP embedding alone
    (`redraw`), scored against the captions of the originals; the ceiling of the two-stage pipeline, whose prior
    can at best produce these embeddings. ``seed``: the held-out world's (2024, the benchmark's; another seed
    gives validation images); ``guidance``: the decoder's."""
    from kandlab.train_unclip import held_out

    images, captions = held_out(n, seed)
    drawn = redraw(pipe, images, batch, guidance, progress)
    stats = shapes.score(drawn, captions)
    return {**{f"shapesbench_{k}": round(v, 4) for k, v in stats.items()}, "prompts": n,
            "count_confusion": shapes.count_confusion(drawn, captions).tolist(),
            "binding": shapes.binding_rates(drawn, captions),
            "sampler": f"decoder DDIM 50 steps, eta 0, guidance {guidance:g}, from the CLIP embedding of each held-out "
                       "image",
            "image_set": f"kandlab.train_unclip.held_out(n): ShapesDataset(size=64, seed={seed})"}
