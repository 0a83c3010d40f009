"""Initialization of the UltraMemV2 memory layer (docs/model.md §4): `paper` and `release`.

    init = memory_initializers(model_config)     # every initializer the layer and its tables need
    calibration = calibrate(model_config)        # `paper` only: the Monte-Carlo gain and σ_s

Under a trace (a jitted or `nnx.eval_shape` model construction), `calibration_scope` makes the
calibration part of the traced program: one compiled program builds the parameters and calibrates
(`umv2_jax.models.build.build_model`); eagerly, `calibrate` runs it as its own compiled program,
cached per config. Both compute the same fp32 operations, so they give the same numbers.

`paper` (the paper's principled initialization):
    W_q, W_p, W_o ~ N(0, sqrt(2/(5h))) truncated at ±3σ, like every backbone projection.
    γ_q = γ_k = g, chosen so that the mean selected score is ≈ 1. The selected score of a slot is the
    total Σ_c s^c_ℓ by which stage 2 selected it (docs/model.md §2 step 5). Every such score is a product of two
    per-rank dot products, each linear in γ_q·γ_k, so it scales exactly with g⁴: one Monte-Carlo pass
    at g = 1 (random unit-variance inputs through the real retrieval code) gives the mean μ₁ and
    g = μ₁^(-1/4); a second pass at g confirms the mean and measures σ_s, the std of the selected scores.
    V, P ~ N(0, σ_V) truncated, σ_V⁴ = 0.2·k_inner·h / (m·heads·(1+σ_s²)·D_p·D_v·L), k_inner = d_ff/h,
    which sets the memory output variance to the FFN's (docs/model.md §4). Why the total and not the per-core
    score: the constant 0.2 treats silu(z) as z (E[silu(z)²] is 0.12, not 0.4, for z ~ N(0, 0.4)), so
    the formula overestimates the FFN's variance ≈ 3.3×; with per-core scores of mean 1 the memory
    output std comes out ≈ 2× the FFN's, while with totals of mean 1 each of the C = 2 cores carries
    about half the score and the memory output std is 1.06–1.24× the FFN's at init (measured on the
    T- and S-umv2 configs of docs/evaluation.md and on small variants; tests/models/test_memory_init.py checks the
    0.5–2× band). The formula's silu constant is not corrected here, so other core counts drift from
    parity: ≈ 2.3× with C = 1, ≈ 0.5× with C = 4. Without pre-values (D_p = 0) the same derivation gives
    σ_V² = 0.08·k_inner·h / (m·heads·(1+σ_s²)·D_v·L).
    Keys ~ N(0, D_k^-0.5) truncated and cores ~ U[0, 1] as in the release: the paper gives no rule for
    them (keys are RMS-normalized on the fly, so their scale only sets the size of their gradients).

`release` (the authors' constants, docs/model.md §4): γ_q = γ_k = D_k^-0.4; W_q ~ N(0, D_k^-0.5); keys
N(0, D_k^-0.5); W_p ~ N(0, h^-0.5); W_o ~ N(0, (G·D_v)^-0.5) with G = key_expand²; values and
pre-values N(0, 0.02); cores U[0, 1].
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from umv2_jax.config import ModelConfig
from umv2_jax.models import init as init_lib
from umv2_jax.models.retrieval import RetrievalInit, TuckerRetrieval

logger = logging.getLogger("umv2_jax")

# The calibration is a property of the config, not of one model's draw: a fixed seed makes it a pure
# function of the config, so the tables (built first, at model level) and every layer agree on it.
CALIBRATION_SEED = 0


@dataclasses.dataclass(frozen=True)
class MemoryInit:
    """Initializers of one memory layer and its tables.

    retrieval:     W_q, keys, cores and the q/k gain (see `RetrievalInit`)
    pre_value_proj W_p [h, D_p];  output_proj W_o [D_v, h]
    values         V [L, n², D_v];  pre_values P [L, n², D_p]
    value_std      σ of V and P (for logs and tests)
    """

    retrieval: RetrievalInit
    pre_value_proj: nnx.Initializer
    output_proj: nnx.Initializer
    values: nnx.Initializer
    pre_values: nnx.Initializer
    value_std: float


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Result of the `paper` Monte-Carlo calibration: Python floats (`calibrate`) or fp32 scalar
    arrays (traced, inside `calibration_scope`).

    gain:           γ_q = γ_k start value g = raw_mean_score^(-1/4)
    raw_mean_score: mean selected score Σ_c s^c at g = 1
    mean_score:     mean selected score at g (≈ 1 by construction)
    sigma_s:        std of the selected scores at g
    value_std:      σ_V of values and pre-values from docs/model.md §4's formula
    tokens:         Monte-Carlo tokens used
    """

    gain: float
    raw_mean_score: float
    mean_score: float
    sigma_s: float
    value_std: float
    tokens: int


