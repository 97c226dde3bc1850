"""The multi-host library path, exercised: N processes x M CPU devices on this machine, each
reading its own share of the data, must train, checkpoint, restore and initialise exactly like 1
process with N x M devices.  (The launchers that start such jobs: tests/test_launchers.py.)"""

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

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


def _launch(nproc, devices_per_proc, spec, log_stem, expect_ok=True):
  """Runs multihost_worker.py on `nproc` processes; returns their RESULT dicts (and the logs)."""
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_proc}",
             JAX_PLATFORMS="cpu")
  logs = [f"{log_stem}.{nproc}x{devices_per_proc}.{i}.log" for i in range(nproc)]
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i),
                             str(nproc), str(port), json.dumps(spec)],
                            env=env, stdout=open(logs[i], "w"), stderr=subprocess.STDOUT)
           for i in range(nproc)]  # log files, not pipes: an unread pipe fills up and blocks
  outs, texts = [], []
  for p, log in zip(procs, logs):
    p.wait(timeout=400)
    with open(log) as f:
      out = f.read()
    texts.append(out)
    if expect_ok:
      assert p.returncode == 0, out[-3000:]
      outs.append([json.loads(l[7:]) for l in out.splitlines() if l.startswith("RESULT ")][0])
  return outs, texts


def _train(nproc, devices, workdir, steps, mesh, **extra):
  return _launch(nproc, devices, dict(kind="train", workdir=workdir, steps=steps, mesh=mesh,
                                      **extra), workdir)


def _losses(workdir):
  recs = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}


