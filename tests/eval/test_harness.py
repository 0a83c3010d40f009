"""umv2_jax/eval/harness.py: our model behind lm-eval's LM interface, run through
`lm_eval.simple_evaluate` on a multiple-choice task defined from local files (offline).

Skipped only when lm-eval is not installed outside CI (CI installs the `test` extra, which has it).
"""

import json
import os

import numpy as np
import pytest
from flax import nnx

from umv2_jax.config import load_config
from umv2_jax.data import tokenizers
from umv2_jax.models.transformer import Transformer
from umv2_jax.training.state import ModelParts

try:
    import lm_eval  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("lm-eval is not installed (pip install 'umv2-jax[eval]')", allow_module_level=True)

from umv2_jax.eval.harness import UMV2LM, run_tasks  # noqa: E402

DOCS = [
    {"question": "ROMEO: I love", "choices": [" thee", " zzqx", " you"], "label": 0},
    {"question": "JULIET: Good", "choices": [" night", " qqqq"], "label": 0},
    {"question": "First Citizen: Before we", "choices": [" proceed", " xk", " go"], "label": 2},
    {"question": "To be, or not", "choices": [" to be", " zz"], "label": 1},
]


@pytest.fixture(scope="module")
def lm():
    config = load_config(
        None, ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=64"]
    )
    parts, params, rest = ModelParts.split(Transformer(config.model, nnx.Rngs(0)))
    return UMV2LM(config, parts, params, rest, tokenizer=tokenizers.byte_tokenizer(), batch_size=4)


def _task(tmp_path) -> str:
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    spec = tmp_path / "tiny_choice.yaml"
    spec.write_text(
        "task: tiny_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return str(spec)


def test_a_local_multiple_choice_task(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = run_tasks(lm, [_task(tmp_path)])
    accuracy = results["tiny_choice"]["acc,none"]
    # The harness picks, per question, the choice of the highest summed log-likelihood: our own
    # scorer's numbers on the same (context, continuation) pairs give the same accuracy.
    correct = []
    for doc in DOCS:
        pairs = [lm.encode_pair(doc["question"], choice) for choice in doc["choices"]]
        scores = [logprob for logprob, _ in lm.scorer.loglikelihood(pairs)]
        correct.append(int(np.argmax(scores)) == doc["label"])
    assert accuracy == pytest.approx(np.mean(correct))


def test_requests_of_each_kind(lm):
    from lm_eval.api.instance import Instance

    def request(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    ((logprob, greedy),) = lm.loglikelihood([request("loglikelihood", ("ROMEO: ", "hello"))])
    context, continuation = lm.encode_pair("ROMEO: ", "hello")
    assert continuation == lm.encode(" hello")  # the context's trailing space moved over
    assert context[0] == lm.tokenizer.bos_id and logprob < 0 and isinstance(greedy, bool)
    (rolling,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", ("abc",))])
    (direct,) = lm.scorer.loglikelihood([([lm.tokenizer.bos_id], lm.encode("abc"))])
    assert rolling == pytest.approx(direct[0], rel=1e-5)
    (text,) = lm.generate_until(
        [request("generate_until", ("ROMEO:", {"until": ["\n"], "max_gen_toks": 4}))]
    )
    assert isinstance(text, str) and "\n" not in text