def memory_initializers(config: ModelConfig) -> MemoryInit:
    """The initializers `config.memory.init` selects (docs/model.md §4)."""
    memory = config.memory
    h, key_dim = config.d_model, memory.key_dim
    key_init = init_lib.truncated_normal(key_dim**-0.5)
    if memory.init == "release":
        groups = memory.key_expand**2
        return MemoryInit(
            retrieval=RetrievalInit(
                query=_normal(key_dim**-0.5),
                keys=_normal(key_dim**-0.5),
                cores=_uniform01,
                gain=key_dim**-0.4,
            ),
            pre_value_proj=_normal(h**-0.5),
            output_proj=_normal((groups * memory.value_dim) ** -0.5),
            values=_normal(0.02),
            pre_values=_normal(0.02),
            value_std=0.02,
        )
    projection = init_lib.truncated_normal(projection_std(config))
    calibration = current_calibration(config)
    value_init = _calibrated_truncated_normal(calibration.value_std)
    return MemoryInit(
        retrieval=RetrievalInit(
            query=projection, keys=key_init, cores=_uniform01, gain=calibration.gain
        ),
        pre_value_proj=projection,
        output_proj=projection,
        values=value_init,
        pre_values=value_init,
        value_std=calibration.value_std,
    )


def projection_std(config: ModelConfig) -> float:
    """σ = sqrt(2/(5h)) of the memory projections W_q, W_p, W_o under `paper` (docs/model.md §4)."""
    return init_lib.backbone_std(config)


def paper_value_std(config: ModelConfig, sigma_s: float) -> float:
    """σ_V of values and pre-values under `paper` for a selected-score std σ_s (docs/model.md §4)."""
    memory = config.memory
    k_inner = config.d_ff / config.d_model
    constant = memory.topk * memory.heads * memory.value_dim * config.num_layers
    common = constant * (1.0 + sigma_s**2)  # sigma_s: a float, or an fp32 array under a trace
    if memory.pre_value_dim > 0:
        fourth = 0.2 * k_inner * config.d_model / (common * memory.pre_value_dim)
        return fourth**0.25
    # No pre-values: p_ℓ = 1, so Var(y) is linear in σ_V² (E[p²] = 1 replaces 0.4·D_p·σ_P²).
    return (0.08 * k_inner * config.d_model / common) ** 0.5


def calibration_arrays(
    config: ModelConfig, seed: jax.Array | int = CALIBRATION_SEED
) -> Calibration:
    """The `paper` Monte-Carlo calibration (docs/model.md §4) as traceable fp32 scalars (a `Calibration` of
    arrays). Pure: the fixed seed makes it a function of the config (`seed` may be a traced int32
    scalar with that value: `calibrate` passes it as an argument so every op is staged).

    Runs `config.memory.calibration_tokens` random N(0, 1) inputs [T, h] (the normalized block
    input has unit variance) through a freshly initialized `TuckerRetrieval`, first at gain 1 and
    then at the calibrated gain g = raw_mean^(-1/4). A non-positive raw mean gives a NaN gain
    (`calibrate` and `build_model` raise on it).
    """
    memory = config.memory
    keys_per_side = memory.key_expand * memory.effective_keys()
    initializers = RetrievalInit(
        query=init_lib.truncated_normal(projection_std(config)),
        keys=init_lib.truncated_normal(memory.key_dim**-0.5),
        cores=_uniform01,
        gain=1.0,
    )
    retrieval = TuckerRetrieval.from_memory(
        memory, config.d_model, keys_per_side, initializers, nnx.Rngs(params=jax.random.key(seed))
    )
    inputs = jax.random.normal(
        jax.random.key(seed + 1), (memory.calibration_tokens, config.d_model)
    )

    def selected_scores(gain: jax.Array) -> jax.Array:
        retrieval.query_gain[...] = jnp.full_like(retrieval.query_gain[...], gain)
        retrieval.key_gain[...] = jnp.full_like(retrieval.key_gain[...], gain)
        # Always the plain-JAX op: the calibration may run under `ensure_compile_time_eval`, where a
        # Pallas kernel's loop constants turn concrete and pallas_call refuses them ("captures
        # constants"), so `auto` on a GPU/TPU (and an explicit pallas) could not build the model.
        core_scores = retrieval(inputs, implementation="xla").core_scores
        return jnp.sum(core_scores, axis=-1)  # the total score each slot was selected by

    raw_mean = jnp.mean(selected_scores(jnp.float32(1.0)))
    gain = jnp.where(raw_mean > 0, raw_mean, jnp.nan) ** -0.25
    scores = selected_scores(gain)
    sigma_s = jnp.std(scores)
    return Calibration(
        gain=gain,
        raw_mean_score=raw_mean,
        mean_score=jnp.mean(scores),
        sigma_s=sigma_s,
        value_std=jnp.asarray(paper_value_std(config, sigma_s), jnp.float32),
        tokens=memory.calibration_tokens,
    )


