"""`model.init` (docs/model.md §4): `release` is the OLMo/OLMoE backbone init the authors' release trains with."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from umv2_jax.config import ModelConfig
from umv2_jax.models import init as init_lib
from umv2_jax.models.transformer import Transformer

CONFIG = ModelConfig(d_model=256, num_layers=4, num_heads=4, d_ff=512, tie_embeddings=False)


def _torch_trunc_normal_std(std: float, cutoff: float) -> float:
    """Std of torch's trunc_normal_(std=std, a=-cutoff·std, b=cutoff·std), from the closed form."""
    pdf = math.exp(-0.5 * cutoff * cutoff) / math.sqrt(2 * math.pi)
    mass = math.erf(cutoff / math.sqrt(2))
    return std * math.sqrt(1 - 2 * cutoff * pdf / mass)


def test_release_std_is_olmoe_trunc_normal_and_output_projections_are_not_scaled():
    release = dataclasses.replace(CONFIG, init="release")
    assert init_lib.backbone_std(release) == pytest.approx(_torch_trunc_normal_std(0.02, 3.0), 1e-4)
    assert init_lib.output_std(release) == init_lib.backbone_std(release)
    # paper is untouched: sqrt(2/(5h)) and the 1/sqrt(2L) output scaling
    assert init_lib.backbone_std(CONFIG) == math.sqrt(2 / (5 * 256))
    assert init_lib.output_std(CONFIG) == math.sqrt(2 / (5 * 256)) / math.sqrt(8)


def test_release_init_draws_every_backbone_matrix_from_the_release_distribution():
    model = Transformer(dataclasses.replace(CONFIG, init="release"), nnx.Rngs(0))
    block = model.blocks[0]
    expected = _torch_trunc_normal_std(0.02, 3.0)
    matrices = {
        "embed": model.embed,
        "lm_head": model.lm_head,
        "attn.query": block.attn.query,
        "attn.out": block.attn.out,
        "ffn.gate": block.ffn.gate,
        "ffn.down": block.ffn.down,
    }
    for name, param in matrices.items():
        values = np.asarray(param[...])
        assert float(values.std()) == pytest.approx(expected, rel=0.02), name
        assert float(np.abs(values).max()) <= 0.06 * (1 + 1e-6), name  # cut at ±3·0.02
        assert float(np.abs(values).max()) > 0.055, name  # …and the tails reach the cut
    # Norm gains still start at one.
    assert np.all(np.asarray(block.attn_norm.scale[...]) == 1.0)


def test_release_and_paper_differ_only_in_scale_not_in_the_draw():
    """Same seed, same draw order: each release matrix is its paper twin times a constant ratio."""
    paper = Transformer(CONFIG, nnx.Rngs(0))
    release = Transformer(dataclasses.replace(CONFIG, init="release"), nnx.Rngs(0))
    ratio = init_lib.backbone_std(dataclasses.replace(CONFIG, init="release")) / (
        init_lib.backbone_std(CONFIG)
    )
    p, r = paper.blocks[1].ffn.gate[...], release.blocks[1].ffn.gate[...]
    np.testing.assert_allclose(np.asarray(r), np.asarray(p) * ratio, rtol=1e-5, atol=1e-9)
    assert jax.tree.structure(nnx.state(paper)) == jax.tree.structure(nnx.state(release))
    assert p.dtype == r.dtype == jnp.float32
