"""The training loop: sharded init, the jit-compiled step, checkpoints, metrics, resume.

`train_and_evaluate(config, workdir)` is the library function behind `python -m tdjax.train`.
The loop is model-agnostic: it drives a `tdjax.tasks.Task`.

Train state (a plain dict, saved as is):
  step         int32, number of optimizer steps taken (= batches consumed)
  params       fp32 master weights
  opt_state    optax state
  model_state  the task's non-trainable state
  ema          EMA of params (only when config.ema_decay > 0)

The step's randomness is `fold_in(key(seed), step)`, and the data order is a function of the
batch index, so a resumed run reproduces an uninterrupted one bit for bit.
"""

from __future__ import annotations

import functools

import json
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import PartitionSpec as P

from tdjax import checkpoint as ckpt_lib
from tdjax import configlib
from tdjax import data as data_lib
from tdjax import metrics as metrics_lib
from tdjax import optim
from tdjax import parallel
from tdjax.tasks import Task, get_task


class NonFiniteError(FloatingPointError):
  """A non-finite loss or gradient norm stopped the run (on_nonfinite='stop'): the entry points
  report it in one line and exit with this status."""
  exit_code = 3


# ------------------------------------------------------------------------------------------------
# State construction
# ------------------------------------------------------------------------------------------------

