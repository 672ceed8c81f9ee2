r"""MoVQ: the vector-quantised autoencoder under Kandinsky 2.1, 2.2 and 3, built from small parts.

Kandinsky does not denoise pixels. A MoVQ encoder turns a 512×512 RGB image into 4×64×64
latents (8× smaller per side, 48× fewer values), the UNet denoises *those*, and the MoVQ decoder
turns the result back into pixels. MoVQ (Zheng et al. 2022, "MoVQ: Modulating Quantized Vectors
for High-Fidelity Image Generation") is a VQGAN whose decoder normalises its features with
`SpatialNorm`: a group norm whose scale and shift come from the quantised latent itself, so the
same code can be drawn differently at different places.

Read top to bottom:

1. ``MoVQConfig``                        — widths, depth, codebook; presets for the published models
2. ``SpatialNorm``                       — GroupNorm(f) · conv_y(zq) + conv_b(zq)  (MoVQ eq. 5)
3. ``ResnetBlock``, ``Attention``        — the two layers both halves are made of
4. ``Downsample``, ``Upsample``          — stride-2 conv after an asymmetric pad; nearest ×2 + conv
5. ``Encoder``, ``Decoder``              — plain GroupNorm going down, SpatialNorm coming up
6. ``VectorQuantizer``                   — nearest code, straight-through gradient, VQ loss
7. ``MoVQ``                              — encode → (quantize) → decode, input checks, diffusers interop

The numbers match diffusers' ``VQModel(norm_type="spatial")`` (tests/test_movq.py): the same
configuration loads its weights through `MoVQ.from_diffusers` and computes the same latents,
codes, loss and images.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

SPATIAL_NORM_GROUPS = 32  # diffusers' SpatialNorm hard-codes 32 groups, whatever norm_num_groups says
EPS = 1e-6  # every norm of the published MoVQ


# --------------------------------------------------------------------------------------
# 1. Configuration
# --------------------------------------------------------------------------------------


@dataclass
class MoVQConfig:
    """Hyper-parameters of a MoVQ. Defaults = the Kandinsky 2.1/2.2 MoVQ (67,832,495 parameters).

    Levels are listed from fine to coarse: the encoder's level ``l`` has ``block_out_channels[l]``
    channels and halves H and W unless it is the last, so the spatial factor is
    ``2 ** (len(block_out_channels) - 1)``. ``attention[l]``: whether level ``l`` has a
    self-attention layer after each resnet (the published models: only the coarsest).
    """

    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    attention: tuple[bool, ...] | None = None  # None → only the coarsest level
    layers_per_block: int = 2  # resnets per encoder level; the decoder has one more per level
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    num_vq_embeddings: int = 16384  # codebook size
    vq_embed_dim: int = 4  # width of a code; the published models use latent_channels
    norm_num_groups: int = 32
    beta: float = 0.25  # weight of the codebook term in the VQ loss (see `vq_loss`)
    mid_attention: bool = True
    spatial_norm: bool = True  # False: a plain VQGAN decoder (GroupNorm; diffusers' norm_type="group"), for comparison

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if self.attention is None:
            self.attention = tuple(i == len(self.block_out_channels) - 1 for i in range(len(self.block_out_channels)))
        self.attention = tuple(bool(a) for a in self.attention)
        problems = []
        if not self.block_out_channels:
            problems.append("block_out_channels is empty")
        if len(self.attention) != len(self.block_out_channels):
            problems.append(f"attention has {len(self.attention)} entries for {len(self.block_out_channels)} levels")
        for c in self.block_out_channels:
            if c % self.norm_num_groups or c % SPATIAL_NORM_GROUPS:
                problems.append(f"{c} channels do not split into {self.norm_num_groups} groups (GroupNorm) "
                                f"and {SPATIAL_NORM_GROUPS} groups (SpatialNorm); use multiples of "
                                f"{max(self.norm_num_groups, SPATIAL_NORM_GROUPS)}")
        if self.layers_per_block < 1:
            problems.append(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        if problems:
            raise ValueError("MoVQConfig: " + "; ".join(problems))

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent pixel along each side (8 for the published models)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def kandinsky2_2(cls) -> MoVQConfig:
        """The MoVQ of Kandinsky 2.1 and 2.2 (67,832,495 parameters)."""
        return cls()

    @classmethod
    def kandinsky3(cls) -> MoVQConfig:
        """The MoVQ of Kandinsky 3 (270,669,103 parameters): twice as wide."""
        return cls(block_out_channels=(256, 512, 512, 1024))

    @classmethod
    def tiny(cls, **overrides) -> MoVQConfig:
        """The course's MoVQ for 64×64 shapes: three levels (factor 4, 64² → 4×16²), 256 codes."""
        base = dict(block_out_channels=(32, 64, 64), layers_per_block=1, num_vq_embeddings=256)
        return cls(**{**base, **overrides})


