r"""CLIP, from scratch: a text tower and an image tower (ViT) trained to agree.

CLIP (Radford et al., 2021, "Learning Transferable Visual Models From Natural Language
Supervision") embeds a caption and an image into the same space and learns, from a batch of
N matching pairs, which of the N × N pairings are the true ones (§2.3, Figure 3). Kandinsky 2.1
and 2.2 read the prompt with CLIP's text tower and draw with CLIP *image* embeddings: the unCLIP
prior (``kandlab.prior``) turns the first into the second, the decoder paints from the second.
The tiny towers of lesson 08 and the 2.5 B-parameter OpenCLIP ViT-bigG/14 of Kandinsky 2.2 are
the same classes with different configs.

Read top to bottom:

1. ``CLIPTextConfig``, ``CLIPVisionConfig`` — field names as ``transformers``' configs; presets
2. ``quick_gelu``                   — CLIP's sigmoid approximation of GELU
3. ``Attention``, ``MLP``, ``EncoderLayer`` — the pre-LN transformer layer both towers share
4. ``causal_padding_mask``          — the text tower's mask: no looking ahead, no looking at padding
5. ``eos_positions``                — which token's state is the pooled text (transformers' rule)
6. ``CLIPTextTower``                — tokens + positions → causal encoder → state at EOS → projection
7. ``CLIPImageTower``               — patches + class token + positions → encoder → class token → projection
8. ``clip_logits``, ``contrastive_loss`` — cosine similarities × temperature; symmetric InfoNCE
9. ``CLIP``                         — both towers and the learned temperature
10. key maps to and from ``transformers`` (``CLIPTextModelWithProjection``,
    ``CLIPVisionModelWithProjection``, ``CLIPModel``) and the loader they share

The production twins are in ``transformers.models.clip``; ``tests/test_clip.py`` checks both give
the same numbers for the same weights. Dropout is left out (CLIP was trained without it;
transformers' ``attention_dropout`` defaults to 0).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CLIPTextConfig",
    "CLIPVisionConfig",
    "CLIPTextTower",
    "CLIPImageTower",
    "CLIP",
    "quick_gelu",
    "causal_padding_mask",
    "eos_positions",
    "clip_logits",
    "contrastive_loss",
    "text_key_map",
    "vision_key_map",
    "clip_key_map",
]

HiddenAct = Literal["quick_gelu", "gelu"]
HIDDEN_ACTS: tuple[str, ...] = ("quick_gelu", "gelu")
LEGACY_EOS_TOKEN_ID = 2  # configs written before transformers PR #24773 say 2; the pooled token is then argmax(ids)
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # Radford et al. §2.5: temperature τ initialised to 0.07, learned as log(1/τ)


# ---------------------------------------------------------------------------
# 1. Configs


def _check_layer_shape(config: CLIPTextConfig | CLIPVisionConfig) -> None:
    """Checks shared by both configs: positive sizes, whole heads, a known activation."""
    for name in ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(config, name)}")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size {config.hidden_size} is not divisible by num_attention_heads {config.num_attention_heads}; "
            "every head gets hidden_size / num_attention_heads channels"
        )
    if config.hidden_act not in HIDDEN_ACTS:
        raise ValueError(f"hidden_act must be one of {HIDDEN_ACTS}, got {config.hidden_act!r}")


@dataclass
class CLIPTextConfig:
    """Shape of a CLIP text tower. Field names and defaults follow ``transformers.CLIPTextConfig``
    (OpenAI's ViT-B/32 text tower)."""

    vocab_size: int = 49408  # CLIP's byte-level BPE: 49 152 merges + 256 bytes + start/end
    hidden_size: int = 512  # width of the residual stream
    intermediate_size: int = 2048  # hidden width of the MLP (4 × hidden_size in every published tower)
    projection_dim: int = 512  # width of the joint image-text space
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77  # CLIP's context length: prompts are padded or truncated to 77 tokens
    hidden_act: HiddenAct = "quick_gelu"  # OpenAI's towers; OpenCLIP's (ViT-bigG) use exact "gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1  # only for the tokenizer: the attention_mask, not this id, hides padding
    bos_token_id: int | None = 49406  # <|startoftext|>
    eos_token_id: int = 49407  # <|endoftext|>; its hidden state is the pooled text (see eos_positions)

    def __post_init__(self) -> None:
        _check_layer_shape(self)
        for name in ("vocab_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ValueError(f"eos_token_id must be one int, got {self.eos_token_id!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # -- presets ---------------------------------------------------------------

    @classmethod
    def vit_bigg_14(cls) -> CLIPTextConfig:
        """OpenCLIP ViT-bigG/14 (laion2B), Kandinsky 2.2's text encoder: 32 × 1280, 20 heads; 694.7 M values.

        ``eos_token_id=2`` is the legacy value that the converted checkpoints carry (the published
        ``kandinsky-2-2-prior`` text encoder included): the pooled token is then ``argmax(input_ids)``,
        which is the end token because 49407 is the largest id in CLIP's vocabulary.
        """
        return cls(hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
                   num_attention_heads=20, hidden_act="gelu", bos_token_id=0, eos_token_id=LEGACY_EOS_TOKEN_ID)

    @classmethod
    def vit_l_14(cls) -> CLIPTextConfig:
        """OpenAI CLIP ViT-L/14, Kandinsky 2.1's text tower: 12 × 768, 12 heads; 123.7 M values."""
        return cls(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                   num_attention_heads=12, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=LEGACY_EOS_TOKEN_ID)

    @classmethod
    def tiny(cls, vocab_size: int = 64, max_position_embeddings: int = 16) -> CLIPTextConfig:
        """A CPU-sized text tower for the shapes captions.

        ``vocab_size`` and ``max_position_embeddings`` come from the tokenizer
        (``ShapesTokenizer.vocab_size`` and its ``max_length``); pad = 0 and end = 1 are its ids.
        """
        return cls(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, projection_dim=64,
                   num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_position_embeddings,
                   hidden_act="gelu", pad_token_id=0, bos_token_id=None, eos_token_id=1)

    @classmethod
    def from_transformers_config(cls, hf_config: Any) -> CLIPTextConfig:
        """Read a ``transformers.CLIPTextConfig``, or the text half of a ``CLIPConfig``.

        A ``CLIPModel`` projects with the *top-level* ``projection_dim``; that one wins.
        """
        projection_dim = None
        if hasattr(hf_config, "text_config"):  # a CLIPConfig
            projection_dim = hf_config.projection_dim
            hf_config = hf_config.text_config
        eos = hf_config.eos_token_id
        if isinstance(eos, (list, tuple)):
            if len(eos) != 1:
                raise ValueError(f"eos_token_id={eos!r}: the CLIP text tower pools at one end token; pick one id")
            eos = eos[0]
        if eos is None:
            raise ValueError("eos_token_id is None: the CLIP text tower needs it to find the pooled token")
        _check_act(hf_config.hidden_act)
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            projection_dim=projection_dim or hf_config.projection_dim or hf_config.hidden_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=hf_config.num_attention_heads,
            max_position_embeddings=hf_config.max_position_embeddings,
            hidden_act=hf_config.hidden_act,
            layer_norm_eps=hf_config.layer_norm_eps if hf_config.layer_norm_eps is not None else 1e-5,
            pad_token_id=hf_config.pad_token_id,
            bos_token_id=hf_config.bos_token_id,
            eos_token_id=int(eos),
        )


@dataclass
class CLIPVisionConfig:
    """Shape of a CLIP image tower (a ViT). Field names and defaults follow
    ``transformers.CLIPVisionConfig`` (OpenAI's ViT-B/32)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224  # square images only; CLIP's preprocessing resizes and centre-crops to this
    patch_size: int = 32  # ViT-B/32: 7 × 7 patches of 32 px; ViT-L/14 and bigG/14: 16 × 16 of 14 px
    hidden_act: HiddenAct = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_layer_shape(self)
        for name in ("num_channels", "image_size", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            fit = self.image_size // self.patch_size * self.patch_size
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}: the last "
                f"{self.image_size - fit} pixels of each row would belong to no patch; "
                f"use image_size={fit or self.patch_size}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per side: ``image_size / patch_size``."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Tokens in the sequence: one per patch plus the class token."""
        return self.grid_size**2 + 1

    # -- presets ---------------------------------------------------------------

    @classmethod
    def vit_bigg_14(cls) -> CLIPVisionConfig:
        """OpenCLIP ViT-bigG/14, Kandinsky 2.2's image encoder: 48 × 1664, 16 heads, 14-px patches; 1.84 B values."""
        return cls(hidden_size=1664, intermediate_size=8192, projection_dim=1280, num_hidden_layers=48,
                   num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu")

    @classmethod
    def vit_l_14(cls) -> CLIPVisionConfig:
        """OpenAI CLIP ViT-L/14, Kandinsky 2.1's image encoder: 24 × 1024, 16 heads, 14-px patches; 304.0 M values."""
        return cls(hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24,
                   num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu")

    @classmethod
    def tiny(cls, image_size: int = 32, num_channels: int = 3) -> CLIPVisionConfig:
        """A CPU-sized ViT for the shapes images: 8 × 8 patches of 4 px, 2 layers of 64."""
        return cls(hidden_size=64, intermediate_size=256, projection_dim=64, num_hidden_layers=2,
                   num_attention_heads=4, num_channels=num_channels, image_size=image_size, patch_size=4,
                   hidden_act="gelu")

    @classmethod
    def from_transformers_config(cls, hf_config: Any) -> CLIPVisionConfig:
        """Read a ``transformers.CLIPVisionConfig``, or the vision half of a ``CLIPConfig``."""
        projection_dim = None
        if hasattr(hf_config, "vision_config"):  # a CLIPConfig
            projection_dim = hf_config.projection_dim
            hf_config = hf_config.vision_config
        image_size = _square(hf_config.image_size, "image_size")
        patch_size = _square(hf_config.patch_size, "patch_size")
        _check_act(hf_config.hidden_act)
        return cls(
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            projection_dim=projection_dim or hf_config.projection_dim,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=hf_config.num_attention_heads,
            num_channels=hf_config.num_channels,
            image_size=image_size,
            patch_size=patch_size,
            hidden_act=hf_config.hidden_act,
            layer_norm_eps=hf_config.layer_norm_eps,
        )


def _check_act(hidden_act: Any) -> None:
    if hidden_act not in HIDDEN_ACTS:
        raise ValueError(f"hidden_act={hidden_act!r} is not supported; kandlab's CLIP has {HIDDEN_ACTS}")


def _square(size: Any, name: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"{name}={size!r}: kandlab's CLIP image tower takes square images and patches only")
        size = size[0]
    return int(size)


# ---------------------------------------------------------------------------
# 2. Activation


def quick_gelu(x: Tensor) -> Tensor:
    r"""CLIP's GELU: :math:`x\,\sigma(1.702\,x)` (Hendrycks & Gimpel, 2016, §2, the sigmoid approximation).

    OpenAI trained with it, so their weights need it; OpenCLIP's larger towers use the exact GELU.
    """
    return x * torch.sigmoid(1.702 * x)


# ---------------------------------------------------------------------------
# 3. The transformer layer both towers share


class Attention(nn.Module):
    r"""Multi-head self-attention with biases: :math:`\mathrm{softmax}(QK^\top/\sqrt{d} + M)\,V`.

    :math:`M` is 0 where a query may look and a very negative number where it may not (the text
    tower's causal and padding mask); the image tower passes no mask.
    """

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        D = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, L, D); mask: additive, (B, 1, L, L) or None."""
        B, L, D = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, L, d)
        k = self.k_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, L, d)
        v = self.v_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, L, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, L, d); scale 1/√d
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class MLP(nn.Module):
    """Position-wise ``fc2(act(fc1(x)))``, with biases; ``act`` is quick GELU or exact GELU."""

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.quick = config.hidden_act == "quick_gelu"
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:  # (B, L, D) -> (B, L, D)
        h = self.fc1(x)  # (B, L, intermediate)
        h = quick_gelu(h) if self.quick else F.gelu(h)
        return self.fc2(h)


class EncoderLayer(nn.Module):
    """Pre-LN residual layer (as GPT-2): ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # (B, L, D) -> (B, L, D)
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


def _init_encoder(layers: nn.ModuleList, width: int) -> None:
    """OpenAI CLIP's initialisation (``model.py``, ``initialize_parameters``): deeper stacks start smaller.

    OpenAI applies it to the text transformer and leaves the ViT's layers at PyTorch's defaults;
    kandlab uses it for both towers, so that both start the same way. Loaded weights replace it.
    """
    depth = len(layers)
    attn_std = width**-0.5  # the output projections
    proj_std = width**-0.5 * (2 * depth) ** -0.5  # q, k, v and the MLP's output, scaled for the residual sum
    fc_std = (2 * width) ** -0.5
    for layer in layers:
        for linear, std in ((layer.self_attn.q_proj, proj_std), (layer.self_attn.k_proj, proj_std),
                            (layer.self_attn.v_proj, proj_std), (layer.self_attn.out_proj, attn_std),
                            (layer.mlp.fc1, fc_std), (layer.mlp.fc2, proj_std)):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)


# ---------------------------------------------------------------------------
# 4. The text tower's mask


def causal_padding_mask(attention_mask: Tensor | None, length: int, dtype: torch.dtype,
                        device: torch.device | str | None = None) -> Tensor:
    r"""Additive mask ``(B or 1, 1, L, L)``: query :math:`i` may look at key :math:`j` iff :math:`j \le i`
    (CLIP's text tower is causal, like GPT-2 — Radford et al. §2.4) and token :math:`j` is not padding.

    Allowed pairs get 0, the others the dtype's most negative number (not −∞, so a row with nothing
    to look at — a padded query before every real token — still gives a finite average).
    """
    pos = torch.arange(length, device=device)
    allowed = (pos[None, :] <= pos[:, None])[None, None]  # (1, 1, L, L): key ≤ query
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device).bool()[:, None, None, :]  # (B, 1, L, L): real keys
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


# ---------------------------------------------------------------------------
# 5. The pooled token


def eos_positions(input_ids: Tensor, eos_token_id: int) -> Tensor:
    """Index of the token whose final state is the pooled text: ``(B, L) -> (B,)`` long.

    CLIP pools at the end-of-text token (Radford et al. §2.4: "the activations of the highest layer
    of the transformer at the [EOS] token are treated as the feature representation of the text").
    ``transformers`` finds it in one of two ways, and so does kandlab:

    - ``eos_token_id == 2`` (configs written before transformers PR #24773, OpenAI's and LAION's
      among them): the position of the **largest id** in the row — right, because
      ``<|endoftext|>`` = 49407 is the last id of CLIP's vocabulary, and wrong for a tokenizer
      with tokens added after it;
    - any other id: the **first** position holding ``eos_token_id`` (padding may use the same id).
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return input_ids.argmax(dim=-1)  # the first maximum, as torch.argmax promises
    return (input_ids == eos_token_id).int().argmax(dim=-1)  # first True; 0 if there is none


# ---------------------------------------------------------------------------
# 6. Text tower


class CLIPTextTower(nn.Module):
    """Token ids → ``(last_hidden_state (B, L, D), text_embeds (B, projection_dim))``.

    Token embedding + learned absolute positions → causal pre-LN encoder → final LayerNorm; the
    state at the end token, projected without bias, is the text's embedding in the joint space.
    Twin: ``transformers.CLIPTextModelWithProjection``.
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.token_embedding = nn.Embedding(config.vocab_size, D)
        self.position_embedding = nn.Parameter(torch.empty(config.max_position_embeddings, D))  # (P, D)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.text_projection = nn.Linear(D, config.projection_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)
        _init_encoder(self.layers, D)
        nn.init.normal_(self.text_projection.weight, std=D**-0.5)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """input_ids: (B, L) long, L ≤ max_position_embeddings, each row holding the end token;
        attention_mask: (B, L), 1 = real token, 0 = padding (right padding, as CLIP's tokenizer does).

        Returns ``last_hidden_state`` (B, L, D) and ``text_embeds`` (B, projection_dim). Padded
        positions get finite but meaningless states; hand the same mask to whatever reads them.
        """
        self._check_inputs(input_ids, attention_mask)
        B, L = input_ids.shape
        x = self.token_embedding(input_ids) + self.position_embedding[:L]  # (B, L, D)
        mask = causal_padding_mask(attention_mask, L, x.dtype, x.device)  # (B or 1, 1, L, L)
        for layer in self.layers:
            x = layer(x, mask)
        x = self.final_layer_norm(x)  # (B, L, D)
        pooled = x[torch.arange(B, device=x.device), eos_positions(input_ids, self.config.eos_token_id).to(x.device)]
        return x, self.text_projection(pooled)  # (B, L, D), (B, P)

    def _check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None) -> None:
        c = self.config
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(
                f"input_ids must be a torch.LongTensor of shape (batch, length), got {type(input_ids).__name__}; "
                "use the tokenizer's output: tower(**tokenizer(prompts))"
            )
        if input_ids.ndim != 2:
            hint = " — add a batch dimension with input_ids[None]" if input_ids.ndim == 1 else ""
            raise ValueError(f"input_ids must be 2-D (batch, length), got shape {tuple(input_ids.shape)}{hint}")
        if input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be token ids of dtype torch.long, got {input_ids.dtype}; "
                             "convert with input_ids.long()")
        L = input_ids.shape[1]
        if L == 0:
            raise ValueError("input_ids has length 0; every prompt needs at least its end-of-text token")
        if L > c.max_position_embeddings:
            raise ValueError(
                f"input_ids has {L} tokens but this text tower has positions for {c.max_position_embeddings}; "
                f"truncate the prompts, e.g. tokenizer(prompts, padding='max_length', truncation=True, "
                f"max_length={c.max_position_embeddings})"
            )
        checkable = input_ids.device.type != "meta" and input_ids.numel() > 0
        if checkable:
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if hi >= c.vocab_size or lo < 0:
                bad = hi if hi >= c.vocab_size else lo
                raise ValueError(
                    f"token id {bad} is outside the vocabulary of {c.vocab_size} tokens (valid ids: "
                    f"0..{c.vocab_size - 1}); was the tower built with the tokenizer's vocab_size, e.g. "
                    "CLIPTextConfig.tiny(vocab_size=tokenizer.vocab_size)?"
                )
            if c.eos_token_id != LEGACY_EOS_TOKEN_ID:
                lacking = (~(input_ids == c.eos_token_id).any(dim=1)).nonzero().flatten().tolist()
                if lacking:
                    raise ValueError(
                        f"rows {lacking} of input_ids hold no end token (eos_token_id={c.eos_token_id}); CLIP pools "
                        "the text at that token, so every prompt must keep it — let the tokenizer add it, and "
                        "truncate with the tokenizer rather than by slicing the ids"
                    )
        if attention_mask is None:
            return
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                             f"{tuple(input_ids.shape)} (one 1/0 per token)")
        if checkable and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must contain only 1 (real token) and 0 (padding)")

    # -- weights from / to transformers ------------------------------------------

    @classmethod
    def from_transformers(cls, model_or_state_dict: nn.Module | Mapping[str, Tensor],
                          config: CLIPTextConfig | None = None) -> CLIPTextTower:
        """A text tower holding the weights of a ``transformers.CLIPTextModelWithProjection``.

        Also takes a ``CLIPModel`` (its image half is skipped) or a state dict with those keys plus
        ``config`` (GELU and quick GELU weights look alike). The tower *shares* the given tensors:
        no copy, same device and dtype.
        """
        model, state_dict, config = _unpack(cls, model_or_state_dict, config, CLIPTextConfig,
                                            "CLIPTextConfig.vit_bigg_14()")
        _load(model, state_dict, text_key_map(config), _TEXT_IGNORED, _TEXT_HINT)
        return model

    def to_transformers_state_dict(self) -> dict[str, Tensor]:
        """The weights under ``CLIPTextModelWithProjection`` keys."""
        ours = self.state_dict()
        return {hf: ours[k] for k, hf in text_key_map(self.config)}


