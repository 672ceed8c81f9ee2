r"""The unCLIP diffusion prior of Kandinsky 2.1 / 2.2: a text embedding in, a CLIP *image* embedding out.

unCLIP (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents",
§2.1) splits text-to-image in two. A *prior* turns the prompt's CLIP text embedding into a CLIP
image embedding; a decoder then paints an image from that embedding. The prior is itself a
diffusion model — over a single vector — whose denoiser is a causal transformer that predicts
the clean embedding :math:`x_0` directly (not the noise ε). Its sequence of tokens is

.. code-block:: text

    [ text token 1 … text token N | pooled text | time | noisy image embedding x_t | prd ]
      (N = num_embeddings = 77)      ---------- additional_embeddings = 4 ----------

and the prediction is read off the last token, a learned "read-out" embedding (the paper's
"final embedding whose output ... is used to predict the unnoised CLIP image embedding").

Read top to bottom:

1. ``PriorConfig``           — field names as diffusers' ``PriorTransformer``; presets
2. ``timestep_embedding``, ``TimeEmbedding`` — sinusoid (cos half first) → linear → act → linear
3. ``SelfAttention``, ``FeedForward``, ``Block`` — a pre-LN transformer block (GELU MLP)
4. ``prior_attention_mask``  — text padding + causal, as an additive −10 000 bias
5. ``PriorTransformer``      — tokens → blocks → last token → x̂₀; diffusers weights in and out
6. ``UnCLIPSampler``         — the prior's DDPM sampler (x₀ prediction, clipping, respacing) + guidance

The production twin is diffusers' ``PriorTransformer`` with ``UnCLIPScheduler``
(``KandinskyV22PriorPipeline``); ``tests/test_prior.py`` checks both give the same numbers.
The model predicts x₀ of the *normalised* image embedding; ``post_process_latents`` maps it back
to CLIP's scale, :math:`\text{emb} = x\cdot\sigma_\text{clip} + \mu_\text{clip}`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from kandlab.diffusion import StepOutput, TrajectoryStep
from kandlab.schedules import cosine_betas

__all__ = [
    "PriorConfig",
    "PriorTransformer",
    "UnCLIPSampler",
    "timestep_embedding",
    "prior_attention_mask",
    "guided_x0",
    "prior_model_fn",
    "diffusers_key_map",
]

TimeAct = Literal["silu", "swish", "gelu", "relu", "mish"]
TIME_ACTS: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "mish": nn.Mish,
}
MASK_VALUE = -10000.0  # what diffusers adds for a hidden key; exp(-1e4) is exactly 0 in float32
LAYER_NORM_EPS = 1e-5  # every LayerNorm of the prior (torch's default)

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, D), t (B,) long) -> x0_hat (B, D)


# ---------------------------------------------------------------------------
# 1. Config


@dataclass
class PriorConfig:
    """Shape of an unCLIP prior. Field names and defaults are diffusers' ``PriorTransformer``'s.

    The defaults are the 768-wide prior of Kandinsky 2.1 / Karlo (OpenAI CLIP ViT-L/14);
    ``PriorConfig.kandinsky2_2()`` is the 1280-wide one (OpenCLIP ViT-bigG/14).
    """

    num_attention_heads: int = 32
    attention_head_dim: int = 64  # the transformer is num_attention_heads · attention_head_dim wide
    num_layers: int = 20
    embedding_dim: int = 768  # CLIP width: of the text hidden states and of the image embedding x_t
    num_embeddings: int = 77  # text tokens; CLIP's context length, prompts are padded to it
    additional_embeddings: int = 4  # pooled text, time, x_t, prd: the tokens after the text
    dropout: float = 0.0
    time_embed_act_fn: TimeAct = "silu"
    norm_in_type: Literal["layer"] | None = None  # a LayerNorm before the blocks (Shap-E has one)
    embedding_proj_norm_type: Literal["layer"] | None = None  # a LayerNorm on the pooled text embedding
    encoder_hid_proj_type: Literal["linear"] = "linear"  # how text hidden states become tokens
    added_emb_type: Literal["prd"] = "prd"  # the learned read-out token at the end
    time_embed_dim: int | None = None  # hidden width of the time MLP; None → inner_dim
    embedding_proj_dim: int | None = None  # width of the pooled text embedding; None → embedding_dim
    clip_embed_dim: int | None = None  # width of the output; None → embedding_dim

    def __post_init__(self) -> None:
        for name in ("num_attention_heads", "attention_head_dim", "num_layers", "embedding_dim", "num_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("time_embed_dim", "embedding_proj_dim", "clip_embed_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None (= its default width), got {value!r}")
        if self.inner_dim < 2:
            raise ValueError("num_attention_heads · attention_head_dim must be at least 2 (sin and cos of the time)")
        if self.time_embed_act_fn not in TIME_ACTS:
            raise ValueError(f"time_embed_act_fn must be one of {sorted(TIME_ACTS)}, got {self.time_embed_act_fn!r}")
        for name in ("norm_in_type", "embedding_proj_norm_type"):
            if getattr(self, name) not in (None, "layer"):
                raise ValueError(f'{name} must be None or "layer", got {getattr(self, name)!r}')
        if self.encoder_hid_proj_type != "linear" or self.added_emb_type != "prd":
            raise ValueError(
                "kandlab's prior is the unCLIP one (Karlo, Kandinsky 2.1/2.2): it needs encoder_hid_proj_type="
                f'"linear" and added_emb_type="prd", got {self.encoder_hid_proj_type!r} and {self.added_emb_type!r} '
                "(the Shap-E prior, which has neither, is not covered)"
            )
        if self.additional_embeddings != 4:
            raise ValueError(
                f"additional_embeddings={self.additional_embeddings}: the unCLIP prior appends exactly 4 tokens "
                "after the text (pooled text, time, x_t, prd); use 4"
            )
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    @property
    def inner_dim(self) -> int:
        """Width of the transformer: ``num_attention_heads · attention_head_dim``."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def seq_len(self) -> int:
        """Tokens in the sequence: N text tokens + 4 (pooled text, time, x_t, prd)."""
        return self.num_embeddings + self.additional_embeddings

    @property
    def time_hidden_dim(self) -> int:
        return self.time_embed_dim or self.inner_dim

    @property
    def text_embed_dim(self) -> int:
        """Width of ``proj_embedding`` (the pooled text embedding)."""
        return self.embedding_proj_dim or self.embedding_dim

    @property
    def out_dim(self) -> int:
        """Width of the predicted image embedding."""
        return self.clip_embed_dim or self.embedding_dim

    # -- presets ---------------------------------------------------------------

    @classmethod
    def kandinsky2_2(cls) -> PriorConfig:
        """kandinsky-community/kandinsky-2-2-prior: 32 heads × 64, 20 layers, CLIP bigG (1280); 1.03 B values."""
        return cls(embedding_dim=1280)

    @classmethod
    def kandinsky2_1(cls) -> PriorConfig:
        """kandinsky-community/kandinsky-2-1-prior: the same transformer on CLIP ViT-L/14 (768)."""
        return cls(embedding_dim=768)

    @classmethod
    def tiny(cls, embedding_dim: int = 64, num_embeddings: int = 16, **overrides: Any) -> PriorConfig:
        """A CPU-sized prior: 4 heads × 16, 4 layers; ``num_embeddings`` = the tokenizer's ``max_length``."""
        fields = dict(num_attention_heads=4, attention_head_dim=16, num_layers=4,
                      embedding_dim=embedding_dim, num_embeddings=num_embeddings)
        return cls(**{**fields, **overrides})

    # -- diffusers config ------------------------------------------------------

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> PriorConfig:
        """Read a diffusers ``PriorTransformer`` config (``model.config`` or ``config.json`` as a dict).

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, …) are bookkeeping and
        ignored; keys that are missing take diffusers' defaults (which are this dataclass's).
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"expected a dict-like diffusers config, got {type(config).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in names)
        if unknown:
            raise ValueError(f"unknown PriorTransformer config keys {unknown}; PriorConfig has {sorted(names)}")
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments for ``diffusers.PriorTransformer(**...)`` building the same model."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# 2. Time embedding


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    r"""Sinusoidal features of (possibly fractional) timesteps, cosine half first: (B,) -> (B, dim).

    The Transformer's position encoding (Vaswani et al. 2017, §3.5) applied to t, as DDPM does:

    .. math::  \omega_k = \text{max\_period}^{-k/h},\ k = 0..h-1,\ h = \lfloor dim/2 \rfloor, \qquad
               e(t) = [\cos(t\,\omega), \sin(t\,\omega)]

    computed in float32 (diffusers' ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``);
    an odd ``dim`` gets one zero at the end.
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)  # (h,)
    omega = torch.exp(-math.log(max_period) * k / half)  # (h,): frequencies from 1 down to ~1/max_period
    angles = t.float()[:, None] * omega[None, :]  # (B, h)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, 2h)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoid → ``linear_1`` → activation → ``linear_2``: one time token of width ``inner_dim``."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.dim = config.inner_dim
        self.linear_1 = nn.Linear(config.inner_dim, config.time_hidden_dim)
        self.act = TIME_ACTS[config.time_embed_act_fn]()
        self.linear_2 = nn.Linear(config.time_hidden_dim, config.inner_dim)

    def forward(self, t: Tensor) -> Tensor:  # (B,) -> (B, inner_dim)
        features = timestep_embedding(t, self.dim).to(self.linear_1.weight.dtype)  # (B, inner_dim)
        return self.linear_2(self.act(self.linear_1(features)))