# --------------------------------------------------------------------------------------
# 2-4. Layers
# --------------------------------------------------------------------------------------


class SpatialNorm(nn.Module):
    r"""MoVQ's spatially conditioned normalisation (MoVQ eq. 5):

    $$\mathrm{SpatialNorm}(f, z_q) = \mathrm{GroupNorm}(f) \odot \mathrm{conv}_y(z_q') + \mathrm{conv}_b(z_q')$$

    with $z_q'$ the quantised latent resized (nearest) to f's height and width. A plain decoder
    draws one code the same way everywhere, which shows as repeated tiles; here every code also
    sets the scale and shift of the features around it, at every layer.
    """

    def __init__(self, channels: int, zq_channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(SPATIAL_NORM_GROUPS, channels, eps=EPS, affine=True)
        self.scale = nn.Conv2d(zq_channels, channels, 1)  # conv_y
        self.shift = nn.Conv2d(zq_channels, channels, 1)  # conv_b

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        # f: (B, C, H, W); zq: (B, D, h, w) with h, w ≤ H, W
        zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")  # (B, D, H, W)
        return self.norm(f) * self.scale(zq) + self.shift(zq)


class Norm(nn.Module):
    """GroupNorm in the encoder; SpatialNorm (which also reads the quantised latent) in the decoder."""

    def __init__(self, channels: int, groups: int, zq_channels: int | None) -> None:
        super().__init__()
        self.spatial = zq_channels is not None
        self.inner = SpatialNorm(channels, zq_channels) if self.spatial else nn.GroupNorm(groups, channels, eps=EPS)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None) -> torch.Tensor:
        return self.inner(x, zq) if self.spatial else self.inner(x)


class ResnetBlock(nn.Module):
    """norm → SiLU → conv3×3 → norm → SiLU → conv3×3, plus the input (1×1 conv when widths differ)."""

    def __init__(self, c_in: int, c_out: int, groups: int, zq_channels: int | None = None) -> None:
        super().__init__()
        self.norm1 = Norm(c_in, groups, zq_channels)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = Norm(c_out, groups, zq_channels)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, zq)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h, zq)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H·W positions, with a residual (the VQGAN attention block)."""

    def __init__(self, channels: int, groups: int, zq_channels: int | None = None) -> None:
        super().__init__()
        self.norm = Norm(channels, groups, zq_channels)
        self.q, self.k, self.v = (nn.Linear(channels, channels) for _ in range(3))
        self.out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x, zq).flatten(2).transpose(1, 2)  # (B, H·W, C)
        q, k, v = self.q(tokens), self.k(tokens), self.v(tokens)  # (B, H·W, C) each
        attended = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √C) v
        return x + self.out(attended).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Pad one pixel on the right and bottom only (0, 1, 0, 1), then a stride-2 3×3 conv: H → H/2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv: H → 2H."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: resnets (each followed by attention where the level has it), then a resample."""

    def __init__(self, c_in: int, c_out: int, n: int, attention: bool, resample: Literal["down", "up"] | None,
                 groups: int, zq_channels: int | None = None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out, groups, zq_channels)
                                     for i in range(n))
        self.attentions = nn.ModuleList(Attention(c_out, groups, zq_channels) for _ in range(n)) if attention else None
        self.resample = Downsample(c_out) if resample == "down" else Upsample(c_out) if resample == "up" else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, zq)
            if self.attentions is not None:
                x = self.attentions[i](x, zq)
        return x if self.resample is None else self.resample(x)


