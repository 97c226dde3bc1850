"""The launch scripts as users run them: `launch/slurm.sh` under a stand-in `srun` and
`launch/tpu_pod.sh` under a stand-in `gcloud` (tests/standins/: they start one process per task /
worker with what SLURM or the TPU VM gives it), each starting the real entry points
(`python -m tdjax.train`, `tdjax.sample`, `tdjax.data.codes`) on 2 processes x 2 CPU devices,
whose results must equal one process with 4 devices."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from test_train_cli import _landed_steps as _landed
from test_train_cli import _losses

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
STANDINS = os.path.join(HERE, "standins")
TOY = "tests/toy_config.py"
pytestmark = pytest.mark.multihost


def _env(**extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                              "JAX_LOCAL_DEVICE_IDS", "CUDA_VISIBLE_DEVICES", "TPU_"))}
  env.update(PATH=STANDINS + os.pathsep + env["PATH"],
             PYTHONPATH=HERE + os.pathsep + env.get("PYTHONPATH", ""),
             XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             TDJAX_VENV=sys.prefix)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _slurm_job_id():
  """A job id whose coordinator port (JAX: 61440 + id % 4096) is free now."""
  for _ in range(100):
    port = random.randrange(61440, 65536)
    with socket.socket() as s:
      try:
        s.bind(("localhost", port))
      except OSError:
        continue
    return 4096 * random.randrange(1, 100) + port - 61440
  raise RuntimeError("no free port in SLURM's coordinator range")


def _slurm(logs, *args, wait=True, **env):
  """`bash launch/slurm.sh ARGS` in a 2-task allocation; each task's output in LOGS/task_K.log."""
  os.makedirs(logs, exist_ok=True)
  env = _env(SLURM_NTASKS=2, SLURM_JOB_ID=_slurm_job_id(), FAKE_SRUN_LOG_DIR=logs,
             FAKE_SRUN_PIDS=os.path.join(logs, "pids"), **env)
  cmd = ["bash", "launch/slurm.sh", *args]
  out = open(os.path.join(logs, "srun.log"), "a")
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
  if wait:
    proc.wait(timeout=500)
  return proc


def _task_logs(logs):
  return [open(os.path.join(logs, f"task_{i}.log")).read() for i in range(2)]


def _single(cmd_args, devices=4):
  """One process with `devices` CPU devices, as the 2 x 2 jobs' global mesh."""
  env = _env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  r = subprocess.run([sys.executable, "-m", *cmd_args], env=env, cwd=ROOT, capture_output=True,
                     text=True, timeout=500)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def _close(got, want, steps):
  """Losses of the 2-process job vs one process: the first 20 steps to 1e-5; later ones drift
  apart a little (the gradient sums are reduced in another order over 2 processes: 1.7e-4 after
  400 steps seen), to 2e-3."""
  steps = list(steps)
  np.testing.assert_allclose([got[s] for s in steps[:20]], [want[s] for s in steps[:20]],
                             rtol=1e-5)
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=2e-3)


def _wait(cond, what, timeout=300, proc=None):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if cond():
      return
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"the job exited with {proc.returncode} before {what}")
    time.sleep(0.05)
  raise AssertionError(f"{what}: not within {timeout} s")


def _pids(logs):
  path = os.path.join(logs, "pids")
  return [int(p) for p in open(path).read().split()] if os.path.exists(path) else []


# ------------------------------------------------------------------------------------------------
# SLURM
# ------------------------------------------------------------------------------------------------