# ---------------------------------------------------------------------------
# 3. Transformer block


class SelfAttention(nn.Module):
    r"""Multi-head self-attention with biases: :math:`\mathrm{softmax}(QK^\top/\sqrt{d} + M)\,V`.

    ``M`` is the additive mask of :func:`prior_attention_mask` (Vaswani et al. 2017, eq. 1).
    """

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.heads, self.head_dim = config.num_attention_heads, config.attention_head_dim
        width = config.inner_dim
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: (B, S, W); mask: (B, 1, S, S) added to the scores. Returns (B, S, W)."""
        B, S, W = x.shape
        q = self.q(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, S, d)
        k = self.k(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, S, d)
        v = self.v(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, S, d)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, S, d)
        h = h.transpose(1, 2).reshape(B, S, W)  # (B, S, heads·d)
        return self.dropout(self.out(h))


class FeedForward(nn.Module):
    r"""Position-wise MLP :math:`W_2\,\mathrm{GELU}(W_1 x)`, hidden width 4·W, exact (erf) GELU."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        width = config.inner_dim
        self.fc_in = nn.Linear(width, 4 * width)
        self.dropout = nn.Dropout(config.dropout)
        self.fc_out = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:  # (B, S, W) -> (B, S, W)
        return self.fc_out(self.dropout(F.gelu(self.fc_in(x))))  # hidden (B, S, 4W)


