"""Typed, validated configuration: frozen dataclasses, YAML files and dotted overrides.

    cfg = load_config("configs/default.yaml", ["model.num_layers=4", "train.steps=100"])

Every field is type-checked and every invalid value or combination raises `ConfigError` naming the
dotted key and what is allowed. Unknown keys get a "did you mean" suggestion. The config is the single
source of truth: the model is built from `cfg.model` alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

# The package's floor: this module imports nothing of umv2_jax but `errors` (a leaf that imports
# nothing). What validation needs from higher floors is data owned here (the op and sharding
# vocabularies below, which `ops.registry` and `parallel.rules` re-export) or a check those floors
# register at import (`register_check`: the synthetic tasks' own checks).
from umv2_jax.errors import ConfigError, show

SparseKind = Literal[
    "none", "ultramem_v2", "moe", "ultramem", "memory_plus", "pkm", "peer", "engram"
]
# The sparse kinds whose layers hold memory value tables (`ValueParam`s).
_MEMORY_KINDS = ("ultramem_v2", "ultramem", "memory_plus", "pkm", "peer", "engram")
# The op registry's vocabulary (umv2_jax.ops.registry re-exports it), one for every op.
IMPLEMENTATIONS = ("auto", "xla", "pallas", "ragged_dot")
# Names earlier versions accepted (grouped_matmul's own vocabulary) → the name now.
RENAMED_IMPLEMENTATIONS = {"block_padded": "xla", "megablox": "pallas"}
Implementation = Literal[IMPLEMENTATIONS]
DType = Literal["float32", "bfloat16"]
# Mesh axes that carry distinct tokens (every axis but `tensor`; umv2_jax.parallel.mesh re-exports it).
BATCH_AXES = ("data", "fsdp", "expert")
MeshAxes = str | tuple[str, ...] | None
# Logical axis → mesh axis (or a tuple of mesh axes, or None): the sharding table that
# umv2_jax.parallel.rules applies and re-exports; `mesh.rules` overrides entries (`resolve_rules`).
LOGICAL_RULES: dict[str, MeshAxes] = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv": None,
    "mlp": "tensor",
    "norm": None,
    "experts": "expert",
    "layers": None,
    "mem_rows": "fsdp",
    "mem_dim": "tensor",
}

# Checks that higher floors add at import, for what only they know (a synthetic task's vocabulary
# and sequence-length needs: umv2_jax.data.tasks registers them). "data": f(DataConfig) from
# DataConfig.validate when data.source is task:NAME; "config": f(Config) from Config.validate.
_CHECKS: dict[str, list[Any]] = {"data": [], "config": []}


def register_check(section: str, check: Any) -> None:
    """Run `check(section_config)` in every later validation of `section` ("data" or "config");
    it raises ConfigError. Registering the same function twice keeps one."""
    if section not in _CHECKS:
        raise ValueError(f"unknown section {section!r}; use one of {', '.join(_CHECKS)}")
    if check not in _CHECKS[section]:
        _CHECKS[section].append(check)


# `model.scan_layers: auto` scans over the blocks from this depth on (shallower models compile fast
# as a loop, and their checkpoints keep one entry per block).
SCAN_MIN_LAYERS = 8
# Every integer field lies in int32's range: steps, sizes and seeds reach JAX as int32 (a larger
# `--steps` would overflow at the first step, after the run directory was written).
INT_MIN, INT_MAX = -(2**31), 2**31 - 1


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config '{key}': {message}")


def _check_choices(section: Any, prefix: str) -> None:
    """Every `Literal[...]` field of a config section (and of its sub-sections) holds an allowed
    value. The YAML loader checks these too; this covers configs built directly in Python."""
    hints = typing.get_type_hints(type(section))
    for item in dataclasses.fields(section):
        value, hint = getattr(section, item.name), hints[item.name]
        if item.metadata.get(_LANGUAGE):  # parsed and checked by its language when set
            continue
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}.{item.name}")
        elif typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
            allowed = ", ".join(str(choice) for choice in typing.get_args(hint))
            _require(
                False, f"{prefix}.{item.name}", f"{show(value)} is not allowed; allowed: {allowed}"
            )


def _check_finite(section: Any, prefix: str) -> None:
    """Every float field of a config section (its sub-sections and typed values too) is a finite
    number: `inf` and `nan` pass the type check (YAML `.inf`, `--set x=nan`) but no bound."""
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        key = f"{prefix}.{item.name}" if prefix else item.name
        if dataclasses.is_dataclass(value):
            if item.metadata.get(_LANGUAGE):  # e.g. value_lr: decay:inf, named by its own key
                for inner in dataclasses.fields(value):
                    number = getattr(value, inner.name)
                    _require(
                        not isinstance(number, float) or math.isfinite(number),
                        key,
                        f"'{value}' holds {number}, not a finite number",
                    )
            else:
                _check_finite(value, key)
        elif isinstance(value, float):
            _require(math.isfinite(value), key, f"{value} is not a finite number")


# A run name is one plain path component: it names the run directory runs/<name>.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


# --------------------------------------------------------------------------------------------------
# The small string languages, parsed once into typed values
# --------------------------------------------------------------------------------------------------
#
# YAML, `--set` overrides and config.json hold these as short strings ("ring:9", "decay:4", "2:5/6:9");
# the sections hold the typed values. A field marked with `_language(...)` accepts either form (from
# YAML or from Python), and `to_dict` writes the string back, so saved configs round-trip.


@dataclass(frozen=True)
class ValueShare:
    """`model.memory.value_share` (docs/model.md §3): `none` | `ring:g` | `noring:g` | `block:g`.

    topology: which g tables a memory layer's window spans; window: g (1 for `none`).
    """

    topology: Literal["none", "ring", "noring", "block"] = "none"
    window: int = 1

    def __post_init__(self) -> None:
        key = "model.memory.value_share"
        _require(
            self.topology in ("none", "ring", "noring", "block"),
            key,
            f"unknown topology '{self.topology}'; allowed: none, ring:g, noring:g, block:g",
        )
        _require(
            isinstance(self.window, int) and self.window >= 1,
            key,
            f"window {self.window!r} must be a positive integer, e.g. {self.topology}:4",
        )
        _require(self.topology != "none" or self.window == 1, key, "'none' has window 1")

    @classmethod
    def parse(cls, text: str, key: str = "model.memory.value_share") -> ValueShare:
        if text == "none":
            return cls()
        topology, _, window = text.partition(":")
        _require(
            topology in ("ring", "noring", "block"),
            key,
            f"unknown topology '{text}'; allowed: none, ring:g, noring:g, block:g",
        )
        _require(
            window.isdigit() and int(window) >= 1,
            key,
            f"'{text}' needs a positive window, e.g. {topology}:4",
        )
        return cls(topology, int(window))

    def __str__(self) -> str:
        return "none" if self.topology == "none" else f"{self.topology}:{self.window}"


@dataclass(frozen=True)
class LrMultiplier:
    """`model.memory.value_lr` (docs/model.md §5): `decay:F` (F× decaying linearly to 1×) | `constant:F`."""

    kind: Literal["decay", "constant"] = "decay"
    factor: float = 4.0

    def __post_init__(self) -> None:
        _require(
            self.kind in ("decay", "constant")
            and isinstance(self.factor, int | float)
            and not isinstance(self.factor, bool)
            and self.factor > 0,
            "model.memory.value_lr",
            f"({self.kind!r}, {self.factor!r}) is not decay:F or constant:F with F > 0",
        )
        object.__setattr__(self, "factor", float(self.factor))

    @classmethod
    def parse(cls, text: str, key: str = "model.memory.value_lr") -> LrMultiplier:
        kind, _, factor = text.partition(":")
        try:
            value = float(factor)
        except ValueError:
            value = -1.0
        _require(
            kind in ("decay", "constant") and value > 0 and math.isfinite(value),
            key,
            f"'{text}' is not decay:F or constant:F with F > 0 (e.g. decay:4)",
        )
        return cls(kind, value)

    def __str__(self) -> str:
        factor = int(self.factor) if self.factor.is_integer() else self.factor
        return f"{self.kind}:{factor}"


SkipPairs = tuple[tuple[int, int], ...]  # ((input block, output block), ...)


def parse_skip_layers(text: str, key: str = "model.ultramem.skip_layers") -> SkipPairs:
    """`"a:b/c:d"` → ((a, b), (c, d)); `""` → (). Syntax only; `UltraMemConfig.validate` checks ranges."""
    if not text.strip():
        return ()
    pairs = []
    for part in text.split("/"):
        source, sep, target = part.strip().partition(":")
        _require(
            bool(sep) and source.strip().isdigit() and target.strip().isdigit(),
            key,
            f"'{part}' in '{text}' is not INPUT:OUTPUT (e.g. 2:5/6:9)",
        )
        pairs.append((int(source), int(target)))
    return tuple(pairs)


def format_skip_layers(pairs: SkipPairs) -> str:
    return "/".join(f"{source}:{target}" for source, target in pairs)


@dataclass(frozen=True)
class _Language:
    """How a typed field reads its string form (or a typed value) and writes it back."""

    coerce: Any  # (value, dotted key) -> typed value; ConfigError naming the key
    format: Any  # typed value -> str


_LANGUAGE = "language"


def _typed(cls: type) -> _Language:
    def coerce(value: Any, key: str) -> Any:
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls.parse(value, key)
        raise ConfigError(f"config '{key}': expected a string like '{cls()}', got {show(value)}")

    return _Language(coerce=coerce, format=str)


def _coerce_skip_layers(value: Any, key: str) -> SkipPairs:
    if isinstance(value, str):
        return parse_skip_layers(value, key)
    if isinstance(value, list | tuple) and all(
        isinstance(pair, list | tuple)
        and len(pair) == 2
        and all(isinstance(i, int) and not isinstance(i, bool) for i in pair)
        for pair in value
    ):
        return tuple((int(source), int(target)) for source, target in value)
    hint = " (quote it in YAML: unquoted 2:5 is the number 125)" if isinstance(value, int) else ""
    raise ConfigError(f"config '{key}': expected a string like '2:5/6:9', got {show(value)}{hint}")


def _language(default: Any, language: _Language) -> Any:
    return field(default=default, metadata={_LANGUAGE: language})


def _parse_languages(section: Any, prefix: str) -> None:
    """Turns the string form of every language field of a frozen section into its typed value."""
    for item in dataclasses.fields(section):
        language = item.metadata.get(_LANGUAGE)
        if language is not None:
            value = language.coerce(getattr(section, item.name), f"{prefix}.{item.name}")
            object.__setattr__(section, item.name, value)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryConfig:
    """UltraMemV2 memory layer (docs/model.md §2–§6). Names follow the paper; see docs/model.md §2 for the release's."""

    n_keys: int = 32  # n: row keys = column keys; n² value rows per layer
    key_dim: int = 32  # D_k
    tucker_rank: int = 2  # r
    n_cores: int = 2  # Tucker cores; the value vector is split into this many chunks
    rc_topk: int = 8  # k: stage-1 candidates per side
    topk: int = 8  # m: values selected per token per head
    heads: int = 1
    value_dim: int = 64  # D_v
    pre_value_dim: int = 32  # D_p; 0 disables the PEER-style pre-values
    key_expand: int = 1  # E: virtual grid (E·n)² aliasing onto n² rows
    value_share: ValueShare = _language(ValueShare(), _typed(ValueShare))  # none | ring:g | …
    pre_score_act: Literal["identity", "gelu"] = "identity"
    per_rank_query: bool = True  # docs/model.md §9.1; false reproduces the release's shared query
    dropout: float = 0.0
    init: Literal["paper", "release"] = "paper"
    calibration_tokens: int = 512  # Monte-Carlo tokens for the `paper` init calibration
    norm_eps: float = 1e-5  # RMSNorm eps of queries and keys (the release's value)
    value_lr: LrMultiplier = _language(LrMultiplier(), _typed(LrMultiplier))  # decay:F | constant:F
    value_lr_decay_fraction: float = 1.0  # fraction of training over which decay:F reaches 1×
    tucker_penalty: float = 0.0  # α of the Tucker penalty; 0 = off
    tucker_tau: float = 0.15
    key_balance: float = 0.0  # β of the key-balance loss; 0 = off
    implementation: Implementation = "auto"
    # Tables row-sharded on `fsdp` (umv2_jax.parallel.exchange): window = all-gather the layer's
    # window of rows (small tables); exchange = send row ids to the rows' owners, which weight-sum
    # locally and return per-token partial sums; auto = the fewer bytes moved per step (printed).
    table_exchange: Literal["auto", "window", "exchange"] = "auto"
    # exchange: slots per token each owner takes = ceil(f · slots / fsdp); 0 = all of a token's
    # slots (lossless, masked). Slots past the buffer are dropped (exchange_dropped_fraction).
    exchange_capacity_factor: float = 0.0

    def __post_init__(self) -> None:
        _parse_languages(self, "model.memory")

    def validate(self, prefix: str, memory_layers: int) -> None:
        """memory_layers: how many blocks hold a memory (they stack their tables, docs/model.md §3)."""
        for name in ("n_keys", "key_dim", "tucker_rank", "n_cores", "rc_topk", "topk", "heads"):
            _require(getattr(self, name) >= 1, f"{prefix}.{name}", "must be >= 1")
        _require(self.value_dim >= 1, f"{prefix}.value_dim", "must be >= 1")
        _require(self.pre_value_dim >= 0, f"{prefix}.pre_value_dim", "must be >= 0 (0 disables)")
        _require(self.key_expand >= 1, f"{prefix}.key_expand", "must be >= 1")
        _require(
            self.value_dim % self.n_cores == 0,
            f"{prefix}.value_dim",
            f"{self.value_dim} is not divisible by n_cores={self.n_cores}",
        )
        window = self.value_share.window
        _require(
            window <= memory_layers,
            f"{prefix}.value_share",
            f"window {window} is larger than the number of layers holding a memory "
            f"({memory_layers}); lower the window or add memory layers (model.sparse_layers)",
        )
        # docs/model.md §9.7: with key_expand > 1 the release splits virtual groups by n_eff² rows, this
        # project by the window's g·n² rows; they agree only when g·n² is a square (g is). The
        # release-compatible layer (per_rank_query false) refuses the rest rather than silently
        # giving ported release weights other outputs; per-rank queries keep this project's split.
        _require(
            self.per_rank_query or self.key_expand == 1 or math.isqrt(window) ** 2 == window,
            f"{prefix}.key_expand",
            f"key_expand {self.key_expand} with value_share {self.value_share} and per_rank_query "
            f"false: the release splits virtual groups by floor(sqrt({window})·n)² rows, this "
            f"project by {window}·n² (docs/model.md §9.7), so release weights would give other outputs; "
            "use key_expand 1, a square window (1, 4, 9, …) or per_rank_query true",
        )
        side = self.key_expand * self.effective_keys()
        _require(
            self.rc_topk <= side,
            f"{prefix}.rc_topk",
            f"{self.rc_topk} exceeds the keys per side ({side}); lower rc_topk or raise n_keys",
        )
        _require(
            self.topk <= self.rc_topk**2,
            f"{prefix}.topk",
            f"{self.topk} exceeds rc_topk² = {self.rc_topk**2}; raise rc_topk or lower topk",
        )
        _require(
            side * side < 2**31,
            f"{prefix}.key_expand",
            f"virtual grid ({side})² does not fit int32 indices; lower key_expand or n_keys",
        )
        _require(
            memory_layers * self.n_keys**2 < 2**31,
            f"{prefix}.n_keys",
            f"{memory_layers} stacked tables of {self.n_keys}² rows do not fit int32 row indices; "
            "lower n_keys or the number of memory layers",
        )
        _require(0.0 <= self.dropout < 1.0, f"{prefix}.dropout", "must be in [0, 1)")
        _require(self.calibration_tokens >= 16, f"{prefix}.calibration_tokens", "must be >= 16")
        _require(
            0.0 < self.value_lr_decay_fraction <= 1.0,
            f"{prefix}.value_lr_decay_fraction",
            "must be in (0, 1]",
        )
        _require(self.tucker_penalty >= 0, f"{prefix}.tucker_penalty", "must be >= 0")
        _require(self.tucker_tau >= 0, f"{prefix}.tucker_tau", "must be >= 0")
        _require(self.norm_eps > 0, f"{prefix}.norm_eps", "must be > 0")
        _require(self.key_balance >= 0, f"{prefix}.key_balance", "must be >= 0")
        _require(
            self.exchange_capacity_factor >= 0,
            f"{prefix}.exchange_capacity_factor",
            "must be >= 0 (0 = every slot of a token, lossless)",
        )

    def effective_keys(self) -> int:
        """Keys per side n_eff = floor(sqrt(g)·n) for the sharing window g (docs/model.md §3)."""
        return int(math.floor(math.sqrt(self.value_share.window) * self.n_keys + 1e-9))


