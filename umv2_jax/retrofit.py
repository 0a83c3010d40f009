"""Retrofit UltraMemV2 memory into a dense Hugging Face checkpoint (Llama / Qwen3 style).

    python -m umv2_jax.retrofit --hf DIR --config OURS.yaml --out RETRO.yaml [--set k=v ...] [--check]
    python train.py --config RETRO.yaml --init-from hf:DIR --workdir runs/retro   # then train memory

`--hf DIR` is a `save_pretrained` directory: `config.json` and `model.safetensors` (or shards with
`model.safetensors.index.json`). The command reads the architecture from `config.json`, writes
OURS.yaml with the backbone fields replaced by the checkpoint's (`model.d_model`, `num_layers`,
`num_heads`, `head_dim`, `d_ff`, `vocab_size`, `tie_embeddings`, `qk_norm`, `rope_theta`, `norm_eps`,
`max_seq_len`) to `--out`, and with `--check` builds the retrofitted model and reports how its
logits compare with the dense `transformers` model's (torch needed). Training from the written
config with `--init-from hf:DIR` (umv2_jax.training.warmstart) loads the weights: the backbone from
the checkpoint, the memory layers (`model.sparse: ultramem_v2`, beside every FFN of
`model.sparse_layers`) freshly initialized with their output projection W_o set to ZERO.

Why zero: the block adds the memory's output y = W_o·o to the residual, so W_o = 0 makes y = 0
exactly and step 0 computes the dense model's logits bit for bit (tested against `transformers`).
The first step's gradient reaches W_o only (every other memory parameter's gradient passes through
W_o, which is zero), so train with `train.trainable: memory` or `all`: `values` alone would never
move (a LoRA-style zero init). `retrofit_params(..., output_scale=S)` (Python) keeps S × the usual
random W_o instead, at the price of step 0 differing from the dense model.

Mapping (HF `nn.Linear` weights are [out, in]; ours are [in, …]; h = hidden_size, n = heads,
d = head_dim, kv = key/value heads):

    model.embed_tokens.weight                  [V, h]   → embed [V_pad, h] (rows ≥ V zero)
    model.layers.i.input_layernorm.weight      [h]      → block i attn_norm.scale
    model.layers.i.self_attn.q_proj.weight     [n·d, h] → attn.query [h, n, d]  (transposed)
    model.layers.i.self_attn.k_proj.weight     [kv·d, h]→ attn.key   [h, n, d]  (transposed; each
    model.layers.i.self_attn.v_proj.weight     [kv·d, h]→ attn.value [h, n, d]   kv head repeated
                                                                                n/kv times: GQA)
    model.layers.i.self_attn.o_proj.weight     [h, n·d] → attn.out   [n, d, h]  (transposed)
    model.layers.i.self_attn.q_norm.weight     [d]      → attn.query_norm.scale (Qwen3 QK-norm)
    model.layers.i.self_attn.k_norm.weight     [d]      → attn.key_norm.scale
    model.layers.i.post_attention_layernorm.weight [h]  → ffn_norm.scale (the pre-FFN norm)
    model.layers.i.mlp.gate_proj.weight        [f, h]   → ffn.gate [h, f]  (transposed)
    model.layers.i.mlp.up_proj.weight          [f, h]   → ffn.up   [h, f]  (transposed)
    model.layers.i.mlp.down_proj.weight        [h, f]   → ffn.down [f, h]  (transposed)
    model.norm.weight                          [h]      → final_norm.scale
    lm_head.weight                             [V, h]   → lm_head [h, V_pad] (absent when tied)

Conventions that match without conversion: pre-norm blocks, RMSNorm y = x·rsqrt(mean(x²)+eps)·γ in
fp32, rotate-half RoPE with inv_freq = θ^(−2j/d), attention scale 1/sqrt(d), SwiGLU with silu, QK-norm
per head over d after the projections and before RoPE (Qwen3's placement). A vocabulary that is not
a multiple of 128 is padded with zero embedding rows and zero head columns: those logits are 0, so
compare (and sample) the first V columns; the training loss counts them in its softmax.

Refused, with one line naming the `config.json` field: any architecture other than LlamaForCausalLM,
MistralForCausalLM (sliding_window null) and Qwen3ForCausalLM (Qwen2: q/k/v biases) —
OLMo-2 (`Olmo2ForCausalLM`) is among them: it normalizes the sublayer outputs (post-norm) and its
QK-norm spans all heads (n·d), neither of which our pre-norm block expresses; `rope_scaling`
(Llama 3.1 / YaRN scaling), attention or MLP biases, an activation other than silu, sliding-window
attention.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Any

import numpy as np

from umv2_jax.errors import ConfigError, UserError

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM")
HF_CONFIG = "config.json"


def _refuse(hf_dir: str, field: str, message: str) -> ConfigError:
    return ConfigError(f"hf:{hf_dir}: {HF_CONFIG} field '{field}' {message}")


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    """config.json of a Hugging Face checkpoint directory; ConfigError (one line) if absent."""
    path = os.path.join(hf_dir, HF_CONFIG)
    if not os.path.isfile(path):
        raise ConfigError(
            f"hf:{hf_dir} has no {HF_CONFIG}; point at a save_pretrained directory (config.json "
            "and model.safetensors)"
        )
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"hf:{hf_dir}: {HF_CONFIG} is not readable JSON ({error})") from None


def _rope(hf: dict[str, Any], hf_dir: str) -> float:
    """RoPE θ; ConfigError for any scaling (only the plain rotate-half RoPE maps)."""
    parameters = hf.get("rope_parameters") or {}  # transformers ≥ 5 keeps θ here
    scaling = hf.get("rope_scaling")
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type")) if scaling else None
    kind = kind or parameters.get("rope_type", "default")
    if kind not in (None, "default"):
        field = "rope_scaling" if scaling else "rope_parameters"
        raise _refuse(
            hf_dir,
            field,
            f"is {kind!r}: only plain RoPE maps (no Llama-3 / YaRN / dynamic scaling)",
        )
    theta = hf.get("rope_theta", parameters.get("rope_theta", 10000.0))
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(hf_dir, "partial_rotary_factor", "is not 1: our RoPE rotates every dimension")
    return float(theta)


def backbone_fields(hf: dict[str, Any], hf_dir: str = "DIR") -> dict[str, Any]:
    """The `model.*` fields the checkpoint fixes, from its config.json; ConfigError naming the
    first field we cannot map."""
    architectures = hf.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in SUPPORTED:
        reason = (
            ": OLMo-2 normalizes sublayer outputs (post-norm) and its QK-norm spans all heads; our "
            "block is pre-norm with per-head QK-norm"
            if architectures and architectures[0].startswith("Olmo")
            else ""
        )
        raise _refuse(
            hf_dir,
            "architectures",
            f"is {architectures!r}; supported: {', '.join(SUPPORTED)}{reason}",
        )
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise _refuse(hf_dir, field, "is true: our attention and FFN have no biases")
    activation = hf.get("hidden_act", "silu")
    if activation != "silu":
        raise _refuse(hf_dir, "hidden_act", f"is {activation!r}; our FFN is SwiGLU (silu)")
    if hf.get("sliding_window") and hf.get("use_sliding_window", True):
        raise _refuse(hf_dir, "sliding_window", "is set: our attention is full causal")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    for field in (*required, "intermediate_size"):
        if not isinstance(hf.get(field), int) or hf[field] < 1:
            raise _refuse(hf_dir, field, f"is {hf.get(field)!r}, not a positive integer")
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise _refuse(
            hf_dir, "num_key_value_heads", f"{kv_heads} does not divide num_attention_heads"
        )
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    qk_norm = architectures[0] == "Qwen3ForCausalLM"
    eps = hf.get("rms_norm_eps", 1e-6)
    return {
        "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": heads,
        "head_dim": head_dim,
        "d_ff": hf["intermediate_size"],
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "qk_norm": qk_norm,
        "rope_theta": _rope(hf, hf_dir),
        "norm_eps": float(eps),
        "max_seq_len": int(hf.get("max_position_embeddings", 2048)),
    }


def retrofit_config(config, hf_dir: str):
    """`config` with its backbone replaced by the checkpoint's (`backbone_fields`), validated."""
    from umv2_jax.config import Config

    fields = backbone_fields(read_hf_config(hf_dir), hf_dir)
    model = dataclasses.replace(config.model, **fields)
    data = config.data
    if data.seq_len > model.max_seq_len:
        data = dataclasses.replace(data, seq_len=model.max_seq_len)
    retro = dataclasses.replace(config, model=model, data=data)
    Config.validate(retro)
    return retro


