r"""The Kandinsky 3 UNet, built from small parts.

The same class trains at a few million parameters on a CPU (``UNetConfig.tiny_pixel()``)
and, at ``UNetConfig.kandinsky3()``, has exactly the 3,055,348,228 parameters of the
published model, whose weights it loads from ``diffusers``' ``Kandinsky3UNet``
(``UNet.from_diffusers``).

Read top to bottom:

1. ``sinusoidal_embedding`` and ``TimeEmbedding``  — t → vector
2. ``ConditionalGroupNorm``                        — group norm whose scale/shift come from t
3. ``Conv1x1``, ``ConvBlock``, ``ResNetBlock``     — BigGAN-deep residual block (kernels 1-3-3-1)
4. ``Attention``                                   — multi-head attention with an additive text mask
5. ``TextProjection``, ``AttentionPooling``        — text tokens; text pooled into one vector added to t
6. ``AttentionBlock``                              — self- or cross-attention + feed-forward
7. ``DownLevel`` and ``UpLevel``                   — one resolution of the U
8. ``UNet``                                        — the whole model, input checks, diffusers interop

Every conditional group norm gets its scale and shift from the time embedding,
which (for a text-conditioned model) already contains the attention-pooled text:
``t_emb = MLP(sinusoid(t)) + AttentionPool(text)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# Kandinsky 3 (and diffusers) turn the 0/1 text mask into the additive bias
# (1 - mask) * MASK_BIAS, not into -inf: a fully masked row attends uniformly.
MASK_BIAS = -10000.0

Resample = Literal["none", "up", "down"]


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass
class UNetConfig:
    """Hyper-parameters of the Kandinsky 3 UNet. Defaults = the published model.

    The resolution levels are listed from fine to coarse: level ``l`` has
    ``block_out_channels[l]`` channels; every level except the last halves H and W.
    """

    in_channels: int = 4  # 4 latent channels of MoVQ; 3 for a pixel-space model
    out_channels: int | None = None  # None → same as in_channels (the model predicts ε)
    time_embedding_dim: int = 1536  # width of t_emb, which drives every conditional norm
    groups: int = 32  # GroupNorm groups everywhere
    head_dim: int = 64  # channels per attention head (heads = channels / head_dim)
    layers_per_block: int = 3  # (resnet → cross-attention → resnet) triples per level
    block_out_channels: tuple[int, ...] = (384, 768, 1536, 3072)
    cross_attention_dim: int = 4096  # width of the projected text tokens
    encoder_hid_dim: int = 4096  # width of the text encoder output (Flan-UL2: 4096)
    # Per level (fine → coarse): does the level have a self-attention block and
    # cross-attention blocks? Kandinsky 3 skips attention at the finest level only.
    attention_levels: tuple[bool, ...] = (False, True, True, True)
    # False builds no text path at all (no cross-attention, no attention pooling):
    # an unconditional model, as trained in lesson 02.
    text_conditioned: bool = True
    expansion_ratio: int = 4  # feed-forward width = 4 × channels (fixed in Kandinsky 3)
    compression_ratio: int = 2  # ResNet hidden width = max(in, out) / 2 (fixed in Kandinsky 3)

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        self._check()

    # --- derived sizes -----------------------------------------------------------------
    @property
    def init_channels(self) -> int:
        """Width after ``conv_in`` and before ``conv_out``: block_out_channels[0] / 2."""
        return self.block_out_channels[0] // 2

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsample_factor(self) -> int:
        """H and W must be divisible by this: every level but the last halves them."""
        return 2 ** (self.num_levels - 1)

    # --- presets ---------------------------------------------------------------------------
    @classmethod
    def kandinsky3(cls, **overrides) -> UNetConfig:
        """The published Kandinsky 3 UNet (3,055,348,228 parameters)."""
        return cls(**overrides)

    @classmethod
    def tiny_pixel(cls, **overrides) -> UNetConfig:
        """An RGB model for 32×32 images that trains on a CPU (5.8 M parameters; 3.8 M
        with ``text_conditioned=False``, the unconditional model of lesson 02).

        Four levels with attention on all but the first, exactly as Kandinsky 3, so
        its weights also load into diffusers' ``Kandinsky3UNet``. Resolutions at
        32×32: 16 → 8 → 4 → 4 on the way down. Text width 64 = d_model of ``T5Config.tiny()``.
        """
        base = dict(
            in_channels=3,
            time_embedding_dim=128,
            groups=8,
            head_dim=32,
            layers_per_block=2,
            block_out_channels=(32, 64, 64, 128),
            cross_attention_dim=64,
            encoder_hid_dim=64,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def tiny_latent(cls, **overrides) -> UNetConfig:
        """The tiny model over 4-channel latents (sizes divisible by 8, e.g. 8×8 or 16×16)."""
        return cls.tiny_pixel(**{"in_channels": 4, **overrides})

    # --- validation ------------------------------------------------------------------------
    def _check(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"UNetConfig: {msg}")

        if not self.block_out_channels:
            fail("block_out_channels is empty; give one width per level, e.g. (64, 128, 256).")
        if self.block_out_channels[0] % 2:
            fail(f"block_out_channels[0]={self.block_out_channels[0]} must be even (init_channels is half of it).")
        if len(self.attention_levels) != self.num_levels:
            fail(
                f"attention_levels has {len(self.attention_levels)} entries but there are "
                f"{self.num_levels} levels (len(block_out_channels)); give one bool per level."
            )
        if self.layers_per_block < 1:
            fail(f"layers_per_block={self.layers_per_block} must be at least 1.")
        for what, c in _normalised_widths(self):
            if c % self.groups:
                fail(
                    f"groups={self.groups} does not divide {c} channels ({what}); every group "
                    f"norm needs channels divisible by groups. Try groups={math.gcd(c, self.groups)} "
                    "or widths that are multiples of groups."
                )
        for what, c in _attention_widths(self):
            if c % self.head_dim:
                fail(
                    f"head_dim={self.head_dim} does not divide {c} channels ({what}); attention "
                    "splits channels into heads of head_dim channels."
                )


def _widths(config: UNetConfig) -> list[int]:
    """Channel count between levels: [init, block_out[0], ..., block_out[-1]]."""
    return [config.init_channels, *config.block_out_channels]


def _normalised_widths(config: UNetConfig) -> list[tuple[str, int]]:
    """Every channel count that passes through a GroupNorm, with where it occurs."""
    widths = _widths(config)
    out = [("init_channels = conv_in output", config.init_channels)]
    for level, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
        r = config.compression_ratio
        out += [
            (f"level {level} width", c_out),
            (f"ResNet hidden width at level {level}", max(c_in, c_out) // r),
            (f"ResNet hidden width at level {level}", c_out // r),
        ]
    return out


def _attention_widths(config: UNetConfig) -> list[tuple[str, int]]:
    """Every channel count split into heads, with where it occurs."""
    widths = _widths(config)
    out = []
    for level, attend in enumerate(config.attention_levels):
        if attend:
            out += [(f"self-attention at level {level}", widths[level]), (f"level {level} width", widths[level + 1])]
    if config.text_conditioned:
        out.append(("attention pooling output = time_embedding_dim", config.time_embedding_dim))
    return out


def level_resolutions(config: UNetConfig, size: int) -> list[tuple[int, int]]:
    """For each down level (fine → coarse): (side it works at, side it hands on) for an input of ``size``.

    Level ``l`` receives the output of level ``l - 1`` (``conv_in`` keeps the input size);
    its blocks and attention run at that side, and every level except the deepest halves it
    in its last ResNet block. Kandinsky 3 at 1024² (latents 128² after MoVQ's ×8):
    ``[(128, 64), (64, 32), (32, 16), (16, 16)]``.
    """
    if size % config.downsample_factor:
        raise ValueError(f"size {size} is not divisible by {config.downsample_factor} "
                         f"(the UNet halves it {config.num_levels - 1} times)")
    out = []
    for level in range(config.num_levels):
        hand_on = size if level == config.num_levels - 1 else size // 2
        out.append((size, hand_on))
        size = hand_on
    return out


# --------------------------------------------------------------------------------------
# 1. Time embedding
# --------------------------------------------------------------------------------------


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    r"""Sinusoidal features of the timesteps, ``[sin(t·f_i), cos(t·f_i)]``.

    .. math:: f_i = \exp\!\left(-\ln(\text{max\_period}) \cdot \frac{i}{\text{half} - 1}\right),
              \quad i = 0 \dots \text{half}-1,\ \text{half} = \lfloor dim/2 \rfloor

    The ``half - 1`` makes the last frequency exactly 1/max_period (diffusers'
    ``downscale_freq_shift=1``). Sines come first. An odd ``dim`` gets one zero column.

    t: (B,) → (B, dim), float32.
    """
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * i / (half - 1))  # (half,)
    angles = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (B, 2·half)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


class TimeEmbedding(nn.Module):
    """sinusoid(t) → Linear → SiLU → Linear.   t: (B,) → (B, time_embedding_dim).

    Kandinsky 3: sinusoid of init_channels = 192 features → 1536 → 1536.
    """

    def __init__(self, sinusoid_dim: int, time_embedding_dim: int):
        super().__init__()
        self.sinusoid_dim = sinusoid_dim
        self.linear_1 = nn.Linear(sinusoid_dim, time_embedding_dim)
        self.linear_2 = nn.Linear(time_embedding_dim, time_embedding_dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        h = sinusoidal_embedding(t, self.sinusoid_dim).to(dtype)  # (B, sinusoid_dim)
        return self.linear_2(F.silu(self.linear_1(h)))  # (B, T)


# --------------------------------------------------------------------------------------
# 2. Conditional group norm
# --------------------------------------------------------------------------------------


class ConditionalGroupNorm(nn.Module):
    r"""GroupNorm without its own affine, then a scale and shift predicted from t.

    .. math:: y = \mathrm{GN}(x)\,(1 + \gamma) + \beta, \qquad
              (\gamma, \beta) = W\,\mathrm{SiLU}(t_{emb}) + b

    ``W`` and ``b`` start at zero, so a fresh block is a plain group norm.
    The caller passes ``t_act = SiLU(t_emb)``: the UNet computes it once for all
    its conditional norms.
    """

    def __init__(self, groups: int, channels: int, time_embedding_dim: int, eps: float = 1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.to_scale_shift = nn.Linear(time_embedding_dim, 2 * channels)
        nn.init.zeros_(self.to_scale_shift.weight)
        nn.init.zeros_(self.to_scale_shift.bias)

    def forward(self, x: torch.Tensor, t_act: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        scale, shift = self.to_scale_shift(t_act).chunk(2, dim=1)  # (B, C) each
        # Written plainly: F.group_norm(x, groups) * (1 + scale)[..., None, None] + shift[..., None, None].
        # Faster: group_norm applies a per-channel affine inside its own kernel. Seen as
        # ONE sample with B·C channels and B·groups groups, x has the very same groups,
        # and our per-(sample, channel) (1 + γ), β become that per-channel affine.
        y = F.group_norm(
            x.reshape(1, B * C, H, W),
            B * self.groups,
            weight=(1.0 + scale).reshape(B * C),
            bias=shift.reshape(B * C),
            eps=self.eps,
        )  # (1, B·C, H, W)
        return y.view(B, C, H, W)


# --------------------------------------------------------------------------------------
# 3. ResNet block (BigGAN-deep)
# --------------------------------------------------------------------------------------


class Conv1x1(nn.Conv2d):
    """A 1×1 convolution: the same matrix W applied to every pixel, y[b] = W · x[b] + bias.

    Same parameters (and state-dict shapes) as ``nn.Conv2d(c_in, c_out, 1)``, computed as
    one batched matrix product: on a CPU that is faster than the convolution kernel for
    (B, C, H, W) tensors — 2-3× at the small widths of the tiny models.
    x: (B, c_in, H, W) → (B, c_out, H, W).
    """

    def __init__(self, c_in: int, c_out: int, bias: bool = True):
        super().__init__(c_in, c_out, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        weight = self.weight.view(1, -1, C).expand(B, -1, C)  # (B, c_out, c_in), no copy
        x = x.reshape(B, C, H * W)  # (B, c_in, HW)
        if self.bias is None:
            y = torch.bmm(weight, x)
        else:
            y = torch.baddbmm(self.bias.view(1, -1, 1), weight, x)  # (B, c_out, HW)
        return y.view(B, -1, H, W)


class ConvBlock(nn.Module):
    """CondGN → SiLU → (2×2 transposed conv if up) → k×k conv → (2×2 stride-2 conv if down)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, config: UNetConfig, resample: Resample = "none"):
        super().__init__()
        self.norm = ConditionalGroupNorm(config.groups, c_in, config.time_embedding_dim)
        self.upsample = nn.ConvTranspose2d(c_in, c_in, 2, stride=2) if resample == "up" else None
        self.conv = Conv1x1(c_in, c_out) if kernel_size == 1 else nn.Conv2d(c_in, c_out, kernel_size, padding=1)
        self.downsample = nn.Conv2d(c_out, c_out, 2, stride=2) if resample == "down" else None

    def forward(self, x: torch.Tensor, t_act: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.norm(x, t_act))  # (B, c_in, H, W)
        if self.upsample is not None:
            x = self.upsample(x)  # (B, c_in, 2H, 2W)
        x = self.conv(x)  # (B, c_out, ·, ·)
        if self.downsample is not None:
            x = self.downsample(x)  # (B, c_out, H/2, W/2)
        return x


