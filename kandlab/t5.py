r"""The T5 text encoder, from scratch: the text tower of Kandinsky 3 (and Imagen).

Kandinsky 3 reads the prompt with the *encoder* half of Flan-UL2, a T5 model
(Raffel et al., 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer"). The tiny encoder trained in the lessons and the
8.7 B-parameter Flan-UL2 encoder are the same class with different configs.

Read top to bottom:

1. ``RMSNorm``                  — T5's layer norm: scale only, no mean, no bias.
2. ``relative_position_bucket`` — how a distance between two tokens becomes one of
   32 buckets (T5 has no absolute position embeddings).
3. ``Attention``                — multi-head self-attention *without* the
   :math:`1/\sqrt{d}` scaling, plus a learned bias per (bucket, head).
4. ``FeedForward``              — ReLU (T5 v1.0) or gated GELU / SiLU (v1.1, Flan, UL2).
5. ``EncoderBlock``             — pre-norm residual: ``x + Attn(norm(x))``, ``x + FF(norm(x))``.
6. ``T5Encoder``                — embedding → blocks → final norm; loads ``transformers`` weights.

The production twin is ``transformers.T5EncoderModel``; ``tests/test_t5.py``
checks that both give the same numbers for the same weights. Dropout is left
out: the encoder is used frozen, for inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

FeedForwardKind = Literal["relu", "gated-gelu", "gated-silu"]
FEED_FORWARD_KINDS: tuple[str, ...] = ("relu", "gated-gelu", "gated-silu")


# ---------------------------------------------------------------------------
# Config


@dataclass
class T5Config:
    """Shape of a T5 encoder. Field names follow ``transformers.T5Config``."""

    vocab_size: int = 32128  # T5's SentencePiece vocabulary (32 000 pieces + 100 sentinels, padded)
    d_model: int = 512  # width of the residual stream
    d_kv: int = 64  # width of one attention head; heads · d_kv may differ from d_model
    num_heads: int = 6
    num_layers: int = 8
    d_ff: int = 1024  # hidden width of the feed-forward layer
    feed_forward: FeedForwardKind = "gated-gelu"  # "relu" in T5 v1.0, gated in v1.1 / Flan / UL2
    relative_attention_num_buckets: int = 32  # 16 per direction in the (bidirectional) encoder
    relative_attention_max_distance: int = 128  # distances beyond this share the last bucket
    layer_norm_eps: float = 1e-6
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.feed_forward not in FEED_FORWARD_KINDS:
            raise ValueError(f"feed_forward must be one of {FEED_FORWARD_KINDS}, got {self.feed_forward!r}")
        for name in ("vocab_size", "d_model", "d_kv", "num_heads", "num_layers", "d_ff"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 2:
            raise ValueError(
                "relative_attention_num_buckets must be an even number ≥ 4 (half per direction), "
                f"got {self.relative_attention_num_buckets}"
            )

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated heads: ``num_heads · d_kv``."""
        return self.num_heads * self.d_kv

    # -- presets (encoder halves of published checkpoints) -------------------

    @classmethod
    def flan_t5_small(cls) -> T5Config:
        """google/flan-t5-small encoder: 35.3 M parameters."""
        return cls(d_model=512, d_kv=64, num_heads=6, num_layers=8, d_ff=1024, feed_forward="gated-gelu")

    @classmethod
    def flan_t5_base(cls) -> T5Config:
        """google/flan-t5-base encoder: 109.6 M parameters."""
        return cls(d_model=768, d_kv=64, num_heads=12, num_layers=12, d_ff=2048, feed_forward="gated-gelu")

    @classmethod
    def t5_v1_1_xxl(cls) -> T5Config:
        """google/t5-v1_1-xxl encoder (Imagen, DeepFloyd IF): 4.76 B parameters."""
        return cls(d_model=4096, d_kv=64, num_heads=64, num_layers=24, d_ff=10240, feed_forward="gated-gelu")

    @classmethod
    def flan_ul2(cls) -> T5Config:
        """google/flan-ul2 encoder (Kandinsky 3): 8.72 B parameters; 16 heads of 256."""
        return cls(d_model=4096, d_kv=256, num_heads=16, num_layers=32, d_ff=16384, feed_forward="gated-silu")

    @classmethod
    def tiny(cls, vocab_size: int = 64) -> T5Config:
        """A CPU-sized encoder for the shapes captions; ``vocab_size`` comes from the tokenizer."""
        return cls(vocab_size=vocab_size, d_model=64, d_kv=16, num_heads=4, num_layers=2, d_ff=128,
                   feed_forward="gated-gelu")

    @classmethod
    def from_transformers_config(cls, hf_config: Any) -> T5Config:
        """Read the encoder fields of a ``transformers.T5Config``."""
        kind = getattr(hf_config, "feed_forward_proj", None)
        if kind not in FEED_FORWARD_KINDS:
            raise ValueError(
                f"feed_forward_proj={kind!r} is not supported; kandlab's T5 has {FEED_FORWARD_KINDS}"
            )
        return cls(
            vocab_size=hf_config.vocab_size,
            d_model=hf_config.d_model,
            d_kv=hf_config.d_kv,
            num_heads=hf_config.num_heads,
            num_layers=hf_config.num_layers,
            d_ff=hf_config.d_ff,
            feed_forward=kind,
            relative_attention_num_buckets=hf_config.relative_attention_num_buckets,
            relative_attention_max_distance=hf_config.relative_attention_max_distance,
            layer_norm_eps=hf_config.layer_norm_epsilon,
            pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
        )