class Setup:
  """Everything built once per run: mesh, task, optimizer, shardings, compiled functions."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
    self.config = config
    self.mesh = mesh if mesh is not None else parallel.make_mesh(dict(config.mesh))
    self.rules = parallel.rules([tuple(r) for r in config.get("axis_rules", [])])
    self.task = get_task(config)
    self.base_key = jax.random.key(config.seed)
    self.init_key = init_key = jax.random.fold_in(self.base_key, 0x7FFFFFFF)

    with parallel.use_mesh(self.mesh, self.rules):
      boxed_params, boxed_mstate = jax.eval_shape(self.task.init, init_key)
    param_specs = parallel.logical_specs(boxed_params)
    mstate_specs = parallel.logical_specs(boxed_mstate)
    params_shape = nn.unbox(boxed_params)
    self.groups = self.task.param_groups(params_shape)
    self.tx = optim.make_optimizer(config, self.groups, param_specs)
    opt_shape = jax.eval_shape(self.tx.init, params_shape)
    # optimizer leaves shaped like a parameter take its spec; other groups' leaves are MaskedNodes
    opt_specs = optax.tree_map_params(
        self.tx, lambda x, spec: x if isinstance(x, optax.MaskedNode) else spec, opt_shape,
        param_specs, transform_non_params=lambda _: P(),
        is_leaf=lambda x: isinstance(x, (P, optax.MaskedNode)))
    specs = dict(step=P(), params=param_specs, opt_state=opt_specs, model_state=mstate_specs)
    if config.get("ema_decay", 0.0):
      specs["ema"] = param_specs
    self.state_specs = specs
    self.state_shape = jax.eval_shape(self._init_state, init_key)
    self.state_shardings = parallel.fit_to_shapes(
        parallel.shardings_for(specs, self.mesh, self.rules), self.state_shape)

  # pure: builds the initial state from the key
  def _init_state(self, key):
    params, mstate = self.task.init(key)
    params, mstate = nn.unbox(params), nn.unbox(mstate)
    state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                 model_state=mstate)
    if self.config.get("ema_decay", 0.0):
      state["ema"] = jax.tree.map(jnp.copy, params)
    return state

  def init_state(self):
    with parallel.use_mesh(self.mesh, self.rules):
      state = jax.jit(self._init_state, out_shardings=self.state_shardings)(self.init_key)
    # pretrained parts (e.g. a SigLIP2 encoder) are read on the host after init, never baked into
    # the compiled init as constants; only a fresh start does this, a restore keeps its weights
    params = self.task.load_pretrained(state["params"])
    if params is not state["params"]:
      state["params"] = jax.device_put(params, self.state_shardings["params"])
      if "ema" in state:
        state["ema"] = jax.device_put(params, self.state_shardings["ema"])
    mstate = self.task.load_frozen(state["model_state"])   # frozen networks' files, the same way
    if mstate is not state["model_state"]:
      state["model_state"] = jax.device_put(mstate, self.state_shardings["model_state"])
    return state

  def abstract_state(self):
    return ckpt_lib.abstract_like(self.state_shape, self.state_shardings)

  # --------------------------------------------------------------------------------------------
  # The train step
  # --------------------------------------------------------------------------------------------
  def train_step(self, state, batch):
    c = self.config
    step = state["step"]
    rng = jax.random.fold_in(self.base_key, step)
    compute_dtype = jnp.dtype(c.get("compute_dtype", "float32"))
    accum = int(c.get("grad_accum", 1))

    def loss_fn(params, mstate, micro, key, branch=None):
      p = optim.cast_floating(params, compute_dtype)
      micro = optim.cast_floating(micro, compute_dtype)
      loss, (metrics, new_mstate) = self.task.loss(p, mstate, micro, key, step, branch=branch)
      return loss.astype(jnp.float32), (metrics, new_mstate)

    def grad_fn(params, mstate, micro, key):
      sel = self.task.loss_branch(key, step)
      if sel is None:
        return jax.value_and_grad(loss_fn, has_aux=True)(params, mstate, micro, key)
      # one complete forward + backward per branch: a switch inside the loss would carry every
      # branch's residuals through the backward pass (zero-filled), costing ~2x on CPU
      index, n = sel
      fns = [jax.value_and_grad(functools.partial(loss_fn, branch=i), has_aux=True)
             for i in range(n)]
      return jax.lax.switch(index, fns, params, mstate, micro, key)
    if accum == 1:
      (loss, (metrics, mstate)), grads = grad_fn(state["params"], state["model_state"], batch, rng)
    else:
      micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

      def body(carry, xs):
        g_acc, l_acc, mstate = carry
        i, mb = xs
        (l, (m, mstate)), g = grad_fn(state["params"], mstate, mb, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, mstate), m

      zeros = jax.tree.map(jnp.zeros_like, state["params"])
      (grads, loss, mstate), ms = jax.lax.scan(
          body, (zeros, jnp.zeros((), jnp.float32), state["model_state"]),
          (jnp.arange(accum), micro))
      if c.get("grad_accum_reduce", "mean") == "mean":
        grads = jax.tree.map(lambda g: g / accum, grads)
      loss = loss / accum            # the mean loss is logged either way
      metrics = jax.tree.map(lambda m: m.mean(0), ms)

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = dict(step=step + 1, params=params, opt_state=opt_state, model_state=mstate)
    if "ema" in state:
      decay = optim.ema_decay_at(step, c.ema_decay, c.get("ema_warmup", False))
      new["ema"] = optim.ema_update(state["ema"], params, decay)
    # A non-finite step never reaches the state: keep the old values (skip) and report it.
    keep_old = lambda n, o: jnp.where(finite, n, o)
    for k in ("params", "opt_state", "model_state", "ema"):
      if k in new:
        new[k] = jax.tree.map(keep_old, new[k], state[k])
    metrics = dict(metrics)
    metrics.update(loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32),
                   loss_finite=jnp.isfinite(loss).astype(jnp.float32))
    return new, metrics

  def compile_step(self, batch_example):
    """jit with explicit in/out shardings and donation of the old state (the pjit model)."""
    data_sh = jax.tree.map(lambda x: parallel.batch_sharding(self.mesh, x.ndim), batch_example)
    return jax.jit(self.train_step,
                   in_shardings=(self.state_shardings, data_sh),
                   out_shardings=(self.state_shardings, parallel.replicated(self.mesh)),
                   donate_argnums=(0,))

  def compile_eval(self, batch_example):
    data_sh = jax.tree.map(lambda x: parallel.batch_sharding(self.mesh, x.ndim), batch_example)

    def eval_fn(state, batch, key):
      params = state.get("ema", state["params"])
      return self.task.eval_metrics(params, state["model_state"], batch, key)

    return jax.jit(eval_fn, in_shardings=(self.state_shardings, data_sh, None),
                   out_shardings=parallel.replicated(self.mesh))


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

class _Preemption:
  """SIGTERM stops the loop at a step boundary after a checkpoint, and the process exits 0.

  One process: a Python SIGTERM handler sets a flag.  Several processes (jax.distributed): the
  signal reaches the hosts at different times, and a host that stopped alone would wait forever
  in the save's barrier; JAX's preemption service (which owns SIGTERM there) makes every process
  stop at the same step (`parallel.preemption_sync_point`)."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self.shared = jax.distributed.is_initialized()

  def __enter__(self):
    if self.shared:        # a Python handler would replace the preemption service's
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. called from a test runner thread)
      self._previous = None
    return self

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: will checkpoint and stop at the next step boundary")
    self.requested = True

  def reached(self, step: int) -> bool:
    """Stop after `step`? The same answer on every process."""
    if self.shared and parallel.preemption_sync_point(step):
      logging.warning("preemption: every process stops after step %d", step)
      self.requested = True
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _SaveClock:
  """`ckpt_every_secs`: a save when that many seconds passed since the last one, decided at log
  points on process 0's clock and broadcast (hosts' clocks differ; all must save together)."""

  def __init__(self, every_secs: float):
    self.every, self.last = float(every_secs or 0), time.time()

  def due(self) -> bool:
    if self.every <= 0:
      return False
    return bool(parallel.from_first_process(time.time() - self.last >= self.every))

  def saved(self) -> None:
    self.last = time.time()