@functools.lru_cache(maxsize=32)
def calibrate(config: ModelConfig) -> Calibration:
    """`calibration_arrays` as one compiled program, evaluated now: a `Calibration` of Python floats
    (each an fp32 value). Cached per config; logs the result.

    Evaluated eagerly even when called under a trace (e.g. a layer built inside a jit outside any
    `calibration_scope`): the calibration's inputs are all concrete.
    """
    names = ("gain", "raw_mean_score", "mean_score", "sigma_s", "value_std")

    def scalars(seed):
        arrays = calibration_arrays(config, seed)
        return tuple(getattr(arrays, name) for name in names)

    # The seed is an argument: under `ensure_compile_time_eval` a jitted function's ops on
    # constants would run one by one while tracing (dozens of compiles); on an argument they stage.
    with jax.ensure_compile_time_eval():
        values = jax.jit(scalars)(jnp.int32(CALIBRATION_SEED))
        result = Calibration(
            **{name: float(value) for name, value in zip(names, values)},
            tokens=config.memory.calibration_tokens,
        )
    check_calibration(result.raw_mean_score)
    log_calibration(result)
    return result


def check_calibration(raw_mean_score: float) -> None:
    """Raises when the mean selected score at gain 1 is not positive (no q/k gain solves it)."""
    if not raw_mean_score > 0:
        raise RuntimeError(
            f"memory init calibration: mean selected score at gain 1 is {raw_mean_score:.3g} (must "
            "be > 0 to solve for the q/k gain); check the retrieval config"
        )


def log_calibration(result: Calibration) -> None:
    """Logs a calibration's gain, mean selected score, σ_s and value std (one INFO line)."""
    logger.info(
        "memory init calibration (%d tokens): q/k gain %.4f, mean selected score %.4f, "
        "sigma_s %.4f, value std %.4g",
        int(result.tokens),
        float(result.gain),
        float(result.mean_score),
        float(result.sigma_s),
        float(result.value_std),
    )


# {config: its traced calibration} while a model is being built under a trace (`calibration_scope`).
_TRACED: contextvars.ContextVar[dict[ModelConfig, Calibration] | None] = contextvars.ContextVar(
    "umv2_traced_calibration", default=None
)


@contextlib.contextmanager
def calibration_scope(config: ModelConfig) -> Iterator[None]:
    """While building a model of `config` under a trace: every `paper` memory initializer inside
    reads one calibration traced into the same program (`calibration_arrays`), instead of running
    `calibrate` as a program of its own. Eagerly (no trace) or for other inits it does nothing."""
    traced = config.sparse == "ultramem_v2" and config.memory.init == "paper" and _tracing()
    if not traced:
        yield
        return
    scope = dict(_TRACED.get() or {})
    if config not in scope:
        scope[config] = calibration_arrays(config)
    token = _TRACED.set(scope)
    try:
        yield
    finally:
        _TRACED.reset(token)


def current_calibration(config: ModelConfig) -> Calibration:
    """The calibration of `config`: the traced one inside `calibration_scope`, else `calibrate`'s."""
    scope = _TRACED.get()
    if scope is not None and config in scope:
        return scope[config]
    return calibrate(config)


def _tracing() -> bool:
    return isinstance(jnp.zeros(()), jax.core.Tracer)


def _calibrated_truncated_normal(std) -> nnx.Initializer:
    """N(0, std²) truncated at ±3σ like `init.truncated_normal`, its scale computed in fp32 so a float
    std and the same fp32 std traced give the same numbers."""

    def init(key, shape, dtype=jnp.float32):
        unit = jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32)
        scale = jnp.asarray(std, jnp.float32) / jnp.float32(init_lib._UNIT_TRUNCATED_STD)
        return (unit * scale).astype(dtype)

    return init


def _normal(std: float) -> nnx.Initializer:
    def init(key, shape, dtype=jnp.float32):
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def _uniform01(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, jnp.float32, 0.0, 1.0).astype(dtype)
