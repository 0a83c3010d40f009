"""Data: sources (embedded Shakespeare, tfds, files, hf_disk, pretokenized ArrayRecord, synthetic
tasks), tokenizers (bytes, sentencepiece, Hugging Face tokenizer.json), packing with document
boundaries, and the input pipelines.

The pipeline API is importable from here; its dependencies load only when it is first used:

    from umv2_jax.data import make_train_iterator, make_eval_batches, describe_source
"""

_PIPELINE_API = ("make_train_iterator", "make_eval_batches", "describe_source")
__all__ = list(_PIPELINE_API)


def __getattr__(name: str):
    if name in _PIPELINE_API:
        from umv2_jax.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'umv2_jax.data' has no attribute '{name}'")