class MidBlock(nn.Module):
    """At the coarsest resolution: resnet → attention → resnet."""

    def __init__(self, channels: int, groups: int, attention: bool, zq_channels: int | None = None) -> None:
        super().__init__()
        self.resnet1 = ResnetBlock(channels, channels, groups, zq_channels)
        self.attention = Attention(channels, groups, zq_channels) if attention else None
        self.resnet2 = ResnetBlock(channels, channels, groups, zq_channels)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        x = self.resnet1(x, zq)
        if self.attention is not None:
            x = self.attention(x, zq)
        return self.resnet2(x, zq)


# --------------------------------------------------------------------------------------
# 5. Encoder and decoder
# --------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """(B, 3, H, W) → (B, latent_channels, H/f, W/f), with plain GroupNorm throughout."""

    def __init__(self, config: MoVQConfig) -> None:
        super().__init__()
        ch, g = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.levels = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], config.layers_per_block, config.attention[i],
                  "down" if i < len(ch) - 1 else None, g)
            for i in range(len(ch)))
        self.mid = MidBlock(ch[-1], g, config.mid_attention)
        self.norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch[0], H, W)
        for level in self.levels:
            h = level(h)  # halves H, W except at the last level
        h = self.mid(h)  # (B, ch[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, latent_channels, H/f, W/f)


class Decoder(nn.Module):
    """(B, latent_channels, h, w) and the quantised latent zq → (B, 3, h·f, w·f); every norm is a SpatialNorm of zq
    (a plain GroupNorm, ignoring zq, when ``config.spatial_norm`` is False)."""

    def __init__(self, config: MoVQConfig) -> None:
        super().__init__()
        ch, g = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        d = config.vq_embed_dim if config.spatial_norm else None
        attention = tuple(reversed(config.attention))
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid = MidBlock(ch[0], g, config.mid_attention, zq_channels=d)
        self.levels = nn.ModuleList(  # coarse → fine, in the order they run
            Level(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, attention[i],
                  "up" if i < len(ch) - 1 else None, g, zq_channels=d)
            for i in range(len(ch)))
        self.norm_out = SpatialNorm(ch[-1], d) if d is not None else nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def forward(self, h: torch.Tensor, zq: torch.Tensor | None) -> torch.Tensor:
        h = self.mid(self.conv_in(h), zq)  # (B, ch[-1], h, w)
        for level in self.levels:
            h = level(h, zq)  # doubles H, W except at the last level
        h = self.norm_out(h, zq) if isinstance(self.norm_out, SpatialNorm) else self.norm_out(h)
        return self.conv_out(F.silu(h))  # (B, 3, H, W)


# --------------------------------------------------------------------------------------
# 6. Vector quantisation
# --------------------------------------------------------------------------------------


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    r"""Index of the closest codebook row for every latent pixel: $k^* = \arg\min_k \lVert z - e_k\rVert_2$.

    z: (B, D, H, W); codebook: (K, D) → indices (B, H, W).
    """
    b, d, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B·H·W, D)
    return torch.cdist(flat, codebook).argmin(dim=1).view(b, h, w)


