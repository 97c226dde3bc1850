"""Ahead-of-time compilation of a sharded train step (pod readiness on fake devices)."""

import jax
import numpy as np
import pytest

from tdjax import aot, configlib



def test_parse_mesh():
  assert aot.parse_mesh("data=2,fsdp=4,tensor=1") == {"data": 2, "fsdp": 4, "tensor": 1}
  with pytest.raises(ValueError, match="expected comma-separated"):
    aot.parse_mesh("pipeline=2")
  with pytest.raises(ValueError, match="expected comma-separated"):
    aot.parse_mesh("data=x")


def test_report_shards_state_and_counts_flops():
  """fsdp=8: the compiled step's argument buffers per device are ~1/8 of the train state; the HLO
  FLOPs of the unrolled step match the analytic transformer count within 10 %."""
  c = configlib.load_config("next_detail", "size=demo")
  out = aot.report(c, {"data": 1, "fsdp": 8, "tensor": 1}, 16)
  rep = aot.report(c, {"data": 8, "fsdp": 1, "tensor": 1}, 16)
  state = 4 * 4 * out["params"]   # fp32 params + Adam mu, nu + EMA
  assert out["devices"] == 8 and out["mesh"]["fsdp"] == 8
  assert out["per_device_bytes"]["argument"] < 0.2 * state            # sharded ...
  assert rep["per_device_bytes"]["argument"] > 0.9 * state            # ... vs replicated
  assert abs(out["hlo_over_analytic"] - 1) < 0.1
  assert out["fits"] == {"95GiB": True, "80GiB": True}


def test_indivisible_dimensions_are_replicated_not_rejected():
  """A 12-wide table on fsdp=8 keeps its other sharded axes and replicates the indivisible one."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from tdjax import parallel
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  sh = {"a": NamedSharding(mesh, P("fsdp", None)), "b": NamedSharding(mesh, P(("data", "fsdp"))),
        "c": NamedSharding(mesh, P(None, "fsdp"))}
  shapes = {"a": jax.ShapeDtypeStruct((6, 3), np.float32),      # 6 % 4 != 0 -> replicated
            "b": jax.ShapeDtypeStruct((10,), np.float32),         # 10 % 8 -> keep data (2)
            "c": jax.ShapeDtypeStruct((3, 8), np.float32)}        # divisible: unchanged
  out = parallel.fit_to_shapes(sh, shapes)
  assert out["a"].spec == P(None, None)
  assert out["b"].spec == P("data")
  assert out["c"].spec == P(None, "fsdp")
  for k in shapes:   # every result is usable for an array of that shape
    jax.device_put(np.zeros(shapes[k].shape, np.float32), out[k])


def test_tokenizer_hlo_flops_match_analytic():
  c = configlib.load_config("detailflow_tokenizer",
                        "size=demo,degrade_p=0.0")
  assert abs(aot.unrolled_hlo_flops(c, {"data": 8}, 16) /
             _analytic_flops(c, 16) - 1) < 0.1


def _analytic_flops(c, b):
  """The task's analytic FLOPs of a train step of batch b (its example batch's shapes)."""
  from tdjax import parallel, trainer
  c = c.copy_and_resolve_references()
  c.input.batch_size = b
  task = trainer.Setup(c, parallel.make_mesh({"data": 8})).task
  return task.analytic_flops(task.example_batch(b))


@pytest.mark.parametrize("arg", ["size=demo,batch_mul=2", "size=demo,mrar=True", "size=demo,head=mlp",
                                 "size=demo,batch_mul=2,conditioning=adaln",
                                 "size=B,batch_mul=1"])
def test_transdiff_hlo_flops_match_analytic(arg):
  """Lowering only (no compile); size=B also checks that scanned stacks are unrolled for the count."""
  c = configlib.load_config("transdiff", arg)
  c.model.dropout = c.head.dropout = 0.0
  ratio = aot.unrolled_hlo_flops(c, {"data": 8}, 8) / _analytic_flops(c, 8)
  assert abs(ratio - 1) < 0.1, ratio


@pytest.mark.parametrize("arg,head_remat",
                         [("size=B,batch_mul=1,res=512,init_from=/unused", "none"),
                          ("size=B,batch_mul=1", "nothing_saveable"),
                          ("size=B,batch_mul=1", "dots_with_no_batch_dims_saveable")])
def test_transdiff_flops_of_a_frozen_ar_and_of_head_remat(arg, head_remat):
  """The 512 px stage (head_only) runs its AR forward only (3 passes would be ~7 % too many at
  B); remat of the head adds one forward of it (~30 % of the B step), or with
  dots_with_no_batch_dims_saveable its attention products only."""
  c = configlib.load_config("transdiff", arg)
  c.model.dropout = c.head.dropout = 0.0
  c.head.remat = head_remat   # (the 512 px config's default is the dots policy)
  ratio = aot.unrolled_hlo_flops(c, {"data": 8}, 8) / _analytic_flops(c, 8)
  assert abs(ratio - 1) < 0.03, ratio