# ---------------------------------------------------------------------------
# 1. RMS norm


class RMSNorm(nn.Module):
    r"""T5's layer norm: :math:`y = w \cdot x / \sqrt{\mathrm{mean}(x^2) + \epsilon}`.

    Unlike LayerNorm there is no mean subtraction and no bias (Zhang & Sennrich,
    2019, "Root Mean Square Layer Normalization", eq. 4). The mean of squares is
    accumulated in float32 even for half-precision inputs; the result is cast
    back to the weight's dtype when that weight is fp16/bf16.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        mean_square = x.to(torch.float32).pow(2).mean(-1, keepdim=True)  # (..., 1)
        x = x * torch.rsqrt(mean_square + self.eps)  # float32 from here on
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


# ---------------------------------------------------------------------------
# 2. Relative position buckets


def relative_position_bucket(
    relative_position: torch.Tensor,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> torch.Tensor:
    r"""Map a signed token distance to a bucket index in ``[0, num_buckets)``.

    ``relative_position = key_position − query_position`` (positive: the key is to
    the right). T5 (Raffel et al. §2.1) learns one scalar per bucket and head
    instead of an embedding per absolute position.

    Bidirectional (the encoder): half of the buckets for each direction,
    :math:`N = \text{num\_buckets}/2 = 16`; keys to the right get an offset of
    :math:`N`. With :math:`n = |\text{rel}|` and :math:`n_\text{exact} = N/2 = 8`:

    .. math::

        \text{bucket}(n) =
        \begin{cases}
            n & n < n_\text{exact} \\
            \min\!\Big(N - 1,\; n_\text{exact} + \Big\lfloor
                \frac{\log(n / n_\text{exact})}{\log(\text{max\_distance} / n_\text{exact})}
                (N - n_\text{exact}) \Big\rfloor\Big) & \text{otherwise}
        \end{cases}

    so distances 0–7 are exact, 8–127 share log-spaced buckets, and every
    distance ≥ 128 lands in the last one. Unidirectional (a decoder): only
    :math:`\text{rel} \le 0` counts, all ``num_buckets`` are used for it, and
    positive distances fall into bucket 0.

    Input: an integer tensor of any shape; output: ``torch.long`` of the same shape.
    """
    if relative_position.is_floating_point():
        raise TypeError("relative_position must be an integer tensor (token distances)")
    bucket = torch.zeros_like(relative_position, dtype=torch.long)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets  # right-hand half
        n = relative_position.abs().long()
    else:
        n = (-relative_position).clamp(min=0).long()  # only looking back counts
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # log-spaced buckets for n ≥ max_exact (log(0) for small n is masked out by where)
    log_ratio = torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
    n_large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    n_large = n_large.clamp(max=num_buckets - 1)
    return bucket + torch.where(is_small, n, n_large)


# ---------------------------------------------------------------------------
# 3. Attention


class Attention(nn.Module):
    r"""Multi-head self-attention as in T5: no biases and no :math:`1/\sqrt{d}`.

    .. math::  \mathrm{softmax}(Q K^\top + B)\,V

    where :math:`B` holds the relative position bias (plus :math:`-\infty`-like
    values at padded keys). T5 leaves out the :math:`1/\sqrt{d_{kv}}` of
    Vaswani et al. — its initialisation scales :math:`W_q` instead — so loaded
    weights only work with ``scale=1``.
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.num_heads = config.num_heads
        self.d_kv = config.d_kv
        inner = config.inner_dim
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x: (B, L, d_model); bias: (B or 1, heads, L, L), added to the scores."""
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.num_heads, self.d_kv).transpose(1, 2)  # (B, heads, L, d_kv)
        k = self.k(x).view(B, L, self.num_heads, self.d_kv).transpose(1, 2)  # (B, heads, L, d_kv)
        v = self.v(x).view(B, L, self.num_heads, self.d_kv).transpose(1, 2)  # (B, heads, L, d_kv)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # (B, heads, L, d_kv)
        out = out.transpose(1, 2).reshape(B, L, self.num_heads * self.d_kv)  # (B, L, heads·d_kv)
        return self.o(out)  # (B, L, d_model)


# ---------------------------------------------------------------------------
# 4. Feed-forward


class FeedForward(nn.Module):
    r"""Position-wise MLP, no biases.

    - ``relu`` (T5 v1.0):        :math:`W_o\,\mathrm{ReLU}(W_i x)`
    - ``gated-gelu`` (v1.1, Flan): :math:`W_o\,(\mathrm{GELU_{tanh}}(W_{i0} x) \odot W_{i1} x)`
    - ``gated-silu`` (UL2):      :math:`W_o\,(\mathrm{SiLU}(W_{i0} x) \odot W_{i1} x)`

    The gated forms are GEGLU / SwiGLU (Shazeer, 2020, "GLU Variants Improve
    Transformer", eq. 6).
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.kind = config.feed_forward
        if self.kind == "relu":
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)  # gate
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)  # value
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, d_model) -> (B, L, d_model)
        if self.kind == "relu":
            h = F.relu(self.wi(x))  # (B, L, d_ff)
        elif self.kind == "gated-gelu":
            h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)  # (B, L, d_ff)
        else:
            h = F.silu(self.wi_0(x)) * self.wi_1(x)  # (B, L, d_ff)
        # transformers keeps `wo` in float32 when loading T5 in half precision
        # (its outputs overflow fp16); follow the weight's dtype like it does.
        return self.wo(h.to(self.wo.weight.dtype))