class ResNetBlock(nn.Module):
    r"""BigGAN-deep residual block: four ConvBlocks with kernels 1, 3, 3, 1.

    Body channels c_in → h → h → h → c_out with the bottleneck
    ``h = max(c_in, c_out) // compression_ratio``. An upsampling block upsamples inside
    its second ConvBlock, a downsampling block downsamples inside its third.
    Shortcut: (up) → 1×1 projection if c_in ≠ c_out → (down).

    .. math:: y = \text{shortcut}(x) + \text{body}(x)

    x: (B, c_in, H, W) → (B, c_out, H', W') with H' = 2H, H/2 or H.
    """

    def __init__(self, c_in: int, c_out: int, config: UNetConfig, resample: Resample = "none"):
        super().__init__()
        h = max(c_in, c_out) // config.compression_ratio
        self.blocks = nn.ModuleList(
            [
                ConvBlock(c_in, h, 1, config),
                ConvBlock(h, h, 3, config, "up" if resample == "up" else "none"),
                ConvBlock(h, h, 3, config, "down" if resample == "down" else "none"),
                ConvBlock(h, c_out, 1, config),
            ]
        )
        self.shortcut_upsample = nn.ConvTranspose2d(c_in, c_in, 2, stride=2) if resample == "up" else None
        self.shortcut_projection = Conv1x1(c_in, c_out) if c_in != c_out else None
        self.shortcut_downsample = nn.Conv2d(c_out, c_out, 2, stride=2) if resample == "down" else None

    def forward(self, x: torch.Tensor, t_act: torch.Tensor) -> torch.Tensor:
        out = x
        for block in self.blocks:
            out = block(out, t_act)  # (B, c_out, H', W') after the last block
        if self.shortcut_upsample is not None:
            x = self.shortcut_upsample(x)
        if self.shortcut_projection is not None:
            x = self.shortcut_projection(x)
        if self.shortcut_downsample is not None:
            x = self.shortcut_downsample(x)
        return x + out