def lookup(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Codes for indices: (B, H, W) → (B, D, H, W)."""
    return codebook[indices].permute(0, 3, 1, 2)


def straight_through(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    r"""Forward value $z_q$, gradient of the identity: $z + \mathrm{sg}[z_q - z]$ (VQ-VAE, van den Oord et al. 2017).

    argmin has no gradient; this copies the decoder's gradient at $z_q$ straight to the encoder's $z$.
    """
    return z + (z_q - z).detach()


def vq_loss(z: torch.Tensor, z_q: torch.Tensor, beta: float = 0.25) -> torch.Tensor:
    r"""The VQ loss as diffusers' ``VectorQuantizer(legacy=True)`` computes it, which every MoVQ was trained with:

    $$\mathcal{L} = \lVert \mathrm{sg}[z_q] - z\rVert^2 + \beta\,\lVert z_q - \mathrm{sg}[z]\rVert^2$$

    (means over all elements). Note that β sits on the **codebook** term (which moves the codes
    towards the encoder's outputs) and the commitment term (which moves the encoder towards its
    codes) has weight 1: the **reverse** of the VQ-VAE paper (eq. 3), where β = 0.25 weights the
    commitment term. diffusers keeps the reversed placement (``legacy``) for compatibility with
    the checkpoints trained that way.
    """
    commitment = torch.mean((z_q.detach() - z) ** 2)
    codebook = torch.mean((z_q - z.detach()) ** 2)
    return commitment + beta * codebook


class VectorQuantizer(nn.Module):
    """A codebook of ``num_codes`` vectors of width ``dim``, initialised U(−1/K, 1/K) as diffusers does."""

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.beta = beta
        self.codebook = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / num_codes, 1.0 / num_codes)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, D, H, W) → (z_q with straight-through gradient (B, D, H, W), VQ loss (), indices (B, H, W))."""
        indices = nearest_code(z, self.codebook.weight)  # (B, H, W)
        z_q = lookup(indices, self.codebook.weight)  # (B, D, H, W)
        return straight_through(z, z_q), vq_loss(z, z_q, self.beta), indices


def codebook_usage(indices: torch.Tensor, num_codes: int) -> dict[str, float]:
    r"""How much of the codebook a set of codes uses: perplexity $\exp(-\sum_k p_k \log p_k)$ of the
    code frequencies (= K when all K codes are equally used, 1 when one code does everything) and
    the share of dead codes (never chosen)."""
    counts = torch.bincount(indices.flatten(), minlength=num_codes).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"perplexity": float(entropy.exp()), "dead_share": float((counts == 0).double().mean()),
            "used": int((counts > 0).sum()), "codes": num_codes}


# --------------------------------------------------------------------------------------
# 7. The model
# --------------------------------------------------------------------------------------


