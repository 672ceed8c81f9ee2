r"""The Kandinsky 2.2 decoder: a UNet that paints latents from a CLIP *image* embedding (no text).

In unCLIP (Ramesh et al. 2022, §2.1) the prior turns a prompt into a CLIP image embedding; the
decoder then denoises image latents conditioned on that embedding alone. Kandinsky 2.2's decoder is
diffusers' ``UNet2DConditionModel`` with two pieces of image conditioning:

* ``encoder_hid_dim_type="image_proj"`` — :class:`ImageProjection`: the embedding becomes
  ``num_image_tokens`` context tokens for every cross-attention (Linear 1280 → 32·768, reshape, LayerNorm);
* ``addition_embed_type="image"`` — :class:`ImageTimeEmbedding`: the embedding becomes one vector
  added to the time embedding (Linear 1280 → 1536, LayerNorm), so it also drives every norm.

kandlab does **not** rebuild ``UNet2DConditionModel``. :class:`ImageConditionedUNet` puts this
conditioning on the course's own Kandinsky 3 UNet (``kandlab.unet.UNet``), in place of its text path
(``TextProjection`` and ``AttentionPooling``, which Kandinsky 2.2 does not have). The two
conditioning modules are parity-tested against diffusers'; the UNet trunk is Kandinsky 3's, so a
published 2.2 decoder checkpoint does not load into it.

Read top to bottom:

1. ``ImageProjection``       — image embedding → context tokens; diffusers weights in and out
2. ``ImageTimeEmbedding``    — image embedding → a vector added to t_emb; diffusers weights in and out
3. ``DecoderConfig``         — a ``UNetConfig`` + the embedding width and token count; presets
4. ``unet_trunk``            — the body of ``UNet.forward`` once t_emb and the context are known
5. ``ImageConditionedUNet``  — (x_t, t, image_embeds) → ε
6. ``drop_image_embeds``, ``guided_eps`` — embedding dropout for classifier-free guidance, guided ε
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kandlab.diffusion import cfg_eps
from kandlab.unet import UNet, UNetConfig, text_mask_bias

__all__ = [
    "ImageProjection",
    "ImageTimeEmbedding",
    "DecoderConfig",
    "ImageConditionedUNet",
    "unet_trunk",
    "drop_image_embeds",
    "guided_eps",
]

KeyMap = tuple[tuple[str, str], ...]  # (kandlab key, diffusers key) pairs


# --------------------------------------------------------------------------------------
# Shared checks and the state-dict loader of the two conditioning modules
# --------------------------------------------------------------------------------------


def _check_embeds(image_embeds: Any, width: int, owner: str) -> None:
    """An image embedding must be a floating-point (B, width) tensor."""
    if not isinstance(image_embeds, Tensor) or not image_embeds.is_floating_point():
        got = image_embeds.dtype if isinstance(image_embeds, Tensor) else type(image_embeds).__name__
        raise TypeError(f"{owner}: image_embeds must be a floating-point tensor of shape (B, {width}), got {got}")
    if image_embeds.ndim != 2 or image_embeds.shape[1] != width:
        hint = " (add a batch axis with image_embeds[None])" if image_embeds.ndim == 1 else ""
        raise ValueError(
            f"{owner}: image_embeds has shape {tuple(image_embeds.shape)} but must be (B, image_embed_dim) = "
            f"(B, {width}){hint}; image_embed_dim is the width of the CLIP image embedding "
            "(1280 for Kandinsky 2.2's OpenCLIP ViT-bigG/14)."
        )


def _state_dict_of(module_or_state_dict: nn.Module | Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """A diffusers module → a detached copy of its tensors; a state dict → itself (tensors shared)."""
    if isinstance(module_or_state_dict, nn.Module):
        return {k: v.detach().clone() for k, v in module_or_state_dict.state_dict().items()}
    if isinstance(module_or_state_dict, Mapping):
        return dict(module_or_state_dict)
    raise TypeError(f"expected a diffusers {what} or its state dict, got {type(module_or_state_dict).__name__}")


def _shape(state_dict: Mapping[str, Tensor], key: str, ndim: int) -> tuple[int, ...] | None:
    """The shape of ``state_dict[key]`` if it is there with ``ndim`` axes, else None (used to read sizes)."""
    value = state_dict.get(key)
    return tuple(value.shape) if isinstance(value, Tensor) and value.ndim == ndim else None


def _adopt(model: nn.Module, key_map: KeyMap, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Load diffusers-named ``state_dict`` into ``model`` (built on the meta device), or explain what does not fit.

    Lists every missing key, unexpected key and shape mismatch at once; tensors are adopted as they are
    (``assign=True``: their dtype and device follow the state dict).
    """
    expected = model.state_dict()  # meta tensors: names and shapes only
    known = {theirs for _, theirs in key_map}
    missing = [theirs for _, theirs in key_map if theirs not in state_dict]
    unexpected = [k for k in state_dict if k not in known]
    mismatched = [
        f"{theirs}: checkpoint {tuple(state_dict[theirs].shape)}, kandlab {tuple(expected[ours].shape)}"
        for ours, theirs in key_map
        if theirs in state_dict and tuple(state_dict[theirs].shape) != tuple(expected[ours].shape)
    ]
    if missing or unexpected or mismatched:
        text = f"the state dict does not fit {model!r}:"
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                text += f"\n  {title} ({len(items)}): " + ", ".join(items)
        raise ValueError(text + f"\n  The diffusers keys are {sorted(known)}; check the sizes you passed.")
    model.load_state_dict({ours: state_dict[theirs] for ours, theirs in key_map}, strict=True, assign=True)
    return model


