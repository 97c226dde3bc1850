"""The multi-host path, exercised: 2 processes x 4 CPU devices on this machine, each reading its own
share of the data, must train, checkpoint and resume exactly like 1 process with 8 devices."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tdjax import checkpoint as ckpt_lib
from tdjax import metrics as metrics_lib
from tdjax import parallel, trainer
from toy_task import toy_config

HERE = os.path.dirname(__file__)
pytestmark = pytest.mark.multihost


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(nproc, devices_per_proc, workdir, steps, mesh):
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_proc}",
             JAX_PLATFORMS="cpu")
  logs = [f"{workdir}.{nproc}x{devices_per_proc}.{steps}.{i}.log" for i in range(nproc)]
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i),
                             str(nproc), str(port), workdir, str(steps), json.dumps(mesh)],
                            env=env, stdout=open(logs[i], "w"), stderr=subprocess.STDOUT)
           for i in range(nproc)]  # log files, not pipes: an unread pipe fills up and blocks
  outs = []
  for p, log in zip(procs, logs):
    p.wait(timeout=400)
    with open(log) as f:
      out = f.read()
    assert p.returncode == 0, out[-3000:]
    outs.append([json.loads(l[7:]) for l in out.splitlines() if l.startswith("RESULT ")][0])
  return outs


def _losses(workdir):
  recs = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}


@pytest.mark.parametrize("mesh", [{"data": -1}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_two_processes_match_one(tmp_path, mesh):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  outs = _launch(2, 4, multi, 4, mesh)
  assert {o["devices"] for o in outs} == {8} and {o["local"] for o in outs} == {4}
  _launch(1, 8, single, 4, mesh)
  lm, ls = _losses(multi), _losses(single)
  assert sorted(lm) == [1, 2, 3, 4]
  np.testing.assert_allclose([lm[s] for s in sorted(lm)], [ls[s] for s in sorted(ls)], rtol=1e-5)
  # resume both from their step-4 checkpoints to step 6: same losses again
  _launch(2, 4, multi, 6, mesh)
  _launch(1, 8, single, 6, mesh)
  lm, ls = _losses(multi), _losses(single)
  np.testing.assert_allclose([lm[5], lm[6]], [ls[5], ls[6]], rtol=1e-5)
  # the 2-process checkpoint restores in this (single) process and equals the 1-process one
  m = parallel.make_mesh({"data": -1})
  setup = trainer.Setup(toy_config(), m)
  with ckpt_lib.Checkpointer(multi, read_only=True) as ck_multi, \
       ckpt_lib.Checkpointer(single, read_only=True) as ck_single:
    _, a, _ = ck_multi.restore(setup.abstract_state())
    _, b, _ = ck_single.restore(setup.abstract_state())
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6),
               a["params"], b["params"])
