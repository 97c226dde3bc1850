"""A finished run, for inference: its config, its task and its weights.

  config, task, params = runs.load_run(workdir)    # EMA weights when the run has them (host arrays)
  config, task, state = runs.load_state(workdir)   # the whole train state, on a mesh

The model is rebuilt from the config stored in the checkpoint, so no config flags are needed.
Sampling, the tokenizer report, evaluation's judge and the converters read runs this way.  Tasks
that build on another run (the AR model's tokenizer, MRAR's 1-step start) read its weights with
`checkpoint.read_params` themselves: this module sits above the trainer and the tasks.
"""

from __future__ import annotations

import ml_collections

from tdjax import checkpoint as ckpt_lib
from tdjax import parallel, trainer
from tdjax.tasks import Task, get_task


def load_run(workdir: str, step: int | None = None,
             use_ema: bool = True) -> tuple[ml_collections.ConfigDict, Task, dict]:
  """(config, task, params) of checkpoint `step` (default: the latest) of `workdir`; params are
  host numpy arrays: the EMA weights when the run has them and `use_ema`."""
  config, params, _ = ckpt_lib.read_params(workdir, step, use_ema)
  config = ml_collections.ConfigDict(config)
  return config, get_task(config), params


def load_state(workdir: str, mesh=None, step: int | None = None):
  """(config, task, train state) of checkpoint `step` (default: the latest), restored onto `mesh`
  (default: every device on the data axis)."""
  with ckpt_lib.Checkpointer(workdir, read_only=True) as checkpointer:
    if checkpointer.latest_step() is None:
      raise ckpt_lib.CheckpointError(f"no checkpoint in {checkpointer.directory}")
    if step is not None and step not in checkpointer.steps():
      raise ckpt_lib.CheckpointError(f"no checkpoint of step {step} in {checkpointer.directory} "
                                     f"(steps: {checkpointer.steps()})")
    config = ml_collections.ConfigDict(checkpointer.restore_config(step))
    setup = trainer.Setup(config, mesh if mesh is not None else parallel.make_mesh({"data": -1}))
    _, state, _ = checkpointer.restore(setup.abstract_state(), step)
  return config, setup.task, state