@dataclass(frozen=True)
class MoEConfig:
    """OLMoE-style mixture of experts replacing the FFN (docs/model.md §7)."""

    num_experts: int = 8
    top_k: int = 2
    expert_d_ff: int = 64
    renormalize: bool = False  # renormalize the top-k router weights to sum to 1
    capacity_factor: float = 0.0  # 0 = dropless; > 0 drops tokens over capacity and reports them
    lb_loss: float = 0.01  # Switch-form load-balancing loss weight
    z_loss: float = 0.001  # router z-loss weight
    shared_expert_d_ff: int = 0  # 0 = no shared expert
    implementation: Implementation = "auto"  # auto: xla (block-padded loop) on CPU
    block_size: int = 64  # row block of block_padded (S-moe on CPU: 64 best; 16 ≈15% slower)
    # Token exchange under a mesh with `expert` > 1 (umv2_jax.parallel.experts): ragged =
    # ragged_all_to_all (dropless; GPU / TPU only), capacity = a fixed-size buffer per destination
    # through all_to_all; auto = ragged on GPU / TPU, capacity on CPU.
    expert_parallel: Literal["auto", "ragged", "capacity"] = "auto"
    # capacity exchange: rows sent per (source, destination) device pair = ceil(f · T_local·k / e);
    # 0 = the worst case T_local·min(k, E/e) (dropless). Drops are reported as ep_dropped_fraction.
    ep_capacity_factor: float = 0.0

    def validate(self, prefix: str) -> None:
        _require(self.num_experts >= 1, f"{prefix}.num_experts", "must be >= 1")
        _require(
            self.ep_capacity_factor >= 0,
            f"{prefix}.ep_capacity_factor",
            f"{self.ep_capacity_factor} must be >= 0 (0 = worst case, dropless)",
        )
        _require(
            1 <= self.top_k <= self.num_experts,
            f"{prefix}.top_k",
            f"{self.top_k} must be in [1, num_experts={self.num_experts}]",
        )
        _require(self.expert_d_ff >= 1, f"{prefix}.expert_d_ff", "must be >= 1")
        _require(self.capacity_factor >= 0, f"{prefix}.capacity_factor", "must be >= 0")
        _require(self.lb_loss >= 0, f"{prefix}.lb_loss", "must be >= 0")
        _require(self.z_loss >= 0, f"{prefix}.z_loss", "must be >= 0")
        _require(self.shared_expert_d_ff >= 0, f"{prefix}.shared_expert_d_ff", "must be >= 0")
        _require(self.block_size >= 1, f"{prefix}.block_size", "must be >= 1")


