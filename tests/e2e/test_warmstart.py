"""Warm start and finetuning from the command line: `train.py --init-from RUN[:STEP] | hf:DIR`."""

import json
import os

import jax
import numpy as np
import pytest

from umv2_jax.config import load_config
from umv2_jax.training import finetune, warmstart
from umv2_jax.training.cli import main
from umv2_jax.training.state import build

MODEL = {
    "model.d_model": 32,
    "model.num_layers": 2,
    "model.num_heads": 2,
    "model.d_ff": 64,
    "model.sparse": "ultramem_v2",
    "model.memory.n_keys": 8,
    "model.memory.key_dim": 8,
    "model.memory.rc_topk": 4,
    "model.memory.topk": 4,
    "model.memory.value_dim": 16,
    "model.memory.pre_value_dim": 8,
    "model.memory.calibration_tokens": 64,
    "data.seq_len": 32,
    "train.batch_size": 4,
    "train.eval_every": 2,
    "train.eval_batches": 1,
    "train.learning_rate": 0.01,
    "train.warmup_fraction": 0,
    "checkpoint.every": 2,
    "checkpoint.async_save": False,
}


def _sets(overrides: dict) -> list[str]:
    argv = []
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    return argv


def _config(**extra):
    return load_config(None, [f"{k}={v}" for k, v in {**MODEL, **extra}.items()])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("base") / "run")
    assert main(_sets(MODEL) + ["--workdir", workdir, "--steps", "2", "--quiet"]) == 0
    return workdir


def test_step_0_of_a_warm_start_holds_the_base_parameters_exactly(base_run):
    config = _config(**{"train.init_from": f"{base_run}:2", "train.seed": 7})
    source = warmstart.resolve(config)
    assert (source.kind, source.step) == ("run", 2)
    setup = build(config)
    state, rest = warmstart.initial_state(config, setup, source)
    base_params, base_rest = warmstart.restore_run(config, source)
    got, want = _flat(state["params"]), _flat(base_params)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(_bits(got[path]), _bits(want[path]), err_msg=path)
    for path, value in _flat(base_rest).items():  # permutations: which row each cell reads
        np.testing.assert_array_equal(_flat(rest)[path], value, err_msg=path)
    # A fresh optimizer: step 0 and zero moments.
    assert int(state["step"]) == 0
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state["opt_state"]))
    # The seed's random init is not what the run starts from.
    assert not np.array_equal(got["['embed']"], _flat(setup.state["params"])["['embed']"])


def test_warm_start_from_an_exported_directory_holds_the_exported_parameters(base_run, tmp_path):
    """`--init-from DIR` of `python -m umv2_jax.export`: step 0 holds the exported tensors
    bitwise, also when the new config scans the blocks the export wrote one by one."""
    from umv2_jax import export

    out = str(tmp_path / "exported")
    assert export.main(["--workdir", base_run, "--out", out]) == 0
    config = _config(**{"train.init_from": out, "model.scan_layers": "true"})
    source = warmstart.resolve(config)
    assert source.kind == "export"
    setup = build(config)
    state, _ = warmstart.initial_state(config, setup, source)
    from_run = _config(**{"train.init_from": f"{base_run}:2", "model.scan_layers": "true"})
    base_params, _ = warmstart.restore_run(from_run, warmstart.resolve(from_run))
    got, want = _flat(state["params"]), _flat(base_params)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(_bits(got[path]), _bits(want[path]), err_msg=path)
    other = _config(**{"train.init_from": out, "model.d_ff": 48})
    with pytest.raises(Exception, match="parameter .* is .* there but .* in this config"):
        warmstart.resolve(other)


def test_rows_finetune_from_the_cli_changes_only_the_chosen_rows(base_run, tmp_path, capsys):
    # Usage counts: the base model on its own data (shakespeare) and on new data (random bytes).
    config = _config()
    source = warmstart.InitSource("run", base_run, 2)
    params, rest = warmstart.restore_run(config, source)
    setup = build(config)
    rng = np.random.default_rng(0)

    def batches(tokens):
        return [{"inputs": tokens, "loss_mask": np.ones(tokens.shape, np.float32)}]

    text = np.frombuffer(b"ROMEO: But soft, what light through yonder window breaks?", np.uint8)
    base_tokens = np.resize(text, (2, 32)).astype(np.int32)
    new_tokens = rng.integers(0, 256, size=(2, 32), dtype=np.int32)
    for name, tokens in (("base", base_tokens), ("new", new_tokens)):
        counts, total = finetune.count_row_usage(setup.parts, params, rest, batches(tokens))
        finetune.write_row_usage(str(tmp_path / f"{name}.npz"), counts, total, "base", 2)
    workdir = str(tmp_path / "ft")
    ft = {
        "train.trainable": "rows",
        "train.rows_usage_base": tmp_path / "base.npz",
        "train.rows_usage_new": tmp_path / "new.npz",
        "train.rows_count": 5,
    }
    argv = _sets({**MODEL, **ft}) + ["--init-from", base_run, "--workdir", workdir]
    assert main(argv + ["--steps", "2", "--quiet"]) == 0
    assert f"Initialized from {base_run} step 2" in capsys.readouterr().out
    after, _ = warmstart.restore_run(config, warmstart.InitSource("run", workdir, 2))
    mask = finetune.row_mask_from_config(_config(**ft))
    assert mask.sum(axis=1).tolist() == [5, 5]
    before, after = _flat(params), _flat(after)
    for path in before:
        if path.endswith("['values']") or path.endswith("['pre_values']"):
            untouched = ~mask
            np.testing.assert_array_equal(
                _bits(after[path][untouched]), _bits(before[path][untouched])
            )
            assert np.all(np.any(after[path][mask] != before[path][mask], axis=-1)), path
        else:
            np.testing.assert_array_equal(_bits(after[path]), _bits(before[path]), err_msg=path)
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["train"]["init_from"] == base_run


