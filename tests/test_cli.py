"""`tdjax.cli.run`: the entry points report bad input in one line (no traceback, exit 2), and let
every other error through with its traceback."""

import os
import subprocess
import sys

import pytest

from tdjax import cli

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


def _run(*args, code=None):
  env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", *args]
  return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _one_line_error(r, module):
  """The error line, after checking that it is the whole story: exit 2, no traceback."""
  assert r.returncode == cli.EXIT_BAD_INPUT, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(f"python -m {module}: error: "), last
  return last


def test_bad_config_input_is_one_line_naming_it(tmp_path):
  work = str(tmp_path / "w")
  toy = f"--config={HERE}/toy_config.py"
  line = _one_line_error(_run("tdjax.train", toy, f"--workdir={work}", "--config.input.not_a_key=3"),
                         "tdjax.train")
  assert "--config.input.not_a_key=3" in line and "no key 'not_a_key'" in line
  line = _one_line_error(_run("tdjax.train", f"{toy}:stepz=3", f"--workdir={work}"), "tdjax.train")
  assert "config arg 'stepz' is unknown" in line and "--config=" in line
  line = _one_line_error(_run("tdjax.train", "--config=configs/no_such_file.py",
                              f"--workdir={work}"), "tdjax.train")
  assert "no_such_file.py" in line and "No such file" in line
  line = _one_line_error(_run("tdjax.train", toy), "tdjax.train")
  assert "--workdir" in line
  assert not os.path.exists(work)


def test_bad_workdir_and_argument_are_one_line(tmp_path):
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  line = _one_line_error(_run("tdjax.sample", f"--workdir={empty}", "--out=x.png"), "tdjax.sample")
  assert line.endswith(f"no checkpoint in {empty}/checkpoints"), line
  line = _one_line_error(_run("tdjax.data.codes", f"--tokenizer_workdir={empty}", "--out=c.npz"),
                         "tdjax.data.codes")
  assert f"no checkpoint in {empty}/checkpoints" in line
  line = _one_line_error(_run("tdjax.ablate", "--table=no_such_table", f"--workdir={empty}"),
                         "tdjax.ablate")
  assert "'no_such_table'" in line and "detailflow_table2" in line
  line = _one_line_error(_run("tdjax.sample", f"--workdir={empty}", "--out=x.jpg"), "tdjax.sample")
  assert "x.jpg" in line and ".png or .npz" in line
  line = _one_line_error(_run("tdjax.sample", f"--workdir={empty}", "--out=gs://b/s.npz"),
                         "tdjax.sample")
  assert "gs://b/s.npz" in line and "not a URL" in line and not os.path.exists(ROOT + "/gs:")


def test_other_errors_keep_their_traceback():
  main = ("from tdjax import cli\n"
          "def main(argv):\n"
          "  {}\n"
          "cli.run(main)\n")
  r = _run(code=main.format("raise TypeError('a bug, not bad input')"))
  assert r.returncode == 1 and "Traceback" in r.stderr and "TypeError: a bug" in r.stderr
  r = _run(code=main.format("raise ValueError('bad value\\nsecond line')"))
  assert r.returncode == cli.EXIT_BAD_INPUT and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1] == (
      "-c: error: bad value (the rest with --verbosity=1)")
  verbose = main.replace("cli.run(main)", "import sys; sys.argv.append('--verbosity=1'); cli.run(main)")
  r = _run(code=verbose.format("raise ValueError('bad value')"))
  assert r.returncode == cli.EXIT_BAD_INPUT and "Traceback" in r.stderr
  assert r.stderr.strip().endswith("-c: error: bad value")


@pytest.mark.parametrize("message, expected", [
    ("flag --kind=x: value should be one of <a|b>", "flag --kind=x: value should be one of <a|b>"),
    ("flag --config=c.py:foo=1: Error whilst parsing config file:\n\n  Traceback (most recent "
     "call last):\n    File \"c.py\", line 3\n  ValueError: config arg 'foo' is unknown\n",
     "flag --config=c.py:foo=1: ValueError: config arg 'foo' is unknown"),
])
def test_flag_error_message_keeps_the_flag_and_the_last_line(message, expected):
  assert cli.flag_error_message(ValueError(message)) == expected


def test_unknown_override_names_the_override():
  argv = ["prog", "--config=c.py", "--config.total_steps=3", "--config.input.not_a_key=3"]
  msg = cli.unknown_override_message(argv, AttributeError("\"'not_a_key'\""))
  assert msg.startswith("--config.input.not_a_key=3: the config has no key 'not_a_key'")