class MoVQ(nn.Module):
    """encode (B, 3, H, W) → z (B, 4, H/f, W/f) → quantize → decode → (B, 3, H, W).

    ``decode(z)`` does **not** quantise by default: every Kandinsky 2.2 and 3 pipeline decodes
    the UNet's latents with diffusers' ``force_not_quantize=True``; the SpatialNorms then read the
    latent itself as zq. ``decode(z, quantize=True)`` snaps z to its nearest codes first.
    """

    def __init__(self, config: MoVQConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or MoVQConfig()
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.vq_embed_dim, 1)
        self.quantizer = VectorQuantizer(config.num_vq_embeddings, config.vq_embed_dim, config.beta)
        self.post_quant_conv = nn.Conv2d(config.vq_embed_dim, config.latent_channels, 1)
        self.decoder = Decoder(config)

    # --- input checks ---------------------------------------------------------------------
    def _check_image(self, x: torch.Tensor) -> None:
        c, f = self.config.in_channels, self.config.downsample_factor
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MoVQ.encode expects images (B, {c}, H, W) in [-1, 1], got {shape}; "
                             "add a batch dimension with x[None] for a single image.")
        if x.shape[1] != c:
            raise ValueError(f"MoVQ.encode expects {c} channels (RGB in [-1, 1]), got {x.shape[1]} in "
                             f"{tuple(x.shape)}; for a channels-last image use x.permute(0, 3, 1, 2).")
        h, w = x.shape[-2:]
        if h % f or w % f:
            raise ValueError(f"image size {h}×{w} is not divisible by this MoVQ's downsampling factor {f}; "
                             f"resize or crop to a multiple of {f}, e.g. {max(f, h // f * f)}×{max(f, w // f * f)}.")

    def _check_latent(self, z: torch.Tensor) -> None:
        d = self.config.vq_embed_dim
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != d:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"MoVQ.decode expects latents (B, {d}, h, w) as `encode` returns them, got {shape}"
                             + ("; did you pass an image? encode it first." if isinstance(z, torch.Tensor)
                                and z.ndim == 4 and z.shape[1] == self.config.in_channels else "."))

    # --- the three steps ----------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] → latents z (B, D, H/f, W/f), not quantised
        (diffusers' ``VQModel.encode(x).latents``)."""
        self._check_image(x)
        return self.quant_conv(self.encoder(x))

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, D, h, w) → (z_q (B, D, h, w), VQ loss (), code indices (B, h, w))."""
        self._check_latent(z)
        return self.quantizer(z)

    def decode(self, z: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Latents (B, D, h, w) → images (B, 3, h·f, w·f). ``quantize=False`` is diffusers'
        ``force_not_quantize=True``, what the Kandinsky pipelines use."""
        self._check_latent(z)
        z_q = self.quantizer(z)[0] if quantize else z
        return self.decoder(self.post_quant_conv(z_q), z_q)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: x → (reconstruction through the codebook, VQ loss)."""
        z = self.encode(x)
        z_q, loss, _ = self.quantizer(z)
        return self.decoder(self.post_quant_conv(z_q), z_q), loss

    # --- diffusers interop ----------------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, model_or_state_dict: nn.Module | dict[str, torch.Tensor],
                       config: MoVQConfig | None = None) -> MoVQ:
        """Build a MoVQ holding the weights of a diffusers ``VQModel(norm_type="spatial")``.

        Given the model, the config is read from ``model.config`` and the weights are copied; given a
        state dict (e.g. from safetensors), ``config`` is required and the tensors are used as they are
        (no copy). Raises ValueError listing missing keys, unexpected keys and shape mismatches.
        """
        if isinstance(model_or_state_dict, nn.Module):
            if not hasattr(model_or_state_dict, "config"):
                raise TypeError("expected a diffusers VQModel (a module with a .config) or its state dict.")
            inferred = config_from_diffusers(model_or_state_dict.config)
            if config is not None and config != inferred:
                diff = [f"{f.name}: given {getattr(config, f.name)!r}, model has {getattr(inferred, f.name)!r}"
                        for f in dataclasses.fields(MoVQConfig) if getattr(config, f.name) != getattr(inferred, f.name)]
                raise ValueError("config does not match the diffusers model's config: " + "; ".join(diff))
            config = inferred
            state_dict = {k: v.detach().clone() for k, v in model_or_state_dict.state_dict().items()}
        elif isinstance(model_or_state_dict, dict):
            if config is None:
                raise ValueError("from_diffusers(state_dict) needs config=MoVQConfig(...): a state dict does not say "
                                 "its architecture. For the published weights use MoVQConfig.kandinsky2_2() or "
                                 "MoVQConfig.kandinsky3().")
            state_dict = model_or_state_dict
        else:
            raise TypeError(f"expected a diffusers VQModel or its state dict, got {type(model_or_state_dict).__name__}.")
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        ours, missing, shape_errors = {}, [], []
        for k_ours, k_theirs in diffusers_key_map(config):
            if k_theirs not in state_dict:
                missing.append(k_theirs)
                continue
            tensor = state_dict[k_theirs]
            if tuple(tensor.shape) != tuple(expected[k_ours].shape):
                shape_errors.append(f"{k_theirs}: checkpoint {tuple(tensor.shape)} vs model "
                                    f"{tuple(expected[k_ours].shape)}")
            ours[k_ours] = tensor
        mapped = {k for _, k in diffusers_key_map(config)}
        unexpected = [k for k in state_dict if k not in mapped]
        if missing or unexpected or shape_errors:
            raise ValueError(_load_report(config, missing, unexpected, shape_errors))
        model.load_state_dict(ours, assign=True)
        return model

    def to_diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under diffusers' ``VQModel`` names (load with ``load_state_dict``)."""
        mine = self.state_dict()
        return {theirs: mine[ours] for ours, theirs in diffusers_key_map(self.config)}