def check_matches(config, hf_dir: str) -> None:
    """ConfigError naming the first `model.*` field where `config` differs from the checkpoint."""
    fields = backbone_fields(read_hf_config(hf_dir), hf_dir)
    for name, value in fields.items():
        ours = getattr(config.model, name)
        if name == "head_dim":
            ours = config.model.resolved_head_dim
        if ours != value:
            raise ConfigError(
                f"config 'model.{name}': {ours!r}, but hf:{hf_dir} has {value!r}; write the config "
                f"with python -m umv2_jax.retrofit --hf {hf_dir} --config YOURS.yaml --out NEW.yaml"
            )


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint's safetensors file(s) as float32 numpy arrays."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise UserError(
            "reading a Hugging Face checkpoint needs safetensors: pip install 'umv2-jax[retrofit]'"
        ) from None
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ConfigError(
            f"hf:{hf_dir} has neither model.safetensors nor model.safetensors.index.json; save "
            "the model with save_pretrained(DIR) (safe_serialization is the default)"
        )
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            raise ConfigError(f"hf:{hf_dir}: shard {name} named by the index is missing")
        with safe_open(path, framework="flax") as handle:  # flax: bf16 arrives as jax bf16
            for key in handle.keys():
                tensors[key] = np.asarray(handle.get_tensor(key), np.float32)
    return tensors


