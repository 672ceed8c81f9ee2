"""kandlab.t5 against its production twin, transformers.T5EncoderModel.

Parity: random tiny configs, every weight randomised (norm gains and the
position-bias table too), padded batches, fp32, max abs diff ≤ 1e-5.
Full size: parameter counts on the meta device, no download.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention
from transformers.models.t5.modeling_t5 import T5LayerNorm as HFT5LayerNorm

from kandlab.t5 import RMSNorm, T5Config, T5Encoder, relative_position_bucket, transformers_key_map

TOL = 1e-5

# (feed_forward, d_model, d_kv, heads, d_ff): two of three have heads·d_kv ≠ d_model.
PARITY_CONFIGS = [
    ("relu", 32, 6, 4, 48),  # inner 24 ≠ 32
    ("gated-gelu", 32, 8, 4, 64),  # inner 32 = d_model (the flan-t5 layout)
    ("gated-silu", 24, 16, 3, 40),  # inner 48 ≠ 24 (Flan-UL2 is 16×256 on 4096: equal; this is the general case)
]


def hf_tiny(feed_forward: str, d_model: int, d_kv: int, heads: int, d_ff: int, attn: str = "sdpa", layers: int = 3,
            model_cls=transformers.T5EncoderModel):
    """A randomly initialised transformers T5 with every weight random."""
    config = transformers.T5Config(
        vocab_size=61, d_model=d_model, d_kv=d_kv, num_heads=heads, num_layers=layers, d_ff=d_ff,
        feed_forward_proj=feed_forward, dropout_rate=0.0,
        relative_attention_num_buckets=16, relative_attention_max_distance=24,  # small, so L=40 reaches the cap
        attn_implementation=attn,
    )
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)  # default is all ones: would hide a mixed-up norm
            elif "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)  # default std d_model^-0.5 is small: make the bias matter
    return model


def padded_batch(length: int = 40, vocab: int = 61):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, length), generator=g)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, 23:] = 0  # right padding
    mask[2, :5] = 0  # left padding (T5 has no absolute positions, so this is legal)
    ids[mask == 0] = 0  # <pad>
    return ids, mask


@pytest.mark.parametrize("feed_forward, d_model, d_kv, heads, d_ff", PARITY_CONFIGS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_parity_with_transformers(feed_forward, d_model, d_kv, heads, d_ff, attn):
    torch.manual_seed(0)
    hf = hf_tiny(feed_forward, d_model, d_kv, heads, d_ff, attn=attn)
    ours = T5Encoder.from_transformers(hf).eval()
    assert ours.config.feed_forward == feed_forward
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
        expected_nomask = hf(input_ids=ids).last_hidden_state
        got_nomask = ours(ids)
    assert got.shape == (3, 40, d_model)
    # All positions, padded ones included: both models hide padded *keys* only, so the
    # output at a padded query position is the same well-defined (if unused) number.
    assert (got - expected).abs().max().item() <= TOL
    assert (got_nomask - expected_nomask).abs().max().item() <= TOL
    assert (got - got_nomask).abs().max().item() > 1e-3  # the mask really did something


def test_padding_is_invisible_to_real_tokens():
    torch.manual_seed(1)
    ours = T5Encoder.from_transformers(hf_tiny("gated-gelu", 32, 8, 4, 64)).eval()
    ids, mask = padded_batch()
    other = ids.clone()
    other[mask == 0] = 7  # change what sits under the padding
    with torch.no_grad():
        a, b = ours(ids, mask), ours(other, mask)
    real = mask.bool()
    assert torch.allclose(a[real], b[real], atol=1e-6)


def test_bias_table_is_shared_by_all_layers():
    # transformers keeps the table in block 0 only; kandlab keeps one table for the stack.
    hf = hf_tiny("gated-gelu", 32, 8, 4, 64, layers=3)
    tables = [k for k in hf.state_dict() if "relative_attention_bias" in k]
    assert tables == ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    ours = T5Encoder.from_transformers(hf)
    assert [k for k in ours.state_dict() if "relative_attention_bias" in k] == ["relative_attention_bias.weight"]


def test_round_trip_to_transformers_state_dict():
    torch.manual_seed(2)
    hf = hf_tiny("gated-silu", 24, 16, 3, 40)
    ours = T5Encoder.from_transformers(hf).eval()
    fresh = transformers.T5EncoderModel(copy.deepcopy(hf.config)).eval()
    fresh.load_state_dict(ours.to_transformers_state_dict(), strict=True)
    ids, mask = padded_batch()
    with torch.no_grad():
        diff = (fresh(input_ids=ids, attention_mask=mask).last_hidden_state - ours(ids, mask)).abs().max()
    assert diff.item() <= TOL


def test_load_from_state_dict_and_from_full_seq2seq_model():
    torch.manual_seed(3)
    full = hf_tiny("gated-gelu", 32, 8, 4, 64, model_cls=transformers.T5ForConditionalGeneration)
    ours = T5Encoder.from_transformers(full).eval()  # decoder / lm_head keys are skipped
    sd = {k: v for k, v in full.state_dict().items() if k != "shared.weight"}  # only the tied copy left
    config = T5Config.from_transformers_config(full.config)
    from_sd = T5Encoder.from_transformers(sd, config=config).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = full.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (ours(ids, mask) - expected).abs().max().item() <= TOL
        assert (from_sd(ids, mask) - expected).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="needs config"):
        T5Encoder.from_transformers(sd)


def test_load_errors_name_the_keys():
    hf = hf_tiny("gated-gelu", 32, 8, 4, 64, layers=2)
    config = T5Config.from_transformers_config(hf.config)
    sd = dict(hf.state_dict())

    missing = {k: v for k, v in sd.items() if k != "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"}
    with pytest.raises(ValueError, match=r"missing keys \(1\)[\s\S]*block\.1\.layer\.1\.DenseReluDense\.wi_1"):
        T5Encoder.from_transformers(missing, config=config)

    extra = {**sd, "encoder.block.2.layer.0.layer_norm.weight": torch.ones(32)}
    with pytest.raises(ValueError, match=r"unexpected keys \(1\)[\s\S]*encoder\.block\.2"):
        T5Encoder.from_transformers(extra, config=config)

    q_mismatch = r"shape mismatches[\s\S]*SelfAttention\.q\.weight: checkpoint \(32, 32\) vs kandlab \(64, 32\)"
    with pytest.raises(ValueError, match=q_mismatch):
        T5Encoder.from_transformers(sd, config=T5Config(**{**vars(config), "d_kv": 16}))

    relu = T5Config(**{**vars(config), "feed_forward": "relu"})
    with pytest.raises(ValueError, match=r"missing keys[\s\S]*DenseReluDense\.wi\.weight"):
        T5Encoder.from_transformers(sd, config=relu)


def test_key_map_covers_every_parameter_once():
    for config in (T5Config.tiny(), T5Config(feed_forward="relu", num_layers=3)):
        pairs = transformers_key_map(config)
        with torch.device("meta"):
            model = T5Encoder(config)
        ours = [k for k, _ in pairs]
        assert sorted(ours) == sorted(model.state_dict())
        assert len({hf for _, hf in pairs}) == len(pairs)


# ---------------------------------------------------------------------------
# Pieces


def test_relative_position_bucket_matches_transformers():
    rel = torch.arange(-300, 301)[None, :]  # (1, 601)
    for bidirectional in (True, False):
        for num_buckets, max_distance in ((32, 128), (16, 24), (64, 300)):
            ours = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
            ref = HFT5Attention._relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
            assert torch.equal(ours, ref), (bidirectional, num_buckets, max_distance)


def test_relative_position_bucket_follows_reference_formula():
    # REFERENCE.md: 16 buckets per direction; |rel| < 8 exact; else 8 + ⌊log(|rel|/8)/log(128/8)·8⌋, capped at 15.
    def bucket(rel: int) -> int:
        n = abs(rel)
        b = n if n < 8 else min(15, 8 + math.floor(math.log(n / 8) / math.log(16) * 8))
        return b + (16 if rel > 0 else 0)

    values = [0, 1, 7, -1, -7, 8, -8, 11, 12, -12, 20, -45, 100, -127, 128, -128, 500, -5000]
    got = relative_position_bucket(torch.tensor(values)).tolist()
    assert got == [bucket(v) for v in values]
    assert got[:5] == [0, 17, 23, 1, 7] and got[-4:] == [31, 15, 31, 15]


def test_rms_norm_matches_t5_layer_norm_including_half_precision():
    torch.manual_seed(4)
    x = torch.randn(2, 5, 16) * 3
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ours, ref = RMSNorm(16), HFT5LayerNorm(16)
        w = torch.rand(16) + 0.5
        ours.weight.data, ref.weight.data = w.to(dtype), w.to(dtype)
        a, b = ours(x), ref(x)
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a, b)
    x = torch.randn(3, 8)
    rms = x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    assert torch.allclose(RMSNorm(8)(x), x / rms, atol=1e-6)  # no mean subtraction, no bias


# ---------------------------------------------------------------------------
# Full size on the meta device


def hf_config_for(c: T5Config) -> transformers.T5Config:
    return transformers.T5Config(vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, num_heads=c.num_heads,
                                 num_layers=c.num_layers, d_ff=c.d_ff, feed_forward_proj=c.feed_forward)


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("flan_t5_small", 35_332_800),  # ≈ 35.3 M
        ("flan_t5_base", 109_628_544),  # ≈ 109.6 M
        ("t5_v1_1_xxl", 4_762_310_656),  # ≈ 4.76 B
        ("flan_ul2", 8_721_797_632),  # ≈ 8.72 B, Kandinsky 3's text encoder
    ],
)
def test_full_size_parameter_counts_on_meta(preset, expected):
    config = getattr(T5Config, preset)()
    # hub numbers from REFERENCE.md, typed by hand: no download
    reference = {
        "flan_t5_small": (512, 64, 6, 8, 1024, "gated-gelu"),
        "flan_t5_base": (768, 64, 12, 12, 2048, "gated-gelu"),
        "t5_v1_1_xxl": (4096, 64, 64, 24, 10240, "gated-gelu"),
        "flan_ul2": (4096, 256, 16, 32, 16384, "gated-silu"),
    }[preset]
    assert (config.d_model, config.d_kv, config.num_heads, config.num_layers, config.d_ff,
            config.feed_forward) == reference
    assert config.vocab_size == 32128
    with torch.device("meta"):
        hf = transformers.T5EncoderModel(hf_config_for(config))
        ours = T5Encoder(config)
    n_hf = sum(p.numel() for p in hf.parameters())  # the tied embedding counted once
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == n_hf == expected
    loaded = T5Encoder.from_transformers(hf)  # the key map fits at full size too
    assert loaded.config == config
    assert loaded.relative_attention_bias.weight.is_meta


# ---------------------------------------------------------------------------
# Bad inputs


@pytest.fixture(scope="module")
def tiny_encoder():
    torch.manual_seed(5)
    return T5Encoder(T5Config.tiny(vocab_size=20)).eval()


def test_tiny_preset_shapes(tiny_encoder):
    ids = torch.randint(0, 20, (2, 16))
    out = tiny_encoder(ids, torch.ones(2, 16, dtype=torch.long))
    assert out.shape == (2, 16, 64)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "ids, mask, message",
    [
        (torch.tensor([3, 4, 1]), None, r"2-D \(batch, length\).*input_ids\[None\]"),
        (torch.rand(1, 4), None, r"torch\.long.*\.long\(\)"),
        (torch.tensor([[3, 25, 1]]), None, r"token id 25 is outside the vocabulary of 20 tokens"),
        (torch.tensor([[3, -1, 1]]), None, r"token id -1 is outside the vocabulary of 20 tokens"),
        (torch.zeros(2, 0, dtype=torch.long), None, r"length 0"),
        (torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4),
         r"attention_mask shape \(2, 4\) must equal input_ids shape \(2, 5\)"),
        (torch.ones(2, 5, dtype=torch.long), torch.full((2, 5), 2), r"only 1 .* and 0"),
    ],
)
def test_bad_inputs_raise_value_error(tiny_encoder, ids, mask, message):
    with pytest.raises(ValueError, match=message):
        tiny_encoder(ids, mask)


def test_bad_types_and_configs():
    encoder = T5Encoder(T5Config.tiny(vocab_size=10))
    with pytest.raises(TypeError, match="torch.LongTensor"):
        encoder([[1, 2, 3]])
    with pytest.raises(ValueError, match="feed_forward must be one of"):
        T5Config(feed_forward="gelu")
    with pytest.raises(ValueError, match="not supported"):
        T5Config.from_transformers_config(transformers.T5Config(feed_forward_proj="gated-relu"))
    with pytest.raises(TypeError, match="state dict"):
        T5Encoder.from_transformers([1, 2, 3])