def test_slurm_job_trains_is_killed_and_resumes_like_one_process(tmp_path):
  """`sbatch launch/slurm.sh tdjax.train ...` with the node's 2 GPUs visible to both tasks (the
  old script hid all but GPU SLURM_LOCALID, so task 1 asked for a GPU it could not see): the job
  trains; SIGKILL of task 1 ends it (srun --kill-on-bad-exit); the job submitted again resumes
  from the last checkpoint and its losses equal one process's on the same 4-device mesh."""
  total, ref, run, logs = 200, str(tmp_path / "ref"), str(tmp_path / "run"), str(tmp_path / "l")
  args = ["tdjax.train", f"--config={TOY}:steps={total},ckpt=10", f"--workdir={run}"]
  proc = _slurm(logs, *args, wait=False, FAKE_SRUN_GPUS_PER_NODE=2)
  _wait(lambda: max(_losses(run), default=0) >= 40 and _landed(run), "step 40", proc=proc)
  os.kill(_pids(logs)[1], signal.SIGKILL)
  assert proc.wait(timeout=120) != 0          # srun killed task 0 and failed the job
  last = max(_landed(run))
  assert last + 20 <= total
  assert _slurm(logs, *args, FAKE_SRUN_GPUS_PER_NODE=2).returncode == 0, _task_logs(logs)
  for log in _task_logs(logs):
    assert f"resumed from step {last} of" in log
    assert "JAX distributed initialized with visible devices: " in log   # SLURM_LOCALID's GPU
  _single(["tdjax.train", f"--config={TOY}:steps={total},ckpt=10", f"--workdir={ref}"])
  _close(_losses(run), _losses(ref), range(last + 1, total + 1))


def test_slurm_preemption_saves_once_at_a_step_all_processes_agree_on(tmp_path):
  """SIGTERM reaches task 0, and task 1 a step or more later: both stop after the same step,
  write one checkpoint together and exit 0; the job submitted again resumes from it."""
  run, logs = str(tmp_path / "run"), str(tmp_path / "l")
  proc = _slurm(logs, "tdjax.train", f"--config={TOY}:steps=100000,ckpt=100000",
                f"--workdir={run}", wait=False)
  _wait(lambda: max(_losses(run), default=0) >= 10, "step 10", proc=proc)
  first, second = _pids(logs)
  os.kill(first, signal.SIGTERM)
  at = max(_losses(run))
  _wait(lambda: max(_losses(run)) > at or proc.poll() is not None, "a step after the first signal")
  try:
    os.kill(second, signal.SIGTERM)
  except ProcessLookupError:
    pass                                    # already stopped: the agreed step came first
  assert proc.wait(timeout=200) == 0, _task_logs(logs)
  saved = _landed(run)
  assert len(saved) == 1, saved
  stop = saved[0]
  for log in _task_logs(logs):
    assert f"preemption: every process stops after step {stop}" in log
  assert max(_losses(run)) == stop
  assert _slurm(logs, "tdjax.train", f"--config={TOY}:steps={stop + 3},ckpt=100000",
                f"--workdir={run}").returncode == 0, _task_logs(logs)
  assert all(f"resumed from step {stop} of" in log for log in _task_logs(logs))
  assert sorted(_losses(run))[-3:] == [stop + 1, stop + 2, stop + 3]