def _load_report(config: MoVQConfig, missing: list, unexpected: list, shape_errors: list, show: int = 5) -> str:
    def part(name: str, items: list) -> str:
        more = f" … and {len(items) - show} more" if len(items) > show else ""
        return f"\n  {len(items)} {name}: " + ", ".join(items[:show]) + more

    return ("the state dict does not fit MoVQ(" + repr(config) + ")"
            + (part("missing keys", missing) if missing else "")
            + (part("unexpected keys", unexpected) if unexpected else "")
            + (part("shape mismatches", shape_errors) if shape_errors else "")
            + "\nCheck that the config matches the checkpoint (its config.json: block_out_channels, "
              "layers_per_block, num_vq_embeddings, norm_type='spatial').")


def config_from_diffusers(cfg) -> MoVQConfig:
    """Our config for a diffusers ``VQModel`` config (object or dict)."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    if get("norm_type", "group") not in ("spatial", "group"):
        raise ValueError("kandlab's MoVQ is diffusers' VQModel with norm_type='spatial' (or 'group', a plain VQGAN "
                         f"decoder); this config has norm_type={get('norm_type')!r}.")
    down = list(get("down_block_types"))
    up = list(get("up_block_types"))
    attention = tuple(t.startswith("Attn") for t in down)
    if tuple(t.startswith("Attn") for t in reversed(up)) != attention:
        raise ValueError(f"the decoder's attention levels {up} do not mirror the encoder's {down}; kandlab's MoVQ "
                         "mirrors them.")
    if get("act_fn", "silu") != "silu":
        raise ValueError(f"kandlab's MoVQ uses SiLU; this config has act_fn={get('act_fn')!r}.")
    latent = get("latent_channels")
    return MoVQConfig(block_out_channels=tuple(get("block_out_channels")), attention=attention,
                      layers_per_block=get("layers_per_block"), in_channels=get("in_channels", 3),
                      out_channels=get("out_channels", 3), latent_channels=latent,
                      num_vq_embeddings=get("num_vq_embeddings"),
                      vq_embed_dim=get("vq_embed_dim") or latent, norm_num_groups=get("norm_num_groups", 32),
                      mid_attention=get("mid_block_add_attention", True),
                      spatial_norm=get("norm_type", "group") == "spatial")


def to_diffusers_config(config: MoVQConfig) -> dict:
    """kwargs for diffusers' ``VQModel`` with this architecture."""
    n = len(config.block_out_channels)
    return dict(
        in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in config.attention),
        up_block_types=tuple("AttnUpDecoderBlock2D" if config.attention[n - 1 - j] else "UpDecoderBlock2D"
                             for j in range(n)),
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels, num_vq_embeddings=config.num_vq_embeddings,
        vq_embed_dim=config.vq_embed_dim, norm_num_groups=config.norm_num_groups,
        norm_type="spatial" if config.spatial_norm else "group",
        mid_block_add_attention=config.mid_attention)


# --- the key map: (our name, diffusers' name) for every tensor --------------------------------


def _conv(ours: str, theirs: str) -> list[tuple[str, str]]:
    return [(f"{ours}.weight", f"{theirs}.weight"), (f"{ours}.bias", f"{theirs}.bias")]


def _spatial_norm(ours: str, theirs: str) -> list[tuple[str, str]]:
    return (_conv(f"{ours}.norm", f"{theirs}.norm_layer") + _conv(f"{ours}.scale", f"{theirs}.conv_y")
            + _conv(f"{ours}.shift", f"{theirs}.conv_b"))


def _norm(ours: str, theirs: str, spatial: bool) -> list[tuple[str, str]]:
    return _spatial_norm(f"{ours}.inner", theirs) if spatial else _conv(f"{ours}.inner", theirs)


