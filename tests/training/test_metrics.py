"""Run metrics: JSONL records, TensorBoard scalars, the loss plot."""

import json
import struct

import pytest

from umv2_jax.training.metrics import MetricsWriter, plot_loss, read_metrics


def _tensorboard_scalars(directory):
    """(tag, step, value) of every scalar in the TFRecord event files under `directory`."""
    from tensorboardX.proto import event_pb2

    found = []
    for path in directory.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                found.append((value.tag, event.step, value.simple_value))
    return found


def test_jsonl_tensorboard_and_plot(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.write(1, {"loss": 3.5, "learning_rate": 1e-3})
    writer.write(2, {"loss": float("nan")})
    writer.write(2, {"eval_loss": 3.0, "eval_bpb": 4.3})
    writer.close()
    records = read_metrics(str(tmp_path))
    assert records[0] == {"step": 1, "loss": 3.5, "learning_rate": 1e-3}
    assert records[1] == {"step": 2, "loss": "nan"}  # JSON has no NaN: written as a string
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[2])["eval_bpb"] == 4.3
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    assert ("loss", 1, pytest.approx(3.5)) in scalars
    assert ("eval_bpb", 2, pytest.approx(4.3)) in scalars
    plot = plot_loss(str(tmp_path))
    assert plot and (tmp_path / "loss.png").stat().st_size > 1000