def _make_input(config, mesh, split, train, seed_offset=0):
  """This process's input: block `parallel.data_shard(mesh)` of every global batch.  Evaluation
  reads a few batches: threads only (starting worker processes would cost more than it saves)."""
  index, count = parallel.data_shard(mesh)
  cfg = config.input
  if not train and cfg.get("worker_processes", 0):
    cfg = ml_collections.ConfigDict({**cfg.to_dict(), "worker_processes": 0})
  return data_lib.make_pipeline(cfg, seed=config.seed + seed_offset, process_index=index,
                                process_count=count, split=split, train=train)


def _host_metrics(metrics_list):
  """Mean over the steps since the last log of each metric (one device->host transfer)."""
  stacked = jax.device_get(metrics_list)
  keys = stacked[0].keys()
  return {k: float(np.mean([m[k] for m in stacked])) for k in keys}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh: jax.sharding.Mesh | None = None) -> dict:
  """Trains `config.task` in `workdir`, resuming from its checkpoints; returns final metrics."""
  t_start = time.time()
  configlib.check_run_config(config)
  parallel.initialize_distributed(config.get("distributed", False))
  parallel.enable_compilation_cache(config.get("compilation_cache", ""))
  workdir = ckpt_lib.resolve_workdir(workdir)
  if not ckpt_lib.is_remote(workdir):
    os.makedirs(workdir, exist_ok=True)
  config_dict = json.loads(config.to_json_best_effort())
  lock = ckpt_lib.WorkdirLock(workdir, config.get("lock_stale_secs", 900))
  _lock_on_first_process(lock)
  try:
    return _train(config, config_dict, workdir, mesh, lock, t_start)
  finally:
    lock.release()


def _lock_on_first_process(lock) -> None:
  """Process 0 takes the workdir lock; every process learns whether it got it."""
  error = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except FileExistsError as e:
      error = e
  if not parallel.from_first_process(error is None):
    raise error or FileExistsError("the workdir is in use by another training (process 0 says "
                                   "which)")


def _train(config, config_dict: dict, workdir: str, mesh, lock, t_start: float) -> dict:
  setup = Setup(config, mesh)
  mesh = setup.mesh
  sizes = parallel.batch_sizes(config.input.batch_size, mesh)
  logging.info("mesh %s over %d devices (%d processes); batch sizes %s",
               dict(mesh.shape), mesh.size, jax.process_count(), sizes)
  if config.get("grad_accum", 1) > 1 and sizes["per_device"] % config.grad_accum:
    raise ValueError(f"grad_accum={config.grad_accum} does not divide the per-device batch "
                     f"{sizes['per_device']}")

  writer = metrics_lib.MetricWriter(workdir)
  try:  # on errors too: pending async saves finish and Orbax's threads stop, nothing leaks
    with ckpt_lib.Checkpointer(workdir, keep=config.get("keep_checkpoints", 3),
                               use_async=config.get("async_checkpoint", True)) as checkpointer:
      last_metrics = _train_loop(setup, config_dict, writer, checkpointer, lock)
  finally:
    writer.close()
  last_metrics["wall_seconds"] = time.time() - t_start
  return last_metrics


