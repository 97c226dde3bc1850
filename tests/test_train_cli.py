"""The real `python -m tdjax.train` entry point: locked configs, SIGTERM, and bitwise-exact resume
after SIGKILL at a random step."""

import json
import os
import random
import signal
import subprocess
import sys
import time

from tdjax import checkpoint as ckpt_lib
from tdjax import metrics as metrics_lib

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


def _cmd(workdir, arg="", *overrides):
  return [sys.executable, "-m", "tdjax.train", f"--config={HERE}/toy_config.py{arg}",
          f"--workdir={workdir}", *overrides]


def _env():
  return dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
              XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")


def _run(cmd, **kw):
  return subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


def _losses(workdir):
  """step -> loss; a step logged twice (before a kill and after the resume) keeps the later value."""
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return out
  for r in metrics_lib.read_jsonl(path):
    if "train/loss" in r:
      out[r["step"]] = r["train/loss"]
  return out


def _wait_for_step(workdir, step, proc, timeout=300):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if max(_losses(workdir), default=0) >= step:
      return
    if proc.poll() is not None:
      raise AssertionError(f"the run exited with {proc.returncode} before step {step}")
    time.sleep(0.05)
  raise AssertionError(f"step {step} not reached in {timeout}s")


def _landed_steps(workdir):
  """Finished checkpoints of a run that is still going (it may delete old steps as we list)."""
  try:
    with ckpt_lib.Checkpointer(workdir, read_only=True) as ck:
      return ck.steps()
  except FileNotFoundError:
    return []


def test_locked_config_names_the_bad_key(tmp_path):
  r = _run(_cmd(str(tmp_path / "w"), "", "--config.input.not_a_key=3"))
  assert r.returncode != 0 and "not_a_key" in r.stderr
  r = _run(_cmd(str(tmp_path / "w"), ":stepz=3"))
  assert r.returncode != 0 and "'stepz' is unknown" in r.stderr
  r = _run(_cmd(str(tmp_path / "w"), ":steps=2", "--config.log_every=1"))
  assert r.returncode == 0, r.stderr[-2000:]
  with open(tmp_path / "w" / "config.json") as f:
    saved = json.load(f)
  assert saved["total_steps"] == 2 and saved["log_every"] == 1


def test_sigterm_saves_and_exits_zero(tmp_path):
  workdir = str(tmp_path / "w")
  log = open(tmp_path / "log.txt", "w")  # a file, not a pipe: an unread pipe fills and blocks
  proc = subprocess.Popen(_cmd(workdir, ":steps=100000,ckpt=100000"), env=_env(), cwd=ROOT,
                          stdout=log, stderr=subprocess.STDOUT)
  _wait_for_step(workdir, 5, proc)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=120)
  assert proc.returncode == 0, (tmp_path / "log.txt").read_text()[-3000:]
  steps = _landed_steps(workdir)
  assert len(steps) == 1 and steps[0] >= 5 and steps[0] == max(_losses(workdir))


def test_sigkill_at_random_step_then_resume_is_bitwise_exact(tmp_path):
  total, ckpt = 400, 10
  ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
  r = _run(_cmd(ref_dir, f":steps={total},ckpt={ckpt}", "--config.log_every=1"))
  assert r.returncode == 0, r.stderr[-2000:]
  ref = _losses(ref_dir)
  kill_at = random.Random(os.getpid()).randint(ckpt + 2, total // 2)
  log = open(tmp_path / "log.txt", "w")
  proc = subprocess.Popen(_cmd(run_dir, f":steps={total},ckpt={ckpt}", "--config.log_every=1"),
                          env=_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  _wait_for_step(run_dir, kill_at, proc)
  t0 = time.time()  # a save still in flight is not a checkpoint: kill once one has landed
  while not _landed_steps(run_dir) and time.time() - t0 < 60:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  last_ckpt = max(_landed_steps(run_dir))
  assert last_ckpt + 20 <= total
  r = _run(_cmd(run_dir, f":steps={total},ckpt={ckpt}", "--config.log_every=1"))
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"resumed from step {last_ckpt}" in r.stderr
  got = _losses(run_dir)
  steps = list(range(last_ckpt + 1, last_ckpt + 21))
  assert [got[s] for s in steps] == [ref[s] for s in steps]  # bitwise: exact float equality
