"""The 1B/7B "before" column of RESULTS.md's AOT fit table: the train step's per-device memory plan
on 8 fake CPU devices, written against the API that both the tree before issue 8 (commit 81211a8,
which had no `umv2_jax.aot`) and today's tree have, so the two can be compared like for like:

    git worktree add /tmp/before 81211a8
    cd /tmp/before && PYTHONPATH=/tmp/before python /path/to/benchmarks/memory_plan_legacy.py \
        configs/paper/ultramem_v2_1b7b.yaml data=1,fsdp=8          # before
    python benchmarks/memory_plan_legacy.py configs/paper/ultramem_v2_1b7b.yaml data=1,fsdp=8  # now

Arguments: CONFIG MESH (axis=N,...) [KEY=VALUE overrides]. Global batch 8 (one 4096-token sequence
per device on 8 batch shards), `model.remat=full`. Prints one JSON line (GB = 1e9 bytes). Today's
tree should agree with `python -m umv2_jax.aot` on the same mesh (same shardings, same step).
"""

# ruff: noqa: E402  (the fake devices must be configured before JAX initializes its backend)

import json
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)
import jax.numpy as jnp
from flax import nnx

from umv2_jax import parallel
from umv2_jax.config import load_config
from umv2_jax.models.transformer import Transformer
from umv2_jax.training.optimizer import make_optimizer, parameter_labels
from umv2_jax.training.state import ModelParts
from umv2_jax.training.step import make_train_step

path, mesh_arg = sys.argv[1], sys.argv[2]
extra = sys.argv[3:]
mesh_over = [f"mesh.{kv}" for kv in mesh_arg.split(",")]
config = load_config(path, mesh_over + ["train.batch_size=8", "model.remat=full"] + extra)
mesh = parallel.make_mesh(config.mesh)
abstract = nnx.eval_shape(lambda: Transformer(config.model, nnx.Rngs(0)))
ps = parallel.state_shardings(nnx.state(abstract, nnx.Param), mesh)
rs = parallel.state_shardings(nnx.state(abstract, nnx.Not(nnx.Param)), mesh)
parts, params, rest = ModelParts.split(abstract)
sds = lambda t, s: jax.tree.map(
    lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), t, s
)
params, rest = sds(params, ps), sds(rest, rs)
opt = make_optimizer(config, parameter_labels(nnx.state(abstract, nnx.Param)), None)
oshape = jax.eval_shape(opt.init, params)
osh = parallel.shardings_like(oshape, parallel.path_index(ps, params), mesh)
rep = parallel.replicated(mesh)
state = {
    "params": params,
    "opt_state": sds(oshape, osh),
    "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
}
shard = {"params": ps, "opt_state": osh, "step": rep}
bs = parallel.batch_sharding(mesh)
S = config.data.seq_len
batch = {
    k: jax.ShapeDtypeStruct((8, S), d, sharding=bs)
    for k, d in [("inputs", jnp.int32), ("targets", jnp.int32), ("loss_mask", jnp.float32)]
}
step = jax.jit(
    make_train_step(parts, opt, 1, 0),
    in_shardings=(shard, rs, bs),
    out_shardings=(shard, rep),
    donate_argnums=(0,),
)
ctx = getattr(parallel, "use_mesh", None)
import contextlib

t0 = time.perf_counter()
with ctx(mesh) if ctx else contextlib.nullcontext():
    compiled = step.trace(state, rest, batch).lower().compile()
dt = time.perf_counter() - t0
m = compiled.memory_analysis()
G = 1e9
print(
    json.dumps(
        {
            "mesh": mesh_arg,
            "args_GB": m.argument_size_in_bytes / G,
            "temp_GB": m.temp_size_in_bytes / G,
            "out_GB": m.output_size_in_bytes / G,
            "compile_s": dt,
        }
    )
)
