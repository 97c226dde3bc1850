r"""Pod readiness without a pod: compile a full-size train step ahead of time on N fake devices.

  python -m tdjax.aot --config configs/next_detail.py:size=L --devices 256 \
      --mesh data=16,fsdp=16,tensor=1 --batch 256 [--config.model.remat=...] [--json out.json]

Lowers and compiles `Setup.train_step` (the same jit with in/out shardings and donation that
`tdjax.train` runs) for abstract state and batch only: no parameter is allocated.  Prints per-device
memory from the compiled executable (arguments, outputs, temporaries; arguments are the sharded
train state + batch), the FLOPs of the step's HLO (XLA cost analysis of the lowered program with the
layer stacks unrolled: the compiled executable's own count includes a scanned layer only once; it is
printed too) next to the analytic FLOPs of the model (6 x params x tokens for the matmuls + the attention score/value
products, times (1 + remat recompute) where given by the task), and the check against a memory
budget per device (default 95 GiB TPU v5p and 80 GiB H100).

CPU-compiled memory figures are the XLA buffer assignment for host devices; a TPU/GPU compile of the
same program fuses differently, so treat them as an estimate of the right order (temporaries
especially), not a guarantee.
"""

import json
import os
import sys
import time


def _early_device_count(argv) -> None:
  """XLA reads the fake device count at backend start: set it before jax is imported."""
  n = None
  for i, a in enumerate(argv):
    if a.startswith("--devices="):
      n = a.split("=", 1)[1]
    elif a == "--devices" and i + 1 < len(argv):
      n = argv[i + 1]
  if n:
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(n)}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":
  _early_device_count(sys.argv)

import jax  # noqa: E402  (imported after the fake device count is set)
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tdjax import cli, parallel, trainer  # noqa: E402

FLAGS = flags.FLAGS

GIB = 1024 ** 3


def parse_mesh(text: str) -> dict:
  """'data=16,fsdp=16,tensor=1' -> {'data': 16, 'fsdp': 16, 'tensor': 1}."""
  out = {}
  for part in filter(None, text.split(",")):
    k, _, v = part.partition("=")
    if k.strip() not in ("data", "fsdp", "tensor") or not v.strip().lstrip("-").isdigit():
      raise ValueError(f"--mesh {text!r}: expected comma-separated data=N,fsdp=N,tensor=N")
    out[k.strip()] = int(v)
  return out


def accelerator_config(config, unroll: bool = False):
  """A copy of `config` as a pod runs it: attention 'auto' -> 'einsum' (the CPU's 'blocked'
  kernel loops over batch blocks and recomputes scores in its backward: neither the pod's
  program nor countable by XLA's cost analysis, which counts a loop body once); unroll=True also
  turns every layer stack's `scan` off (model, head, ...)."""
  config = config.copy_and_resolve_references()
  for key in config.keys():
    node = config[key]
    if hasattr(node, "keys"):
      if node.get("attention_impl") == "auto":
        node.attention_impl = "einsum"
      if unroll and "scan" in node:
        node.scan = False
  return config


def lower_train_step(config, mesh_axes: dict | None = None, batch_size: int | None = None,
                     unroll: bool = False):
  """Lowers the train step for abstract state and batch; returns (setup, lowered, batch).
  unroll=True turns every layer stack's `scan` off (model, head, ...)."""
  config = accelerator_config(config, unroll)
  if unroll:     # XLA counts a loop body once: no layer scan, no accumulation loop (same FLOPs)
    config.grad_accum = 1
  if batch_size:
    config.input.batch_size = batch_size
  if mesh_axes:
    config.mesh = dict(config.mesh)
    config.mesh.update(mesh_axes)
  mesh = parallel.make_mesh(dict(config.mesh))
  setup = trainer.Setup(config, mesh)
  batch = setup.task.example_batch(int(config.input.batch_size))
  abstract_batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype,
                                            sharding=parallel.batch_sharding(mesh, np.ndim(v)))
                    for k, v in batch.items()}
  with parallel.use_mesh(mesh, setup.rules):
    lowered = setup.compile_step(batch).lower(setup.abstract_state(), abstract_batch)
  return setup, lowered, batch


