"""The benchmark's figures are computed from real compiled steps and real shards."""

from tdjax import bench
from toy_task import toy_config


def test_train_step_figures_and_fsdp_ratio():
  figs = bench.train_step_figures(toy_config(), steps=1, repeats=1)
  # 3 dense layers of the toy MLP: at least 2 * batch * params FLOPs forward
  assert figs["flops_per_step"] > 2 * 16 * figs["params"]
  assert figs["seconds_per_step"] > 0 and figs["flops_per_sec"] > 0
  ratio = bench.fsdp_bytes_ratio(toy_config())
  assert ratio["devices"] == 8 and 1.0 <= ratio["ratio_max_to_even_share"] < 1.1
  m = bench.matmul_flops_per_sec(n=256, repeats=1)
  assert m["flops_per_sec"] > 0