def _restore_for_training(checkpointer, setup: Setup, config_dict: dict):
  """The checkpointer's restore; when no checkpoint fits this config, the error leads with how
  the config differs from the one the checkpoints were written with (a changed model is the
  usual cause; Orbax's own message, a tree or shape mismatch, follows)."""
  try:
    return checkpointer.restore(setup.abstract_state())
  except ckpt_lib.CheckpointError as err:
    try:   # a change of schedule (total_steps, ...) is not why checkpoints do not fit
      diff = configlib.config_diff(checkpointer.restore_config(), config_dict,
                                   ignore=configlib.SCHEDULE_KEYS)
    except Exception:  # noqa: BLE001 - the config unreadable too: the original error stands
      diff = []
    if not diff:
      raise
    raise ckpt_lib.CheckpointError(
        f"{checkpointer.directory}: the checkpoints do not fit this config, which differs from "
        f"theirs in {'; '.join(diff)}. Use another --workdir, or the checkpoints' config "
        f"(config.json beside them). Restore errors: {err}") from err


def _train_loop(setup: Setup, config_dict: dict, writer, checkpointer, lock) -> dict:
  """Restores or initialises the state, then runs the steps, evaluations and saves."""
  config, mesh = setup.config, setup.mesh
  data = _make_input(config, mesh, config.input.get("split", "train"), train=True)
  try:
    return _run_steps(setup, config_dict, writer, checkpointer, data, lock)
  finally:
    data.close()                   # stops the input's worker processes


