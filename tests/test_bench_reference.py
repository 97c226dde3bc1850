"""`python -m tdjax.bench_reference` (issue 48's comparison with the reference PyTorch code): it
runs end to end on two cheap measures, with equal parameter counts on both sides, when torch and
the reference checkouts are there (skipped otherwise, as tests/test_reference_repos.py is); and
without torch it stops with status 2 and one line naming what is missing.  The timings themselves
are not checked: they are figures of the machine, not of the code."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from test_bad_input import ROOT, _env, one_line

MODULE = "tdjax.bench_reference"


def _has_torch() -> bool:
  return importlib.util.find_spec("torch") is not None


def test_two_measures_end_to_end(tmp_path):
  pytest.importorskip("torch")
  refs = os.environ.get("TDJAX_REFERENCE_REPOS", "")
  if not refs:
    pytest.skip("TDJAX_REFERENCE_REPOS (a folder with DetailFlow/, TransDiff/ and mar/ checkouts) "
                "is not set")
  from tdjax import bench_reference as br
  only = ["transdiff_decoder", "gpt_train"]
  out = tmp_path / "bench.json"
  r = subprocess.run([sys.executable, "-m", MODULE, "--refs", refs, "--reps", "1", "--rounds", "1",
                      "--threads", "1", "--only", ",".join(only), "--out", str(out)],
                     cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  table = lines[lines.index("| measure (reference config, batch 8) | reference | tdjax | "
                            "reference / tdjax | load |"):]
  assert table[1] == "|---|---|---|---|---|" and len(table) == 2 + len(only), r.stdout
  for name, row in zip(only, table[2:]):
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == br.MEASURES[name][0] and len(cells) == 5, row
    assert all(c.endswith((" s", " ms")) for c in cells[1:3]), row
    assert float(cells[3]) > 0 and "-" in cells[4], row
  result = json.loads(out.read_text())
  assert list(result["measures"]) == only
  assert result["info"]["threads"] == 1 and result["info"]["torch_threads"] == 1
  for name in only:
    m = result["measures"][name]
    assert m["params"]["reference"] == m["params"]["tdjax"] > 100_000, m["params"]
    assert len(m["times"]["reference"]) == len(m["times"]["tdjax"]) == 1
    assert m["ratio"] == pytest.approx(m["reference_seconds"] / m["tdjax_seconds"])
    assert len(m["load"]["reference"][0]) == 2          # the load before and after the timing
    agree = m["outputs_agree"]       # the converted weights: both sides compute the same function
    assert agree["max_abs_reference"] > 0.1, agree
    assert agree["max_abs_diff"] <= 1e-4 * agree["max_abs_reference"], agree
  assert result["table"] == "\n".join(table)


def test_without_torch_it_says_so_in_one_line():
  """Status 2, one line naming torch (in a Python with torch, its import is made to fail)."""
  if _has_torch():
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv[0] = 'x'; "
            f"runpy.run_module('{MODULE}', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, "--only", "gpt_train"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
  else:
    r = subprocess.run([sys.executable, "-m", MODULE, "--only", "gpt_train"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=120)
  line = one_line(r, MODULE, 2, "torch")
  assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert "missing Python package(s) torch" in line