def compile_train_step(config, mesh_axes: dict | None = None, batch_size: int | None = None):
  """Lowers and compiles the train step; returns (setup, compiled, seconds, batch)."""
  t0 = time.perf_counter()
  setup, lowered, batch = lower_train_step(config, mesh_axes, batch_size)
  with parallel.use_mesh(setup.mesh, setup.rules):
    compiled = lowered.compile()
  return setup, compiled, time.perf_counter() - t0, batch


def unrolled_hlo_flops(config, mesh_axes=None, batch_size=None) -> float:
  """FLOPs of the whole (unpartitioned) train step with the layer stacks unrolled."""
  _, lowered, _ = lower_train_step(config, mesh_axes, batch_size, unroll=True)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def report(config, mesh_axes=None, batch_size=None, budgets=(95.0, 80.0)) -> dict:
  setup, compiled, secs, batch = compile_train_step(config, mesh_axes, batch_size)
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  n = setup.mesh.size
  params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(setup.state_shape["params"])))
  per_dev = {k: int(getattr(mem, f"{k}_size_in_bytes", 0)) for k in
             ("argument", "output", "temp", "alias", "generated_code")}
  # donated state: outputs alias arguments, so peak ~ arguments + temporaries (+ non-aliased out)
  peak = per_dev["argument"] + per_dev["temp"] + max(per_dev["output"] - per_dev["alias"], 0)
  flops_dev = float(cost.get("flops", 0.0))
  out = {"config_task": setup.config.task, "devices": n, "mesh": dict(setup.mesh.shape),
         "global_batch": int(setup.config.input.batch_size), "params": params,
         "remat": setup.config.model.get("remat", "none"), "scan": setup.config.model.get("scan"),
         "compile_seconds": secs,
         **({"head_remat": setup.config.head.get("remat", "none")}
            if "head" in setup.config else {}),
         "per_device_bytes": per_dev, "per_device_peak_bytes": peak,
         "per_device_peak_gib": peak / GIB,
         "compiled_flops_per_device": flops_dev, "compiled_flops_total": flops_dev * n}
  # XLA's cost analysis counts a while-loop body once, so a scanned stack's layers are counted
  # once in the compiled figure; the program's FLOPs come from lowering an unrolled copy
  # (scan=False, lowering only: no compile) and reading the global HLO cost analysis
  out["hlo_flops_total"] = unrolled_hlo_flops(config, mesh_axes, batch_size)
  an = setup.task.analytic_flops(batch)
  if an:
    out["analytic_flops_total"] = an
    out["hlo_over_analytic"] = out["hlo_flops_total"] / an
  out["fits"] = {f"{b:g}GiB": bool(peak <= b * GIB) for b in budgets}
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if jax.device_count() != FLAGS.devices:
    raise SystemExit(f"--devices {FLAGS.devices}: jax sees {jax.device_count()} devices (set "
                     f"--devices before anything imports jax)")
  out = report(FLAGS.config, parse_mesh(FLAGS.mesh) or None, FLAGS.batch or None,
               tuple(FLAGS.budget_gib))
  print(json.dumps(out, indent=1))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (path.py[:args]).",
                                  lock_config=True)
  flags.DEFINE_integer("devices", 8, "Fake devices to compile for.")
  flags.DEFINE_string("mesh", "", "data=..,fsdp=..,tensor=.. (default: the config's mesh).")
  flags.DEFINE_integer("batch", 0, "Global batch size (default: the config's).")
  flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")
  flags.DEFINE_multi_float("budget_gib", [95.0, 80.0], "Per-device memory budgets to check (GiB).")
  flags.mark_flags_as_required(["config"])
  cli.run(main)
