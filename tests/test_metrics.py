"""metrics.jsonl under a live run and after a kill: readers skip the record being written, a resumed
writer cuts a half-written record instead of running on into it."""

import json
import os

import pytest

from tdjax import metrics as metrics_lib


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)


def test_read_jsonl_leaves_out_the_record_being_written(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  _write(path, '{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  assert metrics_lib.read_jsonl(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


def test_read_jsonl_names_the_file_and_line_of_a_bad_record(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  _write(path, '{"step": 1}\n{"step": 2, "lo{"step": 3}\n')
  with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not JSON"):
    metrics_lib.read_jsonl(path)


@pytest.mark.parametrize("before", ['{"step": 1, "loss": 2.0}\n{"step": 2, "lo', '{"step": 2, "lo', ""])
def test_resumed_writer_cuts_a_half_written_record(tmp_path, before):
  """A run killed in the middle of a record leaves it without its newline; the resumed run's
  writer drops it, so its first record starts a line of its own and the file stays readable."""
  workdir = str(tmp_path)
  path = os.path.join(workdir, "metrics.jsonl")
  _write(path, before)
  writer = metrics_lib.MetricWriter(workdir, tensorboard=False)
  writer.write_scalars(2, {"loss": 1.25})
  writer.close()
  kept = [json.loads(line) for line in before.split("\n")[:-1]]
  with open(path) as f:
    assert f.read().count("\n") == len(kept) + 1
  assert metrics_lib.read_jsonl(path) == kept + [{"step": 2, "loss": 1.25}]


def test_writer_leaves_a_finished_file_alone(tmp_path):
  workdir = str(tmp_path)
  path = os.path.join(workdir, "metrics.jsonl")
  _write(path, '{"step": 1, "loss": 2.0}\n')
  writer = metrics_lib.MetricWriter(workdir, tensorboard=False)
  writer.write_scalars(2, {"loss": 1.5})
  writer.close()
  assert metrics_lib.read_jsonl(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