def _run_steps(setup: Setup, config_dict: dict, writer, checkpointer, data, lock) -> dict:
  config, mesh = setup.config, setup.mesh
  restored = _restore_for_training(checkpointer, setup, config_dict)
  if restored is None:
    state = setup.init_state()
    logging.info("initialised from scratch (seed %d)", config.seed)
  else:
    step, state, data_state = restored
    if step > int(config.total_steps):    # refused before config.json is rewritten
      raise ValueError(f"config.total_steps={config.total_steps} is below the step of the "
                       f"checkpoint to resume, {step} ({checkpointer.directory}): nothing to "
                       f"train; give total_steps >= {step}, or another --workdir")
    data.set_state(data_state)
    logging.info("resumed from step %d of %s", step, checkpointer.directory)
  if jax.process_index() == 0:   # after the restore: a run that cannot resume leaves it as it was
    ckpt_lib.write_config_json(checkpointer.workdir, config_dict)
  start_step = int(jax.device_get(state["step"]))
  if jax.process_index() == 0:
    logging.info("parameters:\n%s", metrics_lib.parameter_table(state["params"]))
  writer.write_scalars(start_step, {"num_params": metrics_lib.count_params(state["params"])})

  first = parallel.host_to_global(next(data), mesh)
  with parallel.use_mesh(mesh, setup.rules):
    t0 = time.time()
    step_fn = setup.compile_step(first).lower(state, first).compile()
    compile_s = time.time() - t0
  logging.info("train step compiled in %.1f s", compile_s)
  writer.write_scalars(start_step, {"compile_seconds": compile_s})

  total = int(config.total_steps)
  progress = metrics_lib.Progress(total, config.input.batch_size, start_step)
  mfu = _MFU(setup, first, config.get("peak_flops", 0.0))
  profile = _Profile(config.get("profile_steps", ""), writer.workdir)
  pending, last_metrics, batch = [], {}, first
  eval_fn, eval_data = None, None
  stopped_by_signal = False
  clock = _SaveClock(config.get("ckpt_every_secs", 0))
  unchecked = None     # (step, metrics) of the last step whose finite flag is not read yet
  with _Preemption() as preempt:
    for step in range(start_step, total):
      done = step + 1
      profile.before(done)
      with progress.data(), jax.profiler.TraceAnnotation("tdjax.input"):
        if batch is None:
          batch = parallel.host_to_global(next(data), mesh)
      with jax.profiler.StepTraceAnnotation("tdjax.train", step_num=done):
        state, m = step_fn(state, batch)
      batch = None
      pending.append(m)
      # One step behind: reading step k-1's flag waits for k-1 only, while the device already
      # has step k queued, so the next batch's host work overlaps it.  The update of a
      # non-finite step is masked on the device; no checkpoint is written before its flag is read.
      if unchecked is not None:
        _check_finite(*unchecked, config)
      unchecked = (done, m)
      logged = done % config.log_every == 0 or done == total
      if logged:
        lock.refresh()
        _check_finite(*unchecked, config)
        unchecked = None
        last_metrics = _host_metrics(pending)
        pending = []
        rates = progress.report(done)
        rates.update(mfu.of(rates["steps_per_sec"]))
        writer.write_scalars(done, {**{f"train/{k}": v for k, v in last_metrics.items()},
                                    **rates, "lr": float(_lr(config, done))})
        logging.info("step %d/%d loss %.5g | %.2f steps/s, %.1f ex/s (%.3f s/step: data wait %.3f "
                     "s, device %.3f s)%s, ETA %s", done, total,
                     last_metrics.get("loss", float("nan")), rates["steps_per_sec"],
                     rates["examples_per_sec"], rates["step_sec"], rates["data_wait_sec"],
                     rates["device_sec"], f", MFU {100 * rates['mfu']:.1f} %" if "mfu" in rates
                     else "", metrics_lib.format_eta(rates["eta_sec"]))
      profile.after(done, state)
      with progress.pause():
        if config.get("eval_every", 0) and (done % config.eval_every == 0 or done == total):
          eval_fn, eval_data, ev = _evaluate(setup, state, eval_fn, eval_data, done)
          if ev:
            writer.write_scalars(done, {f"eval/{k}": v for k, v in ev.items()})
            logging.info("eval at step %d: %s", done, ", ".join(f"{k} {v:.5g}" for k, v in ev.items()))
            last_metrics.update({f"eval_{k}": v for k, v in ev.items()})
        if config.get("image_every", 0) and done % config.image_every == 0:
          _write_images(setup, state, writer, done)
        stop = preempt.reached(done)
        if (done % config.ckpt_every == 0 or done == total or stop
            or (logged and clock.due())):
          if unchecked is not None:          # never save a state before its step was checked
            _check_finite(*unchecked, config)
            unchecked = None
          checkpointer.save(done, state, config_dict, data.get_state())
          clock.saved()
          writer.flush()     # a remote workdir's metrics and pictures are copied there now
        if stop:
          stopped_by_signal = True
          logging.warning("stopping at step %d after SIGTERM (checkpoint saved)", done)
          break
  if unchecked is not None:
    _check_finite(*unchecked, config)
  profile.close()
  checkpointer.wait()
  if not stopped_by_signal and jax.process_index() == 0:
    stats = data.stats()
    if stats:
      logging.info("input: %s", stats)
  if not stopped_by_signal:
    _write_images(setup, state, writer, int(jax.device_get(state["step"])))
  last_metrics["stopped_by_signal"] = stopped_by_signal
  return last_metrics


def _check_finite(step: int, m: dict, config) -> None:
  """Raises NonFiniteError (on_nonfinite='stop') or warns ('skip') when step `step`'s loss or
  gradient norm was not finite; its update was not applied (masked in the step)."""
  if bool(m["finite"]):
    return
  bad = [k for k in ("loss", "grad_norm") if not np.isfinite(float(m[k]))]
  msg = f"non-finite {', '.join(bad) or 'value'} at step {step}: " + ", ".join(
      f"{k}={float(m[k])}" for k in ("loss", "grad_norm"))
  if config.get("on_nonfinite", "stop") == "stop":
    raise NonFiniteError(msg + " (state not updated; no checkpoint written for this step; "
                         "set on_nonfinite='skip' to skip such updates)")
  logging.warning("%s: update skipped", msg)