class Block(nn.Module):
    """Pre-LN residual block: ``x + Attn(LN(x))`` then ``x + FF(LN(x))`` (diffusers' BasicTransformerBlock)."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.inner_dim, eps=LAYER_NORM_EPS)
        self.attn = SelfAttention(config)
        self.ff_norm = nn.LayerNorm(config.inner_dim, eps=LAYER_NORM_EPS)
        self.ff = FeedForward(config)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # (B, S, W) -> (B, S, W)
        x = x + self.attn(self.attn_norm(x), mask)
        return x + self.ff(self.ff_norm(x))


# ---------------------------------------------------------------------------
# 4. Attention mask


def prior_attention_mask(text_mask: Tensor, num_extra: int = 4, dtype: torch.dtype = torch.float32) -> Tensor:
    r"""Additive attention bias for the prior's sequence: (B, L) text mask -> (B, 1, S, S), S = L + num_extra.

    .. math::  M_b[i, j] = -10^4\,\big(1 - m_b[j]\big)\,[j < L] \;+\; -10^4\,[j > i]

    A query ``i`` never sees a padded text token (first term: padding of the *keys*; the
    extra tokens are never padding) nor a later token (second term: causal). The read-out token
    is last, so it sees everything that is not padding. Where both apply the bias is −2·10⁴.
    ``text_mask`` is True / 1 for real tokens.
    """
    B, L = text_mask.shape
    S = L + num_extra
    padding = (1 - text_mask.to(dtype)) * MASK_VALUE  # (B, L): −1e4 at padded text keys
    padding = F.pad(padding, (0, num_extra), value=0.0)  # (B, S)
    causal = torch.full((S, S), MASK_VALUE, dtype=dtype, device=text_mask.device).triu(1)  # (S, S)
    return (padding[:, None, :] + causal[None]).unsqueeze(1)  # (B, 1, S, S), shared by the heads


# ---------------------------------------------------------------------------
# 5. The prior transformer


class PriorTransformer(nn.Module):
    """Denoiser of the unCLIP prior: (x_t, t, text) -> x̂₀ of the normalised CLIP image embedding.

    Same parameters and numbers as diffusers' ``PriorTransformer`` (unCLIP configs), with one
    deliberate difference: ``clip_mean`` / ``clip_std`` are *buffers* here (statistics, not
    learned) where diffusers makes them parameters, so ``parameters()`` counts 2·clip_embed_dim
    fewer values while the state dicts hold the same tensors.
    """

    def __init__(self, config: PriorConfig | None = None):
        super().__init__()
        config = config or PriorConfig()
        self.config = config
        W = config.inner_dim
        self.time_embedding = TimeEmbedding(config)
        self.proj_in = nn.Linear(config.embedding_dim, W)  # noisy image embedding x_t → one token
        self.embedding_proj_norm = nn.LayerNorm(config.text_embed_dim) if config.embedding_proj_norm_type else None
        self.embedding_proj = nn.Linear(config.text_embed_dim, W)  # pooled text embedding → one token
        self.encoder_hidden_states_proj = nn.Linear(config.embedding_dim, W)  # text hidden states → N tokens
        self.positional_embedding = nn.Parameter(torch.empty(1, config.seq_len, W))  # learned positions
        self.prd_embedding = nn.Parameter(torch.empty(1, 1, W))  # learned read-out token
        self.norm_in = nn.LayerNorm(W) if config.norm_in_type else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm_out = nn.LayerNorm(W)
        self.proj_to_clip_embeddings = nn.Linear(W, config.out_dim)
        # Statistics of CLIP image embeddings: the diffusion runs on (emb − mean) / std.
        self.register_buffer("clip_mean", torch.zeros(1, config.out_dim))
        self.register_buffer("clip_std", torch.ones(1, config.out_dim))
        # diffusers starts positions and the prd token at 0 (it only loads them); small random
        # values (GPT-2's 0.02) give a from-scratch model distinct positions on step one.
        nn.init.normal_(self.positional_embedding, std=0.02)
        nn.init.normal_(self.prd_embedding, std=0.02)

    # -- normalisation of the image embedding -----------------------------------

    def post_process_latents(self, x: Tensor) -> Tensor:
        r"""Normalised sample -> CLIP image embedding: :math:`x\cdot\sigma + \mu`. (B, C) -> (B, C)."""
        return x * self.clip_std.to(x.device) + self.clip_mean.to(x.device)

    def pre_process_latents(self, emb: Tensor) -> Tensor:
        r"""CLIP image embedding -> the normalised x₀ the prior learns: :math:`(e - \mu)/\sigma` (training)."""
        if self.clip_std.device.type != "meta" and bool((self.clip_std == 0).any()):
            raise ValueError(
                "clip_std has zeros, so embeddings cannot be normalised (a freshly built diffusers "
                "PriorTransformer has clip_std = 0); load a checkpoint or call set_clip_stats(image_embeds)"
            )
        return (emb - self.clip_mean.to(emb.device)) / self.clip_std.to(emb.device)

    @torch.no_grad()
    def set_clip_stats(self, image_embeds: Tensor) -> None:
        """Set ``clip_mean`` / ``clip_std`` to the per-dimension mean and std of (N, C) training embeddings."""
        if image_embeds.ndim != 2 or image_embeds.shape[1] != self.config.out_dim or image_embeds.shape[0] < 2:
            raise ValueError(
                f"image_embeds must be (N ≥ 2, {self.config.out_dim}) CLIP image embeddings, "
                f"got {tuple(image_embeds.shape)}"
            )
        self.clip_mean.copy_(image_embeds.mean(0, keepdim=True))
        self.clip_std.copy_(image_embeds.std(0, keepdim=True).clamp(min=1e-6))

    # -- forward ------------------------------------------------------------------

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor | int | float,
        proj_embedding: Tensor,
        encoder_hidden_states: Tensor,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Predict x̂₀ (B, C) of the normalised image embedding. Arguments as in diffusers:

        - ``hidden_states``: (B, D) the noisy normalised image embedding x_t;
        - ``timestep``: (B,) or a scalar, 0 … 999;
        - ``proj_embedding``: (B, D) the pooled (projected) CLIP text embedding of the prompt;
        - ``encoder_hidden_states``: (B, N, D) CLIP's last hidden states, padded to N = num_embeddings;
        - ``attention_mask``: (B, N) bool, True for real tokens. ``None`` means no padding; the causal
          mask still applies. (diffusers skips *both* masks when it gets None — not how the model
          was trained; the Kandinsky pipelines always pass the mask.)
        """
        self._check_inputs(hidden_states, proj_embedding, encoder_hidden_states, attention_mask)
        B, N, _ = encoder_hidden_states.shape
        dtype, device = hidden_states.dtype, hidden_states.device
        t = self._timesteps(timestep, B, device)  # (B,)
        if self.embedding_proj_norm is not None:
            proj_embedding = self.embedding_proj_norm(proj_embedding)
        tokens = torch.cat(
            [
                self.encoder_hidden_states_proj(encoder_hidden_states),  # (B, N, W) text
                self.embedding_proj(proj_embedding)[:, None],  # (B, 1, W) pooled text
                self.time_embedding(t)[:, None],  # (B, 1, W) time
                self.proj_in(hidden_states)[:, None],  # (B, 1, W) x_t
                self.prd_embedding.to(dtype).expand(B, -1, -1),  # (B, 1, W) read-out
            ],
            dim=1,
        )  # (B, S, W), S = N + 4
        h = tokens + self.positional_embedding.to(dtype)  # (B, S, W)
        if attention_mask is None:
            attention_mask = torch.ones(B, N, dtype=torch.bool, device=device)
        mask = prior_attention_mask(attention_mask.to(device), self.config.additional_embeddings, dtype)
        if self.norm_in is not None:
            h = self.norm_in(h)
        for block in self.blocks:
            h = block(h, mask)  # (B, S, W)
        h = self.norm_out(h[:, -1])  # (B, W): the read-out token (LayerNorm is per token)
        return self.proj_to_clip_embeddings(h)  # (B, C)

    @staticmethod
    def _timesteps(timestep: Tensor | int | float, batch: int, device: torch.device) -> Tensor:
        """A scalar, (1,) or (B,) timestep -> (B,) on ``device``; Python numbers become torch.long."""
        if isinstance(timestep, bool):
            raise TypeError("timestep must be a number or a tensor of shape (B,), got a bool")
        if isinstance(timestep, (int, float)):
            if not float(timestep).is_integer():
                raise ValueError(
                    f"timestep={timestep} is not an integer; pass a float tensor, e.g. torch.tensor([{timestep}]), "
                    "for a fractional timestep"
                )
            timestep = torch.tensor([int(timestep)], dtype=torch.long)
        if not isinstance(timestep, Tensor):
            raise TypeError(f"timestep must be a number or a tensor of shape (B,), got {type(timestep).__name__}")
        timestep = timestep.reshape(-1) if timestep.ndim == 0 else timestep
        if timestep.ndim != 1 or timestep.shape[0] not in (1, batch):
            raise ValueError(
                f"timestep has shape {tuple(timestep.shape)}; pass a scalar or a tensor of shape ({batch},)"
            )
        return timestep.to(device).expand(batch)

    def _check_inputs(self, x_t: Tensor, proj: Tensor, text: Tensor, mask: Tensor | None) -> None:
        c = self.config
        for name, value in (("hidden_states", x_t), ("proj_embedding", proj), ("encoder_hidden_states", text)):
            if not isinstance(value, Tensor) or not value.is_floating_point():
                got = value.dtype if isinstance(value, Tensor) else type(value).__name__
                raise TypeError(f"{name} must be a floating-point tensor, got {got}")
        if x_t.ndim != 2 or x_t.shape[1] != c.embedding_dim:
            raise ValueError(
                f"hidden_states (the noisy image embedding x_t) must have shape (B, {c.embedding_dim}), got "
                f"{tuple(x_t.shape)}; this prior works on {c.embedding_dim}-wide CLIP embeddings"
            )
        B = x_t.shape[0]
        if proj.shape != (B, c.text_embed_dim):
            raise ValueError(
                f"proj_embedding (the pooled CLIP text embedding) must have shape ({B}, {c.text_embed_dim}), "
                f"got {tuple(proj.shape)}; pass text_embeds of a CLIPTextModelWithProjection, one row per x_t"
            )
        if text.ndim != 3 or text.shape[0] != B or text.shape[2] != c.embedding_dim:
            raise ValueError(
                f"encoder_hidden_states must have shape ({B}, {c.num_embeddings}, {c.embedding_dim}) "
                f"(CLIP's last hidden states), got {tuple(text.shape)}"
            )
        if text.shape[1] != c.num_embeddings:
            relation = "longer" if text.shape[1] > c.num_embeddings else "shorter"
            raise ValueError(
                f"encoder_hidden_states has {text.shape[1]} tokens, {relation} than the {c.num_embeddings} the "
                f"positional embedding holds; tokenize with padding='max_length', max_length={c.num_embeddings}, "
                "truncation=True and pass the padding as attention_mask"
            )
        if mask is None:
            return
        if not isinstance(mask, Tensor):
            raise TypeError(f"attention_mask must be a tensor of shape ({B}, {c.num_embeddings}), got "
                            f"{type(mask).__name__}")
        if mask.shape != (B, c.num_embeddings):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)} but encoder_hidden_states has {tuple(text.shape[:2])}; "
                "pass one True (real token) / False (padding) per text token"
            )
        if mask.is_floating_point() or (mask.device.type != "meta" and bool(((mask != 0) & (mask != 1)).any())):
            raise ValueError("attention_mask must be bool (or 0/1 integers): True for real tokens, False for padding")

    # -- weights from / to diffusers ------------------------------------------------

    @classmethod
    def from_diffusers(
        cls, model_or_state_dict: nn.Module | Mapping[str, Tensor], config: PriorConfig | Mapping | None = None
    ) -> PriorTransformer:
        """Build a prior holding the weights of a diffusers ``PriorTransformer`` (or its state dict).

        A model brings its config; a state dict needs ``config=`` (a ``PriorConfig`` or a diffusers
        config dict: the head count cannot be read from the weights). The tensors are *shared*, not
        copied (same device and dtype), so a 1 B-parameter checkpoint is never held twice.
        """
        if isinstance(model_or_state_dict, nn.Module):
            if config is None:
                config = dict(model_or_state_dict.config)
            state_dict = model_or_state_dict.state_dict()
        elif isinstance(model_or_state_dict, Mapping):
            if config is None:
                raise ValueError(
                    "loading from a state dict needs config=..., e.g. PriorConfig.kandinsky2_2() or the "
                    "checkpoint's prior/config.json as a dict: 32 heads × 64 and 16 × 128 give the same shapes"
                )
            state_dict = model_or_state_dict
        else:
            raise TypeError(f"expected a diffusers PriorTransformer or a state dict, got "
                            f"{type(model_or_state_dict).__name__}")
        if not isinstance(config, PriorConfig):
            config = PriorConfig.from_diffusers_config(config)

        pairs = diffusers_key_map(config)
        with torch.device("meta"):  # no memory yet: the checkpoint's tensors are adopted below
            model = cls(config)
        expected = model.state_dict()
        known = {hf for _, hf in pairs}
        missing = [hf for _, hf in pairs if hf not in state_dict]
        unexpected = [k for k in state_dict if k not in known]
        mismatched = [
            f"{hf}: checkpoint {tuple(state_dict[hf].shape)} vs kandlab {tuple(expected[ours].shape)}"
            for ours, hf in pairs
            if hf in state_dict and tuple(state_dict[hf].shape) != tuple(expected[ours].shape)
        ]
        if missing or unexpected or mismatched:
            raise ValueError(_load_report(config, missing, unexpected, mismatched))
        # detach(): clip_mean / clip_std are nn.Parameters in diffusers; assigning a Parameter would
        # turn our buffers into parameters. assign=True adopts the tensors as they are.
        model.load_state_dict({ours: state_dict[hf].detach() for ours, hf in pairs}, strict=True, assign=True)
        return model

    def to_diffusers_state_dict(self) -> dict[str, Tensor]:
        """The weights under diffusers ``PriorTransformer`` keys (``load_state_dict(..., strict=True)`` fits)."""
        ours = self.state_dict()
        return {hf: ours[k] for k, hf in diffusers_key_map(self.config)}


