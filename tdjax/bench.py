r"""Speed figures on this machine, as JSON: plain matmul FLOP/s, and for each model its train step's
FLOP/s and the ratio of the two.  Medians of repeats.  A step's FLOPs are XLA's cost analysis of
the step lowered with its layer stacks unrolled (as in `tdjax.aot`): the compiled executable of a
scanned stack counts the loop body once, so its own figure (`compiled_flops_per_step`, also
reported) undercounts a depth-L scanned model about L times.

  python -m tdjax.bench [--models=classifier,tokenizer] [--repeats=5] [--out=bench.json] [--markdown]
  python -m tdjax.bench --input      # the input pipeline's images/s (threads; 1, 2 worker processes)
  python -m tdjax.bench --latency [--generators=detailflow,transdiff_1step,transdiff_mrar]
                                     # per-image sampling latency: measured at the demo size,
                                     # an AOT cost-model estimate at the paper size

Latency (`--latency`): each generator samples with random weights (the time does not depend on
them) at the settings the papers time at (`LATENCY`): DetailFlow-16 at batch 1, CFG 1.45, N = 128
in 23 AR steps + the tokenizer's decode (paper Table 1: 0.08 s/img on an A100); TransDiff-L 1-step
and MRAR with 100 Euler-Maruyama steps at CFG 1.3 and batch 256 (the reference's timer divides a
batch's wall time by its size; maintainer, issue #1: 0.2 s/img for TransDiff-L 1-step).  The demo
size is compiled and run (`seconds_per_image` after a warm-up call, median of repeats, on this
machine).  The paper size is only lowered, with its layer stacks and sampling loops unrolled, and
XLA's cost analysis gives FLOPs per image (AR passes, every diffusion step with its CFG half, the
tokenizer decode; TransDiff's KL-16 VAE decode is counted separately as `vae_decode_flops`): a
100-step sampler is lowered at 2 and 3 steps and extrapolated linearly (each step costs the same).
`estimated_seconds_per_image_at_{tflops}` divides those FLOPs by a sustained rate (an assumption,
not a measurement: 40 % of an A100's 312 bf16 TFLOP/s).

With several devices (e.g. XLA_FLAGS=--xla_force_host_platform_device_count=8) it also reports
how evenly FSDP spreads each model's parameter bytes.  The train-step figures use the config's
one device.
"""

from __future__ import annotations

import contextlib
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

import flax.linen as nn

from tdjax import aot, cli, configlib, parallel, trainer
from tdjax.data import pipeline
from tdjax.generators import next_detail as nd
from tdjax.generators.next_detail import benchmark_cache_vs_recompute
from tdjax.tasks import get_task
from tdjax.tokenizers import kl_vae

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
    "next_detail": ("configs/next_detail.py", "size=demo", {}),
    "transdiff": ("configs/transdiff.py", "size=demo", {}),
    "tokenizer_w512": ("configs/detailflow_tokenizer.py", "size=demo", _W512_TOK),
    "next_detail_w512": ("configs/next_detail.py", "size=demo", _W512_AR),
    "transdiff_w512": ("configs/transdiff.py", "size=demo", _W512_TD),
}


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
  # a loop body (layer scan, the CPU's blocked attention) is counted once: count an unrolled copy
  flops = aot.unrolled_hlo_flops(config)
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


# ------------------------------------------------------------------------------------------------
# Per-image sampling latency
# ------------------------------------------------------------------------------------------------