# ---------------------------------------------------------------------------
# 5. Encoder block


class EncoderBlock(nn.Module):
    """Pre-norm residual block: ``x + Attn(norm(x))`` then ``x + FF(norm(x))``."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.layer_norm_eps)
        self.attn = Attention(config)
        self.ff_norm = RMSNorm(config.d_model, config.layer_norm_eps)
        self.ff = FeedForward(config)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # (B, L, d_model)
        x = x + self.attn(self.attn_norm(x), bias)
        x = x + self.ff(self.ff_norm(x))
        return x


# ---------------------------------------------------------------------------
# 6. The encoder


class T5Encoder(nn.Module):
    """Token ids → contextual embeddings ``(B, L, d_model)``.

    The relative-position bias table lives here, once: every layer adds the
    same bias (``transformers`` stores it inside block 0 and passes it on).
    Token embeddings are not scaled by √d_model.
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_eps)

    def position_bias(self, length: int) -> torch.Tensor:
        """Learned bias for every (query, key) pair: ``(1, heads, L, L)``."""
        device = self.relative_attention_bias.weight.device
        pos = torch.arange(length, dtype=torch.long, device=device)
        relative_position = pos[None, :] - pos[:, None]  # (L, L): key − query
        bucket = relative_position_bucket(
            relative_position,
            bidirectional=True,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )  # (L, L)
        return self.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)  # (1, heads, L, L)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (B, L) long; attention_mask: (B, L), 1 = real token, 0 = padding.

        Returns ``(B, L, d_model)``. Padding is hidden from the *keys* only, so
        padded positions still get a (meaningless but finite) output; pass the
        same mask on to whatever reads these embeddings.
        """
        self._check_inputs(input_ids, attention_mask)
        L = input_ids.shape[1]
        x = self.embed_tokens(input_ids)  # (B, L, d_model)
        bias = self.position_bias(L).to(x.dtype)  # (1, heads, L, L)
        if attention_mask is not None:
            hidden = (attention_mask == 0).to(bias.device)[:, None, None, :]  # (B, 1, 1, L): padded keys
            bias = bias.masked_fill(hidden, torch.finfo(bias.dtype).min)  # (B, heads, L, L)
        for block in self.blocks:
            x = block(x, bias)
        return self.final_norm(x)  # (B, L, d_model)

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(
                f"input_ids must be a torch.LongTensor of shape (batch, length), got {type(input_ids).__name__}; "
                "use the tokenizer's output: encoder(**tokenizer(prompts))"
            )
        if input_ids.ndim != 2:
            hint = " — add a batch dimension with input_ids[None]" if input_ids.ndim == 1 else ""
            raise ValueError(f"input_ids must be 2-D (batch, length), got shape {tuple(input_ids.shape)}{hint}")
        if input_ids.dtype != torch.long:
            raise ValueError(
                f"input_ids must be token ids of dtype torch.long, got {input_ids.dtype}; "
                "convert with input_ids.long() (float tensors are embeddings, not ids)"
            )
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids has length 0; every prompt needs at least the end-of-sequence token")
        checkable = input_ids.device.type != "meta" and input_ids.numel() > 0
        if checkable:
            lo, hi = int(input_ids.min()), int(input_ids.max())
            bad = hi if hi >= self.config.vocab_size else lo
            if hi >= self.config.vocab_size or lo < 0:
                raise ValueError(
                    f"token id {bad} is outside the vocabulary of {self.config.vocab_size} tokens "
                    f"(valid ids: 0..{self.config.vocab_size - 1}); was the encoder built with the "
                    "tokenizer's vocab_size, e.g. T5Config.tiny(vocab_size=tokenizer.vocab_size)?"
                )
        if attention_mask is None:
            return
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                f"{tuple(input_ids.shape)} (one 1/0 per token)"
            )
        if checkable and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must contain only 1 (real token) and 0 (padding)")

    # -- weights from / to transformers --------------------------------------

    @classmethod
    def from_transformers(
        cls, model_or_state_dict: nn.Module | dict[str, torch.Tensor], config: T5Config | None = None
    ) -> T5Encoder:
        """Build an encoder holding the weights of a ``transformers`` T5 model.

        Accepts a ``T5EncoderModel`` / ``T5ForConditionalGeneration`` (its
        config is read) or a state dict with the same keys plus ``config``
        (the activation — GELU or SiLU — cannot be read from the weights).
        Decoder and LM-head weights are ignored.

        The encoder *shares* the given tensors (no copy; same device and
        dtype), so loading costs no extra memory; ``copy.deepcopy`` the result
        if you want to change one model without touching the other.
        """
        if isinstance(model_or_state_dict, nn.Module):
            if config is None:
                config = T5Config.from_transformers_config(model_or_state_dict.config)
            state_dict = model_or_state_dict.state_dict()
        elif isinstance(model_or_state_dict, dict):
            if config is None:
                raise ValueError(
                    "loading from a state dict needs config=..., e.g. T5Config.flan_ul2() or "
                    "T5Config.from_transformers_config(hf_config): gated GELU and gated SiLU weights look alike"
                )
            state_dict = model_or_state_dict
        else:
            kind = type(model_or_state_dict).__name__
            raise TypeError(f"expected a transformers T5 model or a state dict, got {kind}")
        if not isinstance(config, T5Config):
            config = T5Config.from_transformers_config(config)

        state_dict = dict(state_dict)
        if "shared.weight" not in state_dict and "encoder.embed_tokens.weight" in state_dict:
            state_dict["shared.weight"] = state_dict["encoder.embed_tokens.weight"]  # tied copies
        state_dict.pop("encoder.embed_tokens.weight", None)

        pairs = transformers_key_map(config)
        with torch.device("meta"):  # no memory yet: the checkpoint's tensors are adopted below
            model = cls(config)
        expected = dict(model.state_dict())
        missing = [hf for _, hf in pairs if hf not in state_dict]
        known = {hf for _, hf in pairs}
        unexpected = [k for k in state_dict if k not in known and not k.startswith(_IGNORED_PREFIXES)]
        mismatched = [
            f"{hf}: checkpoint {tuple(state_dict[hf].shape)} vs kandlab {tuple(expected[ours].shape)}"
            for ours, hf in pairs
            if hf in state_dict and state_dict[hf].shape != expected[ours].shape
        ]
        if missing or unexpected or mismatched:
            raise ValueError(_load_report(config, missing, unexpected, mismatched))
        # assign=True adopts the tensors as they are (device, dtype, no copy): an 8.7 B
        # encoder is never held twice in memory.
        model.load_state_dict({ours: state_dict[hf] for ours, hf in pairs}, strict=True, assign=True)
        return model

    def to_transformers_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under ``transformers.T5EncoderModel`` keys (both tied embedding keys)."""
        ours = self.state_dict()
        out = {hf: ours[k] for k, hf in transformers_key_map(self.config)}
        out["encoder.embed_tokens.weight"] = out["shared.weight"]
        return out