class _MFU:
  """Model FLOP utilisation for the log: the task's analytic train-step FLOPs x steps/s over the
  mesh's peak (`metrics.peak_flops` of the device kind, or config.peak_flops).  Without either,
  says once why there is none."""

  def __init__(self, setup: Setup, batch, peak_per_device: float):
    flops = setup.task.analytic_flops(batch)
    self.flops = None if flops is None else float(flops)
    kind = setup.mesh.devices.flat[0].device_kind
    peak = float(peak_per_device or 0) or metrics_lib.peak_flops(kind)
    self.peak = peak * setup.mesh.size if peak else None
    if self.flops is None:
      logging.info("MFU: not logged (task %r has no analytic FLOP count)", setup.task.kind)
    elif self.peak is None:
      logging.info("MFU: not logged (no peak FLOP/s known for device kind %r; set "
                   "--config.peak_flops=FLOPS_PER_DEVICE)", kind)
    else:
      logging.info("MFU: %.4g FLOPs per step against %.4g FLOP/s peak (%d x %s)", self.flops,
                   self.peak, setup.mesh.size, kind)

  def of(self, steps_per_sec: float) -> dict:
    if self.flops is None or self.peak is None:
      return {}
    return {"mfu": self.flops * steps_per_sec / self.peak}


class _Profile:
  """config.profile_steps 'A,B': a jax.profiler trace (TensorBoard's profile plugin, Perfetto)
  of steps A..B in `<dir>/profile`, started before step A's batch and stopped after step B ran."""

  def __init__(self, steps: str, directory: str):
    self.first = self.last = None
    self.active = False
    if steps:
      try:
        self.first, self.last = (int(x) for x in str(steps).split(","))
      except ValueError:
        raise ValueError(f"config.profile_steps={steps!r}: expected 'A,B', two step numbers") from None
      if not 0 < self.first <= self.last:
        raise ValueError(f"config.profile_steps={steps!r}: expected 0 < A <= B")
    self.dir = os.path.join(directory, "profile")

  def before(self, step: int) -> None:
    if step == self.first:
      options = jax.profiler.ProfileOptions()
      options.python_tracer_level = 0     # Python function events would flood the trace
      jax.profiler.start_trace(self.dir, create_perfetto_trace=True, profiler_options=options)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step == self.last:
      jax.block_until_ready(state)
      self.close()
      logging.info("profile of steps %d-%d written to %s", self.first, self.last, self.dir)

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def _lr(config, step):
  return optim.learning_rate_schedule(config.optimizer, config.total_steps)(step)


def _evaluate(setup: Setup, state, eval_fn, eval_data, step):
  c = setup.config
  if type(setup.task).eval_metrics is Task.eval_metrics:
    return eval_fn, eval_data, {}
  split = c.input.get("eval_split", "test")
  data = _make_input(c, setup.mesh, split, train=False, seed_offset=1)  # same at every evaluation
  results = []
  with parallel.use_mesh(setup.mesh, setup.rules):
    for i in range(int(c.get("eval_batches", 4))):
      batch = parallel.host_to_global(next(data), setup.mesh)
      if eval_fn is None:
        eval_fn = setup.compile_eval(batch)
      results.append(eval_fn(state, batch, jax.random.fold_in(setup.base_key, 10_000 + i)))
  return eval_fn, None, _host_metrics(results)


def _write_images(setup: Setup, state, writer, step):
  c = setup.config
  data = _make_input(c, setup.mesh, c.input.get("eval_split", "test"), train=False, seed_offset=1)
  batch = parallel.host_to_global(next(data), setup.mesh)
  params = state.get("ema", state["params"])
  with parallel.use_mesh(setup.mesh, setup.rules):
    images = jax.jit(setup.task.images, out_shardings=parallel.replicated(setup.mesh))(
        params, state["model_state"], batch, jax.random.fold_in(setup.base_key, 20_000))
  images = jax.device_get(images)
  if images:
    paths = writer.write_images(step, images)
    logging.info("pictures: %s", paths)
