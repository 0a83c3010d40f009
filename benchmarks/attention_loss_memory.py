"""Transients of the train step with and without memory-efficient attention and vocabulary-chunked
loss: XLA's memory plan of the compiled step (one device, XLA:CPU) at seq 1024, vocab 50304, tiny
width (d_model 64, 2 blocks, 4 heads), 2 sequences, for the four combinations of
model.attention ∈ {xla, auto} × model.loss_vocab_chunk ∈ {0, 8192}.

    python benchmarks/attention_loss_memory.py

Prints per combination the planned temporaries and whether the optimized HLO holds an f32
[batch, heads, seq, seq] score buffer or an f32 [tokens, vocab] logits buffer. CPU plan only: no
GPU / TPU was used, so no accelerator number is printed.
"""

import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from umv2_jax import parallel  # noqa: E402
from umv2_jax.aot import compile_step  # noqa: E402
from umv2_jax.config import load_config  # noqa: E402

BATCH, SEQ, HEADS, VOCAB = 2, 1024, 4, 50304
BASE = [
    "model.d_model=64",
    "model.num_layers=2",
    f"model.num_heads={HEADS}",
    "model.d_ff=128",
    f"model.vocab_size={VOCAB}",
    f"data.seq_len={SEQ}",
    f"model.max_seq_len={SEQ}",
]


def main() -> None:
    mesh = parallel.make_mesh(load_config(None, BASE).mesh, jax.devices()[:1])
    scores = re.compile(rf"f32\[{BATCH},{HEADS},{SEQ},{SEQ}\]")
    logits = re.compile(rf"f32\[({BATCH},{SEQ}|{BATCH * SEQ}),{VOCAB}\]")
    for attention in ("xla", "auto"):
        for chunk in (0, 8192):
            config = load_config(
                None, [*BASE, f"model.attention={attention}", f"model.loss_vocab_chunk={chunk}"]
            )
            compiled = compile_step(config, mesh, batch=BATCH)["compiled"]
            text = compiled.as_text()
            temporaries = compiled.memory_analysis().temp_size_in_bytes
            print(
                f"attention={attention:4s} loss_vocab_chunk={chunk:5d}: temporaries "
                f"{temporaries / 2**20:7.1f} MiB; f32 scores [B,H,S,S] in HLO: "
                f"{bool(scores.search(text))}; f32 logits [T,V] in HLO: {bool(logits.search(text))}"
            )


if __name__ == "__main__":
    main()