def diffusers_key_map(config: PriorConfig) -> list[tuple[str, str]]:
    """Pairs ``(kandlab key, diffusers key)`` for every tensor of the state dict.

    The top level keeps diffusers' names; inside a block diffusers calls the two norms
    ``norm1`` and ``norm3`` (``norm2`` belongs to a cross-attention the prior does not have),
    the attention ``attn1.to_q/to_k/to_v/to_out.0`` and the MLP ``ff.net.0.proj`` / ``ff.net.2``.
    """
    def linear(ours: str, theirs: str) -> list[tuple[str, str]]:
        return [(f"{ours}.weight", f"{theirs}.weight"), (f"{ours}.bias", f"{theirs}.bias")]

    pairs = linear("time_embedding.linear_1", "time_embedding.linear_1")
    pairs += linear("time_embedding.linear_2", "time_embedding.linear_2")
    pairs += linear("proj_in", "proj_in")
    if config.embedding_proj_norm_type:
        pairs += linear("embedding_proj_norm", "embedding_proj_norm")
    pairs += linear("embedding_proj", "embedding_proj")
    pairs += linear("encoder_hidden_states_proj", "encoder_hidden_states_proj")
    pairs += [("positional_embedding", "positional_embedding"), ("prd_embedding", "prd_embedding")]
    if config.norm_in_type:
        pairs += linear("norm_in", "norm_in")
    for i in range(config.num_layers):
        ours, theirs = f"blocks.{i}", f"transformer_blocks.{i}"
        pairs += linear(f"{ours}.attn_norm", f"{theirs}.norm1")
        for name, hf in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("out", "to_out.0")):
            pairs += linear(f"{ours}.attn.{name}", f"{theirs}.attn1.{hf}")
        pairs += linear(f"{ours}.ff_norm", f"{theirs}.norm3")
        pairs += linear(f"{ours}.ff.fc_in", f"{theirs}.ff.net.0.proj")
        pairs += linear(f"{ours}.ff.fc_out", f"{theirs}.ff.net.2")
    pairs += linear("norm_out", "norm_out")
    pairs += linear("proj_to_clip_embeddings", "proj_to_clip_embeddings")
    pairs += [("clip_mean", "clip_mean"), ("clip_std", "clip_std")]
    return pairs


