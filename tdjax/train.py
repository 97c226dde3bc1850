r"""Trains any tdjax model; resumes from the checkpoints in --workdir.

  python -m tdjax.train --config configs/detailflow_tokenizer.py:size=demo --workdir /tmp/tok \
      [--config.total_steps=2000 --config.input.batch_size=64]

On several processes (a pod, a SLURM job: launch/tpu_pod.sh, launch/slurm.sh) add
`--config.distributed=True`: every process joins the job first (`parallel.initialize_distributed`).
The config file's `get_config(arg)` receives the text after ':'.  The config is locked: an
override of a key that does not exist is an error naming the key.  All logic lives in
`tdjax.trainer.train_and_evaluate`.
"""


from absl import app, flags, logging
from ml_collections import config_flags

from tdjax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (path.py[:args]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax
  from tdjax import parallel, trainer
  # before any other JAX call: JAX cannot join a multi-process job once it has looked at devices
  parallel.initialize_distributed(FLAGS.config.get("distributed", False))
  logging.info("JAX %s: process %d/%d, devices %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main)
