"""Task generators (umv2_jax.data.tasks): the batch contract, each task's invariants against an
independent re-reading of the tokens, bad parameters, the trainer stream and the tfds builder."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from umv2_jax.data.tasks import TASKS, make_task
from umv2_jax.data.tasks import fact_base as fb
from umv2_jax.data.tasks import icl_regression as icl
from umv2_jax.data.tasks import overwrite as ow
from umv2_jax.data.tasks.needles import corpus_bytes
from umv2_jax.data.tasks.stream import TaskBatchIterator, task_eval_batches
from umv2_jax.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
# Small settings per task that exercise every code path quickly.
SMALL = {
    "mqar": ({"mix": [[32, 4], [64, 8]]}, 64),
    "overwrite": ({}, 100),
    "needle_passkey": ({"lengths": [160, 200]}, 200),
    "needle_multikey": ({"lengths": [300]}, 300),
    "variable_tracking": ({"lengths": [500], "distractors": 1}, 500),
    "fact_base": ({"num_facts": 100, "facts_per_sequence": 4}, 24),
    "icl_regression": ({"pool_size": 4}, 66),
    "bursty_classification": ({"num_classes": 32, "novel_classes": 8}, 35),
    "shakespeare_lm": ({}, 48),
}


def _task(name):
    params, seq_len = SMALL[name]
    return make_task(name, params), seq_len


def test_every_task_has_a_small_setting():
    assert set(SMALL) == set(TASKS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_batch_contract(name):
    task, seq_len = _task(name)
    for split in task.splits():
        batch = task.batch(6, seq_len, seed=3, index=1, split=split)
        for key in ("inputs", "targets", "loss_mask"):
            assert batch[key].shape == (6, seq_len), key
        assert batch["inputs"].dtype == np.int32 and batch["targets"].dtype == np.int32
        assert batch["loss_mask"].dtype == np.float32
        assert set(np.unique(batch["loss_mask"])) <= {0.0, 1.0}
        assert 0 <= batch["inputs"].min() and batch["inputs"].max() < task.vocab_size
        assert batch["targets"].max() < task.vocab_size
        answers = batch["loss_mask"] > 0
        assert answers.any()
        assert sorted(k[6:] for k in batch if k.startswith("slice/")) == sorted(task.slices())
        for slice_name in task.slices():
            labels = batch[f"slice/{slice_name}"]
            assert labels.dtype == np.int32
            assert (labels[~answers] == -1).all() and (labels[answers] >= 0).all(), slice_name
        assert (batch["targets"][~answers] == 0).all()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic_per_seed_index_and_split(name):
    task, seq_len = _task(name)
    first = task.batch(4, seq_len, seed=7, index=2)
    again = task.batch(4, seq_len, seed=7, index=2)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    other_index = task.batch(4, seq_len, seed=7, index=3)
    other_seed = task.batch(4, seq_len, seed=8, index=2)
    assert not np.array_equal(first["inputs"], other_index["inputs"])
    assert not np.array_equal(first["inputs"], other_seed["inputs"])


@pytest.mark.parametrize("name", sorted(set(TASKS) - {"fact_base"}))
def test_train_and_test_rows_differ(name):
    # fact_base's test split is the recall test of the trained facts (see its own tests).
    task, seq_len = _task(name)
    train = task.batch(16, seq_len, seed=0, index=0, split="train")["inputs"]
    test = task.batch(16, seq_len, seed=0, index=0, split="test")["inputs"]
    train_rows = {row.tobytes() for row in train}
    assert not any(row.tobytes() in train_rows for row in test)


# -- MQAR -------------------------------------------------------------------------------------


def test_mqar_keys_values_and_queries():
    task = make_task("mqar", {"mix": [[64, 4], [128, 16]]})
    batch = task.batch(8, 128, seed=1, index=5)
    for row in range(8):
        inputs, mask = batch["inputs"][row], batch["loss_mask"][row] > 0
        pairs = int(batch["slice/pairs"][row][mask][0])
        length = int(batch["slice/length"][row][mask][0])
        assert (length, pairs) == ((64, 4) if (5 * 8 + row) % 2 == 0 else (128, 16))
        keys, values = inputs[0 : 2 * pairs : 2], inputs[1 : 2 * pairs : 2]
        assert len(set(keys.tolist())) == pairs
        assert ((keys >= 1) & (keys < 128)).all() and ((values >= 128) & (values < 256)).all()
        value_of = dict(zip(keys.tolist(), values.tolist()))
        positions = np.flatnonzero(mask)
        assert len(positions) == pairs and (positions % 2 == 0).all()
        assert (positions >= 2 * pairs).all() and (positions < length).all()
        assert sorted(inputs[positions].tolist()) == sorted(keys.tolist())  # each key once
        for at in positions:
            assert batch["targets"][row, at] == value_of[int(inputs[at])]
        assert (inputs[length:] == task.pad_id).all()


def test_mqar_gaps_follow_the_power_law():
    # a = 0.01: P(gap g) ∝ g^-0.99, so short gaps dominate: over 4000 one-pair examples of length
    # 130 (64 gaps) the smallest gap is chosen with probability 1 / Σ g^-0.99 ≈ 0.21.
    task = make_task("mqar", {"mix": [[130, 1]]})
    batch = task.batch(4000, 130, seed=0, index=0)
    gaps = (np.argmax(batch["loss_mask"], axis=1) - 2) // 2
    weights = np.arange(1, 65, dtype=float) ** -0.99
    expected = weights[0] / weights.sum()
    assert abs(np.mean(gaps == 0) - expected) < 0.03


# -- overwrite --------------------------------------------------------------------------------


def _replay_overwrite(inputs):
    """Reads a row token by token: the expected answer, rounds since and stale value per query."""
    current, round_of, previous, count, answers = {}, {}, {}, {}, {}
    round_index, position = -1, 0
    while position < len(inputs):
        token = int(inputs[position])
        if token == ow.ROUND:
            round_index += 1
            position += 1
        elif token == ow.QUERY:
            key = int(inputs[position + 1])
            answers[position + 1] = (
                current[key],
                round_index - round_of[key],
                previous.get(key, -1),
                count[key],
            )
            position += 2
        elif ow.KEY_BASE <= token < ow.KEY_BASE + ow.MAX_KEYS:
            value = int(inputs[position + 1])
            if token in current:
                previous[token] = current[token]
            current[token], round_of[token] = value, round_index
            count[token] = count.get(token, 0) + 1
            position += 2
        else:
            position += 1
    return answers


def test_overwrite_labels_equal_the_latest_assignment():
    task = make_task("overwrite", {"num_keys": 8})  # few keys: many overwrites
    batch = task.batch(16, 33 * 6, seed=2, index=0)
    overwritten = 0
    for row in range(16):
        answers = _replay_overwrite(batch["inputs"][row])
        positions = np.flatnonzero(batch["loss_mask"][row])
        assert sorted(answers) == positions.tolist()
        for at, (value, since, stale, count) in answers.items():
            assert batch["targets"][row, at] == value
            assert batch["slice/rounds_since"][row, at] == since
            assert batch["aux/stale_value"][row, at] == stale
            assert batch["slice/assignments"][row, at] == count
            overwritten += stale >= 0
    assert overwritten > 20


def test_overwrite_rate_and_round_layout():
    task = make_task("overwrite", {"rounds": 4})
    assert task.min_seq_len() == 4 * 33
    batch = task.batch(400, 140, seed=0, index=0)
    inputs = batch["inputs"]
    assert (inputs[:, [0, 33, 66, 99]] == ow.ROUND).all() and (inputs[:, 132:] == task.pad_id).all()
    # Assignments of rounds 1-3 overwrite with probability 0.3 (64 keys: fresh ones never run out).
    keys = inputs[:, [r * 33 + 1 + 2 * s for r in range(4) for s in range(4)]]
    repeats = [len(row) - len(set(row.tolist())) for row in keys]
    assert abs(np.sum(repeats) / (400 * 12) - 0.3) < 0.03


# -- needles ----------------------------------------------------------------------------------


def _context_and_answer(batch, row):
    positions = np.flatnonzero(batch["loss_mask"][row])
    answer = batch["targets"][row, positions].astype(np.uint8).tobytes()
    inputs = batch["inputs"][row]
    question_end = positions[0] + 1
    question_start = inputs[:question_end].astype(np.uint8).tobytes().rfind(b"\nWhat is")
    return inputs[:question_start].astype(np.uint8).tobytes(), answer, positions


@pytest.mark.parametrize("name", ["needle_passkey", "needle_multikey", "variable_tracking"])
def test_needle_answer_appears_exactly_once_before_the_question(name):
    task, seq_len = _task(name)
    for split in ("train", "test"):
        batch = task.batch(10, seq_len, seed=4, index=0, split=split)
        for row in range(10):
            context, answer, positions = _context_and_answer(batch, row)
            assert context.count(answer) == 1
            assert (np.diff(positions) == 1).all()  # one contiguous answer
            # teacher forcing: the answer bytes follow the question in the input
            assert batch["inputs"][row, positions + 1].astype(np.uint8).tobytes() == answer


def test_needle_depth_places_the_needle():
    task = make_task("needle_passkey", {"lengths": [1000], "depths": [0.0, 0.5, 1.0]})
    batch = task.batch(30, 1000, seed=0, index=0)
    for row in range(30):
        context, answer, positions = _context_and_answer(batch, row)
        depth = batch["slice/depth"][row, positions[0]] / 100
        where = context.find(b"The pass key is " + answer) / len(context)
        assert abs(where - depth) < 0.1


def test_needle_haystacks_come_from_disjoint_works():
    task = make_task("needle_passkey", {"lengths": [400], "depths": [1.0]})
    train_text, test_text = corpus_bytes("train"), corpus_bytes("validation")
    for split, own, other in (("train", train_text, test_text), ("test", test_text, train_text)):
        batch = task.batch(4, 400, seed=0, index=0, split=split)
        for row in range(4):
            piece = batch["inputs"][row, 40:140].astype(np.uint8).tobytes()  # before the needle
            assert piece in own and piece not in other


def test_variable_tracking_chain_resolves_to_the_answer():
    task, seq_len = _task("variable_tracking")
    batch = task.batch(8, seq_len, seed=5, index=0, split="test")
    for row in range(8):
        context, answer, positions = _context_and_answer(batch, row)
        text = batch["inputs"][row, : positions[0] + 1].astype(np.uint8).tobytes().decode()
        asked = re.search(r"What is the value of VAR ([A-Z]{5})\?", text).group(1)
        assignments = dict(re.findall(r"VAR ([A-Z]{5}) = ((?:VAR [A-Z]{5})|\d{5})\.", text))
        name, hops = asked, 0
        while assignments[name].startswith("VAR "):
            name, hops = assignments[name][4:], hops + 1
        assert assignments[name].encode() == answer
        assert hops == batch["slice/hops"][row, positions[0]] and 2 <= hops <= 4


# -- fact base --------------------------------------------------------------------------------


def _facts_seen(task, batch):
    rows, cols = np.nonzero(batch["loss_mask"])
    names = [tuple(batch["inputs"][r, c - 3 : c].tolist()) for r, c in zip(rows, cols)]
    relations = batch["inputs"][rows, cols].tolist()
    objects = batch["targets"][rows, cols].tolist()
    return list(zip(names, relations, objects))


def test_fact_base_objects_fixed_and_bases_disjoint():
    base_a = make_task("fact_base", {"num_facts": 200, "facts_per_sequence": 4})
    base_b = make_task("fact_base", {"num_facts": 300, "facts_per_sequence": 4, "base": 1})
    objects = {}
    for task, tag in ((base_a, "A"), (base_b, "B")):
        for split, index in (("train", 0), ("train", 9), ("test", 0), ("test", 1)):
            for name, relation, obj in _facts_seen(
                task, task.batch(32, 24, seed=index, index=index, split=split)
            ):
                assert objects.setdefault((name, relation), (obj, tag)) == (obj, tag)
    tags = [tag for _, tag in objects.values()]
    assert tags.count("A") > 100 and tags.count("B") > 100
    # objects are spread over the 512 ids (a fixed uniform draw, not a constant)
    assert len({obj for obj, _ in objects.values()}) > 200


def test_fact_base_layout_and_vocabulary():
    task = make_task("fact_base", {"num_facts": 64, "facts_per_sequence": 16})
    batch = task.batch(2, 100, seed=0, index=0)
    row = batch["inputs"][0]
    facts = row[:96].reshape(16, 6)
    assert ((facts[:, :3] >= fb.ALPHABET_BASE) & (facts[:, :3] < fb.RELATION_BASE)).all()
    assert ((facts[:, 3] >= fb.RELATION_BASE) & (facts[:, 3] < fb.SEPARATOR)).all()
    assert (facts[:, 4] < fb.NUM_OBJECTS).all() and (facts[:, 5] == fb.SEPARATOR).all()
    assert (row[96:] == fb.FACT_PAD).all()
    answers = np.flatnonzero(batch["loss_mask"][0])
    assert answers.tolist() == list(range(3, 96, 6))
    assert (batch["targets"][0, answers] == facts[:, 4]).all()  # the object, shown next


def test_fact_base_exposures_and_test_split_cover_each_fact():
    task = make_task("fact_base", {"num_facts": 96, "facts_per_sequence": 4, "exposures": 3})
    steps = task.train_batches(8)
    assert steps == 96 * 3 // 32
    seen = np.concatenate(
        [task.batch(8, 24, seed=1, index=i)["aux/fact"].reshape(-1) for i in range(steps)]
    )
    assert np.array_equal(np.bincount(seen[seen >= 0], minlength=96), np.full(96, 3))
    test = [task.batch(8, 24, seed=1, index=i, split="test") for i in range(task.test_batches(8))]
    facts = np.concatenate([b["aux/fact"].reshape(-1) for b in test])
    assert sorted(facts[facts >= 0].tolist()) == list(range(96))


# -- in-context regression and bursty classification --------------------------------------------


def test_icl_regression_tokens_and_pool():
    task = make_task("icl_regression", {"pool_size": 3, "noise_std": 0.0})
    batch = task.batch(64, 66, seed=0, index=0)
    answers = np.flatnonzero(batch["loss_mask"][0])
    assert answers.tolist() == [6 * k + 4 for k in range(11)]
    assert (batch["targets"][:, answers] == icl.Y_BASE + icl.quantize(batch["aux/y"])).all()
    assert (batch["inputs"][:, answers + 1] == batch["targets"][:, answers]).all()
    # noise 0: each example's y is x·w/√5 for one of the 3 pool vectors (x up to quantization)
    pool = icl._pool(0, 3, 5)
    predicted = np.einsum("bkd,pd->bpk", batch["aux/x"], pool) / np.sqrt(5)
    best = np.abs(predicted - batch["aux/y"][:, None]).max(axis=2).min(axis=1)
    assert best.max() < 0.1
    fresh = task.batch(64, 66, seed=0, index=0, split="test")
    predicted = np.einsum("bkd,pd->bpk", fresh["aux/x"], pool) / np.sqrt(5)
    assert np.abs(predicted - fresh["aux/y"][:, None]).max(axis=2).min(axis=1).min() > 0.1


def test_bursty_icl_and_iwl_splits():
    task, seq_len = _task("bursty_classification")
    labels = task.class_labels()
    answer = task.episode_length - 1
    for split in ("test_icl", "test_iwl", "train"):
        batch = task.batch(64, seq_len, seed=0, index=0, split=split)
        classes = batch["aux/classes"]
        context, query = classes[:, :-1], classes[:, -1]
        target = batch["targets"][:, answer] - 64
        context_labels = batch["inputs"][:, 3 : 4 * 8 : 4] - 64
        in_context = (context == query[:, None]).any(axis=1)
        if split == "test_icl":
            assert (query >= task.num_classes).all() and in_context.all()
            for row in range(64):
                assert (context_labels[row][context[row] == query[row]] == target[row]).all()
        elif split == "test_iwl":
            assert (query < task.num_classes).all() and not in_context.any()
            assert (target == labels[query]).all()
        else:
            assert (classes < task.num_classes).all() and (target == labels[query]).all()
            assert in_context[batch["slice/kind"][:, answer] == 1].all()


# -- bad parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params, seq_len, phrase",
    [
        ("nope", {}, 64, "unknown task 'nope'"),
        ("mqar", {"pairz": 3}, 64, "has no parameter 'pairz'"),
        ("mqar", {"mix": [[64, 20]]}, 64, "use at most 16 pairs"),
        ("mqar", {"mix": [[256, 16]]}, 128, "needs at least 256 positions"),
        ("mqar", {"mix": "64"}, 64, "expected a list"),
        ("fact_base", {"num_facts": 200_000}, 96, "distinct 3-token names"),
        ("needle_passkey", {"depths": [1.2]}, 256, "outside the haystack"),
        ("needle_passkey", {"lengths": [40]}, 256, "cannot hold the needles"),
        ("bursty_classification", {"burstiness": 3}, 64, "does not divide"),
        ("overwrite", {"num_keys": 100}, 64, "num_keys"),
    ],
)
def test_bad_parameters_raise_one_line_config_errors(name, params, seq_len, phrase):
    with pytest.raises(ConfigError) as error:
        make_task(name, params).check_seq_len(seq_len)
    assert phrase in str(error.value) and "\n" not in str(error.value)


# -- the trainer's stream, the tfds builder, train.py ---------------------------------------------


def test_stream_resumes_from_its_state_and_keeps_device_keys_only():
    task, seq_len = _task("overwrite")
    iterator = TaskBatchIterator(task, 4, seq_len, seed=3)
    next(iterator), next(iterator)
    state = iterator.get_state()
    expected = next(iterator)
    assert sorted(expected) == ["inputs", "loss_mask", "targets"]
    resumed = TaskBatchIterator(task, 4, seq_len, seed=3)
    resumed.set_state(state)
    assert all(np.array_equal(expected[k], v) for k, v in next(resumed).items())
    whole = task.batch(4, seq_len, seed=3, index=2)
    host_1 = next(TaskBatchIterator(task, 4, seq_len, seed=3, process_index=1, process_count=2))
    assert np.array_equal(host_1["inputs"], task.batch(4, seq_len, seed=3, index=0)["inputs"][2:])
    assert np.array_equal(expected["inputs"], whole["inputs"])
    with pytest.raises(DataError, match="resume with the original data settings"):
        TaskBatchIterator(task, 4, seq_len + 33, seed=3).set_state(state)
    (evaluation,) = task_eval_batches(task, 4, seq_len, seed=3, num_batches=1, full=True)
    assert np.array_equal(
        evaluation["inputs"], task.batch(4, seq_len, seed=3, index=0, split="test")["inputs"]
    )


def test_tfds_builder_stores_the_generator_rows(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from umv2_jax.data.tasks import tfds_builders

    params = {"rounds": 2}
    path = tfds_builders.materialize("overwrite", params, 70, tmp_path, {"train": 66, "test": 3})
    source = tfds.builder_from_directory(str(path)).as_data_source(split="train")
    assert len(source) == 66
    expected = make_task("overwrite", params).batch(64, 70, seed=0, index=1, split="train")
    stored = tfds_builders.as_numpy(source[65])
    assert sorted(stored) == sorted(expected)
    assert all(np.array_equal(stored[k], expected[k][1]) for k in stored)


def test_train_py_trains_on_a_task_source(tmp_path):
    overrides = [
        "data.source=task:mqar", "data.seq_len=32", "data.task.mix=[[32,4]]",
        "model.sparse=none", "model.d_model=32", "model.num_layers=1", "model.num_heads=2",
        "model.d_ff=64", "train.batch_size=4", "train.eval_every=2", "train.eval_batches=1",
        "checkpoint.every=2",
    ]  # fmt: skip
    command = [sys.executable, "train.py", "--workdir", str(tmp_path), "--steps", "2"]
    for override in overrides:
        command += ["--set", override]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "task mqar (generated)" in done.stdout
    assert (tmp_path / "metrics.jsonl").is_file()
    bad = subprocess.run(
        command[:-2] + ["--set", "data.task.mix=[[32,9]]"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "data.task.mix" in bad.stderr + bad.stdout


# -- shakespeare_lm ---------------------------------------------------------------------------


def test_shakespeare_lm_rows_are_corpus_windows_with_next_byte_targets():
    task = make_task("shakespeare_lm", {})
    for split, corpus in (("train", "train"), ("test", "validation")):
        text = corpus_bytes(corpus)
        batch = task.batch(3, 40, seed=1, index=2, split=split)
        assert (batch["loss_mask"] == 1.0).all()
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        for inputs, targets in zip(batch["inputs"], batch["targets"]):
            window = bytes(inputs.astype(np.uint8)) + bytes([int(targets[-1])])
            assert window in text, split
    # test windows come from the held-out works only: a Hamlet line never trained on.
    assert b"To be, or not to be" in corpus_bytes("validation")
    assert b"To be, or not to be" not in corpus_bytes("train")
