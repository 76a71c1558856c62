"""BluesConfig: the design page's fields and defaults, validation that names the field, presets."""
import dataclasses
import math
import subprocess
import sys

import pytest

from blues.config import PRESETS, BluesConfig
from blues.errors import ConfigError
from blues.layout import canonical_layout

SEED_DEFAULTS = dict(vocab_size=200019, max_position_embeddings=256, num_layers=4, hidden_size=192,
                     head_dim=48, num_attention_heads=4, num_key_value_heads=2, tot_num_experts=4,
                     chosen_num_experts=1)


def test_defaults_are_the_seed_and_design_page():
    c = BluesConfig()
    for name, value in SEED_DEFAULTS.items():
        assert getattr(c, name) == value, name
    assert (c.embedding_multiplier_scale, c.rms_norm_eps, c.rope_theta) == (4, 1e-5, 10000.0)
    assert (c.use_post_norms, c.attn_logit_softcap, c.router_noise_std) == (True, None, 0.05)
    assert (c.normalize_router_weights, c.capacity_factor, c.dropout) == (False, None, 0.0)
    assert (c.router_aux_loss_coef, c.router_z_loss_coef) == (0.01, 0.001)
    assert BluesConfig.preset("tiny") == c


@pytest.mark.parametrize("overrides, field", [
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(chosen_num_experts=5), "chosen_num_experts"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_layers=-1), "num_layers"),
    (dict(head_dim=47), "head_dim"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(attn_logit_softcap=-1.0), "attn_logit_softcap"),
    (dict(dropout=1.0), "dropout"),
    (dict(hidden_size=12.5), "hidden_size"),
    (dict(use_post_norms="yes"), "use_post_norms"),
])
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        BluesConfig(**overrides)


def test_vocab_smaller_than_tokenizer_is_rejected():
    with pytest.raises(ConfigError, match="'vocab_size'.*200019"):
        BluesConfig(vocab_size=1000).check_tokenizer(200019)
    BluesConfig().check_tokenizer(200019)


def test_json_round_trip_and_errors():
    c = BluesConfig(capacity_factor=1.25, attn_logit_softcap=30.0, use_post_norms=False)
    assert BluesConfig.from_json(c.to_json()) == c
    assert BluesConfig.from_json('{"num_layers": 2}').num_layers == 2
    with pytest.raises(ConfigError, match="not valid JSON"):
        BluesConfig.from_json("{num_layers: 2")
    with pytest.raises(ConfigError, match="unknown config field.*num_layer\\b"):
        BluesConfig.from_json('{"num_layer": 2}')
    with pytest.raises(ConfigError, match="'num_layers'"):
        BluesConfig.from_json('{"num_layers": "two"}')
    # An int where a float is expected is accepted (JSON writes 1e4 as 10000.0 or 10000).
    assert BluesConfig.from_json('{"rope_theta": 500000}').rope_theta == 500000.0


def test_presets():
    bench = BluesConfig.preset("bench")
    assert (bench.hidden_size, bench.num_layers, bench.num_attention_heads, bench.head_dim) == (1024, 12, 16, 64)
    assert (bench.num_key_value_heads, bench.tot_num_experts, bench.chosen_num_experts) == (4, 8, 2)
    assert (bench.embedding_multiplier_scale, bench.max_position_embeddings) == (4, 2048)
    small = BluesConfig.preset("small").num_parameters()
    assert 100e6 <= small <= 200e6, small
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny, small, bench"):
        BluesConfig.preset("huge")
    assert set(PRESETS) == {"tiny", "small", "bench"}


@pytest.mark.parametrize("overrides", [{}, dict(use_post_norms=False, num_key_value_heads=1),
                                       dict(tot_num_experts=8, chosen_num_experts=2, hidden_size=40)])
def test_layout_matches_closed_form_count(overrides):
    c = BluesConfig(**overrides)
    layout = canonical_layout(c)
    total = sum(math.prod(s.shape) for s in layout)
    assert total == c.num_parameters()
    assert len({s.name for s in layout}) == len(layout)
    embed = layout[0]
    assert embed.shape == (c.vocab_size, c.hidden_size)
    assert embed.module_shape[0] == c.padded_vocab_size == 200064
    assert c.padded_vocab_size % 128 == 0


def test_config_is_frozen_dataclass():
    with pytest.raises(dataclasses.FrozenInstanceError):
        BluesConfig().num_layers = 3


def test_core_imports_neither_framework():
    code = ("import sys, blues, blues.config, blues.layout, blues.cli, blues.errors,"
            " blues.tokenizer, blues.data;"
            "bad = [m for m in ('torch', 'jax', 'flax') if m in sys.modules];"
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"blues imported: {result.stdout} {result.stderr[-500:]}"


@pytest.mark.parametrize("hidden, chunk", [(1024, 1024), (4096, 1024), (512, 2048), (192, 8192), (64, 16384)])
def test_default_loss_chunk_size_widens_narrow_models(hidden, chunk):
    """At least 1024 tokens a chunk, and chunk x d >= 1024 x 1024 rounded up to a power of two: a
    narrow model's chunk of the LM head is otherwise cheaper than its dispatch (docs/performance.md)."""
    config = dataclasses.replace(BluesConfig(), hidden_size=hidden, head_dim=hidden // 4)
    assert config.default_loss_chunk_size == chunk
    assert chunk * hidden >= 1024 * 1024 and (chunk == 1024 or (chunk // 2) * hidden < 1024 * 1024)


def test_models_take_the_config_default_loss_chunk_size():
    torch_model = pytest.importorskip("blues_torch").BluesModel
    config = BluesConfig.preset("tiny")
    assert torch_model(config).loss_chunk_size == config.default_loss_chunk_size == 8192
    assert torch_model(config, loss_chunk_size=256).loss_chunk_size == 256
    jax_model = pytest.importorskip("blues_jax").BluesModel
    nnx = pytest.importorskip("flax.nnx")
    assert jax_model(config, rngs=nnx.Rngs(0)).loss_chunk_size == 8192
