"""Bad input and faults, through the real entry points (subprocesses): each case ends in one line
`python -m tdjax.X: error: ...` naming the flag, key, file or value, with its exit status (2 bad
input, 3 a training stopped by a non-finite loss), no traceback, and nothing lost: no checkpoint
replaced, no config.json rewritten, no half-written output left behind."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
TOY = f"--config={HERE}/toy_config.py"
TOK = "--config=configs/detailflow_tokenizer.py:size=tiny,steps=2,batch=8,degrade_p=0"


def _env():
  return dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
              XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")


def run(module, *args, timeout=300):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


def one_line(r, module, status, *fragments):
  """The run ended with `status` and a last stderr line `python -m MODULE: error: ...` holding
  every fragment; no traceback anywhere."""
  lines = r.stderr.strip().splitlines()
  assert r.returncode == status, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert lines and lines[-1].startswith(f"python -m {module}: error: "), r.stderr[-2000:]
  for f in fragments:
    assert f in lines[-1], (f, lines[-1])
  return lines[-1]


# --- values that used to train without a word ----------------------------------------------------

@pytest.mark.parametrize("override,fragment", [
    ("--config.model.group=5", "config.model.group=5 does not divide config.model.num_tokens=16"),
    ("--config.model.num_tokens=0", "config.model.num_tokens=0: expected > 0"),
    ("--config.model.alpha=0.0", "config.model.alpha=0.0: R(n) needs alpha > 0"),
    ("--config.model.alpha=-1.0", "config.model.alpha=-1.0: R(n) needs alpha > 0"),
    ("--config.model.enc_heads=3", "does not divide config.model.enc_width"),
    ("--config.optimizer.lr=-0.001", "config.optimizer.lr=-0.001: expected >= 0"),
    ("--config.optimizer.warmup_steps=-5", "config.optimizer.warmup_steps=-5: expected >= 0"),
    ("--config.grad_accum=0", "config.grad_accum=0: expected >= 1"),
    ("--config.on_nonfinite=ignore", "config.on_nonfinite='ignore': expected 'stop' or 'skip'"),
    ("transdiff --config.model.num_heads=5", "config.model.num_heads=5 does not divide "
                                             "config.model.width="),
    ("transdiff --config.head.depth=0", "config.head.depth=0: expected >= 1"),
    ("transdiff --config.model.batch_mul=0", "config.model.batch_mul=0: expected >= 1"),
])
def test_impossible_values_are_refused_before_training(tmp_path, override, fragment):
  config = TOK
  if override.startswith("transdiff "):
    config, override = "--config=configs/transdiff.py:size=tiny,steps=1", override.split()[1]
  r = run("tdjax.train", config, f"--workdir={tmp_path / 'w'}", override)
  one_line(r, "tdjax.train", 2, fragment)
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


# the same checks in process, where the task builds its modules (`--config.X=` sets the key the
# constructor reads; the subprocess cases above show the CLI turns them into one line)
@pytest.mark.parametrize("name,arg,key,value,fragment", [
    ("detailflow_tokenizer", "size=tiny", "model.degrade_p", 1.5,
     "config.model.degrade_p=1.5: expected a probability in [0, 1]"),
    ("detailflow_tokenizer", "size=tiny", "model.size", "huge", "config.model.size='huge'"),
    ("detailflow_tokenizer", "size=tiny", "loss.lpips_weight", -1.0,
     "config.loss.lpips_weight=-1.0: expected >= 0"),
    ("detailflow_tokenizer", "size=tiny", "loss.disc", "stylegan",
     "config.loss.disc='stylegan': expected 'patchgan' or 'dino'"),
    ("detailflow_tokenizer", "size=tiny", "loss.align_weight", 1.0,
     "config.loss.align_weight > 0 needs config.loss.align_teacher_weights"),
    ("transdiff", "size=tiny", "model.label_drop", 1.0, "label_drop=1.0: expected probabilities"),
    ("transdiff", "size=tiny", "latent.kind", "vq", "config.latent.kind='vq'"),
    ("classifier", "", "model.arch", "resnet", "config.model.arch='resnet'"),
    ("next_detail", "size=demo", "model.depth", 0, "config.model.depth=0: expected >= 1"),
    ("next_detail", "size=demo", "model.dropout", 1.0, "config.model.dropout=1.0: expected"),
])
def test_overrides_are_checked_where_the_module_is_built(name, arg, key, value, fragment):
  from tdjax import configlib
  from tdjax.tasks import get_task
  config = configlib.load_config(name, arg, {key: value})
  with pytest.raises(ValueError) as e:
    get_task(config)
  assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_key_a_saved_config_lacks_takes_the_field_default():
  """Configs saved before a field existed lack its key: the module's (or recipe's) own default
  applies -- written once, on the field, not restated by the builder."""
  from tdjax import configlib
  from tdjax.tasks import get_task
  from tdjax.tasks.detailflow_tokenizer import Losses, Recipe
  config = configlib.load_config("detailflow_tokenizer", "size=tiny")
  del config.model["branch_grads"], config.model["top_k"], config.loss["lecam_weight"]
  task = get_task(config)
  assert task.recipe.branch_grads is Recipe.branch_grads is False
  assert task.losses.lecam_weight == Losses.lecam_weight == 0.0
  assert task.model.top_k == 50


def test_a_tokenizer_checkpoint_of_the_old_task_name_still_loads(tiny_tokenizer_dir, tmp_path):
  """Runs written before the task was renamed ('tokenizer' -> 'detailflow_tokenizer') store the
  old name in their checkpoints: they still load, in today's name, by every reader."""
  import glob
  import shutil
  from tdjax import configlib
  from tdjax.tasks.detailflow_tokenizer import load_tokenizer
  old = str(tmp_path / "old")
  shutil.copytree(tiny_tokenizer_dir, old)
  written = glob.glob(os.path.join(old, "checkpoints", "*", "config", "metadata"))
  assert written
  for path in written:
    with open(path) as f:
      saved = json.load(f)
    assert saved["task"] == "detailflow_tokenizer"
    with open(path, "w") as f:
      json.dump(dict(saved, task="tokenizer"), f)
  task, _, config = load_tokenizer(old)
  assert config.task == task.kind == "detailflow_tokenizer"
  assert configlib.upgrade_config({"task": "transdiff"}) == {"task": "transdiff"}


