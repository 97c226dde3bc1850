r"""Speed figures on this machine, as JSON: plain matmul FLOP/s, and for each model its train step's
FLOP/s and the ratio of the two.  Medians of repeats.  A step's FLOPs are XLA's cost analysis of
the step lowered with its layer stacks unrolled (as in `tdjax.aot`): the compiled executable of a
scanned stack counts the loop body once, so its own figure (`compiled_flops_per_step`, also
reported) undercounts a depth-L scanned model about L times.

  python -m tdjax.bench [--models=classifier,tokenizer] [--repeats=5] [--out=bench.json] [--markdown]
  python -m tdjax.bench --input      # the input pipeline's images/s (threads; 1, 2 worker processes)

With several devices (e.g. XLA_FLAGS=--xla_force_host_platform_device_count=8) it also reports
how evenly FSDP spreads each model's parameter bytes.  The train-step figures use the config's
one device.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from PIL import Image

from tdjax import aot, cli, configlib, parallel, trainer
from tdjax.data import pipeline
from tdjax.generators.next_detail import benchmark_cache_vs_recompute

FLAGS = flags.FLAGS


_persistent_cache_hits = 0     # executables this process read from the persistent XLA cache


@functools.cache
def _count_persistent_cache_hits() -> None:
  """Registers (once) the listener that counts reads from the persistent XLA cache."""

  def count(event: str, **kwargs) -> None:
    global _persistent_cache_hits
    if event == "/jax/compilation_cache/cache_hits":
      _persistent_cache_hits += 1
  jax.monitoring.register_event_listener(count)


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
  fn()  # warm-up (and compile)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_flops_per_sec(n: int = 2048, repeats: int = 5) -> dict:
  """FLOP/s of one f32 n x n matmul, the machine's reference figure."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  sec = _median_seconds(lambda: f(a, b).block_until_ready(), repeats)
  return {"n": n, "seconds": sec, "flops_per_sec": 2 * n ** 3 / sec}


# Small configs per model: (config file, arg, {config field: value} overrides).  The demo models
# are 96-128 wide, too narrow for the CPU's matmul kernels; the `_w512` rows are the same models
# 512 wide (still small: 10-30 M parameters), where the matmuls dominate as they do at scale.
_W512_AR = {"model.dim": 512, "model.num_heads": 8, "model.mlp_dim": 1536}
_W512_TOK = {f"model.{side}_{k}": v for side in ("enc", "dec")
             for k, v in (("width", 512), ("heads", 8), ("mlp", 2048))}
_W512_TD = {"model.width": 512, "model.num_heads": 8, "head.width": 512, "head.num_heads": 8}
MODELS = {
    "classifier": ("configs/classifier.py", "size=demo,batch=128", {}),
    "tokenizer": ("configs/detailflow_tokenizer.py", "size=demo", {}),
    "next_detail": ("configs/detailflow_ar.py", "size=demo", {}),
    "transdiff": ("configs/transdiff.py", "size=demo", {}),
    "tokenizer_w512": ("configs/detailflow_tokenizer.py", "size=demo", _W512_TOK),
    "next_detail_w512": ("configs/detailflow_ar.py", "size=demo", _W512_AR),
    "transdiff_w512": ("configs/transdiff.py", "size=demo", _W512_TD),
}


def _scanned(config) -> bool:
  """Whether any layer stack of the config (the model's, TransDiff's head's) is a scan."""
  return any(config.get(part) is not None and bool(config[part].get("scan"))
             for part in ("model", "head"))


def _first(cost):
  return cost[0] if isinstance(cost, (list, tuple)) else cost