def _linear_in_heads(weight: np.ndarray, heads: int, head_dim: int, repeat: int) -> np.ndarray:
    """[kv·d, h] (nn.Linear) → [h, n, d], each of the kv heads repeated `repeat` times."""
    h = weight.shape[1]
    per_head = weight.T.reshape(h, heads, head_dim)
    return np.repeat(per_head, repeat, axis=1) if repeat > 1 else per_head


# (pattern, target path inside a block or at model level, converter(tensor, fields) → array)
_BLOCK_KEYS = (
    (r"input_layernorm\.weight", ("attn_norm", "scale"), lambda t, f: t),
    (
        r"self_attn\.q_proj\.weight",
        ("attn", "query"),
        lambda t, f: _linear_in_heads(t, f["num_heads"], f["head_dim"], 1),
    ),
    (
        r"self_attn\.k_proj\.weight",
        ("attn", "key"),
        lambda t, f: _linear_in_heads(t, f["kv_heads"], f["head_dim"], f["repeat"]),
    ),
    (
        r"self_attn\.v_proj\.weight",
        ("attn", "value"),
        lambda t, f: _linear_in_heads(t, f["kv_heads"], f["head_dim"], f["repeat"]),
    ),
    (
        r"self_attn\.o_proj\.weight",
        ("attn", "out"),
        lambda t, f: t.T.reshape(f["num_heads"], f["head_dim"], t.shape[0]),
    ),
    (r"self_attn\.q_norm\.weight", ("attn", "query_norm", "scale"), lambda t, f: t),
    (r"self_attn\.k_norm\.weight", ("attn", "key_norm", "scale"), lambda t, f: t),
    (r"post_attention_layernorm\.weight", ("ffn_norm", "scale"), lambda t, f: t),
    (r"mlp\.gate_proj\.weight", ("ffn", "gate"), lambda t, f: t.T),
    (r"mlp\.up_proj\.weight", ("ffn", "up"), lambda t, f: t.T),
    (r"mlp\.down_proj\.weight", ("ffn", "down"), lambda t, f: t.T),
)
_MODEL_KEYS = (
    (r"model\.embed_tokens\.weight", ("embed",), lambda t, f: _pad_rows(t, f["padded_vocab"])),
    (r"model\.norm\.weight", ("final_norm", "scale"), lambda t, f: t),
    (r"lm_head\.weight", ("lm_head",), lambda t, f: _pad_rows(t, f["padded_vocab"]).T),
)
_IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def _pad_rows(tensor: np.ndarray, rows: int) -> np.ndarray:
    if tensor.shape[0] == rows:
        return tensor
    padded = np.zeros((rows, *tensor.shape[1:]), tensor.dtype)
    padded[: tensor.shape[0]] = tensor
    return padded


def map_tensors(tensors: dict[str, np.ndarray], hf: dict[str, Any], model_config) -> dict:
    """{"embed", "final_norm", "lm_head", "blocks": {i: {...}}} as our pure-dict paths (loop
    layout: one entry per block), converted by the key table above. Every problem (a tensor no
    rule maps, a parameter no tensor fills, a shape that does not fit) is collected and raised
    together as one ConfigError line."""
    fields = backbone_fields(hf, "DIR")
    kv_heads = hf.get("num_key_value_heads") or fields["num_heads"]
    info = {
        **fields,
        "kv_heads": kv_heads,
        "repeat": fields["num_heads"] // kv_heads,
        "padded_vocab": model_config.padded_vocab_size,
    }
    tied = fields["tie_embeddings"]
    out: dict[str, Any] = {"blocks": {}}
    problems: list[str] = []
    block_pattern = re.compile(r"model\.layers\.(\d+)\.(.+)")
    for key in sorted(tensors):
        tensor = tensors[key]
        if any(re.fullmatch(pattern, key) for pattern in _IGNORED):
            continue
        if tied and key == "lm_head.weight":
            continue  # some writers save the tied head too; the embedding is the head
        match = block_pattern.fullmatch(key)
        table = _BLOCK_KEYS if match else _MODEL_KEYS
        name = match.group(2) if match else key
        rule = next((r for r in table if re.fullmatch(r[0], name)), None)
        if rule is None:
            problems.append(f"tensor {key} {list(tensor.shape)} has no mapping")
            continue
        _, path, convert = rule
        try:
            value = np.asarray(convert(tensor, info), np.float32)
        except ValueError as error:
            problems.append(f"tensor {key} {list(tensor.shape)} does not convert ({error})")
            continue
        node = out["blocks"].setdefault(int(match.group(1)), {}) if match else out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out, problems


