"""A tiny MLP classifier whose weights use the 'embed', 'mlp' and 'vocab'-like axes, so that data,
FSDP and tensor parallelism all shard something; plus knobs to inject non-finite losses."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from tdjax import configlib
from tdjax.tasks import TASKS
from tdjax.tasks.base import Task

_lp = nn.with_logical_partitioning


class MLP(nn.Module):
  width: int = 64
  hidden: int = 128
  classes: int = 16

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.width, kernel_init=_lp(nn.initializers.lecun_normal(), ("conv_in", "embed")),
                 bias_init=_lp(nn.initializers.zeros, ("embed",)))(x)
    x = nn.with_logical_constraint(x, ("batch", "embed"))
    for i in range(2):
      h = nn.Dense(self.hidden, kernel_init=_lp(nn.initializers.lecun_normal(), ("embed", "mlp")),
                   bias_init=_lp(nn.initializers.zeros, ("mlp",)))(x)
      h = nn.with_logical_constraint(nn.gelu(h), ("batch", "mlp"))
      x = x + nn.Dense(self.width, kernel_init=_lp(nn.initializers.lecun_normal(), ("mlp", "embed")),
                       bias_init=_lp(nn.initializers.zeros, ("embed",)))(h)
    return nn.Dense(self.classes, kernel_init=_lp(nn.initializers.lecun_normal(), ("embed", "vocab")),
                    bias_init=_lp(nn.initializers.zeros, ("vocab",)))(x)


class ToyTask(Task):
  kind = "toy"

  def __init__(self, config):
    super().__init__(config)
    self.model = MLP()

  def init(self, rng):
    c = self.config.input
    return self.model.init(rng, jnp.zeros((1, c.image_size, c.image_size, c.channels)))["params"], {}

  def loss(self, params, model_state, batch, rng, step, branch=None):
    logits = self.model.apply({"params": params}, batch["image"])
    # makes the loss depend on the step's RNG (so resume tests check the RNG stream too)
    noise = jax.random.normal(rng, ()) * self.config.get("noise_scale", 1e-3)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean() + noise
    nan_at = self.config.get("nan_at_step", -1)
    loss = jnp.where(step == nan_at - 1, jnp.nan, loss)  # step is 0-based inside; reports are 1-based
    return loss, ({"loss": loss}, model_state)


TASKS["toy"] = "toy_task:ToyTask"


def toy_config(**over) -> ml_collections.ConfigDict:
  c = configlib.base_config()
  c.task = "toy"
  c.total_steps = 6
  c.log_every = 1
  c.eval_every = 0
  c.ckpt_every = 3
  c.async_checkpoint = False
  c.nan_at_step = -1
  c.noise_scale = 1e-3
  c.input = ml_collections.ConfigDict(dict(
      source="fashion_mnist", split="train", eval_split="test", batch_size=16, image_size=8,
      channels=1, augment="none"))
  c.optimizer.update(dict(lr=1e-2, warmup_steps=2, schedule="cosine"))
  c.update(over)
  return c
