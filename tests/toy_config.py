"""Config file for the toy task, so tests can drive the real `python -m tdjax.train` entry point."""

from tdjax import configlib
from toy_task import toy_config


def get_config(arg=None):
  a = configlib.parse_arg(arg, steps=6, ckpt=3, augment="flip")
  c = toy_config(total_steps=a.steps, ckpt_every=a.ckpt, async_checkpoint=True)
  c.input.augment = a.augment
  return c