def _expected(model_config) -> dict[str, tuple[int, ...]]:
    """{dotted path: shape} of the dense backbone parameters in loop layout."""
    h, n, d, f = (
        model_config.d_model,
        model_config.num_heads,
        model_config.resolved_head_dim,
        model_config.d_ff,
    )
    shapes = {"embed": (model_config.padded_vocab_size, h), "final_norm.scale": (h,)}
    if not model_config.tie_embeddings:
        shapes["lm_head"] = (h, model_config.padded_vocab_size)
    for i in range(model_config.num_layers):
        block = {
            "attn_norm.scale": (h,),
            "attn.query": (h, n, d),
            "attn.key": (h, n, d),
            "attn.value": (h, n, d),
            "attn.out": (n, d, h),
            "ffn_norm.scale": (h,),
            "ffn.gate": (h, f),
            "ffn.up": (h, f),
            "ffn.down": (f, h),
        }
        if model_config.qk_norm:
            block["attn.query_norm.scale"] = (d,)
            block["attn.key_norm.scale"] = (d,)
        shapes.update({f"blocks.{i}.{key}": shape for key, shape in block.items()})
    return shapes


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def load_backbone(hf_dir: str, model_config) -> dict[str, np.ndarray]:
    """{dotted loop-layout path: float32 array} of every backbone parameter, from the checkpoint;
    one ConfigError listing every problem when the tensors do not fill the backbone exactly."""
    hf = read_hf_config(hf_dir)
    mapped, problems = map_tensors(read_tensors(hf_dir), hf, model_config)
    flat = _flatten(mapped)
    expected = _expected(model_config)
    for name, shape in expected.items():
        if name not in flat:
            problems.append(f"no tensor fills {name} {list(shape)}")
        elif tuple(flat[name].shape) != shape:
            problems.append(f"{name} is {list(flat[name].shape)}, the model needs {list(shape)}")
    for name in sorted(set(flat) - set(expected)):
        problems.append(f"{name} is not a parameter of the config's model")
    if problems:
        shown = "; ".join(problems[:6]) + (
            f"; … {len(problems) - 6} more" if len(problems) > 6 else ""
        )
        raise ConfigError(f"hf:{hf_dir}: {len(problems)} problem(s) mapping the weights: {shown}")
    return flat


def retrofit_params(params: dict, config, hf_dir: str, output_scale: float = 0.0) -> dict:
    """`params` (a pure dict of the config's model, any layout, e.g. freshly initialized) with
    every backbone parameter replaced by the checkpoint's and each memory layer's W_o scaled by
    `output_scale` (0: zero, so the model computes the dense model's logits). numpy leaves in the
    parameters' dtypes; the memory layers' other parameters are kept as given."""
    import jax

    from umv2_jax.models.transformer import convert_block_tree, segment_layout

    model_config = config.model
    check_matches(config, hf_dir)
    flat = load_backbone(hf_dir, model_config)
    loop_layout = tuple((i,) for i in range(model_config.num_layers))
    layout = segment_layout(model_config)
    host = jax.tree.map(np.asarray, params)
    per_block = convert_block_tree(host["blocks"], layout, loop_layout)
    for name, value in flat.items():
        parts = name.split(".")
        if parts[0] == "blocks":
            node, parts = per_block[int(parts[1])], parts[2:]
        else:
            node = host
        for part in parts[:-1]:
            node = node[part]
        old = node[parts[-1]]
        node[parts[-1]] = value.astype(old.dtype)
    for block in per_block.values():
        sparse = block.get("sparse")
        if sparse is not None and "output_proj" in sparse:
            sparse["output_proj"] = (sparse["output_proj"] * output_scale).astype(
                sparse["output_proj"].dtype
            )
    host["blocks"] = jax.tree.map(np.asarray, convert_block_tree(per_block, loop_layout, layout))
    return host