# ---------------------------------------------------------------------------
# 7. Image tower


class CLIPImageTower(nn.Module):
    """Images → ``(last_hidden_state (B, 1 + N, D), image_embeds (B, projection_dim))``, N = (S / p)².

    A ViT (Dosovitskiy et al., 2021, eq. 1–4): cut the image into p × p patches and embed each
    linearly (a stride-p convolution without bias), prepend a learned class token, add learned
    positions, then — CLIP's one change (Radford et al. §2.4) — a LayerNorm *before* the encoder
    (``pre_layrnorm``, transformers' spelling). The class token's final state, layer-normed
    (``post_layernorm``) and projected without bias, is the image's embedding in the joint space.
    ``last_hidden_state`` is the encoder's output *before* ``post_layernorm``, as in transformers.
    Twin: ``transformers.CLIPVisionModelWithProjection``.
    """

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        D, p = config.hidden_size, config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, D, kernel_size=p, stride=p, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(D))  # (D,)
        self.position_embedding = nn.Parameter(torch.empty(config.num_positions, D))  # (1 + N, D)
        self.pre_layrnorm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.visual_projection = nn.Linear(D, config.projection_dim, bias=False)
        scale = D**-0.5  # OpenAI's VisionTransformer: class token, positions and projection ~ N(0, 1/D)
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.position_embedding, std=scale)
        _init_encoder(self.layers, D)
        nn.init.normal_(self.visual_projection.weight, std=scale)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """pixel_values: (B, C, S, S) float, normalised as CLIP's image processor does.

        Returns ``last_hidden_state`` (B, 1 + N, D) and ``image_embeds`` (B, projection_dim).
        """
        self._check_inputs(pixel_values)
        B = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, S/p, S/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, D), row by row
        cls_token = self.class_embedding.expand(B, 1, -1)  # (B, 1, D)
        x = torch.cat([cls_token, patches], dim=1) + self.position_embedding  # (B, 1 + N, D)
        x = self.pre_layrnorm(x)
        for layer in self.layers:
            x = layer(x)
        pooled = self.post_layernorm(x[:, 0])  # (B, D): the class token
        return x, self.visual_projection(pooled)  # (B, 1 + N, D), (B, P)

    def _check_inputs(self, pixel_values: Tensor) -> None:
        c = self.config
        want = f"(batch, {c.num_channels}, {c.image_size}, {c.image_size})"
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a float tensor {want}, got {type(pixel_values).__name__}")
        if pixel_values.ndim != 4:
            hint = " — add a batch dimension with pixel_values[None]" if pixel_values.ndim == 3 else ""
            raise ValueError(f"pixel_values must be 4-D {want}, got shape {tuple(pixel_values.shape)}{hint}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floats (normalised pixels), got {pixel_values.dtype}; "
                             "uint8 images need .float() / 255 and CLIP's mean/std normalisation first")
        _, C, H, W = pixel_values.shape
        if C != c.num_channels:
            hint = " (a grey image? repeat it: x.expand(-1, 3, -1, -1))" if C == 1 and c.num_channels == 3 else ""
            raise ValueError(f"pixel_values has {C} channels but this tower takes {c.num_channels}: pass {want}"
                             f"{hint}; channels come second (B, C, H, W), not last")
        if H != c.image_size or W != c.image_size:
            raise ValueError(
                f"pixel_values are {H} × {W} but this tower was built for {c.image_size} × {c.image_size} (its "
                f"learned positions are one per patch of that grid); resize first, e.g. "
                f"F.interpolate(x, size={c.image_size}, mode='bicubic', antialias=True), or centre-crop"
            )

    # -- weights from / to transformers ------------------------------------------

    @classmethod
    def from_transformers(cls, model_or_state_dict: nn.Module | Mapping[str, Tensor],
                          config: CLIPVisionConfig | None = None) -> CLIPImageTower:
        """An image tower holding the weights of a ``transformers.CLIPVisionModelWithProjection``.

        Also takes a ``CLIPModel`` (its text half is skipped) or a state dict with those keys plus
        ``config``. The tower *shares* the given tensors: no copy, same device and dtype.
        """
        model, state_dict, config = _unpack(cls, model_or_state_dict, config, CLIPVisionConfig,
                                            "CLIPVisionConfig.vit_bigg_14()")
        _load(model, state_dict, vision_key_map(config), _VISION_IGNORED, _VISION_HINT)
        return model

    def to_transformers_state_dict(self) -> dict[str, Tensor]:
        """The weights under ``CLIPVisionModelWithProjection`` keys."""
        ours = self.state_dict()
        return {hf: ours[k] for k, hf in vision_key_map(self.config)}