# --------------------------------------------------------------------------------------
# 4. Attention
# --------------------------------------------------------------------------------------


def text_mask_bias(text_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive attention bias of a text mask: 0 for real tokens, ``MASK_BIAS`` for padding.

    text_mask: (B, L), bool or 0/1 with 1 = real token → (B, 1, 1, L), which broadcasts over
    heads and queries in scores of shape (B, heads, N, L).
    """
    return ((1.0 - text_mask.to(dtype)) * MASK_BIAS)[:, None, None, :]


class Attention(nn.Module):
    r"""Multi-head attention without biases; keys and values from ``context``.

    .. math:: \mathrm{Attn}(Q, K, V) = \mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt{d}} + M\right) V

    ``M`` is the additive text-mask bias ``(1 - mask)·(-10000)`` of shape (B, 1, 1, L),
    or None. heads = inner_dim / head_dim.

    x: (B, N, query_dim), context: (B, L, context_dim) → (B, N, out_dim).
    """

    def __init__(self, query_dim: int, context_dim: int, inner_dim: int, out_dim: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = inner_dim // head_dim, head_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        L = context.shape[1]
        h, d = self.heads, self.head_dim
        q = self.to_q(x).view(B, N, h, d).transpose(1, 2)  # (B, h, N, d)
        k = self.to_k(context).view(B, L, h, d).transpose(1, 2)  # (B, h, L, d)
        v = self.to_v(context).view(B, L, h, d).transpose(1, 2)  # (B, h, L, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, h * d)  # (B, N, inner_dim)
        return self.to_out(out)  # (B, N, out_dim)


# --------------------------------------------------------------------------------------
# 5. The text path: projection and attention pooling
# --------------------------------------------------------------------------------------


class TextProjection(nn.Module):
    """Text encoder states → cross-attention width: Linear (no bias) → LayerNorm.  (B, L, E) → (B, L, D)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.linear = nn.Linear(config.encoder_hid_dim, config.cross_attention_dim, bias=False)
        self.norm = nn.LayerNorm(config.cross_attention_dim)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(text))