# name: (family, demo config args, paper config args, paper timing settings, paper figure)
LATENCY = {
    "detailflow": dict(
        family="detailflow", demo=("size=demo", "size=demo"),
        paper=("size=L,tokens=128", "size=full,tokens=128"),
        settings=dict(batch=1, cfg=1.45),
        paper_figure="DetailFlow-16 (GPT-L, N=128, 23 AR steps): 0.08 s/img, A100, batch 1 "
                     "(paper Table 1)"),
    "transdiff_1step": dict(
        family="transdiff", demo="size=demo", paper="size=L",
        settings=dict(batch=256, steps=100, cfg=1.30, scale_0=0.89, scale_1=0.95),
        paper_figure="TransDiff-L 1-step: 0.2 s/img (maintainer, issue #1; the reference's timer: "
                     "a batch of 256's wall time / 256)"),
    "transdiff_mrar": dict(
        family="transdiff", demo="size=demo,mrar=True", paper="size=L,mrar=True",
        settings=dict(batch=256, steps=100, cfg=1.30, scale_0=0.925, scale_1=0.95),
        paper_figure="TransDiff-L MRAR: not published (4 rounds of the 1-step sampler: ~4x)"),
}
ASSUMED_TFLOPS = 0.4 * 312     # sustained bf16 rate assumed for the paper-size estimate (A100)


def _unscanned(config):
  """The config with every layer stack's scan off and einsum attention (XLA counts a loop body
  once)."""
  return aot.accelerator_config(config, unroll=True)


@contextlib.contextmanager
def _python_fori_loops():
  """jax.lax.fori_loop with Python-int bounds runs as a Python loop while tracing (each step its
  own ops in the program, so a cost analysis counts every step)."""
  original = jax.lax.fori_loop

  def fori_loop(lower, upper, body, init, **kw):
    if isinstance(lower, int) and isinstance(upper, int):
      x = init
      for i in range(lower, upper):
        x = body(i, x)
      return x
    return original(lower, upper, body, init, **kw)

  jax.lax.fori_loop = fori_loop
  try:
    yield
  finally:
    jax.lax.fori_loop = original


def _flops(lowered) -> float:
  return float(_first(lowered.cost_analysis()).get("flops", 0.0))


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(tree))


def _detailflow(ar_arg: str, tok_arg: str, *, abstract: bool, scan: bool = True):
  """(AR task, AR params, tokenizer model, tokenizer params): random weights, or their shapes."""
  ar_cfg = configlib.load_config("next_detail", ar_arg)
  tok_cfg = configlib.load_config("detailflow_tokenizer", tok_arg)
  if not scan:
    ar_cfg, tok_cfg = _unscanned(ar_cfg), _unscanned(tok_cfg)
  ar_cfg.tokenizer_workdir = ""
  for part in (ar_cfg.model, ar_cfg.input):     # the AR model on this tokenizer's codes
    part.update(dict(num_tokens=tok_cfg.model.num_tokens, vocab_size=tok_cfg.model.codebook_size))
  task, tok_task = get_task(ar_cfg), get_task(tok_cfg)
  key = jax.random.key(0)
  init_ar = lambda k: nn.unbox(task.init(k)[0])
  init_tok = lambda k: tok_task.model.init({"params": k}, tok_task._dummy())["params"]
  if abstract:
    return task, _abstract(jax.eval_shape(init_ar, key)), tok_task.model, _abstract(
        jax.eval_shape(init_tok, key))
  # a non-zero head: sampled tokens that depend on the inputs, as with trained weights
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(key, p.shape, p.dtype),
                        jax.jit(init_ar)(key))
  return task, params, tok_task.model, jax.jit(init_tok)(key)


def _detailflow_sampler(task, tok_model, settings, python_loop: bool = False):
  model = task.model
  guided = float(settings["cfg"]) != 1.0
  decode_ar = functools.partial(nd._decode, model, guided=guided, cfg_schedule="constant",
                                temperature=1.0, top_k=0, top_p=1.0, use_cache=True,
                                python_loop=python_loop, counter=None)

  def fn(params, tok_params, labels, rng):
    codes = decode_ar(params, labels, rng, jnp.float32(settings["cfg"]))
    return nd.decode_codes(tok_model, tok_params, codes)
  return fn


def _transdiff(arg: str, *, abstract: bool, scan: bool = True):
  cfg = configlib.load_config("transdiff", arg)
  if not scan:
    cfg = _unscanned(cfg)
  task = get_task(cfg)
  init = lambda k: nn.unbox(task.init(k)[0])
  key = jax.random.key(0)
  if abstract:
    return task, _abstract(jax.eval_shape(init, key))
  return task, jax.jit(init)(key)


