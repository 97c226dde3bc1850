"""Config helpers shared by the files in configs/: argument parsing and the common skeleton.

Config files are Python modules with `get_config(arg)`; `arg` is the text after ':' in
`--config configs/x.py:size=demo,tokens=32`.  An ablation row is a config argument, not a file.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the checkout: configs/ lives here


def _convert(key: str, text: str, default):
  if isinstance(default, bool):
    if text.lower() in ("1", "true", "yes", "on", ""):
      return True
    if text.lower() in ("0", "false", "no", "off"):
      return False
    raise ValueError(f"config arg {key}={text!r}: expected a boolean")
  if default is None:
    return text
  try:
    return type(default)(text)
  except ValueError:
    raise ValueError(f"config arg {key}={text!r}: expected {type(default).__name__}") from None


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'size=demo,tokens=32,flag' -> ConfigDict with typed values; unknown keys are an error.

  A bare name sets a boolean option to True (big_vision's `runlocal` style).
  """
  out = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config arg {key!r} is unknown; known: {', '.join(sorted(defaults))}")
    out[key] = _convert(key, value.strip(), defaults[key])
  return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
  """Fields the training loop reads; model configs fill `task`, `model`, `input`, `loss`."""
  c = ml_collections.ConfigDict()
  c.task = ""
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 50
  c.eval_every = 500
  c.eval_batches = 4
  c.image_every = 0            # 0: pictures only at the end
  c.ckpt_every = 500
  c.ckpt_every_secs = 0.0      # also save when this many seconds passed since the last save
                               # (checked at log points, on process 0's clock; 0 = off)
  c.keep_checkpoints = 3
  c.async_checkpoint = True
  c.grad_accum = 1
  c.grad_accum_reduce = "mean"   # 'sum': the micro-batches' gradients summed, as TransDiff's
                                 # reference does (it matters for the clip), not averaged
  c.compute_dtype = "float32"  # 'bfloat16' for mixed precision (fp32 master weights)
  c.ema_decay = 0.0            # 0 disables the EMA copy
  c.ema_warmup = False         # decay min(ema_decay, (1 + t) / (10 + t)) (optim.ema_decay_at)
  c.on_nonfinite = "stop"      # 'stop' or 'skip' (skip the update, keep going)
  c.compilation_cache = ""     # directory of the persistent XLA cache ('' = off)
  c.profile_steps = ""         # 'A,B': a jax.profiler trace of steps A..B in WORKDIR/profile
  c.peak_flops = 0.0           # FLOP/s per device for the MFU in the log (0: by device kind)
  c.lock_stale_secs = 900      # a workdir lock not refreshed for this long is taken over
  c.distributed = False        # join a multi-process job at start (parallel.initialize_distributed)
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.axis_rules = []            # extra (logical, mesh) rules taking precedence over the defaults
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
      schedule="cosine", warmup_steps=0, warmup_init=0.0, min_lr_ratio=0.1, grad_clip=1.0,
      decay_min_ndim=2))
  c.optimizer_groups = ml_collections.ConfigDict()  # per-group overrides, e.g. {'disc': {'lr': ..}}
  return c


def from_config(cls, cfg, where: str, **fixed):
  """`cls(**fields)` from the entries of config node `cfg` that are fields of the dataclass (or
  flax Module) `cls`, plus `fixed`; a field the node lacks (a config saved before the field
  existed) takes `cls`'s default, so each default is written once, on the field.  `where` names
  the node ('config.loss') in the one-line error of a value of the wrong kind.  A list (a tuple
  read back from a run's config.json) becomes a tuple: flax Module fields must be hashable."""
  names = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]
  kw = {k: cfg[k] for k in names if k in cfg and k not in fixed}
  for k, v in kw.items():
    if isinstance(v, ml_collections.ConfigDict):
      kw[k] = v.to_dict()
    elif isinstance(v, list):
      kw[k] = tuple(v)
  try:
    return cls(**kw, **fixed)
  except TypeError as e:
    raise ValueError(f"{where}: {e}") from None


# task names changed since checkpoints were first written: old -> current ("tokenizer" was
# DetailFlow's only tokenizer; renamed 2026-12-07 so config, task and module names agree)
RENAMED_TASKS = {"tokenizer": "detailflow_tokenizer"}


def upgrade_config(config: dict) -> dict:
  """A config read from a checkpoint written by an earlier tdjax, in today's names."""
  task = config.get("task")
  return dict(config, task=RENAMED_TASKS[task]) if task in RENAMED_TASKS else config