class AttentionPooling(nn.Module):
    r"""Pool the projected text into one vector of the time-embedding width.

    The query is the plain mean of all L tokens (padding included, as in Kandinsky 3);
    keys and values are the tokens, with the text mask. heads = time_embedding_dim / head_dim.

    .. math:: t_{emb} \leftarrow t_{emb} + \mathrm{Attn}(\bar{c}, c, c),
              \quad \bar{c} = \tfrac{1}{L}\textstyle\sum_l c_l

    text: (B, L, D) → (B, time_embedding_dim).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        D, T = config.cross_attention_dim, config.time_embedding_dim
        self.attention = Attention(D, D, inner_dim=T, out_dim=T, head_dim=config.head_dim)

    def forward(self, text: torch.Tensor, mask_bias: torch.Tensor | None) -> torch.Tensor:
        query = text.mean(dim=1, keepdim=True)  # (B, 1, D)
        return self.attention(query, text, mask_bias).squeeze(1)  # (B, T)


# --------------------------------------------------------------------------------------
# 6. Attention block: self- or cross-attention, then feed-forward
# --------------------------------------------------------------------------------------


class AttentionBlock(nn.Module):
    r"""Pre-norm attention and feed-forward over the pixels of a feature map.

    .. math:: x \leftarrow x + \mathrm{Attn}(\mathrm{CGN}(x), \text{context}), \qquad
              x \leftarrow x + W_2\,\mathrm{SiLU}(W_1\,\mathrm{CGN}(x))

    ``context_dim=None`` makes it self-attention (keys from the normalised pixels);
    otherwise it is cross-attention to text tokens of width ``context_dim``.
    The feed-forward is two bias-free 1×1 convs, C → 4C → C.

    x: (B, C, H, W) → (B, C, H, W).
    """

    def __init__(self, channels: int, config: UNetConfig, context_dim: int | None = None):
        super().__init__()
        C, T = channels, config.time_embedding_dim
        self.in_norm = ConditionalGroupNorm(config.groups, C, T)
        self.attention = Attention(C, context_dim or C, inner_dim=C, out_dim=C, head_dim=config.head_dim)
        self.out_norm = ConditionalGroupNorm(config.groups, C, T)
        self.ff_in = Conv1x1(C, config.expansion_ratio * C, bias=False)
        self.ff_out = Conv1x1(config.expansion_ratio * C, C, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        t_act: torch.Tensor,
        text: torch.Tensor | None = None,
        mask_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.in_norm(x, t_act).flatten(2).transpose(1, 2)  # (B, HW, C)
        if text is None:
            h = self.attention(h, h)  # self-attention: (B, HW, C)
        else:
            h = self.attention(h, text, mask_bias)  # cross-attention: (B, HW, C)
        x = x + h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        h = self.ff_out(F.silu(self.ff_in(self.out_norm(x, t_act))))  # (B, C, H, W)
        return x + h


# --------------------------------------------------------------------------------------
# 7. One resolution level of the U
# --------------------------------------------------------------------------------------


def _cross_attention(c: int, config: UNetConfig, attend: bool) -> AttentionBlock | None:
    if attend and config.text_conditioned:
        return AttentionBlock(c, config, context_dim=config.cross_attention_dim)
    return None


class DownLevel(nn.Module):
    """Encoder level: (self-attention) → ``layers_per_block`` × [resnet_in → cross-attention → resnet_out].

    The last resnet_out halves H and W unless this is the deepest level.
    x: (B, c_in, H, W) → (B, c_out, H/2, W/2) (or H, W at the deepest level).
    """

    def __init__(self, c_in: int, c_out: int, config: UNetConfig, attend: bool, downsample: bool):
        super().__init__()
        n = config.layers_per_block
        self.self_attention = AttentionBlock(c_in, config) if attend else None
        self.resnets_in = nn.ModuleList([ResNetBlock(c_in if i == 0 else c_out, c_out, config) for i in range(n)])
        cross = [_cross_attention(c_out, config, attend) for _ in range(n)]
        self.cross_attentions = nn.ModuleList(cross) if cross[0] is not None else None
        self.resnets_out = nn.ModuleList(
            [ResNetBlock(c_out, c_out, config, "down" if downsample and i == n - 1 else "none") for i in range(n)]
        )

    def forward(
        self,
        x: torch.Tensor,
        t_act: torch.Tensor,
        text: torch.Tensor | None = None,
        mask_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.self_attention is not None:
            x = self.self_attention(x, t_act)
        for i, (resnet_in, resnet_out) in enumerate(zip(self.resnets_in, self.resnets_out)):
            x = resnet_in(x, t_act)
            if self.cross_attentions is not None and text is not None:
                x = self.cross_attentions[i](x, t_act, text, mask_bias)
            x = resnet_out(x, t_act)
        return x


class UpLevel(nn.Module):
    """Decoder level: ``layers_per_block`` × [resnet_in → cross-attention → resnet_out] → (self-attention).

    Its input is the previous level's output concatenated with the encoder skip
    (``c_in + c_skip`` channels). The first resnet_in doubles H and W (except at the
    deepest level) and keeps ``c_in + c_skip`` channels, so the first cross-attention
    runs at that width; the last resnet_out maps to ``c_out``; the self-attention runs
    at ``c_out``. Unlike diffusers' class, ``layers_per_block=1`` works here.

    x: (B, c_in + c_skip, H, W) → (B, c_out, 2H, 2W) (or H, W at the deepest level).
    """

    def __init__(self, c_in: int, c_skip: int, c_out: int, config: UNetConfig, attend: bool, upsample: bool):
        super().__init__()
        n = config.layers_per_block
        widths = [c_in + c_skip] + [c_in] * (n - 1) + [c_out]  # channels between triples
        self.resnets_in = nn.ModuleList(
            [ResNetBlock(widths[i], widths[i], config, "up" if upsample and i == 0 else "none") for i in range(n)]
        )
        cross = [_cross_attention(widths[i], config, attend) for i in range(n)]
        self.cross_attentions = nn.ModuleList(cross) if cross[0] is not None else None
        self.resnets_out = nn.ModuleList([ResNetBlock(widths[i], widths[i + 1], config) for i in range(n)])
        self.self_attention = AttentionBlock(c_out, config) if attend else None

    def forward(
        self,
        x: torch.Tensor,
        t_act: torch.Tensor,
        text: torch.Tensor | None = None,
        mask_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for i, (resnet_in, resnet_out) in enumerate(zip(self.resnets_in, self.resnets_out)):
            x = resnet_in(x, t_act)
            if self.cross_attentions is not None and text is not None:
                x = self.cross_attentions[i](x, t_act, text, mask_bias)
            x = resnet_out(x, t_act)
        if self.self_attention is not None:
            x = self.self_attention(x, t_act)
        return x


# --------------------------------------------------------------------------------------
# 8. The UNet
# --------------------------------------------------------------------------------------


class UNet(nn.Module):
    r"""The Kandinsky 3 UNet: predicts ε from (x_t, t, text).

    conv_in → down levels (saving a skip after each but the deepest) → up levels
    (concatenating the skips, deepest first) → GroupNorm → SiLU → conv_out.

    Kandinsky 3 at 1024² (latents 4 × 128²), channels@size: conv_in 192@128;
    down 384@64, 768@32, 1536@16, 3072@16; up 1536@16, 768@32, 384@64, 192@128;
    conv_out 4@128.

    ``forward(x, t, text=None, text_mask=None)``:

    * x: (B, in_channels, H, W), H and W divisible by ``config.downsample_factor``
    * t: int/float, a 0-d tensor, or (B,) — timesteps (fractional allowed)
    * text: (B, L, encoder_hid_dim) text-encoder states; required iff
      ``config.text_conditioned``
    * text_mask: (B, L) bool or 0/1, 1 = real token; None = all tokens real

    returns (B, out_channels, H, W).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        widths = _widths(config)
        last = config.num_levels - 1

        self.time_embedding = TimeEmbedding(config.init_channels, config.time_embedding_dim)
        if config.text_conditioned:
            self.text_projection = TextProjection(config)
            self.attention_pooling = AttentionPooling(config)
        else:
            self.text_projection = self.attention_pooling = None
        self.conv_in = nn.Conv2d(config.in_channels, config.init_channels, 3, padding=1)

        self.down = nn.ModuleList(
            [
                DownLevel(widths[l], widths[l + 1], config, config.attention_levels[l], downsample=l != last)
                for l in range(config.num_levels)
            ]
        )
        # In the order they run: deepest level first. Level l gets the skip saved by
        # down level l, which has widths[l + 1] channels (the deepest saves none).
        self.up = nn.ModuleList(
            [
                UpLevel(
                    widths[l + 1],
                    widths[l + 1] if l != last else 0,
                    widths[l],
                    config,
                    config.attention_levels[l],
                    upsample=l != last,
                )
                for l in reversed(range(config.num_levels))
            ]
        )
        self.norm_out = nn.GroupNorm(config.groups, config.init_channels)
        self.conv_out = nn.Conv2d(config.init_channels, config.out_channels, 3, padding=1)

    # --- forward -------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | int | float,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = self._check_inputs(x, t, text, text_mask)  # (B,)

        t_emb = self.time_embedding(t, x.dtype)  # (B, T)
        mask_bias = None
        if text is not None:
            text = self.text_projection(text)  # (B, L, D)
            if text_mask is not None:
                mask_bias = text_mask_bias(text_mask, text.dtype)  # (B, 1, 1, L)
            t_emb = t_emb + self.attention_pooling(text, mask_bias)  # (B, T)
        return self.trunk(x, t_emb, text, mask_bias)

    def trunk(self, x: torch.Tensor, t_emb: torch.Tensor, context: torch.Tensor | None = None,
              mask_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Everything after the conditioning: conv_in → down levels → up levels (with skips) → norm → conv_out.

        ``forward`` builds ``t_emb`` (B, T) and the context (B, L, D) from text; another conditioning (lesson 08's
        image embedding, `kandlab.decoder`) builds its own and calls this. ``mask_bias``: (B, 1, 1, L) or None.
        """
        t_act = F.silu(t_emb)  # (B, T), shared by every conditional group norm
        h = self.conv_in(x)  # (B, init, H, W)
        skips = []
        for level in self.down:
            h = level(h, t_act, context, mask_bias)
            skips.append(h)
        skips.pop()  # the deepest output continues straight up, it is not a skip
        for i, level in enumerate(self.up):
            if i > 0:
                h = torch.cat([h, skips.pop()], dim=1)  # (B, c_in + c_skip, ·, ·)
            h = level(h, t_act, context, mask_bias)
        h = F.silu(self.norm_out(h))  # (B, init, H, W)
        return self.conv_out(h)  # (B, out_channels, H, W)

    def _check_inputs(self, x, t, text, text_mask) -> torch.Tensor:
        """Check shapes at the boundary with messages that say what to do; return t as (B,)."""
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(
                f"x must be a (B, C, H, W) tensor, got {_describe(x)}; add a batch axis with x[None] if needed."
            )
        B, C, H, W = x.shape
        if C != cfg.in_channels:
            raise ValueError(
                f"x has {C} channels but this UNet expects in_channels={cfg.in_channels} "
                f"({'RGB pixels' if cfg.in_channels == 3 else 'latent channels'}); x has shape {tuple(x.shape)}."
            )
        f, halvings = cfg.downsample_factor, cfg.num_levels - 1
        for size in (H, W):
            if size % f:
                raise ValueError(
                    f"image size {size} is not divisible by {f} (the UNet halves it {halvings} times); "
                    f"use {max(f, round(size / f) * f)}."
                )

        if isinstance(t, (int, float)):
            t = torch.tensor([float(t)], device=x.device)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t must be a number or a tensor of timesteps, got {type(t).__name__}.")
        if t.ndim == 0 or t.shape == (1,):
            t = t.reshape(1).expand(B)
        elif t.shape != (B,):
            raise ValueError(f"t must be a scalar or have shape (B,) = ({B},), got {tuple(t.shape)}.")
        t = t.to(x.device)

        if not cfg.text_conditioned:
            if text is not None or text_mask is not None:
                raise ValueError(
                    "this UNet was built with text_conditioned=False and has no cross-attention; "
                    "call it without text, or build it with UNetConfig(..., text_conditioned=True)."
                )
            return t
        if text is None:
            raise ValueError(
                "this UNet is text-conditioned: pass text of shape (B, L, encoder_hid_dim). For the "
                "unconditional branch of classifier-free guidance pass zero embeddings with an all-zero "
                "mask, or build the model with text_conditioned=False for an unconditional model."
            )
        if not isinstance(text, torch.Tensor) or text.ndim != 3 or text.shape[::2] != (B, cfg.encoder_hid_dim):
            raise ValueError(
                f"text must have shape (B, L, encoder_hid_dim) = ({B}, L, {cfg.encoder_hid_dim}), "
                f"got {_describe(text)}; encoder_hid_dim must equal the text encoder's hidden size."
            )
        if text_mask is not None:
            L = text.shape[1]
            if not isinstance(text_mask, torch.Tensor) or text_mask.shape != (B, L):
                raise ValueError(
                    f"text_mask must have shape (B, L) = ({B}, {L}) like the text tokens, "
                    f"got {_describe(text_mask)}."
                )
            if text_mask.dtype != torch.bool and not ((text_mask == 0) | (text_mask == 1)).all():
                raise ValueError("text_mask must be bool or hold only 0 and 1 (1 = real token, 0 = padding).")
        return t

    # --- diffusers interop ------------------------------------------------------------------
    @classmethod
    def from_diffusers(
        cls, model_or_state_dict: nn.Module | dict[str, torch.Tensor], config: UNetConfig | None = None
    ) -> UNet:
        """Build a UNet holding the weights of a diffusers ``Kandinsky3UNet``.

        * Given the diffusers model, the config is read from ``model.config`` and the
          weights are copied.
        * Given its state dict (e.g. loaded from safetensors), ``config`` is required and
          the tensors are used as they are (no copy: dtype and device follow the dict).

        Raises ValueError listing missing keys, unexpected keys and shape mismatches.
        """
        if isinstance(model_or_state_dict, nn.Module):
            if not hasattr(model_or_state_dict, "config"):
                raise TypeError("expected a diffusers Kandinsky3UNet (a module with a .config) or its state dict.")
            inferred = config_from_diffusers(model_or_state_dict.config)
            if config is not None and config != inferred:
                diff = [
                    f"{f.name}: given {getattr(config, f.name)!r}, model has {getattr(inferred, f.name)!r}"
                    for f in dataclasses.fields(UNetConfig)
                    if getattr(config, f.name) != getattr(inferred, f.name)
                ]
                raise ValueError("config does not match the diffusers model's config: " + "; ".join(diff))
            config = inferred
            state_dict = {k: v.detach().clone() for k, v in model_or_state_dict.state_dict().items()}
        elif isinstance(model_or_state_dict, dict):
            if config is None:
                raise ValueError(
                    "from_diffusers(state_dict) needs config=UNetConfig(...): a state dict does not say "
                    "its architecture. For the published weights use UNetConfig.kandinsky3()."
                )
            state_dict = model_or_state_dict
        else:
            raise TypeError(
                f"expected a diffusers Kandinsky3UNet or its state dict, got {type(model_or_state_dict).__name__}."
            )
        if not config.text_conditioned:
            raise ValueError("diffusers' Kandinsky3UNet is always text-conditioned; use text_conditioned=True.")

        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()  # meta tensors: names and shapes only
        ours = {}
        missing, shape_errors = [], []
        for k_ours, k_theirs in diffusers_key_map(config):
            if k_theirs not in state_dict:
                missing.append(k_theirs)
            elif tuple(state_dict[k_theirs].shape) != tuple(expected[k_ours].shape):
                shape_errors.append(
                    f"{k_theirs}: checkpoint {tuple(state_dict[k_theirs].shape)}, "
                    f"model {tuple(expected[k_ours].shape)}"
                )
            else:
                ours[k_ours] = state_dict[k_theirs]
        mapped = {k_theirs for _, k_theirs in diffusers_key_map(config)}
        unexpected = [k for k in state_dict if k not in mapped]
        if missing or unexpected or shape_errors:
            raise ValueError(_load_report(config, missing, unexpected, shape_errors))
        model.load_state_dict(ours, strict=True, assign=True)
        return model

    def to_diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under diffusers' ``Kandinsky3UNet`` names (tensors shared, not copied)."""
        if not self.config.text_conditioned:
            raise ValueError("an unconditional UNet (text_conditioned=False) has no diffusers counterpart.")
        ours = self.state_dict()
        return {k_theirs: ours[k_ours] for k_ours, k_theirs in diffusers_key_map(self.config)}


def _describe(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def config_to_diffusers(config: UNetConfig) -> dict:
    """Keyword arguments of diffusers' ``Kandinsky3UNet`` for the same architecture (the inverse of
    `config_from_diffusers`; for ``UNetConfig.kandinsky3()`` they are diffusers' own defaults)."""
    return dict(in_channels=config.in_channels, time_embedding_dim=config.time_embedding_dim, groups=config.groups,
                attention_head_dim=config.head_dim, layers_per_block=config.layers_per_block,
                block_out_channels=config.block_out_channels, cross_attention_dim=config.cross_attention_dim,
                encoder_hid_dim=config.encoder_hid_dim)


def config_from_diffusers(diffusers_config) -> UNetConfig:
    """UNetConfig equivalent to a diffusers ``Kandinsky3UNet.config``."""
    c = dict(diffusers_config)
    levels = len(c["block_out_channels"])
    if levels != 4:
        # diffusers hard-codes attention flags for four levels, (F, T, T, T), and zips
        # them with the levels: with another number of levels its up path gets
        # attention where the down path has none, a layout kandlab does not build.
        raise ValueError(
            f"diffusers' Kandinsky3UNet has {levels} levels; only 4 levels give the Kandinsky 3 "
            "attention layout that kandlab reproduces. Use 4 block_out_channels."
        )
    for key in ("layers_per_block", "cross_attention_dim"):
        if not isinstance(c[key], int):
            raise ValueError(f"{key}={c[key]!r}: only a single int (the same for every level) is supported.")
    if c["layers_per_block"] < 2:
        raise ValueError("diffusers' Kandinsky3UNet needs layers_per_block >= 2 (1 breaks its up blocks).")
    return UNetConfig(
        in_channels=c["in_channels"],
        time_embedding_dim=c["time_embedding_dim"],
        groups=c["groups"],
        head_dim=c["attention_head_dim"],
        layers_per_block=c["layers_per_block"],
        block_out_channels=tuple(c["block_out_channels"]),
        cross_attention_dim=c["cross_attention_dim"],
        encoder_hid_dim=c["encoder_hid_dim"],
    )


def _load_report(config: UNetConfig, missing: list, unexpected: list, shape_errors: list, show: int = 5) -> str:
    def part(title: str, items: list) -> str:
        more = f" … and {len(items) - show} more" if len(items) > show else ""
        return f"\n  {len(items)} {title}: " + ", ".join(items[:show]) + more

    return (
        "the state dict does not fit a kandlab UNet built from this config "
        f"(block_out_channels={config.block_out_channels}, layers_per_block={config.layers_per_block}); "
        "check the config matches the checkpoint."
        + (part("missing keys", missing) if missing else "")
        + (part("unexpected keys", unexpected) if unexpected else "")
        + (part("shape mismatches", shape_errors) if shape_errors else "")
    )


# --------------------------------------------------------------------------------------
# The key map kandlab ↔ diffusers
# --------------------------------------------------------------------------------------
# Walks the same levels as UNet.__init__ and lists every parameter as
# (kandlab name, diffusers name). Renames, by component:
#   time_embedding.linear_{1,2}        ↔ time_embedding.linear_{1,2}
#   text_projection.{linear,norm}      ↔ encoder_hid_proj.projection_{linear,norm}
#   attention_pooling.attention        ↔ add_time_condition.attention
#   Attention.to_out                   ↔ Attention.to_out.0
#   ConditionalGroupNorm.to_scale_shift↔ …context_mlp.1
#   ResNetBlock.blocks.j.{norm,upsample,conv,downsample}
#                                      ↔ resnet_blocks.j.{group_norm,up_sample,projection,down_sample}
#   ResNetBlock.shortcut_{upsample,projection,downsample}
#                                      ↔ shortcut_{up_sample,projection,down_sample}
#   AttentionBlock.{ff_in,ff_out}      ↔ feed_forward.{0,2}
#   down.l / up.u                      ↔ down_blocks.l / up_blocks.u
#   *.self_attention                   ↔ *.attentions.0
#   *.cross_attentions.i               ↔ *.attentions.{i+1}
#   *.resnets_{in,out}.i               ↔ *.resnets_{in,out}.i
#   norm_out                           ↔ conv_norm_out


def _weight_bias(ours: str, theirs: str, bias: bool = True) -> list[tuple[str, str]]:
    pairs = [(f"{ours}.weight", f"{theirs}.weight")]
    if bias:
        pairs.append((f"{ours}.bias", f"{theirs}.bias"))
    return pairs


def _attention_keys(ours: str, theirs: str) -> list[tuple[str, str]]:
    pairs = [(f"{ours}.to_{p}.weight", f"{theirs}.to_{p}.weight") for p in "qkv"]
    return pairs + [(f"{ours}.to_out.weight", f"{theirs}.to_out.0.weight")]


def _cond_norm_keys(ours: str, theirs: str) -> list[tuple[str, str]]:
    return _weight_bias(f"{ours}.to_scale_shift", f"{theirs}.context_mlp.1")


def _attention_block_keys(ours: str, theirs: str) -> list[tuple[str, str]]:
    return (
        _cond_norm_keys(f"{ours}.in_norm", f"{theirs}.in_norm")
        + _attention_keys(f"{ours}.attention", f"{theirs}.attention")
        + _cond_norm_keys(f"{ours}.out_norm", f"{theirs}.out_norm")
        + _weight_bias(f"{ours}.ff_in", f"{theirs}.feed_forward.0", bias=False)
        + _weight_bias(f"{ours}.ff_out", f"{theirs}.feed_forward.2", bias=False)
    )


def _resnet_keys(ours: str, theirs: str, c_in: int, c_out: int, resample: Resample) -> list[tuple[str, str]]:
    pairs = []
    for j in range(4):
        o, t = f"{ours}.blocks.{j}", f"{theirs}.resnet_blocks.{j}"
        pairs += _cond_norm_keys(f"{o}.norm", f"{t}.group_norm")
        if j == 1 and resample == "up":
            pairs += _weight_bias(f"{o}.upsample", f"{t}.up_sample")
        pairs += _weight_bias(f"{o}.conv", f"{t}.projection")
        if j == 2 and resample == "down":
            pairs += _weight_bias(f"{o}.downsample", f"{t}.down_sample")
    if resample == "up":
        pairs += _weight_bias(f"{ours}.shortcut_upsample", f"{theirs}.shortcut_up_sample")
    if c_in != c_out:
        pairs += _weight_bias(f"{ours}.shortcut_projection", f"{theirs}.shortcut_projection")
    if resample == "down":
        pairs += _weight_bias(f"{ours}.shortcut_downsample", f"{theirs}.shortcut_down_sample")
    return pairs


def diffusers_key_map(config: UNetConfig) -> list[tuple[str, str]]:
    """Every parameter as (kandlab key, diffusers ``Kandinsky3UNet`` key), in model order."""
    widths = _widths(config)
    n, last = config.layers_per_block, config.num_levels - 1
    pairs = _weight_bias("time_embedding.linear_1", "time_embedding.linear_1")
    pairs += _weight_bias("time_embedding.linear_2", "time_embedding.linear_2")
    pairs += _weight_bias("text_projection.linear", "encoder_hid_proj.projection_linear", bias=False)
    pairs += _weight_bias("text_projection.norm", "encoder_hid_proj.projection_norm")
    pairs += _attention_keys("attention_pooling.attention", "add_time_condition.attention")
    pairs += _weight_bias("conv_in", "conv_in")

    for l in range(config.num_levels):
        o, t = f"down.{l}", f"down_blocks.{l}"
        c_in, c_out, attend = widths[l], widths[l + 1], config.attention_levels[l]
        if attend:
            pairs += _attention_block_keys(f"{o}.self_attention", f"{t}.attentions.0")
        for i in range(n):
            c_first = c_in if i == 0 else c_out
            pairs += _resnet_keys(f"{o}.resnets_in.{i}", f"{t}.resnets_in.{i}", c_first, c_out, "none")
            if attend:
                pairs += _attention_block_keys(f"{o}.cross_attentions.{i}", f"{t}.attentions.{i + 1}")
            resample = "down" if l != last and i == n - 1 else "none"
            pairs += _resnet_keys(f"{o}.resnets_out.{i}", f"{t}.resnets_out.{i}", c_out, c_out, resample)

    for u, l in enumerate(reversed(range(config.num_levels))):
        o, t = f"up.{u}", f"up_blocks.{u}"
        c_skip = widths[l + 1] if l != last else 0
        w = [widths[l + 1] + c_skip] + [widths[l + 1]] * (n - 1) + [widths[l]]
        attend = config.attention_levels[l]
        for i in range(n):
            resample = "up" if l != last and i == 0 else "none"
            pairs += _resnet_keys(f"{o}.resnets_in.{i}", f"{t}.resnets_in.{i}", w[i], w[i], resample)
            if attend:
                pairs += _attention_block_keys(f"{o}.cross_attentions.{i}", f"{t}.attentions.{i + 1}")
            pairs += _resnet_keys(f"{o}.resnets_out.{i}", f"{t}.resnets_out.{i}", w[i], w[i + 1], "none")
        if attend:
            pairs += _attention_block_keys(f"{o}.self_attention", f"{t}.attentions.0")

    pairs += _weight_bias("norm_out", "conv_norm_out")
    pairs += _weight_bias("conv_out", "conv_out")
    return pairs
