"""Task registry: `config.task` names one of these; modules are imported lazily."""

from __future__ import annotations

import importlib

from tdjax import configlib
from tdjax.tasks.base import GeneratorTask, Task

__all__ = ["GeneratorTask", "Task", "TASKS", "get_task"]

TASKS = {
    "classifier": "tdjax.tasks.classifier:ClassifierTask",
    "detailflow_tokenizer": "tdjax.tasks.detailflow_tokenizer:DetailFlowTokenizerTask",
    "next_detail": "tdjax.tasks.next_detail:NextDetailTask",
    "transdiff": "tdjax.tasks.transdiff:TransDiffTask",
    "next_detail_diffusion": "tdjax.tasks.next_detail_diffusion:NextDetailDiffusionTask",
}


def get_task(config) -> Task:
  name = configlib.RENAMED_TASKS.get(config.task, config.task)   # configs of earlier releases
  if name not in TASKS:
    raise ValueError(f"config.task={name!r} is unknown; known tasks: {', '.join(sorted(TASKS))}")
  module, cls = TASKS[name].split(":")
  return getattr(importlib.import_module(module), cls)(config)