@dataclass(frozen=True)
class ProductKeyConfig:
    """Product-key memory baselines (docs/model.md §7): `memory_plus`, `pkm`, `peer` (v1: `UltraMemConfig`).

    Each head scores n row sub-keys and n column sub-keys; a grid cell (i, j) addresses row i·n + j of
    an n²-row table (PEER: n² single-neuron experts). Equations: umv2_jax.models.product_key.
    """

    n_keys: int = 32  # n: sub-keys per side; n² value rows per table
    key_dim: int = 32  # D_k: one sub-query / sub-key (a head's query has 2·D_k numbers)
    heads: int = 1
    topk: int = 8  # m: rows selected per token per head
    rc_topk: int = 0  # candidates kept per side before the final top-m; 0 = topk (Lample)
    value_dim: int = 0  # D_v; 0 = d_model (pkm and peer need d_model: their rows are outputs)
    query_norm: bool = True  # RMSNorm on every sub-query (the BatchNorm-free query norm)
    key_norm: bool = False  # RMSNorm on the sub-keys too (Memory+'s qk-norm)
    activation: Literal["gelu", "identity"] = "gelu"  # peer: σ of an expert's neuron
    norm_eps: float = 1e-5
    implementation: Implementation = "auto"
    # pkm / memory_plus / peer tables on fsdp: as model.memory.table_exchange and
    # model.memory.exchange_capacity_factor (umv2_jax.parallel.exchange).
    table_exchange: Literal["auto", "window", "exchange"] = "auto"
    exchange_capacity_factor: float = 0.0

    def resolved_rc_topk(self) -> int:
        return self.rc_topk or self.topk

    def resolved_value_dim(self, d_model: int) -> int:
        return self.value_dim or d_model

    def validate(self, prefix: str, kind: str, d_model: int) -> None:
        for name in ("n_keys", "key_dim", "heads", "topk"):
            _require(getattr(self, name) >= 1, f"{prefix}.{name}", "must be >= 1")
        _require(self.rc_topk >= 0, f"{prefix}.rc_topk", "must be >= 0 (0 = topk)")
        _require(self.value_dim >= 0, f"{prefix}.value_dim", "must be >= 0 (0 = d_model)")
        _require(self.norm_eps > 0, f"{prefix}.norm_eps", "must be > 0")
        _require(
            self.exchange_capacity_factor >= 0,
            f"{prefix}.exchange_capacity_factor",
            "must be >= 0 (0 = every slot of a token, lossless)",
        )
        value_dim = self.resolved_value_dim(d_model)
        if kind in ("pkm", "peer"):
            _require(
                value_dim == d_model,
                f"{prefix}.value_dim",
                f"{kind} rows are added to the residual, so value_dim must be d_model={d_model} "
                "(or 0)",
            )
        rc_topk = self.resolved_rc_topk()
        _require(
            self.topk <= rc_topk <= self.n_keys,
            f"{prefix}.rc_topk",
            f"{rc_topk} must be in [topk={self.topk}, keys per side={self.n_keys}]",
        )
        _require(
            self.n_keys**2 < 2**31,
            f"{prefix}.n_keys",
            f"({self.n_keys})² grid cells do not fit int32 indices; lower n_keys",
        )


