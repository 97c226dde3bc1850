"""Fashion-MNIST classifier: the offline feature net for class accuracy and Fréchet distances.

  python -m tdjax.train --config configs/classifier.py --workdir /tmp/clf
  python -m tdjax.train --config configs/classifier.py:size=tiny,steps=20 --workdir /tmp/clf_tiny
"""

from tdjax import configlib as common
from tdjax.data.pipeline import default_input_config

SIZES = {
    "tiny": dict(channels=(8, 16, 16), blocks=1, features=16),
    "demo": dict(channels=(32, 64, 128), blocks=1, features=128),
    "wide": dict(channels=(32, 64, 128), blocks=2, features=128),
}


def get_config(arg=None):
  a = common.parse_arg(arg, size="demo", steps=1500, batch=128, image_size=32, lr=2e-3)
  c = common.base_config()
  c.task = "classifier"
  c.total_steps = a.steps
  c.log_every = 50
  c.eval_every = 500
  c.ckpt_every = 500
  c.input = default_input_config()
  c.input.image_size = a.image_size
  c.input.batch_size = a.batch
  c.input.augment = "none"
  c.model = dict(SIZES[a.size], num_classes=10)
  c.optimizer.update(dict(name="adamw", lr=a.lr, weight_decay=1e-4, schedule="cosine",
                          warmup_steps=min(100, a.steps // 10), min_lr_ratio=0.01, grad_clip=1.0))
  return c