def _resnet(ours: str, theirs: str, c_in: int, c_out: int, spatial: bool) -> list[tuple[str, str]]:
    pairs = (_norm(f"{ours}.norm1", f"{theirs}.norm1", spatial) + _conv(f"{ours}.conv1", f"{theirs}.conv1")
             + _norm(f"{ours}.norm2", f"{theirs}.norm2", spatial) + _conv(f"{ours}.conv2", f"{theirs}.conv2"))
    return pairs + (_conv(f"{ours}.skip", f"{theirs}.conv_shortcut") if c_in != c_out else [])


def _attention(ours: str, theirs: str, spatial: bool) -> list[tuple[str, str]]:
    norm = _norm(f"{ours}.norm", f"{theirs}.spatial_norm" if spatial else f"{theirs}.group_norm", spatial)
    return norm + [p for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("out", "to_out.0"))
                   for p in _conv(f"{ours}.{a}", f"{theirs}.{b}")]


def _mid(ours: str, theirs: str, c: int, attention: bool, spatial: bool) -> list[tuple[str, str]]:
    pairs = _resnet(f"{ours}.resnet1", f"{theirs}.resnets.0", c, c, spatial)
    if attention:
        pairs += _attention(f"{ours}.attention", f"{theirs}.attentions.0", spatial)
    return pairs + _resnet(f"{ours}.resnet2", f"{theirs}.resnets.1", c, c, spatial)


def diffusers_key_map(config: MoVQConfig) -> list[tuple[str, str]]:
    """(our key, diffusers ``VQModel`` key) for every tensor, in one explicit list."""
    ch, n, lpb = config.block_out_channels, len(config.block_out_channels), config.layers_per_block
    pairs = _conv("encoder.conv_in", "encoder.conv_in")
    for i in range(n):  # encoder levels fine → coarse = diffusers' down_blocks
        for j in range(lpb):
            c_in = ch[max(i - 1, 0)] if j == 0 else ch[i]
            pairs += _resnet(f"encoder.levels.{i}.resnets.{j}", f"encoder.down_blocks.{i}.resnets.{j}", c_in, ch[i], False)
            if config.attention[i]:
                pairs += _attention(f"encoder.levels.{i}.attentions.{j}", f"encoder.down_blocks.{i}.attentions.{j}", False)
        if i < n - 1:
            pairs += _conv(f"encoder.levels.{i}.resample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    pairs += _mid("encoder.mid", "encoder.mid_block", ch[-1], config.mid_attention, False)
    pairs += _conv("encoder.norm_out", "encoder.conv_norm_out") + _conv("encoder.conv_out", "encoder.conv_out")
    pairs += _conv("quant_conv", "quant_conv") + [("quantizer.codebook.weight", "quantize.embedding.weight")]
    pairs += _conv("post_quant_conv", "post_quant_conv") + _conv("decoder.conv_in", "decoder.conv_in")
    spatial = config.spatial_norm
    pairs += _mid("decoder.mid", "decoder.mid_block", ch[-1], config.mid_attention, spatial)
    rch = tuple(reversed(ch))
    for i in range(n):  # decoder levels coarse → fine = diffusers' up_blocks
        for j in range(lpb + 1):
            c_in = rch[max(i - 1, 0)] if j == 0 else rch[i]
            pairs += _resnet(f"decoder.levels.{i}.resnets.{j}", f"decoder.up_blocks.{i}.resnets.{j}", c_in, rch[i],
                             spatial)
            if config.attention[n - 1 - i]:
                pairs += _attention(f"decoder.levels.{i}.attentions.{j}", f"decoder.up_blocks.{i}.attentions.{j}",
                                    spatial)
        if i < n - 1:
            pairs += _conv(f"decoder.levels.{i}.resample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    pairs += (_spatial_norm("decoder.norm_out", "decoder.conv_norm_out") if spatial
              else _conv("decoder.norm_out", "decoder.conv_norm_out")) + _conv("decoder.conv_out", "decoder.conv_out")
    return pairs
