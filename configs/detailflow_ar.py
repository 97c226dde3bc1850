"""The old name of configs/next_detail.py (DetailFlow's next-detail AR generator), kept for one
release so that commands written with it still run: the same options, the same config."""

from tdjax import configlib


def get_config(arg=None):
  return configlib.load_config("next_detail", arg or "")