# --------------------------------------------------------------------------------------
# 1. Image embedding → context tokens
# --------------------------------------------------------------------------------------


class ImageProjection(nn.Module):
    r"""One image embedding → ``num_image_text_embeds`` context tokens for cross-attention.

    .. math:: c = \mathrm{LN}\big(\mathrm{reshape}_{N \times D}(W e + b)\big), \qquad
              e \in \mathbb{R}^{E},\ c \in \mathbb{R}^{N \times D}

    The LayerNorm acts on each token separately (over its D channels). Kandinsky 2.2:
    E = 1280, N = 32, D = 768. Same numbers as diffusers' ``ImageProjection``.

    image_embeds: (B, E) → (B, N, D).
    """

    # kandlab name ↔ diffusers name
    DIFFUSERS_KEYS: KeyMap = (
        ("linear.weight", "image_embeds.weight"),
        ("linear.bias", "image_embeds.bias"),
        ("norm.weight", "norm.weight"),
        ("norm.bias", "norm.bias"),
    )

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_image_text_embeds: int):
        super().__init__()
        self.image_embed_dim, self.cross_attention_dim = image_embed_dim, cross_attention_dim
        self.num_image_text_embeds = num_image_text_embeds
        self.linear = nn.Linear(image_embed_dim, num_image_text_embeds * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: Tensor) -> Tensor:
        _check_embeds(image_embeds, self.image_embed_dim, "ImageProjection")
        B = image_embeds.shape[0]
        h = self.linear(image_embeds.to(self.linear.weight.dtype))  # (B, N·D)
        h = h.view(B, self.num_image_text_embeds, self.cross_attention_dim)  # (B, N, D)
        return self.norm(h)  # (B, N, D)

    def extra_repr(self) -> str:
        return (f"image_embed_dim={self.image_embed_dim}, cross_attention_dim={self.cross_attention_dim}, "
                f"num_image_text_embeds={self.num_image_text_embeds}")

    @classmethod
    def from_diffusers(
        cls,
        module_or_state_dict: nn.Module | Mapping[str, Tensor],
        *,
        image_embed_dim: int | None = None,
        cross_attention_dim: int | None = None,
        num_image_text_embeds: int | None = None,
    ) -> ImageProjection:
        """Build an ``ImageProjection`` holding the weights of diffusers' ``ImageProjection`` (or its state dict).

        Sizes you leave out are read from the module (or from the tensor shapes: E and N·D from the
        linear weight, D from the norm); sizes you give are checked against the weights. A module's
        tensors are copied; a state dict's are adopted as they are (shared).
        """
        num = num_image_text_embeds or getattr(module_or_state_dict, "num_image_text_embeds", None)
        state_dict = _state_dict_of(module_or_state_dict, "ImageProjection")
        weight = _shape(state_dict, "image_embeds.weight", 2) or (1, 1)  # (N·D, E)
        norm = _shape(state_dict, "norm.weight", 1) or (1,)  # (D,)
        D = cross_attention_dim or norm[0]
        E = image_embed_dim or weight[1]
        N = num or max(1, weight[0] // D)  # a non-multiple shows up below as a shape mismatch
        with torch.device("meta"):
            model = cls(E, D, N)
        return _adopt(model, cls.DIFFUSERS_KEYS, state_dict)

    def to_diffusers_state_dict(self) -> dict[str, Tensor]:
        """The weights under diffusers ``ImageProjection`` names (tensors shared, not copied)."""
        ours = self.state_dict()
        return {theirs: ours[k] for k, theirs in self.DIFFUSERS_KEYS}


# --------------------------------------------------------------------------------------
# 2. Image embedding → a vector added to the time embedding
# --------------------------------------------------------------------------------------


class ImageTimeEmbedding(nn.Module):
    r"""One image embedding → a vector of the time-embedding width, added to t_emb.

    .. math:: t_{emb} \leftarrow t_{emb} + \mathrm{LN}(W e + b)

    Because every conditional norm of the UNet reads t_emb, this reaches every block, not only
    the cross-attentions. Kandinsky 2.2: 1280 → 1536. Same numbers as diffusers' ``ImageTimeEmbedding``.

    image_embeds: (B, E) → (B, T).
    """

    DIFFUSERS_KEYS: KeyMap = (
        ("linear.weight", "image_proj.weight"),
        ("linear.bias", "image_proj.bias"),
        ("norm.weight", "image_norm.weight"),
        ("norm.bias", "image_norm.bias"),
    )

    def __init__(self, image_embed_dim: int, time_embed_dim: int):
        super().__init__()
        self.image_embed_dim, self.time_embed_dim = image_embed_dim, time_embed_dim
        self.linear = nn.Linear(image_embed_dim, time_embed_dim)
        self.norm = nn.LayerNorm(time_embed_dim)

    def forward(self, image_embeds: Tensor) -> Tensor:
        _check_embeds(image_embeds, self.image_embed_dim, "ImageTimeEmbedding")
        return self.norm(self.linear(image_embeds.to(self.linear.weight.dtype)))  # (B, T)

    def extra_repr(self) -> str:
        return f"image_embed_dim={self.image_embed_dim}, time_embed_dim={self.time_embed_dim}"

    @classmethod
    def from_diffusers(
        cls,
        module_or_state_dict: nn.Module | Mapping[str, Tensor],
        *,
        image_embed_dim: int | None = None,
        time_embed_dim: int | None = None,
    ) -> ImageTimeEmbedding:
        """Build an ``ImageTimeEmbedding`` holding the weights of diffusers' ``ImageTimeEmbedding``.

        Sizes left out are read from the linear weight (T, E); sizes given are checked. A module's
        tensors are copied; a state dict's are adopted as they are (shared).
        """
        state_dict = _state_dict_of(module_or_state_dict, "ImageTimeEmbedding")
        T, E = _shape(state_dict, "image_proj.weight", 2) or (1, 1)  # (T, E)
        with torch.device("meta"):
            model = cls(image_embed_dim or E, time_embed_dim or T)
        return _adopt(model, cls.DIFFUSERS_KEYS, state_dict)

    def to_diffusers_state_dict(self) -> dict[str, Tensor]:
        """The weights under diffusers ``ImageTimeEmbedding`` names (tensors shared, not copied)."""
        ours = self.state_dict()
        return {theirs: ours[k] for k, theirs in self.DIFFUSERS_KEYS}


# --------------------------------------------------------------------------------------
# 3. Configuration
# --------------------------------------------------------------------------------------


@dataclass
class DecoderConfig:
    """A Kandinsky 3 UNet over 4 latent channels, conditioned on a CLIP image embedding.

    ``unet.encoder_hid_dim`` is the width of the conditioning the UNet receives, so it must equal
    ``image_embed_dim`` (as in diffusers, where ``encoder_hid_dim=1280`` sizes both image modules);
    the context tokens have ``unet.cross_attention_dim`` channels and the time vector
    ``unet.time_embedding_dim``.
    """

    unet: UNetConfig = dataclasses.field(default_factory=lambda: DecoderConfig._tiny_unet(64))
    image_embed_dim: int = 64  # width of the CLIP image embedding (1280 for ViT-bigG/14)
    num_image_tokens: int = 4  # context tokens made from one embedding (32 in Kandinsky 2.2)

    def __post_init__(self) -> None:
        for name in ("image_embed_dim", "num_image_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DecoderConfig: {name} must be a positive int, got {value!r}")
        if not isinstance(self.unet, UNetConfig):
            raise TypeError(f"DecoderConfig: unet must be a UNetConfig, got {type(self.unet).__name__}")
        if not self.unet.text_conditioned:
            raise ValueError(
                "DecoderConfig: the UNet needs its cross-attention blocks for the image tokens; "
                "build it with UNetConfig(..., text_conditioned=True)."
            )
        if self.unet.encoder_hid_dim != self.image_embed_dim:
            raise ValueError(
                f"DecoderConfig: unet.encoder_hid_dim={self.unet.encoder_hid_dim} but image_embed_dim="
                f"{self.image_embed_dim}; the UNet is conditioned on the image embedding, so give both the "
                f"embedding's width, e.g. UNetConfig.tiny_latent(encoder_hid_dim={self.image_embed_dim})."
            )
        if self.unet.in_channels != 4 or self.unet.out_channels != 4:
            raise ValueError(
                f"DecoderConfig: the decoder works on the 4 channels of MoVQ latents and predicts ε of the same "
                f"shape, got in_channels={self.unet.in_channels}, out_channels={self.unet.out_channels}; use 4 and 4."
            )

    @staticmethod
    def _tiny_unet(image_embed_dim: int) -> UNetConfig:
        return UNetConfig.tiny_latent(out_channels=4, encoder_hid_dim=image_embed_dim)

    @classmethod
    def tiny(cls, image_embed_dim: int = 64, num_image_tokens: int = 4) -> DecoderConfig:
        """The widths of the shipped ``latent_text`` UNet (32/64/64/128, t_emb 128, context 64) on 4×16×16 latents.

        64 = the width of ``PriorConfig.tiny()``'s image embedding. 4 tokens of 64 channels: at this width
        the 64 numbers of the embedding leave little to spread over Kandinsky 2.2's 32 tokens.
        """
        return cls(unet=cls._tiny_unet(image_embed_dim), image_embed_dim=image_embed_dim,
                   num_image_tokens=num_image_tokens)

    @classmethod
    def kandinsky2_2(cls) -> DecoderConfig:
        """Kandinsky 2.2's decoder numbers (kandinsky-community/kandinsky-2-2-decoder, REFERENCE.md):

        CLIP ViT-bigG/14 embedding 1280 → 32 context tokens of 768 and a 1536-wide time vector;
        block widths 384/768/1152/1536, head_dim 64, 32 groups, no attention at the finest level.
        ``layers_per_block`` stays Kandinsky 3's 3 (diffusers' Kandinsky 2.1 conversion script also gives
        its UNet 3; REFERENCE.md does not list it for 2.2). Two deliberate differences from the published
        1.253 B ``UNet2DConditionModel``: the blocks are Kandinsky 3's (kandlab's UNet), and
        ``out_channels`` is 4 (ε only), where the published model has 8 (ε and a learned variance).
        Built, it has 1,406,125,252 parameters: 31,483,392 in ``ImageProjection``, 1,970,688 in
        ``ImageTimeEmbedding`` (``tests/test_decoder.py`` counts them on the meta device).
        """
        unet = UNetConfig(
            in_channels=4,
            out_channels=4,
            time_embedding_dim=1536,
            block_out_channels=(384, 768, 1152, 1536),
            cross_attention_dim=768,
            encoder_hid_dim=1280,
        )
        return cls(unet=unet, image_embed_dim=1280, num_image_tokens=32)


# --------------------------------------------------------------------------------------
# 4. The UNet trunk, given the conditioning
# --------------------------------------------------------------------------------------


def unet_trunk(unet: UNet, x: Tensor, t_emb: Tensor, context: Tensor, mask_bias: Tensor | None = None) -> Tensor:
    """The UNet's blocks driven by a ready-made time embedding and context (`UNet.trunk`, which ``UNet.forward``
    itself ends with): x (B, in_channels, H, W), t_emb (B, T), context (B, L, D) → (B, out_channels, H, W)."""
    return unet.trunk(x, t_emb, context, mask_bias)


# --------------------------------------------------------------------------------------
# 5. The decoder
# --------------------------------------------------------------------------------------


class ImageConditionedUNet(nn.Module):
    r"""Kandinsky 2.2's decoder conditioning on kandlab's Kandinsky 3 UNet: (x_t, t, e) → ε̂.

    .. math:: t_{emb} = \mathrm{MLP}(\mathrm{sinusoid}(t)) + \mathrm{ImageTimeEmbedding}(e), \qquad
              c = \mathrm{ImageProjection}(e), \qquad \hat\varepsilon = \mathrm{trunk}(x_t, t_{emb}, c)

    The Kandinsky 3 text path of the UNet (``text_projection``, ``attention_pooling``) is removed
    (set to None, as the UNet itself does when unconditional): Kandinsky 2.2 has neither, and the
    two image modules take their place. The time MLP and every block are the UNet's own. The
    context mask is all true (every image token is real); diffusers passes none, the same numbers.

    The image vector is added to t_emb *before* the SiLU that feeds every conditional norm, so it is
    added exactly where Kandinsky 3 adds its pooled text. Those norms start with zero weights
    (``ConditionalGroupNorm``), so on the very first training step no gradient reaches the time path
    — neither the time MLP nor ``image_time_embedding``; from the second step on it does.

    ``forward(x_t, t, image_embeds)``:

    * x_t: (B, 4, h, w) latents, h and w divisible by ``config.unet.downsample_factor``
    * t: a number, a 0-d tensor, or (B,) timesteps
    * image_embeds: (B, image_embed_dim) CLIP image embeddings (zeros = unconditional, see
      :func:`drop_image_embeds`)

    returns ε̂: (B, 4, h, w).
    """

    def __init__(self, config: DecoderConfig | None = None):
        super().__init__()
        config = config or DecoderConfig.tiny()
        self.config = config
        u = config.unet
        self.image_projection = ImageProjection(config.image_embed_dim, u.cross_attention_dim, config.num_image_tokens)
        self.image_time_embedding = ImageTimeEmbedding(config.image_embed_dim, u.time_embedding_dim)
        self.unet = UNet(u)
        self.unet.text_projection = None  # replaced by image_projection
        self.unet.attention_pooling = None  # replaced by image_time_embedding

    def condition(self, t: Tensor, image_embeds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """t (B,), image_embeds (B, E) → t_emb (B, T), context tokens (B, N, D), context mask (B, N) all true."""
        t_emb = self.unet.time_embedding(t, image_embeds.dtype)  # (B, T)
        t_emb = t_emb + self.image_time_embedding(image_embeds)  # (B, T): addition_embed_type="image"
        context = self.image_projection(image_embeds)  # (B, N, D): encoder_hid_dim_type="image_proj"
        context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)  # (B, N)
        return t_emb, context, context_mask

    def forward(self, x_t: Tensor, t: Tensor | int | float, image_embeds: Tensor) -> Tensor:
        t = self._check_inputs(x_t, t, image_embeds)  # (B,)
        t_emb, context, context_mask = self.condition(t, image_embeds.to(x_t.dtype))
        return unet_trunk(self.unet, x_t, t_emb, context, text_mask_bias(context_mask, context.dtype))

    def _check_inputs(self, x_t: Any, t: Any, image_embeds: Any) -> Tensor:
        """Check shapes at the boundary with messages that say what to do; return t as (B,)."""
        u = self.config.unet
        if not isinstance(x_t, Tensor) or x_t.ndim != 4:
            got = tuple(x_t.shape) if isinstance(x_t, Tensor) else type(x_t).__name__
            raise ValueError(f"x_t must be a (B, {u.in_channels}, h, w) tensor of latents, got {got}.")
        B, C, H, W = x_t.shape
        if C != u.in_channels:
            raise ValueError(
                f"x_t has {C} channels but the decoder works on {u.in_channels} latent channels (MoVQ's); "
                f"x_t has shape {tuple(x_t.shape)}. Encode images with the MoVQ first."
            )
        f = u.downsample_factor
        for size in (H, W):
            if size % f:
                raise ValueError(f"latent size {size} is not divisible by {f} (the UNet halves it "
                                 f"{u.num_levels - 1} times); use {max(f, round(size / f) * f)}.")
        _check_embeds(image_embeds, self.config.image_embed_dim, "ImageConditionedUNet")
        if image_embeds.shape[0] != B:
            raise ValueError(
                f"image_embeds has {image_embeds.shape[0]} rows but x_t has batch size {B}; pass one embedding "
                "per latent (for guidance, stack [unconditional; conditional] rows for both, see guided_eps)."
            )
        if isinstance(t, bool) or not isinstance(t, (int, float, Tensor)):
            raise TypeError(f"t must be a number or a tensor of timesteps, got {type(t).__name__}.")
        t = torch.as_tensor(t, dtype=torch.float32 if isinstance(t, float) else None, device=x_t.device)
        if t.ndim == 0 or t.shape == (1,):
            return t.reshape(1).expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be a scalar or have shape (B,) = ({B},), got {tuple(t.shape)}.")
        return t


# --------------------------------------------------------------------------------------
# 6. Classifier-free guidance: dropout of the embedding and the guided ε
# --------------------------------------------------------------------------------------


def drop_image_embeds(
    image_embeds: Tensor, p: float, generator: torch.Generator | None = None, null: Tensor | None = None
) -> Tensor:
    r"""Replace each row by the "no image" embedding with probability ``p`` (training for guidance).

    Classifier-free guidance (Ho & Salimans 2022, §3.2) trains one model for both branches by dropping
    the condition. The "no image" embedding is a choice made once and kept for sampling:

    * here, by default, **zeros** — a fixed point that needs no CLIP tower, as Kandinsky 3 uses zero text;
    * Kandinsky 2.2 uses CLIP's embedding of an all-zero image (the prior pipeline's ``get_zero_embed``):
      pass it as ``null`` (E,) to train the same way.

    image_embeds: (B, E) → (B, E); the draw is ``torch.rand(B, generator=generator) < p`` per row.
    """
    if not isinstance(image_embeds, Tensor) or image_embeds.ndim != 2:
        got = tuple(image_embeds.shape) if isinstance(image_embeds, Tensor) else type(image_embeds).__name__
        raise ValueError(f"image_embeds must be a (B, E) tensor, got {got}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p={p!r} is the probability of dropping a row; use a number in [0, 1], e.g. 0.1")
    B, E = image_embeds.shape
    if null is None:
        null = image_embeds.new_zeros(E)
    elif not isinstance(null, Tensor) or tuple(null.shape) != (E,):
        got = tuple(null.shape) if isinstance(null, Tensor) else type(null).__name__
        raise ValueError(f"null must be one embedding of shape ({E},), got {got}")
    rand_device = generator.device if generator is not None else image_embeds.device
    dropped = torch.rand(B, generator=generator, device=rand_device).to(image_embeds.device) < p  # (B,)
    return torch.where(dropped[:, None], null.to(image_embeds), image_embeds)  # (B, E)


def guided_eps(
    model: ImageConditionedUNet,
    x_t: Tensor,
    t: Tensor | int | float,
    image_embeds: Tensor,
    scale: float,
    negative_image_embeds: Tensor | None = None,
) -> Tensor:
    r"""Classifier-free guided ε̂ (Ho & Salimans 2022, eq. 6), via ``kandlab.diffusion.cfg_eps``:

    .. math:: \hat\varepsilon = \varepsilon_u + s\,(\varepsilon_c - \varepsilon_u)

    One call on the doubled batch, unconditional rows first as in diffusers' Kandinsky 2.2 pipeline
    (``cat([negative, positive])``, guidance 4). ``negative_image_embeds`` defaults to zeros, the
    "no image" of :func:`drop_image_embeds`; pass the one the model was trained with. s = 1: no
    guidance; s = 0: unconditional.

    x_t: (B, 4, h, w), image_embeds: (B, E) → (B, 4, h, w).
    """
    if not isinstance(image_embeds, Tensor) or not isinstance(x_t, Tensor):
        raise TypeError("x_t and image_embeds must be tensors, (B, 4, h, w) and (B, E)")
    negative = torch.zeros_like(image_embeds) if negative_image_embeds is None else negative_image_embeds
    if not isinstance(negative, Tensor) or negative.shape != image_embeds.shape:
        raise ValueError("negative_image_embeds must have the shape of image_embeds, (B, E): one per latent")
    if isinstance(t, Tensor) and t.ndim == 1 and t.shape[0] > 1:
        t = torch.cat([t, t])  # (2B,): the same timesteps for both halves
    eps = model(torch.cat([x_t, x_t]), t, torch.cat([negative, image_embeds]))  # (2B, 4, h, w)
    eps_uncond, eps_cond = eps.chunk(2)  # (B, 4, h, w) each
    return cfg_eps(eps_uncond, eps_cond, scale)