IMAGENET_TRAIN = 1_281_167     # images in ImageNet-1k's train split: the papers count epochs of it


def epochs(n: float, batch: int) -> int:
  """Steps of `n` ImageNet epochs at global batch `batch` (at least 1)."""
  return max(int(n * IMAGENET_TRAIN // batch), 1)


def check_run_config(c: ml_collections.ConfigDict) -> None:
  """One-line errors for loop settings no run can use (the loop reads these keys)."""
  at_least = dict(total_steps=1, log_every=1, ckpt_every=1, grad_accum=1, eval_every=0,
                  image_every=0, keep_checkpoints=0, eval_batches=1, ckpt_every_secs=0,
                  lock_stale_secs=1)
  for key, low in at_least.items():
    if key in c and c[key] < low:
      raise ValueError(f"config.{key}={c[key]}: expected >= {low}")
  if c.get("grad_accum_reduce", "mean") not in ("mean", "sum"):
    raise ValueError(f"config.grad_accum_reduce={c.grad_accum_reduce!r}: expected 'mean' or 'sum'")
  if c.get("on_nonfinite", "stop") not in ("stop", "skip"):
    raise ValueError(f"config.on_nonfinite={c.on_nonfinite!r}: expected 'stop' or 'skip'")
  if c.get("compute_dtype", "float32") not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"config.compute_dtype={c.compute_dtype!r}: expected float32, bfloat16 or "
                     f"float16")
  if not 0 <= float(c.get("ema_decay", 0.0)) < 1:
    raise ValueError(f"config.ema_decay={c.ema_decay}: expected in [0, 1) (0: no EMA)")


def config_path(name: str) -> str:
  """'transdiff' -> <checkout>/configs/transdiff.py; a path ('configs/x.py', '/abs/x.py') is kept,
  relative paths being read from the checkout."""
  if not name.endswith(".py"):
    return os.path.join(ROOT, "configs", name + ".py")
  return name if os.path.isabs(name) else os.path.join(ROOT, name)


@functools.lru_cache(maxsize=None)
def _config_module(path: str):
  spec = importlib.util.spec_from_file_location(
      "tdjax_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name: str, arg: str = "", overrides: dict | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file, as `--config NAME:ARG` gives it to tdjax.train.

  `name` is a file under configs/ ('transdiff') or a path to one; `overrides` sets dotted fields
  after parsing ({'model.depth': 3}), for benchmarks and tests that need a shape no option names.
  """
  path = config_path(name)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} does not exist (from {name!r})")
  config = _config_module(os.path.realpath(path)).get_config(arg)
  for key, value in (overrides or {}).items():   # get_config's ConfigDicts are unlocked
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise KeyError(f"config override {key!r}: {name} has no field {leaf!r} there")
    node[leaf] = value
  return config


def _flatten(tree, prefix: str = "") -> dict:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


# keys that change how a run goes, not what its checkpoints hold: a resume may change them
SCHEDULE_KEYS = ("seed", "total_steps", "log_every", "eval_every", "eval_batches", "image_every",
                 "ckpt_every", "ckpt_every_secs", "keep_checkpoints", "async_checkpoint",
                 "on_nonfinite", "compilation_cache", "distributed", "profile_steps", "peak_flops",
                 "optimizer.lr", "optimizer.warmup_steps", "optimizer.warmup_init",
                 "optimizer.schedule", "optimizer.min_lr_ratio", "optimizer.grad_clip",
                 "optimizer.weight_decay")


def config_diff(old: dict, new: dict, limit: int = 8, ignore=()) -> list[str]:
  """'key: old -> new' for each dotted key whose value differs (absent keys read '<none>'):
  `task` and `model.*` first, then the rest sorted; at most `limit` (then '... and K more').
  Keys in `ignore` (e.g. SCHEDULE_KEYS) are left out."""
  a, b = _flatten(old), _flatten(new)
  keys = sorted((k for k in set(a) | set(b)
                 if a.get(k, "<none>") != b.get(k, "<none>") and k not in ignore),
                key=lambda k: (k != "task", not k.startswith("model."), k))
  out = [f"{k}: {a.get(k, '<none>')!r} -> {b.get(k, '<none>')!r}" for k in keys[:limit]]
  return out + ([f"... and {len(keys) - limit} more"] if len(keys) > limit else [])
