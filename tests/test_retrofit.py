"""Retrofitting memory into a dense Hugging Face checkpoint (umv2_jax.retrofit).

The logit-parity tests build tiny random LlamaForCausalLM / Qwen3ForCausalLM models offline with
`transformers` and torch (CPU) and compare logits; they skip when those are not installed (the
`retrofit` extra, which README's test command installs: torch from PyPI is several GB), unless
UMV2_REQUIRE_RETROFIT=1 or CI is set, where a missing package fails them. Refusals and mapping errors need only
safetensors.
"""

import json
import os

import numpy as np
import pytest

from umv2_jax import retrofit
from umv2_jax.config import load_config
from umv2_jax.errors import ConfigError

TINY = [
    "model.d_model=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.d_ff=64",
    "data.seq_len=16",
    "train.batch_size=2",
    "train.steps=2",
]
MEMORY = [
    "model.sparse=ultramem_v2",
    "model.memory.n_keys=8",
    "model.memory.key_dim=8",
    "model.memory.rc_topk=4",
    "model.memory.topk=4",
    "model.memory.value_dim=16",
    "model.memory.pre_value_dim=8",
    "model.memory.calibration_tokens=64",
]


def _torch_and_transformers():
    try:
        import torch
        import transformers
    except ImportError:
        if os.environ.get("UMV2_REQUIRE_RETROFIT") or os.environ.get("CI"):
            raise  # CI installs the retrofit extra (README's test command): never skip there
        pytest.skip("needs torch and transformers (pip install 'umv2-jax[retrofit]')")
    return torch, transformers


def _save_tiny(tmp_path, kind: str, **overrides) -> str:
    """A tiny random model of `kind` saved with save_pretrained; every weight (norms included)
    random, so that a swapped or untransposed tensor shows."""
    torch, transformers = _torch_and_transformers()
    common = dict(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: our attention gets each kv head repeated
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        **overrides,
    )
    if kind == "llama":
        config = transformers.LlamaConfig(tie_word_embeddings=False, **common)
        model_class = transformers.LlamaForCausalLM
    else:
        config = transformers.Qwen3Config(head_dim=16, tie_word_embeddings=True, **common)
        model_class = transformers.Qwen3ForCausalLM
    torch.manual_seed(0)
    model = model_class(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter))
            else:
                parameter.normal_(0.0, 0.2)
    directory = str(tmp_path / kind)
    model.save_pretrained(directory)
    return directory


def _tokens(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(2, 24))


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_logits_match_transformers_and_zero_memory_changes_nothing(tmp_path, kind):
    hf_dir = _save_tiny(tmp_path, kind)
    dense = retrofit.retrofit_config(load_config(None, TINY), hf_dir)
    assert dense.model.qk_norm == (kind == "qwen3")
    assert dense.model.tie_embeddings == (kind == "qwen3")
    tokens = _tokens(dense.model.vocab_size)
    theirs = retrofit.hf_logits(hf_dir, tokens)
    params, rest = retrofit.build_retrofitted(dense, hf_dir)
    ours = retrofit.our_logits(dense, params, rest, tokens)
    report = retrofit.compare_logits(ours, theirs)
    print(f"{kind}: {report}")
    assert report["max_abs_logit_diff"] < 1e-4
    assert report["kl"] < 1e-9
    # With UltraMemV2 beside every FFN and its W_o zero: the dense model's logits, bit for bit.
    memory = retrofit.retrofit_config(load_config(None, TINY + MEMORY), hf_dir)
    params_m, rest_m = retrofit.build_retrofitted(memory, hf_dir)
    with_memory = retrofit.our_logits(memory, params_m, rest_m, tokens)
    np.testing.assert_array_equal(with_memory, ours)
    # A non-zero W_o (--output-scale) changes them: the memory is wired in.
    params_s, _ = retrofit.build_retrofitted(memory, hf_dir, output_scale=1.0)
    moved = retrofit.our_logits(memory, params_s, rest_m, tokens)
    assert np.max(np.abs(moved - ours)) > 1e-4


def _write_hf(directory, config: dict, tensors: dict | None = None) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config, handle)
    if tensors is not None:
        from safetensors.numpy import save_file

        save_file(tensors, os.path.join(directory, "model.safetensors"))
    return str(directory)


LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"architectures": ["Olmo2ForCausalLM"]}, "architectures"),
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ],
)
def test_unmappable_configs_are_one_line_naming_the_field(tmp_path, change, field):
    hf_dir = _write_hf(tmp_path / "hf", {**LLAMA, **change})
    with pytest.raises(ConfigError) as error:
        retrofit.retrofit_config(load_config(None, TINY), hf_dir)
    message = str(error.value)
    assert "\n" not in message and f"'{field}'" in message, message
    if field == "architectures" and "Olmo2" in str(change):
        assert "post-norm" in message


def test_cli_refuses_olmo2_with_exit_2_and_writes_nothing(tmp_path, capsys):
    hf_dir = _write_hf(tmp_path / "olmo2", {**LLAMA, "architectures": ["Olmo2ForCausalLM"]})
    config = tmp_path / "ours.yaml"
    config.write_text("model:\n  sparse: ultramem_v2\n")
    out = tmp_path / "retro.yaml"
    code = retrofit.main(["--hf", hf_dir, "--config", str(config), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert len(err.splitlines()) == 1 and "'architectures'" in err and "Olmo2" in err


def test_every_mapping_problem_is_collected_into_one_line(tmp_path):
    rng = np.random.default_rng(0)
    h, f = 32, 48
    tensors = {
        "model.embed_tokens.weight": rng.normal(size=(256, h)).astype(np.float32),
        "model.norm.weight": np.ones(h, np.float32),
        "model.layers.0.input_layernorm.weight": np.ones(h, np.float32),
        "model.layers.0.post_attention_layernorm.weight": np.ones(h, np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.normal(size=(h, h)).astype(np.float32),
        "model.layers.0.self_attn.k_proj.weight": rng.normal(size=(h, h)).astype(np.float32),
        "model.layers.0.self_attn.v_proj.weight": rng.normal(size=(h, h)).astype(np.float32),
        # o_proj missing; gate_proj with a wrong width; an unknown tensor
        "model.layers.0.mlp.gate_proj.weight": rng.normal(size=(f + 1, h)).astype(np.float32),
        "model.layers.0.mlp.up_proj.weight": rng.normal(size=(f, h)).astype(np.float32),
        "model.layers.0.mlp.down_proj.weight": rng.normal(size=(h, f)).astype(np.float32),
        "model.layers.0.mlp.extra.weight": np.ones(3, np.float32),
    }
    hf_dir = _write_hf(tmp_path / "hf", LLAMA, tensors)
    config = retrofit.retrofit_config(load_config(None, TINY), hf_dir)
    with pytest.raises(ConfigError) as error:
        retrofit.load_backbone(hf_dir, config.model)
    message = str(error.value)
    assert "\n" not in message and "3 problem(s)" in message
    assert "mlp.extra.weight" in message and "attn.out" in message and "ffn.gate" in message