@dataclass(frozen=True)
class UltraMemConfig:
    """UltraMem v1 (`sparse: ultramem`, arXiv 2411.12364; docs/model.md §7): TDQKR retrieval with multi-core
    scoring over a virtual (E·n)² grid (E² = G = `value_expand`), one query projection shared by the
    heads, no pre-values, optional skip-layer wiring. Equations: umv2_jax.models.product_key.
    """

    n_keys: int = 32  # n: keys per side of the physical table; n² value rows per layer
    key_dim: int = 32  # D_k
    heads: int = 1  # each head its own keys, cores and gains; one query projection for all
    topk: int = 8  # m: rows selected per token per head
    rc_topk: int = 0  # k: stage-1 candidates per side; 0 = topk
    value_dim: int = 0  # D_v; 0 = d_model
    value_expand: int = 1  # virtual groups G (a square, E = sqrt(G)); W_o: G·D_v → h
    # "a:b/c:d": the memory reading block a's normalized input is added after block b
    skip_layers: SkipPairs = _language((), _Language(_coerce_skip_layers, format_skip_layers))
    tucker_rank: int = 2  # r of the Tucker-decomposed retrieval
    n_cores: int = 2  # cores of multi-core scoring; D_v splits into this many chunks
    norm_eps: float = 1e-5
    implementation: Implementation = "auto"

    def __post_init__(self) -> None:
        _parse_languages(self, "model.ultramem")

    def resolved_rc_topk(self) -> int:
        return self.rc_topk or self.topk

    def resolved_value_dim(self, d_model: int) -> int:
        return self.value_dim or d_model

    def key_expand(self) -> int:
        """E = sqrt(G): the virtual key grid is (E·n)² cells over n² rows."""
        return math.isqrt(self.value_expand)

    def keys_per_side(self) -> int:
        """N = E·n: keys per side of the virtual grid."""
        return self.key_expand() * self.n_keys

    def validate(self, prefix: str, d_model: int, num_layers: int) -> None:
        positive = ("n_keys", "key_dim", "heads", "topk", "value_expand", "tucker_rank", "n_cores")
        for name in positive:
            _require(getattr(self, name) >= 1, f"{prefix}.{name}", "must be >= 1")
        _require(self.rc_topk >= 0, f"{prefix}.rc_topk", "must be >= 0 (0 = topk)")
        _require(self.value_dim >= 0, f"{prefix}.value_dim", "must be >= 0 (0 = d_model)")
        _require(self.norm_eps > 0, f"{prefix}.norm_eps", "must be > 0")
        expand = self.key_expand()
        _require(
            expand * expand == self.value_expand,
            f"{prefix}.value_expand",
            f"{self.value_expand} is not a square (G = E² virtual groups; e.g. 1, 4, 9)",
        )
        value_dim = self.resolved_value_dim(d_model)
        _require(
            value_dim % self.n_cores == 0,
            f"{prefix}.value_dim",
            f"{value_dim} is not divisible by n_cores={self.n_cores}",
        )
        text = format_skip_layers(self.skip_layers)
        for source, target in self.skip_layers:
            _require(
                0 <= source <= target < num_layers,
                f"{prefix}.skip_layers",
                f"'{source}:{target}' needs 0 <= input <= output < num_layers={num_layers}",
            )
        spans = sorted(self.skip_layers)
        for (_, end), (start, _) in zip(spans, spans[1:]):
            _require(
                end < start,
                f"{prefix}.skip_layers",
                f"spans in '{text}' overlap (each block may belong to one span)",
            )
        side = self.keys_per_side()
        rc_topk = self.resolved_rc_topk()
        _require(
            self.topk <= rc_topk <= side,
            f"{prefix}.rc_topk",
            f"{rc_topk} must be in [topk={self.topk}, keys per side={side}]",
        )
        _require(
            self.n_keys**2 < 2**31 and side * side < 2**31,
            f"{prefix}.n_keys",
            f"({side})² grid cells do not fit int32 indices; lower n_keys",
        )