def _load_report(config: PriorConfig, missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    def listing(title: str, items: list[str]) -> str:
        shown = "\n    ".join(items[:10]) + (f"\n    … and {len(items) - 10} more" if len(items) > 10 else "")
        return f"\n  {title} ({len(items)}):\n    {shown}"

    text = f"the checkpoint does not fit this PriorTransformer config {config!r}:"
    if missing:
        text += listing("missing keys", missing)
    if unexpected:
        text += listing("unexpected keys", unexpected)
    if mismatched:
        text += listing("shape mismatches", mismatched)
    return text + (
        "\n  Check num_layers, embedding_dim, num_embeddings, num_attention_heads · attention_head_dim and the"
        " norm_in_type / embedding_proj_norm_type options against the checkpoint's config.json."
    )


# ---------------------------------------------------------------------------
# 6. The sampler


def guided_x0(x0_uncond: Tensor, x0_text: Tensor, scale: float) -> Tensor:
    r"""Classifier-free guidance on x̂₀: :math:`\hat x_0 = u + g\,(c - u)` (Ho & Salimans 2022, eq. 6).

    At a fixed x_t, x̂₀ is an affine function of ε̂ (DDPM eq. 15) and the weights (1 − g, g) sum
    to 1, so guiding x̂₀ is the same as guiding ε̂. Kandinsky 2.2's prior uses g = 4.
    """
    if x0_uncond.shape != x0_text.shape:
        raise ValueError(f"x0_uncond {tuple(x0_uncond.shape)} and x0_text {tuple(x0_text.shape)} must match")
    return x0_uncond + scale * (x0_text - x0_uncond)


def prior_model_fn(
    prior: PriorTransformer, proj_embedding: Tensor, encoder_hidden_states: Tensor, attention_mask: Tensor | None
) -> ModelFn:
    """Bind the prompt(s) to the prior: ``model_fn(x_t, t) -> x̂₀`` for :meth:`UnCLIPSampler.sample`.

    For guidance, stack the rows as diffusers does: the unconditional ("" prompt) rows first,
    then the text rows, so that the conditioning has 2B rows for a batch of B samples.
    """
    def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
        return prior(x_t, t, proj_embedding, encoder_hidden_states, attention_mask)

    return model_fn


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved (diffusers' ``randn_tensor``)."""
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


class UnCLIPSampler:
    r"""The prior's ancestral sampler: diffusers' ``UnCLIPScheduler`` with Kandinsky's settings.

    - cosine βs over T = 1000 steps (Nichol & Dhariwal 2021, eq. 17; ``squaredcos_cap_v2``);
    - the model predicts x₀ (``prediction_type="sample"``), clipped to ±``clip_sample_range``;
    - each step samples the DDPM posterior :math:`q(x_{t'} \mid x_t, \hat x_0)` (Ho et al. 2020,
      eq. 6-7) with the *effective* β of the jump t → t′ and its variance β̃ (``fixed_small_log``);
    - ``timesteps(N)`` spaces N steps by (T − 1)/(N − 1) and rounds: 999, 957, …, 42, 0 for N = 25.

    ᾱ is the float32 cumulative product of the float32 βs, and every step does its arithmetic in
    float32 in the scheduler's order. That departs from kandlab's "float64 once" habit on purpose:
    the last step multiplies x̂₀ by β₀/(1 − ᾱ₀) = 0.99947 (not 1, because 1 − β₀ rounds in float32),
    and the prior is matched to the published pipeline, float32 rounding included.
    """

    def __init__(self, num_train_timesteps: int = 1000, clip_sample_range: float | None = 10.0):
        T = num_train_timesteps
        if isinstance(T, bool) or not isinstance(T, int) or T < 2:
            raise ValueError(f"num_train_timesteps must be an int ≥ 2, got {T!r}; the prior uses 1000")
        if clip_sample_range is not None and not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0 or None (no clipping), got {clip_sample_range}")
        self.num_train_timesteps = num_train_timesteps
        self.clip_sample_range = clip_sample_range
        self.betas = cosine_betas(num_train_timesteps)  # (T,) float32, bitwise diffusers' betas_for_alpha_bar
        self.alphas = 1.0 - self.betas  # (T,)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,) ᾱ_t, float32 on purpose (see above)

    def timesteps(self, num_steps: int) -> list[int]:
        """The N visited timesteps, decreasing: round(i · (T − 1)/(N − 1)) for i = N − 1 … 0."""
        T = self.num_train_timesteps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int):
            raise TypeError(f"steps must be an int, got {type(num_steps).__name__}; Kandinsky 2.2 uses 25")
        if not (2 <= num_steps <= T):
            raise ValueError(
                f"steps={num_steps}: the unCLIP spacing (T − 1)/(steps − 1) needs 2 ≤ steps ≤ {T} "
                "(one step would divide by zero); Kandinsky 2.2 uses 25"
            )
        ratio = (T - 1) / (num_steps - 1)
        return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64).tolist()  # numpy, as diffusers

    def step(
        self,
        x0_hat: Tensor,
        t: int,
        x_t: Tensor,
        t_prev: int | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        r"""One reverse step x_t -> x_{t'} from the model's x̂₀ (B, D); ``t_prev`` defaults to t − 1.

        With :math:`\bar\alpha' = \bar\alpha_{t'}` (1 for t′ = −1) and the effective step
        :math:`\beta = 1 - \bar\alpha_t/\bar\alpha'` (the stored β_t when t′ = t − 1):

        .. math::

            \tilde\mu = \frac{\sqrt{\bar\alpha'}\,\beta}{1-\bar\alpha_t}\,\hat x_0
                      + \frac{\sqrt{1-\beta}\,(1-\bar\alpha')}{1-\bar\alpha_t}\,x_t, \qquad
            \tilde\beta = \frac{1-\bar\alpha'}{1-\bar\alpha_t}\,\beta \quad\text{(DDPM eq. 7)}

        and :math:`x_{t'} = \tilde\mu + \sqrt{\tilde\beta}\,z` for t > 0 (no noise at t = 0), z =
        ``noise`` or drawn from ``generator``.
        """
        T = self.num_train_timesteps
        t, t_prev = int(t), (int(t) - 1 if t_prev is None else int(t_prev))
        if not (0 <= t < T) or not (-1 <= t_prev < t):
            raise ValueError(f"need 0 ≤ t < {T} and −1 ≤ t_prev < t, got t={t}, t_prev={t_prev}")
        if x0_hat.shape != x_t.shape or (noise is not None and noise.shape != x_t.shape):
            raise ValueError(f"x0_hat {tuple(x0_hat.shape)} (and noise) must have the shape of x_t {tuple(x_t.shape)}")
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0)
        if t_prev == t - 1:
            beta, alpha = self.betas[t], self.alphas[t]
        else:
            beta = 1 - alpha_bar_t / alpha_bar_prev  # the β of the whole jump t -> t'
            alpha = 1 - beta
        if self.clip_sample_range is not None:
            x0_hat = x0_hat.clamp(-self.clip_sample_range, self.clip_sample_range)
        coef_x0 = (alpha_bar_prev**0.5 * beta) / (1 - alpha_bar_t)  # DDPM eq. 7
        coef_xt = alpha**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
        mean = coef_x0.to(x_t.device) * x0_hat + coef_xt.to(x_t.device) * x_t  # (B, D)
        if t == 0:
            return StepOutput(mean, x0_hat)
        if noise is None:
            noise = _randn(tuple(x_t.shape), generator, x_t.device, x0_hat.dtype)
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta  # β̃
        std = torch.exp(0.5 * torch.log(variance.clamp(min=1e-20)))  # "fixed_small_log": via log β̃, clamped
        return StepOutput(mean + std.to(x_t.device) * noise, x0_hat)

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, int],
        steps: int = 25,
        generator: torch.Generator | None = None,
        guidance_scale: float | None = None,
        x_T: Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        progress: bool = False,
        return_trajectory: bool = False,
    ) -> Tensor | list[TrajectoryStep]:
        """Sample normalised image embeddings of ``shape`` = (B, D) from x_T ~ N(0, I).

        ``model_fn(x_t, t) -> x̂₀`` with t a LongTensor. With ``guidance_scale`` set it is called
        once per step on the doubled batch ``cat([x_t, x_t])`` (2B rows: unconditional first, then
        text, as in diffusers) and the halves are combined by :func:`guided_x0`. Noise comes from
        ``generator`` in diffusers' order: x_T (unless given), then one draw per step with t > 0.
        Map the result to CLIP's scale with ``prior.post_process_latents``.

        Returns (B, D), or with ``return_trajectory`` a list of ``TrajectoryStep(t, x_t, x̂₀)``
        (on the CPU) plus a last entry ``(-1, x_0, x_0)``.
        """
        timesteps = self.timesteps(steps)
        shape = tuple(shape)
        if len(shape) != 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
            raise ValueError(f"shape={shape} must be (batch, embedding_dim), e.g. (4, 1280)")
        if guidance_scale is not None and not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale={guidance_scale} must be a finite number (Kandinsky 2.2 uses 4.0)")
        if device is None:
            device = x_T.device if x_T is not None else torch.device("cpu")
        device = torch.device(device)
        if x_T is None:
            x = _randn(shape, generator, device, dtype)  # x_T ~ N(0, I); init_noise_sigma = 1
        elif tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
        else:
            x = x_T.to(device=device, dtype=dtype)
        B = shape[0]
        rows = B if guidance_scale is None else 2 * B
        trajectory: list[TrajectoryStep] = []
        for i, t in enumerate(tqdm(timesteps, desc="prior sampling", disable=not progress)):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else t - 1  # the last step goes to −1
            t_batch = torch.full((rows,), t, dtype=torch.long, device=device)
            model_in = x if guidance_scale is None else torch.cat([x, x])  # (rows, D)
            out = model_fn(model_in, t_batch)
            if not isinstance(out, Tensor) or tuple(out.shape) != (rows, shape[1]):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                why = " ([unconditional; text] rows, since guidance_scale is set)" if guidance_scale is not None else ""
                raise ValueError(f"model_fn must return x̂₀ of shape ({rows}, {shape[1]}){why}, got {got}")
            if guidance_scale is not None:
                x0_uncond, x0_text = out.chunk(2)  # (B, D) each
                out = guided_x0(x0_uncond, x0_text, guidance_scale)
            step = self.step(out, t, x, t_prev, generator=generator)
            if return_trajectory:
                trajectory.append(TrajectoryStep(t, x.detach().cpu(), step.x0_hat.detach().cpu()))
            x = step.x_prev
        if return_trajectory:
            trajectory.append(TrajectoryStep(-1, x.detach().cpu(), x.detach().cpu()))
            return trajectory
        return x
