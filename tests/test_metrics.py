"""metrics.jsonl under a live run and after a kill: readers skip the record being written, a resumed
writer cuts a half-written record instead of running on into it."""

import json
import os

import numpy as np
import pytest

from tdjax import checkpoint as ckpt_lib
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


def test_url_workdirs_keep_their_scheme():
  """os.path.abspath('gs://b/run') is the local folder ./gs:/b/run: a URL workdir stays a URL."""
  assert ckpt_lib.resolve_workdir("gs://b/run/") == "gs://b/run"
  assert ckpt_lib.checkpoint_dir("gs://b/run") == "gs://b/run/checkpoints"
  assert ckpt_lib.checkpoint_dir("rel/run") == os.path.join(os.getcwd(), "rel", "run", "checkpoints")
  assert metrics_lib.default_mirror_dir("gs://b/run").endswith(os.path.join("tdjax_mirror",
                                                                            "gs_b_run"))


def test_mirrored_writer_copies_its_files_and_resumes_from_the_workdir(tmp_path):
  """A URL workdir is written through a local mirror: flush() and close() copy metrics.jsonl,
  pictures and TensorBoard events there; a resumed writer on another host (a new mirror) starts
  from the workdir's metrics.jsonl.  A local folder stands for the bucket (the same etils.epath
  calls; gs:// itself needs network)."""
  remote = str(tmp_path / "bucket" / "run")
  writer = metrics_lib.MetricWriter(remote, mirror_dir=str(tmp_path / "host0"))
  writer.write_scalars(1, {"loss": 2.0})
  writer.write_images(1, {"samples": np.zeros((4, 8, 8, 1), np.float32)})
  assert not os.path.exists(remote)               # nothing reaches the workdir before a flush
  writer.flush()
  assert metrics_lib.read_jsonl(os.path.join(remote, "metrics.jsonl")) == [{"step": 1, "loss": 2.0}]
  assert os.listdir(os.path.join(remote, "pictures")) == ["samples_0000001.png"]
  assert any(n.startswith("events") for n in os.listdir(os.path.join(remote, "tensorboard")))
  writer.write_scalars(2, {"loss": 1.5})
  writer.close()
  resumed = metrics_lib.MetricWriter(remote, tensorboard=False, mirror_dir=str(tmp_path / "host1"))
  resumed.write_scalars(3, {"loss": 1.0})
  resumed.close()
  assert metrics_lib.read_jsonl(os.path.join(remote, "metrics.jsonl")) == [
      {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]
  leftovers = [n for _, _, names in os.walk(remote) for n in names if n.endswith(".tmp")]
  assert leftovers == []