def _transdiff_sampler(task, settings, steps=None):
  kw = dict(cfg=settings["cfg"], steps=int(steps or settings["steps"]),
            scale_0=settings["scale_0"], scale_1=settings["scale_1"])
  return lambda params, labels, rng: task.sample_latents(params, labels, rng, **kw)


def measured_latency(name: str, *, batch: int | None = None, steps: int | None = None,
                     repeats: int = 3) -> dict:
  """Wall seconds per image of generator `name` at the demo size (random weights, compiled
  before timing; median of `repeats` calls), with LATENCY's settings (batch / steps overridable)."""
  spec = LATENCY[name]
  settings = dict(spec["settings"])
  settings.update({k: v for k, v in (("batch", batch), ("steps", steps))
                   if v and k in settings})
  b = int(settings["batch"])
  key = jax.random.key(1)
  if spec["family"] == "detailflow":
    task, params, tok_model, tok_params = _detailflow(*spec["demo"], abstract=False)
    fn = jax.jit(_detailflow_sampler(task, tok_model, settings))
    labels = jnp.arange(b, dtype=jnp.int32) % task.model.num_classes
    run = lambda: jax.block_until_ready(fn(params, tok_params, labels, key))
    extra = dict(num_tokens=task.model.num_tokens, group=task.model.group_size,
                 ar_forward_passes=nd.num_forward_passes(task.model.num_tokens,
                                                         task.model.group_size, task.model.c))
  else:
    task, params = _transdiff(spec["demo"], abstract=False)
    sampler = _transdiff_sampler(task, settings)
    fn = jax.jit(lambda p, lab, k: task._to_images(sampler(p, lab, k)))   # + the latent decode
    labels = jnp.arange(b, dtype=jnp.int32) % int(task.config.model.num_classes)
    run = lambda: jax.block_until_ready(fn(params, labels, key))
    extra = dict(latent_tokens=task.L, rounds=task.num_refs + 1)
  t0 = time.perf_counter()
  run()
  compile_and_first = time.perf_counter() - t0
  times = []
  for _ in range(max(repeats, 1)):         # after the first call (compile): the median
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  sec = statistics.median(times)
  params_n = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
  return dict(settings, **extra, params=params_n, seconds_per_batch=sec,
              seconds_per_image=sec / b, first_call_seconds=compile_and_first)


def paper_flops(name: str) -> dict:
  """FLOPs per image of generator `name` at the paper size with LATENCY's settings, from XLA's
  cost analysis of the lowered (not compiled, not run) sampler: layer stacks and sampling loops
  unrolled; a multi-step sampler is lowered at 2 and 3 steps and extrapolated linearly."""
  spec = LATENCY[name]
  settings = dict(spec["settings"])
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  b = 1           # FLOPs scale with the batch: per image = the program at batch 1
  labels = jax.ShapeDtypeStruct((b,), jnp.int32)
  t0 = time.perf_counter()
  if spec["family"] == "detailflow":
    task, params, tok_model, tok_params = _detailflow(*spec["paper"], abstract=True, scan=False)
    ar = _detailflow_sampler(task, tok_model, settings, python_loop=True)
    codes = jax.ShapeDtypeStruct((b, task.model.num_tokens), jnp.int32)
    decode = lambda tp, c: nd.decode_codes(tok_model, tp, c)
    decode_flops = _flops(jax.jit(decode).lower(tok_params, codes))
    total = _flops(jax.jit(ar).lower(params, tok_params, labels, key))
    out = dict(ar_flops=total - decode_flops, tokenizer_decode_flops=decode_flops,
               ar_forward_passes=nd.num_forward_passes(task.model.num_tokens,
                                                       task.model.group_size, task.model.c),
               params=int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))))
  else:
    task, params = _transdiff(spec["paper"], abstract=True, scan=False)
    with _python_fori_loops():
      f2, f3 = (_flops(jax.jit(_transdiff_sampler(task, settings, s)).lower(params, labels, key))
                for s in (2, 3))
    steps = int(settings["steps"])
    total = f2 + (steps - 2) * (f3 - f2)
    out = dict(flops_per_step=(f3 - f2), rounds=task.num_refs + 1, latent_tokens=task.L,
               params=int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))))
    vae = kl_vae.AutoencoderKL(kl_vae.KL16)
    size = int(task.config.input.image_size)
    vae_params = _abstract(jax.eval_shape(
        lambda k: vae.init(k, jnp.zeros((1, size, size, 3)))["params"], jax.random.key(0)))
    z = jax.ShapeDtypeStruct((b, task.grid, task.grid, kl_vae.KL16.embed_dim), jnp.float32)
    out["vae_decode_flops"] = _flops(jax.jit(
        lambda p, z: vae.apply({"params": p}, z, method="decode")).lower(vae_params, z))
  out.update(settings=settings, flops_per_image=total / b, lower_seconds=time.perf_counter() - t0,
             **{f"estimated_seconds_per_image_at_{ASSUMED_TFLOPS:g}_tflops":
                (total / b + out.get("vae_decode_flops", 0.0)) / (ASSUMED_TFLOPS * 1e12)},
             paper_figure=spec["paper_figure"])
  return out


