"""The benchmark's figures are computed from real compiled steps and real shards."""

from tdjax import bench, configlib
from toy_task import toy_config


def test_train_step_figures_and_fsdp_ratio():
  figs = bench.train_step_figures(toy_config(), steps=1, repeats=1)
  # the suite's persistent XLA cache (conftest) holds the step now: a second measurement reads it,
  # and says so rather than passing the read off as a compile time (the CLI turns the cache off)
  import jax
  assert jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache
  again = bench.train_step_figures(toy_config(), steps=1, repeats=1)
  assert again["compile_cached"] is True
  assert "(cache hit)" in bench.markdown_table({"matmul": {"n": 8, "flops_per_sec": 1.0},
                                               "train_step/toy": dict(again, ratio_to_matmul=1.0)})
  # 3 dense layers of the toy MLP: at least 2 * batch * params FLOPs forward
  assert figs["flops_per_step"] > 2 * 16 * figs["params"]
  assert figs["seconds_per_step"] > 0 and figs["flops_per_sec"] > 0
  ratio = bench.fsdp_bytes_ratio(toy_config())
  assert ratio["devices"] == 8 and 1.0 <= ratio["ratio_max_to_even_share"] < 1.1
  m = bench.matmul_flops_per_sec(n=256, repeats=1)
  assert m["flops_per_sec"] > 0
  table = bench.markdown_table({"matmul": m, "fsdp_bytes/toy": ratio, "train_step/toy": dict(
      figs, ratio_to_matmul=figs["flops_per_sec"] / m["flops_per_sec"])})
  row = table.splitlines()[-1].split(" | ")
  assert row[0] == "| toy" and row[2] == "16" and row[-1] == f"{ratio['ratio_max_to_even_share']:.2f} |"


def test_a_scanned_stack_counts_every_layer():
  """XLA's compiled cost analysis counts a scanned stack's loop body once; the bench must not."""
  import pytest
  scanned = configlib.load_config("configs/next_detail.py", "size=demo,batch=8", {"model.depth": 3})
  unrolled = configlib.load_config("configs/next_detail.py", "size=demo,batch=8,scan=False",
                                   {"model.depth": 3})
  assert scanned.model.scan and not unrolled.model.scan and scanned.model.depth == 3
  s = bench.train_step_figures(scanned, steps=1, repeats=1)
  u = bench.train_step_figures(unrolled, steps=1, repeats=1)
  assert s["flops_per_step"] == pytest.approx(u["compiled_flops_per_step"], rel=0.02)
  assert u["flops_per_step"] == pytest.approx(s["flops_per_step"], rel=0.02)
  assert s["compiled_flops_per_step"] < 0.6 * s["flops_per_step"]     # the loop body once
  path, arg, over = bench.MODELS["next_detail_w512"]
  assert configlib.load_config(path, arg, over).model.dim == 512


def test_load_config_by_name_or_path_and_its_errors(tmp_path):
  """One loader for every CLI: a configs/ name and a path give the same config; a missing file, an
  unknown override field and an unknown config arg are each named."""
  import pytest
  by_name = configlib.load_config("transdiff", "size=demo,mrar=True", {"head.depth": 3})
  by_path = configlib.load_config("configs/transdiff.py", "size=demo,mrar=True")
  assert by_name.head.depth == 3 and by_path.head.depth != 3
  by_name.head.depth = by_path.head.depth
  assert by_name.to_dict() == by_path.to_dict()
  with pytest.raises(FileNotFoundError, match="transdif.py"):
    configlib.load_config("transdif", "size=demo")
  with pytest.raises(KeyError, match="head.dept"):
    configlib.load_config("transdiff", "size=demo", {"head.dept": 3})
  with pytest.raises(ValueError, match="'sise' is unknown"):
    configlib.load_config("transdiff", "sise=demo")


def test_latency_cli_measures_per_image_sampling_time():
  """`--latency` as a subprocess (DetailFlow's AR + tokenizer decode at the demo size, the batch
  cut to 2): seconds per image = a timed batch / its size, after the compiling call."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run([sys.executable, "-m", "tdjax.bench", "--latency", "--generators=detailflow",
                        "--latency_batch=2", "--repeats=2", "--nopaper"], cwd=root,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  text = run.stdout
  table = text[text.index("| generator |"):]
  result = json.loads(text[:text.index("| generator |")])
  d = result["detailflow"]["demo"]
  assert "paper" not in result["detailflow"]
  assert d["batch"] == 2 and d["cfg"] == 1.45 and "steps" not in d      # the paper's CFG
  assert d["num_tokens"] == 32 and d["ar_forward_passes"] == 11           # demo N=32, g=4
  assert d["seconds_per_image"] == d["seconds_per_batch"] / 2 > 0
  assert d["first_call_seconds"] > d["seconds_per_batch"]                 # the compile is excluded
  assert f"| detailflow | 2, 11, 1.45 | {d['seconds_per_image'] * 1e3:.2f} ms | - | - |" in table


def test_paper_size_flops_count_every_step_and_layer(monkeypatch):
  """The cost model lowers the sampler with its loops unrolled: a 2- and 3-step TransDiff sampler
  differ by one step (2 guided head calls), which the 100-step figure extrapolates exactly; the
  DetailFlow figure counts all its AR passes and the decode.  Sizes cut to tiny/demo here."""
  import pytest
  import jax
  monkeypatch.setitem(bench.LATENCY, "transdiff_1step", dict(
      bench.LATENCY["transdiff_1step"], paper="size=tiny",
      settings=dict(bench.LATENCY["transdiff_1step"]["settings"], steps=5)))
  monkeypatch.setitem(bench.LATENCY, "detailflow", dict(
      bench.LATENCY["detailflow"], paper=("size=demo,tokens=16,group=4", "size=tiny")))
  before = jax.lax.fori_loop
  td = bench.paper_flops("transdiff_1step")
  assert jax.lax.fori_loop is before                   # the unrolling patch is undone
  task, params = bench._transdiff("size=tiny", abstract=True, scan=False)
  labels = jax.ShapeDtypeStruct((1,), jax.numpy.int32)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  with bench._python_fori_loops():
    five = bench._flops(jax.jit(bench._transdiff_sampler(task, td["settings"], 5)).lower(
        params, labels, key))
  assert td["flops_per_step"] > 0 and td["flops_per_image"] == pytest.approx(five, rel=1e-6)
  # a step is one head call on the guided (2x) batch: at least 2 x 2 x head params x tokens
  head = sum(x.size for x in jax.tree.leaves(params["head"]))
  assert td["flops_per_step"] > 2 * 2 * head * task.L * 0.5
  assert td["vae_decode_flops"] > 0
  df = bench.paper_flops("detailflow")
  assert df["ar_forward_passes"] == 7                  # N=16, g=4: 4 tokens, then 3 groups
  # every pass of the guided batch (2 rows) through every layer: >= 2 x params x N x 2 rows
  assert df["ar_flops"] > 2 * 0.5 * df["params"] * 16 * 2
  assert df["flops_per_image"] == pytest.approx(df["ar_flops"] + df["tokenizer_decode_flops"])
  assert df["tokenizer_decode_flops"] > 0