def test_slurm_codes_and_samples_equal_one_process(tmp_path, tiny_tokenizer_dir):
  """`tdjax.data.codes` and `tdjax.sample` through slurm.sh, each task bound to its own GPU
  (--gpus-per-task: it sees one, number 0): the codes file and the samples equal one process's."""
  from tdjax import configlib, trainer
  from tdjax.data import codes as codes_lib
  logs = str(tmp_path / "l")
  flags = ["--max_batches=3", "--batch_size=8", "--views=flip"]
  two, one = str(tmp_path / "two.npz"), str(tmp_path / "one.npz")
  r = _slurm(logs, "tdjax.data.codes", f"--tokenizer_workdir={tiny_tokenizer_dir}",
             f"--out={two}", *flags, FAKE_SRUN_GPUS_PER_NODE=2, SLURM_GPUS_PER_TASK=1)
  assert r.returncode == 0, _task_logs(logs)
  assert not os.path.exists(two + ".parts")
  _single(["tdjax.data.codes", f"--tokenizer_workdir={tiny_tokenizer_dir}", f"--out={one}",
           *flags])
  (a, ma), (b, mb) = codes_lib.load_codes(two), codes_lib.load_codes(one)
  assert ma == mb and ma["num_views"] == 2
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  # a tiny TransDiff run to sample from (pixel latents: no tokenizer needed)
  c = configlib.load_config("transdiff", "size=tiny,steps=2")
  c.input.image_size, c.log_every, c.eval_every, c.ckpt_every = 16, 2, 0, 2
  gen = str(tmp_path / "gen")
  trainer.train_and_evaluate(c, gen)
  flags = [f"--workdir={gen}", "--classes=0,3,7", "--num=4", "--batch_size=4", "--steps=2"]
  r = _slurm(logs, "tdjax.sample", f"--out={tmp_path / 'two_s.npz'}", *flags,
             FAKE_SRUN_GPUS_PER_NODE=2, SLURM_GPUS_PER_TASK=1)
  assert r.returncode == 0, _task_logs(logs)
  _single(["tdjax.sample", f"--out={tmp_path / 'one_s.npz'}", *flags])
  a, b = np.load(tmp_path / "two_s.npz"), np.load(tmp_path / "one_s.npz")
  assert a["arr_0"].shape == (12, 16, 16, 1)
  np.testing.assert_array_equal(a["labels"], b["labels"])
  assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1   # uint8 rounding