def test_a_warmup_longer_than_the_run_is_one_warning_line(tmp_path):
  r = run("tdjax.train", TOY + ":steps=3", f"--workdir={tmp_path / 'w'}",
          "--config.optimizer.warmup_steps=10")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "config.optimizer.warmup_steps=10 >= total_steps=3: the run never reaches" in r.stderr


def test_a_resume_below_the_checkpoint_is_refused_and_config_json_kept(tmp_path):
  w = str(tmp_path / "w")
  assert run("tdjax.train", TOY + ":steps=6", f"--workdir={w}").returncode == 0
  before = open(os.path.join(w, "config.json")).read()
  r = run("tdjax.train", TOY + ":steps=4", f"--workdir={w}")
  one_line(r, "tdjax.train", 2, "config.total_steps=4 is below the step of the checkpoint to "
                                "resume, 6")
  assert open(os.path.join(w, "config.json")).read() == before


def test_a_non_finite_loss_is_one_line_with_its_own_status(tmp_path):
  r = run("tdjax.train", TOY + ":steps=6", f"--workdir={tmp_path / 'w'}", "--config.nan_at_step=5")
  one_line(r, "tdjax.train", 3, "non-finite loss at step 5", "no checkpoint written")


# --- data -------------------------------------------------------------------------------------------