# ---------------------------------------------------------------------------
# 8. The contrastive objective


def clip_logits(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor | float) -> Tensor:
    r"""Scaled cosine similarities, ``logits_per_image`` ``(N_img, N_txt)``:

    .. math::  \ell_{ij} = e^{s}\;\frac{I_i}{\lVert I_i\rVert} \cdot \frac{T_j}{\lVert T_j\rVert}

    with :math:`s` = ``logit_scale`` = :math:`\log(1/\tau)`. Transpose for ``logits_per_text``.
    """
    _check_embeds(image_embeds, text_embeds, same_batch=False)
    logit_scale = torch.as_tensor(logit_scale, dtype=image_embeds.dtype, device=image_embeds.device)
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must be one number (log of the inverse temperature), got shape "
                         f"{tuple(logit_scale.shape)}")
    image = F.normalize(image_embeds, dim=-1)  # (N_img, P), unit rows
    text = F.normalize(text_embeds, dim=-1)  # (N_txt, P)
    return logit_scale.exp().reshape(()) * image @ text.T  # (N_img, N_txt)


def contrastive_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor | float) -> Tensor:
    r"""CLIP's symmetric InfoNCE loss over a batch of N matching (image, text) pairs.

    Radford et al. (2021), Figure 3 (the numpy-like pseudocode) and §2.3: with the logits
    :math:`\ell_{ij}` of ``clip_logits`` (row i: image i against every text),

    .. math::

        \mathcal{L} = \frac{1}{2N} \sum_{i=1}^{N} \Big[
            -\log \frac{e^{\ell_{ii}}}{\sum_j e^{\ell_{ij}}}
            -\log \frac{e^{\ell_{ii}}}{\sum_j e^{\ell_{ji}}} \Big]

    — cross-entropy with label i for image i over the texts, plus the same for text i over the
    images, averaged. Pair i is the positive; the other N − 1 in the batch are the negatives
    (van den Oord et al., 2018, eq. 4). Equal to :math:`\log N` when every similarity is the same,
    near 0 when matching pairs are far more similar than the rest.

    The paper also clips the learned temperature so that :math:`e^s \le 100`; a training loop
    does that on the parameter (``logit_scale.data.clamp_(max=math.log(100))``), not here.
    """
    _check_embeds(image_embeds, text_embeds, same_batch=True)
    logits = clip_logits(image_embeds, text_embeds, logit_scale)  # (N, N): images × texts
    labels = torch.arange(logits.shape[0], device=logits.device)  # pair i is row i, column i
    loss_image = F.cross_entropy(logits, labels)  # each image picks its text
    loss_text = F.cross_entropy(logits.T, labels)  # each text picks its image
    return (loss_image + loss_text) / 2