def test_slurm_latent_cache_equals_one_process(tmp_path):
  """`tdjax.data.latents` through slurm.sh: the 2 tasks encode alternate shards (each batch over
  its 2 devices) into the same files one process writes."""
  import jax
  import jax.numpy as jnp
  from tdjax.tokenizers import kl_vae
  vae = str(tmp_path / "vae.npz")
  kl_vae.save_params(kl_vae.AutoencoderKL(kl_vae.DEMO).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"], vae)
  flags = [f"--vae={vae}", "--vae_config=demo", "--source=fashion_mnist", "--image_size=32",
           "--channels=1", "--split=test", "--max_records=100", "--shard_size=40",
           "--batch_size=16"]
  logs, two, one = str(tmp_path / "l"), str(tmp_path / "two"), str(tmp_path / "one")
  r = _slurm(logs, "tdjax.data.latents", f"--out={two}", *flags)
  assert r.returncode == 0, _task_logs(logs)
  _single(["tdjax.data.latents", f"--out={one}", *flags])
  names = sorted(f for f in os.listdir(one) if f.endswith(".npy"))
  assert len(names) == 6 and sorted(f for f in os.listdir(two) if f.endswith(".npy")) == names
  for n in names:
    np.testing.assert_allclose(np.load(os.path.join(two, n)), np.load(os.path.join(one, n)),
                               atol=1e-6)
  assert "shard" in _task_logs(logs)[1]          # task 1 encoded its share


def test_slurm_evaluation_reports_once(tmp_path):
  """`tdjax.evaluate` through slurm.sh: both tasks compute, task 0 writes the metrics, which equal
  one process's."""
  from tdjax import configlib, evaluate, trainer
  judge = str(tmp_path / "clf")
  trainer.train_and_evaluate(configlib.load_config("classifier", "size=tiny,steps=5,batch=32"),
                             judge)
  from tdjax import evaluation
  images = evaluate.real_images(evaluation.ClassifierJudge(judge), "test", 64)
  samples = str(tmp_path / "s.npz")
  np.savez(samples, arr_0=images)
  logs, out = str(tmp_path / "l"), str(tmp_path / "m.json")
  r = _slurm(logs, "tdjax.evaluate", f"--samples={samples}", "--reference=split:train",
             f"--judge={judge}", f"--out={out}", "--batch_size=32")
  assert r.returncode == 0, _task_logs(logs)
  got = json.load(open(out))
  want = evaluate.evaluate(samples, "split:train", judge, batch_size=32)
  assert got["fid"] == pytest.approx(want["fid"], rel=1e-4)
  printed = [log.count('"fid"') for log in _task_logs(logs)]
  assert printed == [1, 0]


def test_slurm_script_refuses_what_it_cannot_run(tmp_path):
  r = subprocess.run(["bash", "launch/slurm.sh", "tdjax.convert", "--kind=x"], cwd=ROOT,
                     env=_env(SLURM_NTASKS=2), capture_output=True, text=True)
  assert r.returncode == 2 and "tdjax.convert does not run on several processes" in r.stderr
  r = subprocess.run(["bash", "launch/slurm.sh", "tdjax.train"], cwd=ROOT,
                     env=_env(SLURM_NTASKS=2, TDJAX_VENV=str(tmp_path / "none")),
                     capture_output=True, text=True)
  assert r.returncode == 2 and "no Python at" in r.stderr


# ------------------------------------------------------------------------------------------------
# Cloud TPU pod
# ------------------------------------------------------------------------------------------------

def _pod(tmp_path, *args, **env):
  """`bash launch/tpu_pod.sh ARGS` against the stand-in gcloud: 2 workers of this checkout."""
  env = _env(**{"TPU": "test-pod", "ZONE": "test-zone", "REMOTE_DIR": ROOT,
                "REMOTE_PYTHON": os.path.join(sys.prefix, "bin", "python"),
                "REMOTE_LOG_DIR": str(tmp_path / "remote_logs"),
                "FAKE_GCLOUD_LOG_DIR": str(tmp_path), **env})
  return subprocess.run(["bash", "launch/tpu_pod.sh", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=500)


def _git_head():
  r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
  if r.returncode:
    pytest.skip("the checkout is not a git repository (tpu_pod.sh pins the workers' commit)")
  return r.stdout.strip()


def test_tpu_pod_job_outlives_a_dropped_connection_is_killed_and_resumes(tmp_path):
  """The ssh sessions are cut 3 s into the run and the job goes on on both workers; then both
  workers' jobs are killed (SIGKILL, a lost slice): ATTACH=1 reports it, and the same command
  again resumes from the last checkpoint; the losses equal one process's on 4 devices."""
  _git_head()
  run, ref, remote = str(tmp_path / "run"), str(tmp_path / "ref"), tmp_path / "remote_logs"
  args = ["tdjax.train", f"--config={TOY}:steps=400,ckpt=50"]
  r = _pod(tmp_path, *args, WORKDIR=run, FAKE_GCLOUD_DROP_AFTER=3)
  assert r.returncode == 255, r.stderr[-2000:]          # ssh's status for a lost connection
  at_drop = max(_losses(run), default=0)
  _wait(lambda: max(_losses(run), default=0) >= max(at_drop, 0) + 50 and _landed(run),
        "50 steps after the dropped connection")
  for w in range(2):
    os.killpg(int((remote / f"tdjax_{w}.log.pid").read_text()), signal.SIGKILL)
  r = _pod(tmp_path, ATTACH=1)
  assert r.returncode == 1 and "the job ended without a status" in open(tmp_path / "worker_0.log").read()
  last = max(_landed(run))
  assert last < 400
  r = _pod(tmp_path, *args, WORKDIR=run)
  assert r.returncode == 0, open(tmp_path / "worker_0.log").read()[-3000:]
  assert f"resumed from step {last} of" in (remote / "tdjax_1.log").read_text()
  assert _landed(run)[-1] == 400
  _single(["tdjax.train", f"--config={TOY}:steps=400,ckpt=50", f"--workdir={ref}"])
  _close(_losses(run), _losses(ref), range(last + 1, 401))


def test_tpu_pod_failures_fail_the_command_in_one_line(tmp_path):
  """A failing worker fails the command (the old `| tee` returned tee's 0); a worker on another
  commit or an old Python refuses to start, saying which."""
  head = _git_head()
  r = _pod(tmp_path, "tdjax.train", f"--config={TOY}:stepz=3", WORKDIR=str(tmp_path / "w"))
  assert r.returncode == 2
  worker_log = open(tmp_path / "worker_0.log").read()
  assert "config arg 'stepz' is unknown" in worker_log
  r = _pod(tmp_path, "tdjax.train", f"--config={TOY}", WORKDIR=str(tmp_path / "w"),
           COMMIT="0" * 40)
  assert r.returncode == 2
  assert f"is at {head}, the job runs {'0' * 40}" in open(tmp_path / "worker_1.log").read()
  old = tmp_path / "python3.10"
  old.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'Python 3.10.12' && exit 0\nexit 1\n")
  old.chmod(0o755)
  r = _pod(tmp_path, "tdjax.train", f"--config={TOY}", WORKDIR=str(tmp_path / "w"),
           REMOTE_PYTHON=str(old))
  assert r.returncode == 2
  assert "tdjax needs Python 3.11+" in open(tmp_path / "worker_0.log").read()
  assert "Python 3.10.12" in open(tmp_path / "worker_0.log").read()


def test_a_gs_compilation_cache_is_not_made_a_local_folder(tmp_path, monkeypatch):
  """tpu_pod.sh passes --config.compilation_cache=gs://.../xla_cache: it is handed to JAX as the
  URL (before, os.makedirs made the local folder ./gs:/...)."""
  import jax
  from tdjax import parallel
  monkeypatch.chdir(tmp_path)
  before = jax.config.jax_compilation_cache_dir
  try:
    parallel.enable_compilation_cache("gs://bucket/run/xla_cache")
    assert jax.config.jax_compilation_cache_dir == "gs://bucket/run/xla_cache"
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
    from jax.experimental.compilation_cache import compilation_cache
    compilation_cache.reset_cache()
  assert os.listdir(tmp_path) == []


def test_slurm_ablation_row_runs_each_stage_as_one_job(tmp_path):
  """`tdjax.ablate --multihost` on both tasks: the parents start no JAX, each stage (TransDiff
  training, sampling to a PNG with the judge) joins the 2-process job, and the table is written."""
  from tdjax import configlib, trainer
  judge, wd, logs = str(tmp_path / "clf"), str(tmp_path / "abl"), str(tmp_path / "l")
  trainer.train_and_evaluate(configlib.load_config("classifier", "size=tiny,steps=10,batch=32"),
                             judge)
  r = _slurm(logs, "tdjax.ablate", "--table=transdiff_steps", "--scale=tiny", f"--workdir={wd}",
             f"--judge={judge}", "--rows=0")
  assert r.returncode == 0, _task_logs(logs)
  row = json.load(open(os.path.join(wd, "transdiff_steps.json")))["rows"][0]
  assert 0 <= row["class_accuracy"] <= 1 and row["frechet_distance"] > 0
  for log in _task_logs(logs):
    assert "--config.distributed=True" in log and "--multihost" in log
    assert "(2 processes)" in log             # the training stage's mesh spans both tasks
  assert not [f for f in os.listdir(os.path.join(wd, "samples")) if f.endswith(".parts")]


def test_partial_coordinator_settings_are_one_line(tmp_path):
  """JAX_NUM_PROCESSES without the other two: the entry point says which are missing (before
  touching JAX), exit 2."""
  r = subprocess.run([sys.executable, "-m", "tdjax.train", f"--config={TOY}",
                      f"--workdir={tmp_path / 'w'}", "--config.distributed=True"], cwd=ROOT,
                     env=_env(JAX_NUM_PROCESSES=2), capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (
      "python -m tdjax.train: error: JAX_NUM_PROCESSES set but not JAX_COORDINATOR_ADDRESS, "
      "JAX_PROCESS_ID: set all three, or none for JAX's cluster detection (TPU, SLURM, MPI)")