def train_step_figures(config, steps: int, repeats: int) -> dict:
  """Compile time, FLOPs per step (compiled cost analysis) and achieved FLOP/s of one model."""
  setup = trainer.Setup(config, parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  state = setup.init_state()
  batch = setup.task.example_batch(int(config.input.batch_size))
  with parallel.use_mesh(setup.mesh, setup.rules):
    gbatch = parallel.host_to_global(batch, setup.mesh)
    _count_persistent_cache_hits()
    hits = _persistent_cache_hits
    t0 = time.perf_counter()
    lowered = setup.compile_step(gbatch).lower(state, gbatch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    # with a persistent XLA cache on (the CLI turns it off) the step may have been read, not compiled
    compile_cached = _persistent_cache_hits > hits
  cost = _first(compiled.cost_analysis())
  if _scanned(config):               # the loop body is counted once: lower an unrolled copy
    flops = aot.unrolled_hlo_flops(config)
  else:                              # the step as lowered is already unrolled
    flops = float(_first(lowered.cost_analysis()).get("flops", 0.0))
  holder = [state]

  def run():
    s = holder[0]
    for _ in range(steps):
      s, m = compiled(s, gbatch)
    jax.block_until_ready(m["loss"])
    holder[0] = s

  sec = _median_seconds(run, repeats) / steps
  return {"compile_seconds": compile_s, "compile_cached": compile_cached, "flops_per_step": flops,
          "compiled_flops_per_step": float(cost.get("flops", 0.0)), "seconds_per_step": sec,
          "flops_per_sec": flops / sec, "batch_size": int(config.input.batch_size),
          "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state["params"])))}


def fsdp_bytes_ratio(config) -> dict:
  """Parameter bytes held per device with the parameters fully sharded over all devices (fsdp =
  device count), relative to total / devices (1.0 = perfectly even), measured from the shards."""
  n = jax.device_count()
  config = config.copy_and_resolve_references()
  setup = trainer.Setup(config, parallel.make_mesh({"data": 1, "fsdp": n, "tensor": 1}))
  state = setup.init_state()
  held = parallel.per_device_bytes(state["params"])
  total = parallel.tree_bytes(state["params"])
  return {"devices": n, "total_bytes": total, "max_per_device_bytes": max(held.values()),
          "ratio_max_to_even_share": max(held.values()) / (total / n)}


def run_benchmarks(models=None, repeats: int = 5, steps: int = 5) -> dict:
  unknown = [m for m in models or () if m not in MODELS]
  if unknown:
    raise ValueError(f"--models: {', '.join(unknown)} unknown; expected some of {', '.join(MODELS)}")
  out = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
         "matmul": matmul_flops_per_sec(repeats=repeats)}
  peak = out["matmul"]["flops_per_sec"]
  for name in models or MODELS:
    path, arg, overrides = MODELS[name]
    try:
      config = configlib.load_config(path, arg, overrides)
    except FileNotFoundError:
      logging.info("bench: %s has no config yet, skipped", name)
      continue
    figs = train_step_figures(config, steps, repeats)
    figs["ratio_to_matmul"] = figs["flops_per_sec"] / peak
    out[f"train_step/{name}"] = figs
    if jax.device_count() > 1:
      out[f"fsdp_bytes/{name}"] = fsdp_bytes_ratio(config)
  if models is None or "next_detail" in models:
    out["sampling/next_detail_cache_vs_recompute"] = benchmark_cache_vs_recompute(
        repeats=repeats, verbose=False)
  return out


def jpeg_folder(path: str, num: int = 192, seed: int = 0) -> str:
  """`num` JPEGs of ImageNet-like sizes (sides 300-500 px, mostly landscape; smooth content that
  compresses like photographs, ~40-90 KB) in 4 class folders under `path`."""
  rng = np.random.default_rng(seed)
  for i in range(num):
    w, h = int(rng.integers(400, 501)), int(rng.integers(300, 501))
    low = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(low).resize((w, h), Image.BICUBIC)
    noise = rng.integers(-12, 13, (h, w, 3))
    im = Image.fromarray(np.clip(np.asarray(im, np.int16) + noise, 0, 255).astype(np.uint8))
    folder = os.path.join(path, f"class_{i % 4}")
    os.makedirs(folder, exist_ok=True)
    im.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
  return path


def input_figures(workers=(0, 1, 2), num_images: int = 192, batch: int = 32,
                  image_size: int = 256, threads: int = 2) -> dict:
  """Images/s of the training input (JPEG decode + random square crop + flip + resize to
  `image_size`, ADM-style) on a generated folder, with decoding on `threads` threads in this
  process (worker_processes=0, the demo's setting) and in k grain worker processes (each with one
  thread).  Each setting reads 3 epochs of the folder after a first batch (worker start-up)."""
  out = {"cores": os.cpu_count(), "images": num_images, "batch": batch, "image_size": image_size}
  with tempfile.TemporaryDirectory() as d:
    jpeg_folder(d, num_images)
    sizes = [os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs]
    out["mean_jpeg_kb"] = sum(sizes) / len(sizes) / 1024
    for k in workers:
      cfg = pipeline.with_defaults(dict(source="folder", data_dir=d, image_size=image_size,
                                        channels=3, augment="crop_flip", batch_size=batch,
                                        num_classes=4, num_workers=threads if k == 0 else 1,
                                        worker_processes=k))
      data = pipeline.make_image_pipeline(cfg, seed=0)
      next(data)
      n = 3 * data.steps_per_epoch
      t0 = time.perf_counter()
      for _ in range(n):
        next(data)
      rate = n * batch / (time.perf_counter() - t0)
      data.close()
      name = f"threads_{threads}" if k == 0 else f"processes_{k}"
      out[name] = {"images_per_sec": rate,
                   "images_per_sec_per_core": rate / min(max(k, 1) if k else threads,
                                                         os.cpu_count() or 1)}
  if "processes_1" in out and "processes_2" in out:
    out["speedup_2_vs_1_process"] = (out["processes_2"]["images_per_sec"]
                                     / out["processes_1"]["images_per_sec"])
  return out


def markdown_table(result: dict) -> str:
  """The README's table of the train-step figures (one row per model) from a bench result."""
  peak = result["matmul"]["flops_per_sec"]
  lines = [f"plain f32 matmul {result['matmul']['n']}^3: {peak / 1e9:.0f} GFLOP/s", "",
           "| model | params | batch | step | GFLOP / step | GFLOP/s | ratio to matmul | compile "
           "| FSDP bytes: max / even share |", "|---|---|---|---|---|---|---|---|---|"]
  for key, f in result.items():
    if not key.startswith("train_step/"):
      continue
    name = key.split("/", 1)[1]
    fsdp = result.get(f"fsdp_bytes/{name}", {}).get("ratio_max_to_even_share")
    lines.append(f"| {name} | {f['params'] / 1e6:.1f} M | {f['batch_size']} | "
                 f"{f['seconds_per_step']:.3f} s | {f['flops_per_step'] / 1e9:.1f} | "
                 f"{f['flops_per_sec'] / 1e9:.0f} | {f['ratio_to_matmul']:.2f} | "
                 f"{f['compile_seconds']:.1f} s{' (cache hit)' * f.get('compile_cached', False)} | "
                 f"{'-' if fsdp is None else f'{fsdp:.2f}'} |")
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.input:
    result = input_figures()
    print(json.dumps(result, indent=2))
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        f.write(json.dumps(result, indent=2) + "\n")
    return
  # compile times are cold compiles: no persistent XLA cache (JAX_COMPILATION_CACHE_DIR) is read
  jax.config.update("jax_enable_compilation_cache", False)
  result = run_benchmarks(FLAGS.models, FLAGS.repeats, FLAGS.steps)
  text = json.dumps(result, indent=2)
  print(text)
  if FLAGS.markdown:
    print(markdown_table(result))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":   # flags defined here: tdjax.aot imports this module as tdjax.bench
  flags.DEFINE_list("models", None, "Models to benchmark (default: all that exist).")
  flags.DEFINE_integer("repeats", 5, "Timed repeats; the median is reported.")
  flags.DEFINE_integer("steps", 5, "Train steps per timed repeat.")
  flags.DEFINE_string("out", None, "Also write the JSON to this file.")
  flags.DEFINE_bool("markdown", False, "Also print the train-step figures as a Markdown table.")
  flags.DEFINE_bool("input", False, "Only the input pipeline: images/s of JPEG decode + crop + "
                    "resize on threads and in 1 and 2 worker processes.")
  cli.run(main)