@pytest.mark.parametrize("mesh", [{"data": -1}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_two_processes_match_one(tmp_path, mesh):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  outs, _ = _train(2, 4, multi, 4, mesh)
  assert {o["devices"] for o in outs} == {8} and {o["local"] for o in outs} == {4}
  _train(1, 8, single, 4, mesh)
  lm, ls = _losses(multi), _losses(single)
  assert sorted(lm) == [1, 2, 3, 4]
  np.testing.assert_allclose([lm[s] for s in sorted(lm)], [ls[s] for s in sorted(ls)], rtol=1e-5)
  # resume both from their step-4 checkpoints to step 6: same losses again
  _train(2, 4, multi, 6, mesh)
  _train(1, 8, single, 6, mesh)
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


def test_a_tensor_axis_across_processes_reads_the_whole_batch_on_each(tmp_path):
  """tensor=4 over 2 processes x 2 devices: both processes hold every row of the batch, so both
  read all of it (before: each read half, and the global batch came out half-size, (8, ...) for
  16, with another loss and no error)."""
  mesh = {"data": 1, "fsdp": 1, "tensor": 4}
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  outs, logs = _train(2, 2, multi, 3, mesh)
  assert [o["data_shard"] for o in outs] == [[0, 1], [0, 1]]
  assert all("'per_process': 16" in log for log in logs)
  _train(1, 4, single, 3, mesh)
  lm, ls = _losses(multi), _losses(single)
  np.testing.assert_allclose([lm[s] for s in (1, 2, 3)], [ls[s] for s in (1, 2, 3)], rtol=1e-5)


def test_data_shard_of_each_process():
  """Which block of the batch each process reads, on fake devices of 4 processes."""
  def mesh(shape, procs):
    devices = np.array([SimpleNamespace(process_index=p) for p in procs]).reshape(shape)
    return SimpleNamespace(devices=devices, shape=dict(zip(parallel.MESH_AXES, shape)))
  # data=4 over 4 processes x 2 devices (tensor=2): four blocks
  m = mesh((4, 1, 2), [0, 0, 1, 1, 2, 2, 3, 3])
  assert [parallel.data_shard(m, p) for p in range(4)] == [(0, 4), (1, 4), (2, 4), (3, 4)]
  # tensor=4 spans process pairs: two blocks, each read by two processes
  m = mesh((2, 1, 4), [0, 0, 1, 1, 2, 2, 3, 3])
  assert [parallel.data_shard(m, p) for p in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
  # fsdp=2 inside data=2, one process per data-parallel pair of positions
  m = mesh((2, 2, 2), [0, 0, 0, 0, 1, 1, 1, 1])
  assert [parallel.data_shard(m, p) for p in range(2)] == [(0, 2), (1, 2)]
  # a device order that interleaves processes over the data axis is refused, naming the mesh
  m = mesh((4, 1, 1), [0, 1, 0, 1])
  with pytest.raises(ValueError, match=r"process 0's devices hold the data-parallel positions "
                                       r"\[0, 2\], not one contiguous range"):
    parallel.data_shard(m, 0)


def test_an_unreadable_checkpoint_on_one_process_sends_every_process_back(tmp_path):
  """Process 1 cannot read the newest checkpoint (step 4): both processes restore step 2 and go on
  identically (before: process 0 restored step 4 and process 1 step 2)."""
  workdir = str(tmp_path / "w")
  _train(2, 2, workdir, 4, {"data": -1})
  with ckpt_lib.Checkpointer(workdir, read_only=True) as ck:
    assert ck.steps()[-2:] == [2, 4]
  _, logs = _train(2, 2, workdir, 6, {"data": -1}, unreadable=[1, 4])
  for log in logs:
    assert "resumed from step 2 of" in log, log[-3000:]
    assert "step 4 in" in log and "is not usable" in log
  single = str(tmp_path / "single")
  _train(1, 4, single, 6, {"data": -1})
  lm, ls = _losses(workdir), _losses(single)
  np.testing.assert_allclose([lm[s] for s in (3, 4, 5, 6)], [ls[s] for s in (3, 4, 5, 6)],
                             rtol=1e-5)


def test_wall_clock_checkpoints_are_taken_together(tmp_path):
  """ckpt_every_secs: saves every ~0.3 s besides ckpt_every (here never), decided on process 0's
  clock at log points and broadcast, so both processes save the same steps (a host saving alone
  would wait in Orbax's barrier for ever)."""
  workdir = str(tmp_path / "w")
  outs, logs = _train(2, 2, workdir, 150, {"data": -1},
                      overrides=dict(ckpt_every=100000, ckpt_every_secs=0.3, keep_checkpoints=0))
  with ckpt_lib.Checkpointer(workdir, read_only=True) as ck:
    steps = ck.steps()
  assert len(steps) >= 3 and steps[-1] == 150, steps
  saved = [sorted(int(l.split("saving step ")[1].split()[0]) for l in log.splitlines()
                  if "checkpoint: saving step" in l) for log in logs]
  assert saved[0] == saved[1] == steps


def _init_sums(nproc, devices, stem, config, arg, overrides=None, mesh=None):
  spec = dict(kind="init", config=config, arg=arg, overrides=overrides or {},
              mesh=mesh or {"data": 1, "fsdp": -1})
  outs, _ = _launch(nproc, devices, spec, stem)
  return outs


def test_pretrained_parts_load_when_the_params_span_processes(tmp_path):
  """The SigLIP2 encoder initialisation (tokenizer) and a 1-step run's weights (MRAR init_from)
  are read into params that FSDP shards over both processes: the same initial state as one
  process (before: jax.device_get of arrays spanning processes failed)."""
  from test_tokenizer import _siglip_file
  from tdjax import configlib
  siglip, _, _ = _siglip_file(tmp_path, depth=2)
  over = {"input.channels": 3, "input.image_size": 16, "model.patch": 4, "model.num_tokens": 8,
          "model.group": 4, "model.enc_width": 16, "model.enc_depth": 2, "model.enc_heads": 2,
          "model.enc_mlp": 32, "model.encoder_init": siglip}
  arg = "size=tiny,batch=8,degrade_p=0,correction=False"
  two = _init_sums(2, 2, str(tmp_path / "tok"), "detailflow_tokenizer", arg, over)
  one = _init_sums(1, 4, str(tmp_path / "tok"), "detailflow_tokenizer", arg, over)
  assert all(o["sharded_over_processes"] > 0 for o in two)
  assert two[0]["sums"] == two[1]["sums"]
  np.testing.assert_allclose(list(two[0]["sums"].values()), list(one[0]["sums"].values()),
                             rtol=1e-6)
  # MRAR from a 1-step run (trained here, single process)
  c = configlib.load_config("transdiff", "size=tiny,steps=2")
  c.input.image_size, c.log_every, c.eval_every, c.ckpt_every = 16, 2, 0, 2
  one_step = str(tmp_path / "one_step")
  trainer.train_and_evaluate(c, one_step)
  arg, over = f"size=tiny,mrar=True,init_from={one_step}", {"input.image_size": 16}
  two = _init_sums(2, 2, str(tmp_path / "mrar"), "transdiff", arg, over)
  one = _init_sums(1, 4, str(tmp_path / "mrar"), "transdiff", arg, over)
  assert all(o["sharded_over_processes"] > 0 for o in two)
  np.testing.assert_allclose(list(two[0]["sums"].values()), list(one[0]["sums"].values()),
                             rtol=1e-6)


def test_multislice_mesh_puts_the_data_axis_across_slices():
  """Devices of 2 TPU slices (stand-ins with `slice_index`): `data` = slices x per-slice data,
  each slice a contiguous block of the data axis (DCN outside, ICI inside); a data axis that the
  slice count does not divide is refused in one line (jax.make_mesh refuses multislice outright)."""
  devs = [SimpleNamespace(id=i, slice_index=i // 4, process_index=i // 2, platform="cpu",
                          device_kind="cpu") for i in range(8)]
  assert parallel.num_slices(devs) == 2 and parallel.num_slices(jax.devices()) == 1
  grid = parallel.hybrid_device_array((4, 2, 1), devs)
  assert grid.shape == (4, 2, 1)
  slices = np.vectorize(lambda d: d.slice_index)(grid)
  assert (slices[:2] == 0).all() and (slices[2:] == 1).all()
  with pytest.raises(ValueError, match=r"span 2 TPU slices .* data=1 is not a multiple of 2"):
    parallel.hybrid_device_array((1, 4, 2), devs)