@pytest.mark.parametrize(
    "extra, init_from, message",
    [
        ({"model.d_ff": 48}, "{base}", "parameter params.blocks.0.ffn.down is [64, 32] there but"),
        ({}, "{base}:7", "has no checkpoint at step 7; saved steps: 2"),
        ({}, "{tmp}/nowhere", "is not a directory"),
        ({"train.trainable": "rows"}, "{base}", "train.rows_usage_base"),
    ],
)
def test_bad_warm_starts_are_one_line_exit_2_and_write_nothing(
    base_run, tmp_path, capsys, extra, init_from, message
):
    workdir = tmp_path / "run"
    source = init_from.format(base=base_run, tmp=tmp_path)
    argv = _sets({**MODEL, **extra}) + ["--init-from", source, "--workdir", str(workdir)]
    assert main(argv + ["--steps", "2", "--quiet"]) == 2
    assert message in _one_error_line(capsys)
    assert not workdir.exists()


def test_an_unmappable_hugging_face_config_is_one_line_naming_the_field(tmp_path, capsys):
    hf_dir = tmp_path / "olmo2"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"architectures": ["Olmo2ForCausalLM"]}))
    workdir = tmp_path / "run"
    argv = _sets(MODEL) + ["--init-from", f"hf:{hf_dir}", "--workdir", str(workdir)]
    assert main(argv + ["--steps", "2", "--quiet"]) == 2
    line = _one_error_line(capsys)
    assert "'architectures'" in line and "Olmo2ForCausalLM" in line
    assert not workdir.exists()


def _write_llama(directory, rng) -> dict[str, np.ndarray]:
    """A dense 2-layer Llama-style checkpoint written with numpy (no torch needed)."""
    from safetensors.numpy import save_file

    h, f, vocab, layers = 32, 64, 259, 2  # the byte tokenizer's ids; padded to 384 here
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": h,
        "intermediate_size": f,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
    }
    normal = lambda *shape: (0.1 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    tensors = {"model.embed_tokens.weight": normal(vocab, h), "model.norm.weight": normal(h)}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        tensors.update(
            {
                prefix + "input_layernorm.weight": normal(h),
                prefix + "post_attention_layernorm.weight": normal(h),
                prefix + "self_attn.q_proj.weight": normal(h, h),
                prefix + "self_attn.k_proj.weight": normal(h // 2, h),
                prefix + "self_attn.v_proj.weight": normal(h // 2, h),
                prefix + "self_attn.o_proj.weight": normal(h, h),
                prefix + "mlp.gate_proj.weight": normal(f, h),
                prefix + "mlp.up_proj.weight": normal(f, h),
                prefix + "mlp.down_proj.weight": normal(h, f),
            }
        )
    os.makedirs(directory)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))
    return tensors


def test_retrofit_then_train_the_memory_from_hf(tmp_path, capsys):
    from umv2_jax import retrofit

    hf_dir = tmp_path / "llama"
    tensors = _write_llama(hf_dir, np.random.default_rng(0))
    ours = tmp_path / "ours.yaml"
    memory = {k: v for k, v in MODEL.items() if k.startswith("model.memory") or k == "model.sparse"}
    ours.write_text("name: retro\n")
    retro = tmp_path / "retro.yaml"
    argv = ["--hf", str(hf_dir), "--config", str(ours), "--out", str(retro)]
    argv += [f"--set={k}={v}" for k, v in memory.items()]
    assert retrofit.main(argv) == 0
    assert f"--init-from hf:{hf_dir}" in capsys.readouterr().out
    workdir = str(tmp_path / "run")
    run = ["--config", str(retro), "--init-from", f"hf:{hf_dir}", "--workdir", workdir]
    small = {"data.seq_len": 32, "train.batch_size": 4, "train.trainable": "memory"}
    small.update({"train.eval_batches": 1, "checkpoint.every": 2, "checkpoint.async_save": False})
    assert main(run + _sets(small) + ["--steps", "2", "--quiet"]) == 0
    config = load_config(str(retro), [f"{k}={v}" for k, v in small.items()])
    after, _ = warmstart.restore_run(config, warmstart.InitSource("run", workdir, 2))
    # The backbone is the checkpoint's, untouched by training; the memory trained (W_o left 0).
    np.testing.assert_array_equal(after["embed"][:259], tensors["model.embed_tokens.weight"])
    assert not np.any(after["embed"][259:])  # padding rows: zero, and frozen
    q = tensors["model.layers.1.self_attn.q_proj.weight"].T.reshape(32, 2, 16)
    np.testing.assert_array_equal(after["blocks"][1]["attn"]["query"], q)
    k = tensors["model.layers.0.self_attn.k_proj.weight"].T.reshape(32, 1, 16)
    np.testing.assert_array_equal(after["blocks"][0]["attn"]["key"], np.repeat(k, 2, axis=1))
    down = tensors["model.layers.0.mlp.down_proj.weight"].T
    np.testing.assert_array_equal(after["blocks"][0]["ffn"]["down"], down)
    assert np.any(after["blocks"][0]["sparse"]["output_proj"] != 0)