# Keys of a full T5 checkpoint that the encoder does not use.
_IGNORED_PREFIXES = ("decoder.", "lm_head.")


def transformers_key_map(config: T5Config) -> list[tuple[str, str]]:
    """Pairs ``(kandlab key, transformers key)`` for every encoder weight.

    ``transformers`` nests each block as ``layer.0`` (self-attention sub-layer)
    and ``layer.1`` (feed-forward sub-layer) and keeps the position-bias table in
    block 0. The token embedding is ``shared.weight`` (``encoder.embed_tokens``
    is the same tensor, tied).
    """
    pairs = [
        ("embed_tokens.weight", "shared.weight"),
        ("relative_attention_bias.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    ]
    ff_names = ["wi", "wo"] if config.feed_forward == "relu" else ["wi_0", "wi_1", "wo"]
    for i in range(config.num_layers):
        hf = f"encoder.block.{i}.layer"
        pairs.append((f"blocks.{i}.attn_norm.weight", f"{hf}.0.layer_norm.weight"))
        for name in ("q", "k", "v", "o"):
            pairs.append((f"blocks.{i}.attn.{name}.weight", f"{hf}.0.SelfAttention.{name}.weight"))
        pairs.append((f"blocks.{i}.ff_norm.weight", f"{hf}.1.layer_norm.weight"))
        for name in ff_names:
            pairs.append((f"blocks.{i}.ff.{name}.weight", f"{hf}.1.DenseReluDense.{name}.weight"))
    pairs.append(("final_norm.weight", "encoder.final_layer_norm.weight"))
    return pairs


def _load_report(config: T5Config, missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    def listing(title: str, items: list[str]) -> str:
        shown = "\n    ".join(items[:10]) + (f"\n    … and {len(items) - 10} more" if len(items) > 10 else "")
        return f"\n  {title} ({len(items)}):\n    {shown}"

    text = "the checkpoint does not fit this T5Encoder config " + repr(config) + ":"
    if missing:
        text += listing("missing keys", missing)
    if unexpected:
        text += listing("unexpected keys", unexpected)
    if mismatched:
        text += listing("shape mismatches", mismatched)
    hint = "\n  Check num_layers, feed_forward (relu has `wi`, gated has `wi_0`/`wi_1`), d_model, d_kv and num_heads."
    return text + hint