def _check_embeds(image_embeds: Tensor, text_embeds: Tensor, same_batch: bool) -> None:
    for name, e in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        if not isinstance(e, torch.Tensor) or e.ndim != 2 or e.shape[0] == 0:
            shape = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
            raise ValueError(f"{name} must be a (batch ≥ 1, projection_dim) tensor, got {shape}")
    if image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(f"image_embeds are {image_embeds.shape[1]}-wide but text_embeds {text_embeds.shape[1]}-wide; "
                         "both towers must project into the same space (equal projection_dim)")
    if same_batch and image_embeds.shape[0] != text_embeds.shape[0]:
        raise ValueError(f"{image_embeds.shape[0]} images but {text_embeds.shape[0]} texts: the contrastive loss "
                         "needs matching pairs, row i of each being one (image, caption) pair")


# ---------------------------------------------------------------------------
# 9. CLIP


class CLIP(nn.Module):
    """Both towers and the learned temperature ``logit_scale`` = log(1/τ), initialised to log(1/0.07).

    ``clip(input_ids, pixel_values, attention_mask)`` returns ``(image_embeds, text_embeds)``;
    ``clip.loss(...)`` the contrastive loss of that batch. Twin: ``transformers.CLIPModel``.
    """

    def __init__(self, text_config: CLIPTextConfig, vision_config: CLIPVisionConfig,
                 logit_scale_init: float = LOGIT_SCALE_INIT):
        super().__init__()
        if text_config.projection_dim != vision_config.projection_dim:
            raise ValueError(
                f"text projection_dim {text_config.projection_dim} ≠ vision projection_dim "
                f"{vision_config.projection_dim}: both towers must project into the same joint space"
            )
        self.text_tower = CLIPTextTower(text_config)
        self.image_tower = CLIPImageTower(vision_config)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))

    @classmethod
    def tiny(cls, vocab_size: int = 64, max_position_embeddings: int = 16, image_size: int = 32) -> CLIP:
        """The lesson-08 CLIP for the shapes world (both towers' ``tiny`` presets)."""
        return cls(CLIPTextConfig.tiny(vocab_size, max_position_embeddings), CLIPVisionConfig.tiny(image_size))

    def forward(self, input_ids: Tensor, pixel_values: Tensor,
                attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, L) ids and (B, C, S, S) images → ``image_embeds`` (B_img, P), ``text_embeds`` (B_txt, P)."""
        _, image_embeds = self.image_tower(pixel_values)
        _, text_embeds = self.text_tower(input_ids, attention_mask)
        return image_embeds, text_embeds

    def logits(self, input_ids: Tensor, pixel_values: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``logits_per_image`` (B_img, B_txt): scaled cosine similarities (``clip_logits``)."""
        return clip_logits(*self(input_ids, pixel_values, attention_mask), self.logit_scale)

    def loss(self, input_ids: Tensor, pixel_values: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Symmetric InfoNCE over the batch; row i of the ids and of the images form pair i."""
        return contrastive_loss(*self(input_ids, pixel_values, attention_mask), self.logit_scale)

    @classmethod
    def from_transformers(cls, model_or_state_dict: nn.Module | Mapping[str, Tensor],
                          text_config: CLIPTextConfig | None = None,
                          vision_config: CLIPVisionConfig | None = None) -> CLIP:
        """A CLIP holding the weights of a ``transformers.CLIPModel`` (or its state dict plus both configs)."""
        if isinstance(model_or_state_dict, nn.Module):
            hf_config = model_or_state_dict.config
            text_config = text_config or CLIPTextConfig.from_transformers_config(hf_config)
            vision_config = vision_config or CLIPVisionConfig.from_transformers_config(hf_config)
            state_dict = model_or_state_dict.state_dict()
        elif isinstance(model_or_state_dict, Mapping):
            if text_config is None or vision_config is None:
                raise ValueError("loading CLIP from a state dict needs text_config=... and vision_config=..., e.g. "
                                 "CLIPTextConfig.from_transformers_config(hf_config) and the vision one likewise")
            state_dict = model_or_state_dict
        else:
            kind = type(model_or_state_dict).__name__
            raise TypeError(f"expected a transformers CLIPModel or a state dict, got {kind}")
        with torch.device("meta"):
            model = cls(text_config, vision_config)
        _load(model, state_dict, clip_key_map(text_config, vision_config), _TEXT_IGNORED + _VISION_IGNORED,
              _TEXT_HINT + _VISION_HINT)
        return model

    def to_transformers_state_dict(self) -> dict[str, Tensor]:
        """The weights under ``CLIPModel`` keys."""
        ours = self.state_dict()
        return {hf: ours[k] for k, hf in clip_key_map(self.text_tower.config, self.image_tower.config)}


# ---------------------------------------------------------------------------
# 10. Key maps and the loader


def _layer_pairs(ours: str, hf: str, num_layers: int) -> list[tuple[str, str]]:
    """Pairs for the encoder layers: kandlab's leaf names are transformers' own, only the prefix differs."""
    leaves = ["layer_norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
              "layer_norm2", "mlp.fc1", "mlp.fc2"]
    return [(f"{ours}.{i}.{leaf}.{p}", f"{hf}.{i}.{leaf}.{p}")
            for i in range(num_layers) for leaf in leaves for p in ("weight", "bias")]


def text_key_map(config: CLIPTextConfig) -> list[tuple[str, str]]:
    """Pairs ``(kandlab key, transformers key)`` for every text-tower weight.

    transformers nests the tower in ``text_model`` (``embeddings``, ``encoder.layers``,
    ``final_layer_norm``) and keeps ``text_projection`` beside it; its position table is an
    ``nn.Embedding`` (``.weight``), kandlab's a plain parameter.
    """
    return [
        ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        ("position_embedding", "text_model.embeddings.position_embedding.weight"),
        *_layer_pairs("layers", "text_model.encoder.layers", config.num_hidden_layers),
        ("final_layer_norm.weight", "text_model.final_layer_norm.weight"),
        ("final_layer_norm.bias", "text_model.final_layer_norm.bias"),
        ("text_projection.weight", "text_projection.weight"),
    ]


def vision_key_map(config: CLIPVisionConfig) -> list[tuple[str, str]]:
    """Pairs ``(kandlab key, transformers key)`` for every image-tower weight (``vision_model.*`` and
    ``visual_projection``)."""
    v = "vision_model"
    return [
        ("class_embedding", f"{v}.embeddings.class_embedding"),
        ("patch_embedding.weight", f"{v}.embeddings.patch_embedding.weight"),
        ("position_embedding", f"{v}.embeddings.position_embedding.weight"),
        ("pre_layrnorm.weight", f"{v}.pre_layrnorm.weight"),
        ("pre_layrnorm.bias", f"{v}.pre_layrnorm.bias"),
        *_layer_pairs("layers", f"{v}.encoder.layers", config.num_hidden_layers),
        ("post_layernorm.weight", f"{v}.post_layernorm.weight"),
        ("post_layernorm.bias", f"{v}.post_layernorm.bias"),
        ("visual_projection.weight", "visual_projection.weight"),
    ]


def clip_key_map(text_config: CLIPTextConfig, vision_config: CLIPVisionConfig) -> list[tuple[str, str]]:
    """Pairs for a whole ``CLIPModel``: the two tower maps (same transformers keys) and ``logit_scale``."""
    return [
        *((f"text_tower.{ours}", hf) for ours, hf in text_key_map(text_config)),
        *((f"image_tower.{ours}", hf) for ours, hf in vision_key_map(vision_config)),
        ("logit_scale", "logit_scale"),
    ]


# Keys a checkpoint may hold that carry no weights for the tower being loaded: the other tower of a
# CLIPModel, and the position-id buffers that older transformers versions saved.
_TEXT_IGNORED = ("vision_model.", "visual_projection.", "logit_scale", "text_model.embeddings.position_ids")
_VISION_IGNORED = ("text_model.", "text_projection.", "logit_scale", "vision_model.embeddings.position_ids")
_TEXT_HINT = ("\n  Text tower: check num_hidden_layers, hidden_size, intermediate_size, projection_dim, vocab_size "
              "and max_position_embeddings; a CLIPTextModel has no text_projection — use "
              "CLIPTextModelWithProjection.")
_VISION_HINT = ("\n  Image tower: check num_hidden_layers, hidden_size, intermediate_size, projection_dim, "
                "patch_size, image_size and num_channels; a CLIPVisionModel has no visual_projection — use "
                "CLIPVisionModelWithProjection.")


def _unpack(cls: type, model_or_state_dict: Any, config: Any, config_cls: type, example: str) -> tuple:
    """(model on meta, state dict, config) from a transformers model or a state dict + config."""
    if isinstance(model_or_state_dict, nn.Module):
        if config is None:
            config = config_cls.from_transformers_config(model_or_state_dict.config)
        state_dict = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        if config is None:
            raise ValueError(f"loading from a state dict needs config=..., e.g. {example} or "
                             f"{config_cls.__name__}.from_transformers_config(hf_config): the activation and the "
                             "end token cannot be read from the weights")
        state_dict = model_or_state_dict
    else:
        raise TypeError(f"expected a transformers CLIP model or a state dict, got {type(model_or_state_dict).__name__}")
    if not isinstance(config, config_cls):
        config = config_cls.from_transformers_config(config)
    with torch.device("meta"):  # no memory yet: the checkpoint's tensors are adopted in _load
        model = cls(config)
    return model, state_dict, config


def _load(model: nn.Module, state_dict: Mapping[str, Tensor], pairs: list[tuple[str, str]],
          ignored: tuple[str, ...], hint: str) -> None:
    """Check every key and shape, then adopt the checkpoint's tensors (``assign=True``: no copy)."""
    expected = model.state_dict()
    known = {hf for _, hf in pairs}
    missing = [hf for _, hf in pairs if hf not in state_dict]
    unexpected = [k for k in state_dict if k not in known and not k.startswith(ignored)]
    mismatched = [
        f"{hf}: checkpoint {tuple(state_dict[hf].shape)} vs kandlab {tuple(expected[ours].shape)}"
        for ours, hf in pairs
        if hf in state_dict and tuple(state_dict[hf].shape) != tuple(expected[ours].shape)
    ]
    if missing or unexpected or mismatched:
        configs = [m.config for m in model.modules() if isinstance(m, (CLIPTextTower, CLIPImageTower))]
        raise ValueError(_load_report(type(model).__name__, configs, missing, unexpected, mismatched) + hint)
    model.load_state_dict({ours: state_dict[hf] for ours, hf in pairs}, strict=True, assign=True)


def _load_report(name: str, configs: list[Any], missing: list[str], unexpected: list[str],
                 mismatched: list[str]) -> str:
    def listing(title: str, items: list[str]) -> str:
        shown = "\n    ".join(items[:10]) + (f"\n    … and {len(items) - 10} more" if len(items) > 10 else "")
        return f"\n  {title} ({len(items)}):\n    {shown}"

    described = ", ".join(f"{type(c).__name__}({_short(c)})" for c in configs)
    text = f"the checkpoint does not fit this {name} ({described}):"
    if missing:
        text += listing("missing keys", missing)
    if unexpected:
        text += listing("unexpected keys", unexpected)
    if mismatched:
        text += listing("shape mismatches", mismatched)
    return text


def _short(config: Any) -> str:
    """The size fields of a config, for error messages."""
    skip = {"pad_token_id", "bos_token_id", "layer_norm_eps"}
    return ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config) if f.name not in skip)