def test_a_truncated_idx_file_names_the_file(tmp_path):
  src = "/usr/share/datasets/fashion-mnist"
  for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
    data = open(os.path.join(src, name), "rb").read()
    with open(tmp_path / name, "wb") as f:
      f.write(data[:len(data) // 2] if "images" in name else data)
  r = run("tdjax.train", TOK, f"--workdir={tmp_path / 'w'}", f"--config.input.data_dir={tmp_path}")
  one_line(r, "tdjax.train", 2, "train-images-idx3-ubyte.gz: unreadable (EOFError")


def test_an_unprepared_tfds_dataset_names_it_and_prepares_nothing(tmp_path):
  d = tmp_path / "tfds"
  d.mkdir()
  r = run("tdjax.train", TOK, f"--workdir={tmp_path / 'w'}", "--config.input.source=tfds",
          "--config.input.tfds_name=imagenet2012", f"--config.input.data_dir={d}")
  one_line(r, "tdjax.train", 2, "tfds dataset 'imagenet2012' (split 'train') is not prepared in",
           f"tfds build imagenet2012 --data_dir={d}")
  assert not any(p.is_file() for p in d.rglob("*"))      # no download, no preparation begun
  r = run("tdjax.train", TOK, f"--workdir={tmp_path / 'w'}", "--config.input.source=tfds",
          "--config.input.tfds_name=no_such_dataset")
  one_line(r, "tdjax.train", 2, "input.tfds_name='no_such_dataset': tfds has no such dataset")


# --- sampling -------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--num=0", "--batch_size=0"])
def test_sampling_counts_must_be_positive(tmp_path, flag):
  r = run("tdjax.sample", f"--workdir={tmp_path}", f"--out={tmp_path / 's.png'}", flag)
  one_line(r, "tdjax.sample", 2, f"{flag}: expected at least 1")


def test_sampling_never_overwrites_without_being_told(tmp_path):
  out = tmp_path / "s.png"
  out.write_bytes(b"earlier samples")
  r = run("tdjax.sample", f"--workdir={tmp_path}", f"--out={out}")
  one_line(r, "tdjax.sample", 2, f"--out={out} exists: pass --overwrite")
  assert out.read_bytes() == b"earlier samples"


# --- conversion -----------------------------------------------------------------------------------

def test_converting_into_an_existing_output_is_one_line(tmp_path):
  from test_convert import gpt_state_dict
  np.savez(tmp_path / "gpt.npz", **gpt_state_dict())
  (tmp_path / "out").mkdir()
  r = run("tdjax.convert", "--kind=detailflow_gpt", f"--input={tmp_path / 'gpt.npz'}",
          f"--output={tmp_path / 'out'}", "--tokens=16", "--num_heads=2")
  one_line(r, "tdjax.convert", 2, f"{tmp_path / 'out'} exists; choose a new --output")
  assert os.listdir(tmp_path / "out") == []


def test_a_failed_conversion_leaves_nothing_behind(tmp_path):
  from test_convert import gpt_state_dict
  sd = gpt_state_dict()
  sd["norm.weight"] = sd["norm.weight"][:-1]          # one mis-shaped tensor
  np.savez(tmp_path / "gpt.npz", **sd)
  r = run("tdjax.convert", "--kind=detailflow_gpt", f"--input={tmp_path / 'gpt.npz'}",
          f"--output={tmp_path / 'out'}", "--tokens=16", "--num_heads=2")
  one_line(r, "tdjax.convert", 2, "['norm']['scale']: checkpoint gives (31,)")
  assert sorted(os.listdir(tmp_path)) == ["gpt.npz"]


def test_a_state_dict_of_another_kind_names_the_likely_kind_and_caps_the_list(tmp_path):
  from test_convert import dino_state_dict
  np.savez(tmp_path / "dino.npz", **dino_state_dict())
  r = run("tdjax.convert", "--kind=mar_vae", f"--input={tmp_path / 'dino.npz'}",
          f"--output={tmp_path / 'vae.npz'}")
  line = one_line(r, "tdjax.convert", 2, "looks like a dino checkpoint, not mar_vae (use --kind "
                                         "dino)", "more")
  assert len(line) < 1500, len(line)
  assert not os.path.exists(tmp_path / "vae.npz")


# --- checkpoints and the workdir ------------------------------------------------------------------

def _trained(tmp_path, steps=6):
  w = str(tmp_path / "w")
  assert run("tdjax.train", TOY + f":steps={steps}", f"--workdir={w}").returncode == 0
  return w


def test_unreadable_checkpoints_lead_with_the_real_cause(tmp_path):
  """Every checkpoint lost its OCDBT manifest and total_steps changed: the error names the missing
  files, not the schedule change (not a misfit), and Orbax's async noise is not printed."""
  w = _trained(tmp_path)
  for step in ("3", "6"):
    os.remove(os.path.join(w, "checkpoints", step, "state", "manifest.ocdbt"))
  r = run("tdjax.train", TOY + ":steps=8", f"--workdir={w}")
  line = one_line(r, "tdjax.train", 2, "no readable checkpoint in", "missing", "manifest.ocdbt")
  assert "do not fit this config" not in line and "Event loop is closed" not in r.stderr


def test_a_checkpoint_missing_its_manifest_falls_back_with_one_warning(tmp_path):
  w = _trained(tmp_path)
  os.remove(os.path.join(w, "checkpoints", "6", "state", "manifest.ocdbt"))
  os.remove(os.path.join(w, "checkpoints", "3", "state", "_sharding"))     # not needed
  r = run("tdjax.train", TOY + ":steps=8", f"--workdir={w}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "step 6" in r.stderr and "is not usable (missing" in r.stderr
  assert "resumed from step 3 of" in r.stderr and "Event loop is closed" not in r.stderr


def test_a_second_training_in_one_workdir_is_refused(tmp_path):
  w = str(tmp_path / "w")
  log = open(tmp_path / "first.log", "w")
  first = subprocess.Popen([sys.executable, "-m", "tdjax.train", TOY + ":steps=100000,ckpt=100000",
                            f"--workdir={w}"], cwd=ROOT, env=_env(), stdout=log,
                           stderr=subprocess.STDOUT)
  try:
    t0 = time.time()
    while not os.path.exists(os.path.join(w, "metrics.jsonl")) and time.time() - t0 < 120:
      assert first.poll() is None, open(tmp_path / "first.log").read()[-2000:]
      time.sleep(0.1)
    r = run("tdjax.train", TOY + ":steps=100000,ckpt=100000", f"--workdir={w}")
    one_line(r, "tdjax.train", 2, f"is in use by the training of pid {first.pid}",
             "tdjax.lock")
  finally:
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=120)
  assert first.returncode == 0                     # the first run was not disturbed
  assert not os.path.exists(os.path.join(w, "tdjax.lock"))
  # a lock left by a process that is gone (SIGKILL) is taken over with a warning
  with open(os.path.join(w, "tdjax.lock"), "w") as f:
    json.dump(dict(host=os.uname().nodename, pid=2 ** 22 + 17, started=0, heartbeat=0), f)
  r = run("tdjax.train", TOY + ":steps=100000,ckpt=100000", f"--workdir={w}",
          "--config.total_steps=" + str(_last_step(w) + 1))
  assert r.returncode == 0, r.stderr[-2000:]
  assert "taking it over, its process" in r.stderr


def _last_step(workdir):
  steps = [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return max(steps)