def latency_figures(generators=None, *, batch: int | None = None, steps: int | None = None,
                    repeats: int = 3, paper: bool = True) -> dict:
  unknown = [g for g in generators or () if g not in LATENCY]
  if unknown:
    raise ValueError(f"--generators: {', '.join(unknown)} unknown; expected some of "
                     f"{', '.join(LATENCY)}")
  out = {"jax": jax.__version__, "device": str(jax.devices()[0])}
  for name in generators or LATENCY:
    out[name] = {"demo": measured_latency(name, batch=batch, steps=steps, repeats=repeats)}
    if paper:
      out[name]["paper"] = paper_flops(name)
  return out


def latency_table(result: dict) -> str:
  lines = ["| generator | demo: batch, steps, CFG | demo s / image (this machine) | paper size: "
           "GFLOP / image | paper size: est. s / image | paper's figure |",
           "|---|---|---|---|---|---|"]
  for name, r in result.items():
    if not isinstance(r, dict) or "demo" not in r:
      continue
    d, p = r["demo"], r.get("paper")
    est = [v for k, v in (p or {}).items() if k.startswith("estimated_seconds_per_image")]
    gflop = "-" if not p else f"{(p['flops_per_image'] + p.get('vae_decode_flops', 0.0)) / 1e9:,.0f}"
    lines.append(f"| {name} | {d['batch']}, {d.get('steps', d.get('ar_forward_passes'))}, "
                 f"{d['cfg']} | {d['seconds_per_image'] * 1e3:.2f} ms | {gflop} | "
                 f"{'-' if not est else f'{est[0]:.3f}'} | "
                 f"{LATENCY[name]['paper_figure'] if name in LATENCY else ''} |")
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.latency:
    result = latency_figures(FLAGS.generators, batch=FLAGS.latency_batch or None,
                             steps=FLAGS.latency_steps or None, repeats=FLAGS.repeats,
                             paper=FLAGS.paper)
    print(json.dumps(result, indent=2))
    print(latency_table(result))
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        f.write(json.dumps(result, indent=2) + "\n")
    return
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
  flags.DEFINE_bool("latency", False, "Only per-image sampling latency: measured at the demo "
                    "size, estimated from the AOT cost model at the paper size.")
  flags.DEFINE_list("generators", None, "--latency: generators (default: all of "
                    + ", ".join(LATENCY) + ").")
  flags.DEFINE_integer("latency_batch", 0, "--latency: demo batch (default: the paper's).")
  flags.DEFINE_integer("latency_steps", 0, "--latency: demo diffusion steps (default: the paper's).")
  flags.DEFINE_bool("paper", True, "--latency: also the paper-size cost-model estimate.")
  flags.DEFINE_bool("input", False, "Only the input pipeline: images/s of JPEG decode + crop + "
                    "resize on threads and in 1 and 2 worker processes.")
  cli.run(main)