@dataclass(frozen=True)
class EngramConfig:
    """Engram conditional memory (`sparse: engram`, arXiv 2601.07372): hashed n-gram embedding
    tables addressed by token ids, a context-aware gate and a short causal depthwise convolution.
    Equations: umv2_jax.models.engram."""

    max_ngram: int = 3  # n-gram orders 2 … max_ngram
    heads: int = 8  # hash heads per order, each with its own prime-sized table
    embed_dim: int = 128  # numbers per order (heads · head dim); retrieved (max_ngram − 1)·this
    table_size: int = 10007  # rows per head: each head takes the next unused prime >= this
    kernel_size: int = 4  # taps of the causal depthwise convolution
    dilation: int = 0  # 0 = max_ngram (the paper's choice)
    seed: int = 0  # hash multipliers: drawn per layer from this seed
    norm_eps: float = 1e-5

    def resolved_dilation(self) -> int:
        return self.dilation or self.max_ngram

    def validate(self, prefix: str) -> None:
        _require(
            2 <= self.max_ngram <= 8,
            f"{prefix}.max_ngram",
            f"{self.max_ngram} must be in [2, 8] (orders 2 … max_ngram; the paper uses 3)",
        )
        for name in ("heads", "embed_dim", "kernel_size"):
            _require(getattr(self, name) >= 1, f"{prefix}.{name}", "must be >= 1")
        _require(
            self.embed_dim % self.heads == 0,
            f"{prefix}.embed_dim",
            f"{self.embed_dim} is not divisible by heads={self.heads}; pick a multiple of heads",
        )
        _require(
            2 <= self.table_size < 2**30,
            f"{prefix}.table_size",
            f"{self.table_size} must be in [2, 2^30) (rows per head; int32 row indices)",
        )
        _require(self.dilation >= 0, f"{prefix}.dilation", "must be >= 0 (0 = max_ngram)")
        _require(self.norm_eps > 0, f"{prefix}.norm_eps", "must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer (docs/model.md §1) with an optional sparse layer in each block."""

    vocab_size: int = 259  # 256 bytes + BOS/EOS/PAD; padded to a multiple of 128 when built
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 0  # 0 = d_model // num_heads
    d_ff: int = 512  # SwiGLU inner width; 0 = no FFN (the MoE replaces it)
    tie_embeddings: bool = True
    qk_norm: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    max_seq_len: int = 2048  # longest sequence RoPE and generation support
    # Backbone init (docs/model.md §4; umv2_jax.models.init): paper = N(0, sqrt(2/(5h))) with the
    # 1/sqrt(2L) output scaling; release = the OLMo recipe the authors' release trains with.
    init: Literal["paper", "release"] = "paper"
    compute_dtype: DType = "float32"
    param_dtype: DType = "float32"  # bfloat16 stores parameters in bf16; optimizer state stays fp32
    sparse: SparseKind = "none"
    sparse_layers: tuple[int, ...] | None = None  # blocks holding the sparse layer; None = all
    # Scan over layers: runs of identical blocks are stacked along a `layers` axis and run by one
    # lax.scan (compile time and program size independent of depth). auto = on from SCAN_MIN_LAYERS.
    scan_layers: Literal["auto", True, False] = "auto"
    # Rematerialization of each block in the backward: none, full (recompute the whole block),
    # save_dots (keep matmul outputs, recompute the rest).
    remat: Literal["none", "full", "save_dots"] = "none"
    # Attention (umv2_jax.ops.attention): auto = cuDNN flash attention on GPU, Pallas splash on TPU,
    # the chunked XLA path elsewhere (the plain reference when seq <= attention_chunk); xla = the
    # plain reference (f32 [batch, heads, seq, seq] scores); chunked = flash-style XLA.
    attention: Literal["auto", "xla", "chunked", "cudnn", "splash"] = "auto"
    attention_chunk: int = 512  # query / key block of the chunked path
    # Train / eval loss over vocabulary chunks of at most this many columns
    # (umv2_jax.ops.cross_entropy): the f32 [tokens, vocab] logits never exist. 0 = full logits.
    loss_vocab_chunk: int = 8192
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    product_key: ProductKeyConfig = field(default_factory=ProductKeyConfig)
    ultramem: UltraMemConfig = field(default_factory=UltraMemConfig)
    engram: EngramConfig = field(default_factory=EngramConfig)

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // 128) * 128

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def resolved_scan_layers(self) -> bool:
        """Whether the model scans over its blocks (`scan_layers`, auto: from SCAN_MIN_LAYERS)."""
        if self.scan_layers == "auto":
            return self.num_layers >= SCAN_MIN_LAYERS
        return bool(self.scan_layers)

    def sparse_layer_indices(self) -> tuple[int, ...]:
        if self.sparse == "none":
            return ()
        if self.sparse == "ultramem" and self.ultramem.skip_layers:
            # UltraMem v1's skip-layer memories sit in the block their output is added after.
            return tuple(sorted(target for _, target in self.ultramem.skip_layers))
        if self.sparse_layers is None:
            return tuple(range(self.num_layers))
        return tuple(self.sparse_layers)

    def validate(self, prefix: str = "model") -> None:
        _check_choices(self, prefix)
        _require(self.vocab_size >= 2, f"{prefix}.vocab_size", "must be >= 2")
        for name in ("d_model", "num_layers", "num_heads", "max_seq_len"):
            _require(getattr(self, name) >= 1, f"{prefix}.{name}", "must be >= 1")
        _require(self.d_ff >= 0, f"{prefix}.d_ff", "must be >= 0 (0 = no FFN)")
        _require(self.head_dim >= 0, f"{prefix}.head_dim", "must be >= 0 (0 = d_model/num_heads)")
        if self.head_dim == 0:
            _require(
                self.d_model % self.num_heads == 0,
                f"{prefix}.num_heads",
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "set model.head_dim explicitly or change num_heads",
            )
        _require(self.resolved_head_dim % 2 == 0, f"{prefix}.head_dim", "must be even for RoPE")
        _require(self.rope_theta > 0, f"{prefix}.rope_theta", "must be > 0")
        _require(self.norm_eps > 0, f"{prefix}.norm_eps", "must be > 0")
        _require(
            self.attention_chunk >= 1,
            f"{prefix}.attention_chunk",
            f"{self.attention_chunk} must be >= 1 (rows per query / key block, e.g. 512)",
        )
        _require(
            self.loss_vocab_chunk >= 0,
            f"{prefix}.loss_vocab_chunk",
            f"{self.loss_vocab_chunk} must be >= 0 (columns per chunk, e.g. 8192; 0 = full logits)",
        )
        if self.sparse_layers is not None:
            _require(len(self.sparse_layers) > 0, f"{prefix}.sparse_layers", "must not be empty")
            for index in self.sparse_layers:
                _require(
                    0 <= index < self.num_layers,
                    f"{prefix}.sparse_layers",
                    f"block {index} out of range [0, {self.num_layers})",
                )
            _require(
                len(set(self.sparse_layers)) == len(self.sparse_layers),
                f"{prefix}.sparse_layers",
                "has duplicate blocks",
            )
        _require(
            self.d_ff > 0 or self.sparse == "moe",
            f"{prefix}.d_ff",
            "0 (no FFN) is only allowed with sparse: moe",
        )
        if self.sparse == "ultramem_v2":
            self.memory.validate(f"{prefix}.memory", len(self.sparse_layer_indices()))
        if self.sparse == "moe":
            self.moe.validate(f"{prefix}.moe")
        if self.sparse == "engram":
            self.engram.validate(f"{prefix}.engram")
        if self.sparse in ("memory_plus", "pkm", "peer"):
            self.product_key.validate(f"{prefix}.product_key", self.sparse, self.d_model)
        if self.sparse == "ultramem":
            _require(
                self.product_key == ProductKeyConfig(),
                f"{prefix}.product_key",
                "sparse: ultramem reads its fields from model.ultramem (UltraMem v1's own section); "
                "move them there",
            )
            self.ultramem.validate(f"{prefix}.ultramem", self.d_model, self.num_layers)
            if self.ultramem.skip_layers:
                outputs = tuple(sorted(t for _, t in self.ultramem.skip_layers))
                _require(
                    self.sparse_layers is None or tuple(sorted(self.sparse_layers)) == outputs,
                    f"{prefix}.sparse_layers",
                    f"must be unset or {list(outputs)}: ultramem.skip_layers places the memories",
                )


def _coerce_task_params(value: Any, key: str) -> tuple:
    """A mapping of task parameters → sorted (name, value) pairs, lists as tuples (hashable)."""
    if value is None:
        return ()
    if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        return value
    if not isinstance(value, dict):
        raise ConfigError(
            f"config '{key}': expected a mapping of task parameters, got {show(value)}"
        )

    def frozen(item: Any) -> Any:
        return tuple(frozen(v) for v in item) if isinstance(item, list | tuple) else item

    return tuple(sorted((str(name), frozen(item)) for name, item in value.items()))


def _format_task_params(value: tuple) -> dict[str, Any]:
    def plain(item: Any) -> Any:
        return [plain(v) for v in item] if isinstance(item, tuple) else item

    return {name: plain(item) for name, item in value}


def _coerce_mixture(value: Any, key: str) -> tuple:
    """`data.mixture: [[SOURCE, WEIGHT], ...]` → ((source, weight), ...)."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise ConfigError(
            f"config '{key}': expected a list of [SOURCE, WEIGHT] pairs, got {value!r}"
        )
    pairs = []
    for index, item in enumerate(value):
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not isinstance(item[0], str)
            or isinstance(item[1], bool)
            or not isinstance(item[1], int | float)
        ):
            raise ConfigError(
                f"config '{key}[{index}]': expected [SOURCE, WEIGHT] (e.g. [files:a/*.txt, 0.7]), "
                f"got {item!r}"
            )
        pairs.append((item[0], float(item[1])))
    return tuple(pairs)


def _format_mixture(value: tuple) -> list:
    return [[source, weight] for source, weight in value]


# Source kinds of `data.source` (and of each `data.mixture` entry); `task:` only stands alone.
TEXT_SOURCE_KINDS = ("tfds", "files", "hf_disk", "arrayrecord")


def source_kind(source: str) -> str:
    """`shakespeare` | `tfds` | `files` | `hf_disk` | `arrayrecord` | `task` | '' (not a source)."""
    if source == "shakespeare":
        return "shakespeare"
    kind, sep, rest = source.partition(":")
    if sep and rest and kind in (*TEXT_SOURCE_KINDS, "task"):
        return kind
    return ""


@dataclass(frozen=True)
class DataConfig:
    """Where batches come from and how text becomes tokens (umv2_jax.data.pipeline).

    `shakespeare` is the corpus embedded in the package. Text sources: `tfds:NAME`, `files:GLOB`
    (.txt = one document per file, .jsonl / .jsonl.gz = one per line, text in `text_key`),
    `hf_disk:PATH` (a Hugging Face `datasets` dataset saved with `save_to_disk`), `arrayrecord:GLOB`
    (shards written by `python -m umv2_jax.data.pretokenize`). `task:NAME` generates a synthetic task.
    """

    source: str = "shakespeare"
    # Weighted mixture of text sources, [[SOURCE, WEIGHT], ...]; replaces `source` when set.
    mixture: tuple = _language((), _Language(coerce=_coerce_mixture, format=_format_mixture))
    data_dir: str | None = None  # tfds data_dir for tfds:NAME (default: tfds's own)
    seq_len: int = 128
    shuffle_seed: int = 0  # for task:NAME, the seed of the training stream (eval uses its own)
    text_key: str = "text"  # the text field of tfds / jsonl / hf_disk records
    train_split: str = "train"
    eval_split: str = "validation"
    # Sources without splits (files, a single-split hf_disk or arrayrecord) hold out this fraction
    # of their documents, evenly spaced, for evaluation.
    eval_holdout: float = 0.05
    # bytes | sentencepiece:PATH | hf:PATH (a tokenizer.json); a bare sentencepiece name such as
    # `sentencepiece:shakespeare_bpe2048` is one shipped in umv2_jax/data/prepared/tokenizers/.
    tokenizer: str = "bytes"
    # Special tokens (their strings in the vocabulary) for tokenizers that lack them.
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    # Attention and RoPE positions restart at every document of a packed window (auto: on for text
    # sources; task sources build their own rows).
    document_mask: Literal["auto", True, False] = "auto"
    # A .txt document longer than this many characters is cut on line boundaries into pieces that
    # pack as separate documents (so a few large files still give every batch row its own text).
    max_document_chars: int = 65536
    # jsonl lines that are not JSON or lack `text_key`: an error naming file and line (false), or
    # skipped and counted (true).
    skip_bad_records: bool = False
    # Parameters of a task:NAME source, a mapping checked by the task (e.g. {mix: [[64, 4]]}).
    task: tuple = _language((), _Language(coerce=_coerce_task_params, format=_format_task_params))

    def __post_init__(self) -> None:
        _parse_languages(self, "data")

    @property
    def task_name(self) -> str | None:
        """NAME of a `task:NAME` source, else None."""
        kind, _, name = self.source.partition(":")
        return name if kind == "task" and not self.mixture else None

    @property
    def sources(self) -> tuple[tuple[str, float], ...]:
        """((source, weight), ...): the mixture, or the one source with weight 1."""
        return self.mixture or ((self.source, 1.0),)

    @property
    def masks_documents(self) -> bool:
        """Whether packed documents are masked from each other (`document_mask`, auto → text)."""
        if self.document_mask == "auto":
            return self.task_name is None
        return bool(self.document_mask)

    def task_params(self) -> dict[str, Any]:
        """`data.task` as plain data (lists, not tuples)."""
        return _format_task_params(self.task)

    def validate(self, prefix: str = "data") -> None:
        _check_choices(self, prefix)
        _require(self.seq_len >= 1, f"{prefix}.seq_len", f"must be positive, got {self.seq_len}")
        allowed = "shakespeare, tfds:NAME, files:GLOB, hf_disk:PATH, arrayrecord:GLOB, task:NAME"
        if self.mixture:
            _require(
                self.source in ("shakespeare", "mixture"),
                f"{prefix}.source",
                f"'{self.source}' is set together with data.mixture; set one of them (the "
                "mixture names its sources)",
            )
            for index, (source, weight) in enumerate(self.mixture):
                _require(
                    source_kind(source) not in ("", "task"),
                    f"{prefix}.mixture[{index}]",
                    f"'{source}' is not a text source; allowed: "
                    + allowed.removesuffix(", task:NAME"),
                )
                _require(
                    math.isfinite(weight) and weight >= 0,
                    f"{prefix}.mixture[{index}]",
                    f"weight {weight} must be a finite number >= 0",
                )
            _require(
                sum(weight for _, weight in self.mixture) > 0,
                f"{prefix}.mixture",
                "weights sum to 0; give at least one source a positive weight",
            )
        else:
            _require(
                source_kind(self.source) != "",
                f"{prefix}.source",
                f"'{self.source}' is not one of {allowed}",
            )
        kind = source_kind(self.source) if not self.mixture else "mixture"
        _require(
            kind == "task" or not self.task,
            f"{prefix}.task",
            f"task parameters are set but data.source is '{self.source}'; set data.source: "
            "task:NAME or remove data.task",
        )
        _require(
            kind != "task" or self.tokenizer == "bytes",
            f"{prefix}.tokenizer",
            f"'{self.tokenizer}' is set but task sources generate their own token ids; remove "
            "data.tokenizer",
        )
        _require(
            0 < self.eval_holdout < 1,
            f"{prefix}.eval_holdout",
            f"{self.eval_holdout} must be in (0, 1) (the fraction of documents held out)",
        )
        _require(
            self.max_document_chars >= 1,
            f"{prefix}.max_document_chars",
            f"must be >= 1, got {self.max_document_chars}",
        )
        tokenizer_kind, sep, path = self.tokenizer.partition(":")
        _require(
            self.tokenizer == "bytes"
            or (tokenizer_kind in ("sentencepiece", "hf") and sep and path),
            f"{prefix}.tokenizer",
            f"'{self.tokenizer}' is not one of bytes, sentencepiece:PATH, hf:PATH",
        )
        if kind == "task":
            for check in _CHECKS.get("data", ()):
                check(self)


@dataclass(frozen=True)
class TrainConfig:
    """Optimization (docs/model.md §5) and the loop's cadence."""

    steps: int = 300
    batch_size: int = 16  # global batch, in sequences
    micro_batches: int = 1  # gradient accumulation: the batch is split into this many
    learning_rate: float = 3e-3
    warmup_fraction: float = 0.02
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak LR
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    # What a step may change: every parameter; only the memory value and pre-value tables
    # (`ValueParam`s); only chosen rows of them (`rows`: the TF-IDF rows of
    # umv2_jax.training.finetune.select_rows, from the `rows_usage_*` files below); every parameter
    # of the memory layers (`memory`: tables, retrieval, projections); or only the FFNs (`ffn`).
    # Everything else stays bitwise unchanged, weight decay included, and keeps no optimizer state
    # (umv2_jax.training.optimizer).
    trainable: Literal["all", "values", "rows", "memory", "ffn"] = "all"
    # Update rule of the memory value and pre-value tables (`ValueParam`s; every other parameter
    # keeps AdamW): adamw (two fp32 moments per table entry), adafactor (factored second moment: a
    # row and a column statistic per table, no first moment), sgd (no state). The saving is the
    # tables' optimizer state: 8 bytes per entry under adamw (umv2_jax.training.optimizer).
    table_optimizer: Literal["adamw", "adafactor", "sgd"] = "adamw"
    # Warm start (umv2_jax.training.warmstart): a new run starts from these parameters with a fresh
    # optimizer: RUN[:STEP] (a run directory, its newest checkpoint or STEP) or hf:DIR (a dense
    # Hugging Face checkpoint, retrofitted: umv2_jax.retrofit). Ignored when the run resumes.
    init_from: str | None = None
    # `trainable: rows`: per-row usage counts (`python -m umv2_jax.evaluate --row-usage OUT.npz`)
    # of the base model on its own data (base) and on the new data (new), and how many rows of each
    # memory table to train.
    rows_usage_base: str | None = None
    rows_usage_new: str | None = None
    rows_count: int = 64
    # Observability (umv2_jax.training.profiling, .metrics): "START:STOP" writes a jax.profiler
    # trace of steps START … STOP (1-based, inclusive) under WORKDIR/profile/ (--profile).
    profile: str | None = None
    # Weights & Biases: log metrics.jsonl's records to this project too (--wandb PROJECT; needs
    # the `wandb` extra); mode online | offline | disabled (the WANDB_MODE variable overrides it).
    wandb_project: str | None = None
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    wandb_entity: str | None = None

    def profile_steps(self) -> tuple[int, int] | None:
        """`profile` as (START, STOP), None if unset; ConfigError if malformed or outside 1 …
        steps."""
        if self.profile is None:
            return None
        start, sep, stop = str(self.profile).partition(":")
        try:
            first, last = int(start), int(stop)
        except ValueError:
            first = last = None
        _require(
            bool(sep) and first is not None,
            "train.profile",
            f"{self.profile!r} is not START:STOP (two step numbers, e.g. --profile 10:15)",
        )
        _require(
            1 <= first <= last <= self.steps,
            "train.profile",
            f"steps {first}:{last} are outside the run's steps 1 … {self.steps}; give "
            f"1 <= START <= STOP <= {self.steps} (e.g. --profile {min(2, self.steps)}:"
            f"{min(4, self.steps)})",
        )
        return first, last

    def validate(self, prefix: str = "train") -> None:
        _require(self.steps >= 1, f"{prefix}.steps", "must be >= 1")
        _require(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        _require(self.micro_batches >= 1, f"{prefix}.micro_batches", "must be >= 1")
        _require(
            self.batch_size % self.micro_batches == 0,
            f"{prefix}.micro_batches",
            f"batch_size={self.batch_size} is not divisible by micro_batches={self.micro_batches}",
        )
        _require(self.learning_rate > 0, f"{prefix}.learning_rate", "must be > 0")
        _require(0 <= self.warmup_fraction < 1, f"{prefix}.warmup_fraction", "must be in [0, 1)")
        _require(0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", "must be in [0, 1]")
        _require(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
        _require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"{prefix}.b1", "betas must be in [0, 1)")
        _require(self.grad_clip >= 0, f"{prefix}.grad_clip", "must be >= 0 (0 = off)")
        _require(self.eps > 0, f"{prefix}.eps", "must be > 0 (Adam divides by sqrt(v) + eps)")
        warmup = int(round(self.warmup_fraction * self.steps))
        _require(
            warmup < self.steps,
            f"{prefix}.warmup_fraction",
            f"{self.warmup_fraction} of {self.steps} steps is a warmup of {warmup} steps, not "
            "shorter than the run; lower train.warmup_fraction or raise train.steps",
        )
        _require(self.eval_every >= 1, f"{prefix}.eval_every", "must be >= 1")
        _require(self.eval_batches >= 1, f"{prefix}.eval_batches", "must be >= 1")
        _require(self.log_every >= 1, f"{prefix}.log_every", "must be >= 1")
        _require(self.rows_count >= 1, f"{prefix}.rows_count", "must be >= 1 (rows per table)")
        _require(
            self.init_from is None or self.init_from.strip() != "",
            f"{prefix}.init_from",
            "is empty; give RUN[:STEP] or hf:DIR, or leave it unset",
        )
        self.profile_steps()
        _require(
            self.wandb_project is None or self.wandb_project.strip() != "",
            f"{prefix}.wandb_project",
            "is empty; give a W&B project name, or leave it unset",
        )


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # save every N steps (and at the end)
    keep: int = 3  # keep the last K checkpoints
    async_save: bool = True
    # A checkpoint without checksums.json (an older layout, or the file deleted) cannot be verified:
    # false restores it with a one-line warning, true refuses it (exit 2).
    require_checksums: bool = False

    def validate(self, prefix: str = "checkpoint") -> None:
        _require(self.every >= 1, f"{prefix}.every", "must be >= 1")
        _require(self.keep >= 1, f"{prefix}.keep", "must be >= 1")


def _coerce_rules(value: Any, key: str) -> tuple:
    """`mesh.rules` as sorted (logical name, mesh axis | tuple of axes | None) pairs."""
    if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        return value
    if not isinstance(value, dict):
        raise ConfigError(
            f"config '{key}': expected a mapping of logical axis → mesh axis, got {show(value)}"
        )
    pairs = []
    for name, target in value.items():
        if isinstance(target, list | tuple):
            target = tuple(str(axis) for axis in target) or None
        elif target is not None and not isinstance(target, str):
            raise ConfigError(
                f"config '{key}.{name}': expected a mesh axis, a list of them or null, got {show(target)}"
            )
        pairs.append((str(name), target))
    return tuple(sorted(pairs))


def _format_rules(value: tuple) -> dict[str, Any]:
    return {name: list(target) if isinstance(target, tuple) else target for name, target in value}


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh. One axis may be -1 (all remaining devices); the product must equal the count."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    # Overrides of umv2_jax.parallel.rules.LOGICAL_RULES: {logical name: mesh axis | [axes] | null},
    # e.g. {mem_rows: null} keeps memory tables whole along rows.
    rules: tuple = _language((), _Language(coerce=_coerce_rules, format=_format_rules))

    AXES = ("data", "fsdp", "tensor", "expert")

    def __post_init__(self) -> None:
        _parse_languages(self, "mesh")

    def validate(self, prefix: str = "mesh") -> None:
        sizes = [getattr(self, axis) for axis in self.AXES]
        for axis, size in zip(self.AXES, sizes):
            _require(size == -1 or size >= 1, f"{prefix}.{axis}", "must be >= 1 or -1")
        _require(sizes.count(-1) <= 1, prefix, "at most one axis may be -1")
        resolve_rules(self.rules)

    def shape(self, device_count: int) -> tuple[int, ...]:
        """The concrete mesh shape for `device_count` devices, or ConfigError if it cannot divide."""
        sizes = [getattr(self, axis) for axis in self.AXES]
        known = math.prod(size for size in sizes if size != -1)
        if -1 in sizes:
            if device_count % known:
                raise ConfigError(
                    f"config 'mesh': axes {dict(zip(self.AXES, sizes))} do not divide "
                    f"{device_count} devices; make the fixed axes' product divide {device_count}"
                )
            sizes[sizes.index(-1)] = device_count // known
        elif known != device_count:
            raise ConfigError(
                f"config 'mesh': axes {dict(zip(self.AXES, sizes))} need {known} devices but "
                f"{device_count} are available; set one axis to -1 or match the device count"
            )
        return tuple(sizes)


def resolve_rules(
    overrides: typing.Mapping[str, Any] | typing.Sequence[tuple[str, Any]] = (),
) -> dict[str, MeshAxes]:
    """LOGICAL_RULES with the config's overrides applied; ConfigError for an unknown name or axis."""
    rules = dict(LOGICAL_RULES)
    items = overrides.items() if isinstance(overrides, typing.Mapping) else overrides
    for name, target in items:
        if name not in LOGICAL_RULES:
            raise ConfigError(
                f"config 'mesh.rules.{name}': unknown logical axis; known: "
                f"{', '.join(sorted(LOGICAL_RULES))}"
            )
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        for axis in axes:
            if axis not in MeshConfig.AXES:
                raise ConfigError(
                    f"config 'mesh.rules.{name}': {axis!r} is not a mesh axis; use one of "
                    f"{', '.join(MeshConfig.AXES)} (a list of them, or null to replicate)"
                )
        rules[name] = axes[0] if len(axes) == 1 else (axes or None)
    return rules


@dataclass(frozen=True)
class Config:
    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def validate(self) -> Config:
        _require(
            _NAME_PATTERN.fullmatch(self.name) is not None,
            "name",
            f"{show(self.name)} is not a plain name (letters, digits and . _ + -, no '/'): it names the "
            "run directory runs/<name>; pass --workdir to train elsewhere",
        )
        _check_finite(self, "")
        self.model.validate("model")
        self.data.validate("data")
        self.train.validate("train")
        self.checkpoint.validate("checkpoint")
        self.mesh.validate("mesh")
        self.check_mesh_fits_model(self.mesh.expert, self.mesh.tensor)
        self.check_trainable()
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            f"{self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
        )
        for check in _CHECKS.get("config", ()):
            check(self)
        return self

    def check_trainable(self) -> None:
        """`train.trainable: values` / `memory` need value tables; `rows` needs UltraMemV2's
        [L, n², ·] ones; `ffn` needs FFNs. (`rows` also needs usage counts: checked where they are
        read, `umv2_jax.training.finetune.row_mask_from_config`, since the comparison runner
        passes its rows directly.)"""
        trainable, sparse = self.train.trainable, self.model.sparse
        _require(
            trainable != "values" or sparse in _MEMORY_KINDS,
            "train.trainable",
            f"'values' trains only memory value tables, and model.sparse={sparse!r} has none; "
            "use train.trainable=all or a memory model (e.g. model.sparse=ultramem_v2)",
        )
        _require(
            trainable != "rows" or sparse == "ultramem_v2",
            "train.trainable",
            f"'rows' trains chosen rows of UltraMemV2 value tables, and model.sparse={sparse!r} "
            "is not ultramem_v2; use train.trainable=all (or values for another memory model)",
        )
        _require(
            trainable != "memory" or sparse in _MEMORY_KINDS,
            "train.trainable",
            f"'memory' trains the memory layers, and model.sparse={sparse!r} has none; use "
            "train.trainable=all or a memory model (e.g. model.sparse=ultramem_v2)",
        )
        _require(
            trainable != "ffn" or self.model.d_ff > 0,
            "train.trainable",
            "'ffn' trains the dense FFNs, and model.d_ff=0 builds none; use train.trainable=all",
        )

    def check_mesh_fits_model(self, expert_axis: int, tensor_axis: int = 1) -> None:
        """The mesh axes the model must split evenly (checked again once -1 is resolved).

        `expert` must divide the experts; for UltraMemV2 with its tables on `tensor` (the
        `mem_dim` rule), `tensor` must divide memory.value_dim and memory.pre_value_dim, since
        each device aggregates its own slice of the value dimension.
        """
        if self.model.sparse == "moe" and expert_axis > 1:
            _require(
                self.model.moe.num_experts % expert_axis == 0,
                "mesh.expert",
                f"{expert_axis} does not divide model.moe.num_experts={self.model.moe.num_experts}",
            )
        if self.model.sparse == "ultramem_v2" and tensor_axis > 1:
            target = resolve_rules(self.mesh.rules)["mem_dim"]
            if "tensor" in ((target,) if isinstance(target, str) else tuple(target or ())):
                memory = self.model.memory
                for name in ("value_dim", "pre_value_dim"):
                    size = getattr(memory, name)
                    _require(
                        size % tensor_axis == 0,
                        "mesh.tensor",
                        f"{tensor_axis} does not divide model.memory.{name}={size} (the tables "
                        f"split their value dimension on 'tensor'); use a tensor size dividing "
                        f"{size}, or mesh.rules={{mem_dim: null}} to keep them whole",
                    )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# --------------------------------------------------------------------------------------------------
# Loading: dicts → dataclasses with type checks, YAML files, dotted overrides
# --------------------------------------------------------------------------------------------------


# Keys that left their section, with where they went (a config written before the move gets the fix).
_MOVED = {
    **{
        f"model.product_key.{name}": f"model.ultramem.{name}"
        for name in ("skip_layers", "value_expand", "tucker_rank", "n_cores")
    },
}


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Builds dataclass `cls` from a nested dict, checking keys and types (no validation)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config '{prefix or '<root>'}': expected a mapping, got {show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields and dotted in _MOVED:
            raise ConfigError(
                f"config '{dotted}' was moved to '{_MOVED[dotted]}' (UltraMem v1 has its own "
                "section, model.ultramem); set it there"
            )
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{dotted}'{hint} (allowed: {', '.join(sorted(fields))})"
            )
        language = fields[key].metadata.get(_LANGUAGE)
        if language is not None:
            kwargs[key] = language.coerce(value, dotted)
        else:
            kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[-1])
    if origin is Literal:
        if args == IMPLEMENTATIONS and value in RENAMED_IMPLEMENTATIONS:
            raise ConfigError(
                f"config '{key}': {show(value)} was renamed; use {RENAMED_IMPLEMENTATIONS[value]!r}"
            )
        if value not in args:
            allowed = ", ".join(str(a) for a in args)
            raise ConfigError(f"config '{key}': {show(value)} is not allowed; allowed: {allowed}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config '{key}': expected a list, got {show(value)}")
        item_type = args[0]
        return tuple(_coerce(item_type, item, f"{key}[{i}]") for i, item in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config '{key}': expected true or false, got {show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config '{key}': expected an integer, got {show(value)}")
        if not INT_MIN <= value <= INT_MAX:  # steps, sizes and seeds reach JAX as int32
            raise ConfigError(
                f"config '{key}': {show(value)} is out of range; integers must be between "
                f"{INT_MIN} and {INT_MAX}"
            )
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config '{key}': expected a number, got {show(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config '{key}': expected a string, got {show(value)}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain YAML/JSON-able data: tuples become lists, typed language values their
    strings ("ring:9", "decay:4", "2:5/6:9"), so `config_from_dict(to_dict(c)) == c`."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return to_dict(value)
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    data = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        language = item.metadata.get(_LANGUAGE)
        data[item.name] = language.format(value) if language is not None else plain(value)
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in place."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{override}' is not KEY=VALUE (e.g. model.num_layers=4)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        except ValueError:  # an integer of more digits than Python converts (4300)
            raise ConfigError(
                f"config '{key}': {show(raw)} is out of range; integers must be between "
                f"{INT_MIN} and {INT_MAX}"
            ) from None
        if isinstance(value, int) and ":" in raw:  # YAML 1.1 reads 2:5 as base 60; keep the text
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{override}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def packaged_configs_dir() -> str:
    """The folder of the configs shipped with the package: `umv2_jax/configs/` in an installed
    wheel (pyproject maps the repository's `configs/` there), else the repository's `configs/`
    beside the package (a clone or an editable install)."""
    from importlib import resources

    shipped = resources.files(__package__) / "configs"  # __package__: "umv2_jax"
    if shipped.is_dir():
        return str(shipped)
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def packaged_configs() -> list[str]:
    """The packaged configs' names, e.g. ["default", "eval/t_umv2", "paper/ultramem_v2_227m", …]."""
    root = packaged_configs_dir()
    names = []
    for folder, _dirs, files in os.walk(root):
        for file in files:
            if file.endswith(".yaml"):
                relative = os.path.relpath(os.path.join(folder, file), root)
                names.append(relative.removesuffix(".yaml").replace(os.sep, "/"))
    return sorted(names)


def resolve_config_path(path: str | os.PathLike) -> str:
    """A config's file: `path` itself when it exists, else the packaged config it names —
    "paper/ultramem_v2_227m", "tiny_umv2.yaml" or "configs/eval/t_umv2.yaml" (the repository
    layout, so a command written for a clone also runs from an installed wheel). A path that
    is neither comes back unchanged (load_config reports it)."""
    text = os.fspath(path)
    if os.path.exists(text):
        return text
    name = text.replace(os.sep, "/").removeprefix("./").removeprefix("configs/")
    candidate = os.path.join(packaged_configs_dir(), *name.removesuffix(".yaml").split("/"))
    candidate += ".yaml"
    return candidate if os.path.isfile(candidate) and ".." not in name.split("/") else text


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> Config:
    """Reads a YAML config (or the defaults when `path` is None), applies overrides, validates.

    `path`: a YAML file, or a packaged config's name ("tiny_umv2", "paper/ultramem_v2_227m",
    "eval/t_umv2"; `packaged_configs()` lists them), found through the installed package."""
    data: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        if os.path.isdir(path):
            raise ConfigError(
                f"config file '{path}' is a directory; pass --config PATH to a .yaml file"
            )
        if not os.path.isfile(path):
            raise ConfigError(
                f"config file '{path}' does not exist; pass --config PATH to a .yaml file or a "
                f"packaged config's name (one of {', '.join(packaged_configs())})"
            )
        try:
            with open(path, encoding="utf-8") as handle:
                data = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file '{path}' is not valid YAML{where}") from None
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"config file '{path}' is not UTF-8 text (it holds the byte "
                f"0x{error.object[error.start]:02x}); save it as UTF-8"
            ) from None
        except OSError as error:
            raise ConfigError(
                f"cannot read config file '{path}' ({error.strerror}); fix its permissions or "
                "pass another --config"
            ) from None
        except ValueError:  # an integer of more digits than Python converts (4300)
            raise ConfigError(
                f"config file '{path}' holds an integer out of range; integers must be between "
                f"{INT_MIN} and {INT_MAX}"
            ) from None
        if data is None:
            raise ConfigError(
                f"config file '{path}' is empty; put the settings in it (see configs/default.yaml) "
                "or leave out --config to train configs/default.yaml"
            )
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    apply_overrides(data, overrides or [])
    return from_dict(Config, data).validate()


def config_from_dict(data: dict[str, Any]) -> Config:
    """Builds and validates a Config from plain data (e.g. the JSON saved beside a checkpoint)."""
    return from_dict(Config, data).validate()