# --------------------------------------------------------------------------------------------------
# Parity with transformers (torch on CPU)
# --------------------------------------------------------------------------------------------------


def hf_logits(hf_dir: str, tokens: np.ndarray) -> np.ndarray:
    """float32 [batch, seq, V] logits of the `transformers` model in `hf_dir` (fp32, CPU, eager)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, attn_implementation="eager", **{dtype_key: torch.float32}
    )
    model.eval()
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long))
    return out.logits.float().numpy()


def our_logits(config, params: dict, rest: dict, tokens: np.ndarray) -> np.ndarray:
    """float32 [batch, seq, V] logits of our model (the first V = vocab_size columns)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from umv2_jax.models.transformer import Transformer
    from umv2_jax.training.state import ModelParts

    abstract = nnx.eval_shape(lambda: Transformer(config.model, nnx.Rngs(0)))
    parts, _, _ = ModelParts.split(abstract)

    @jax.jit
    def forward(params, rest, tokens):
        logits, _ = parts.build(params, rest)(tokens)
        return logits

    logits = forward(params, rest, jnp.asarray(tokens, jnp.int32))
    return np.asarray(logits)[..., : config.model.vocab_size]


def compare_logits(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """max |Δlogit| and the mean KL(theirs ‖ ours) per position, in nats."""
    ours = np.asarray(ours, np.float64)
    theirs = np.asarray(theirs, np.float64)

    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    p, q = log_softmax(theirs), log_softmax(ours)
    kl = np.sum(np.exp(p) * (p - q), axis=-1)
    return {"max_abs_logit_diff": float(np.max(np.abs(ours - theirs))), "kl": float(kl.mean())}


def build_retrofitted(config, hf_dir: str, output_scale: float = 0.0):
    """(params, rest) pure dicts: the config's model initialized, then `retrofit_params`."""
    import jax
    from flax import nnx

    from umv2_jax.models.transformer import Transformer
    from umv2_jax.training.state import ModelParts

    _, params, rest = ModelParts.split(Transformer(config.model, nnx.Rngs(config.train.seed)))
    params = retrofit_params(params, config, hf_dir, output_scale)
    return jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m umv2_jax.retrofit",
        description="Write a config that puts UltraMemV2 memory beside the FFNs of a dense Hugging "
        "Face checkpoint; train it with train.py --config OUT --init-from hf:DIR.",
    )
    parser.add_argument("--hf", required=True, metavar="DIR", help="save_pretrained directory")
    parser.add_argument("--config", required=True, help="our YAML config (model.sparse, memory)")
    parser.add_argument("--out", required=True, metavar="OUT.yaml", help="the config to write")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument(
        "--check",
        action="store_true",
        help="also compare the retrofitted model's logits with transformers' (needs torch)",
    )
    args = parser.parse_args(argv)
    try:
        import yaml

        from umv2_jax.config import load_config, to_dict

        if os.path.exists(args.out):
            raise UserError(f"--out {args.out} exists; pick a new path (nothing is overwritten)")
        hf_dir = args.hf
        if not os.path.isdir(hf_dir):
            raise ConfigError(f"--hf {hf_dir} is not a directory")
        config = retrofit_config(load_config(args.config, args.overrides), hf_dir)
        read_tensors_check = load_backbone(hf_dir, config.model)  # every mapping problem now
        del read_tensors_check
        report = {}
        if args.check:
            try:
                import torch  # noqa: F401
                import transformers  # noqa: F401
            except ImportError:
                raise UserError(
                    "--check needs torch and transformers: pip install 'umv2-jax[retrofit]'"
                ) from None
            params, rest = build_retrofitted(config, hf_dir)
            vocab = config.model.vocab_size
            tokens = np.random.default_rng(0).integers(0, vocab, size=(2, 16))
            report = compare_logits(
                our_logits(config, params, rest, tokens), hf_logits(hf_dir, tokens)
            )
        with open(args.out, "w") as handle:
            yaml.safe_dump(to_dict(config), handle, sort_keys=False)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    model = config.model
    print(
        f"wrote {args.out}: {model.num_layers} layers, d_model {model.d_model}, {model.num_heads} "
        f"heads × {model.resolved_head_dim}, d_ff {model.d_ff}, vocab {model.vocab_size}, "
        f"sparse {model.sparse} (memory W_o = 0: step 0 equals the dense model)"
    )
    if report:
        print(
            f"logit parity with transformers: max |Δlogit| {report['max_abs_logit_diff']:.3g}, "
            f"KL {report['kl']:.3g} nats"
        )
    print(f"train with  python train.py --config {args.out} --init-from hf:{args.hf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
