"""Fashion-MNIST classifier: the offline feature net for class accuracy and Fréchet distances.

  python -m tdjax.train --config configs/classifier.py --workdir /tmp/clf
  python -m tdjax.train --config configs/classifier.py:size=tiny,steps=20 --workdir /tmp/clf_tiny
  # a small ViT whose tower stands in for SigLIP2 as DetailFlow's alignment teacher
  python -m tdjax.train --config configs/classifier.py:arch=vit --workdir runs/teacher
  python -m tdjax.convert --kind teacher --input runs/teacher --output runs/teacher.npz

Options: arch=convnet|vit, size (the convnet's tiny|demo|wide, the ViT's tiny|demo), steps,
batch, image_size, lr, seed.
"""

from tdjax import configlib as common
from tdjax.data.pipeline import default_input_config

SIZES = {
    "tiny": dict(channels=(8, 16, 16), blocks=1, features=16),
    "demo": dict(channels=(32, 64, 128), blocks=1, features=128),
    "wide": dict(channels=(32, 64, 128), blocks=2, features=128),
}
VIT_SIZES = {   # ViTTeacher dims; patch 4 on 32x32 images: an 8x8 grid
    "tiny": dict(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=8, pos_grid=4),
    "demo": dict(width=96, depth=4, num_heads=4, mlp_dim=384, patch_size=4, pos_grid=8),
}


def get_config(arg=None):
  a = common.parse_arg(arg, arch="convnet", size="demo", steps=1500, batch=128, image_size=32,
                       lr=2e-3, seed=0)
  sizes = {"convnet": SIZES, "vit": VIT_SIZES}.get(a.arch)
  if sizes is None or a.size not in sizes:
    raise ValueError(f"config args arch={a.arch!r}, size={a.size!r}: expected arch convnet "
                     f"(size {'|'.join(SIZES)}) or vit (size {'|'.join(VIT_SIZES)})")
  c = common.base_config()
  c.task = "classifier"
  c.seed = a.seed
  c.total_steps = a.steps
  c.log_every = 50
  c.eval_every = 500
  c.ckpt_every = 500
  c.input = default_input_config()
  c.input.image_size = a.image_size
  c.input.batch_size = a.batch
  c.input.augment = "none"
  c.model = dict(sizes[a.size], arch=a.arch, num_classes=10)
  if a.arch == "vit" and a.image_size % c.model.patch_size:
    raise ValueError(f"config arg image_size={a.image_size}: not a multiple of the ViT's patch "
                     f"{c.model.patch_size}")
  c.optimizer.update(dict(name="adamw", lr=a.lr, weight_decay=1e-4, schedule="cosine",
                          warmup_steps=min(100, a.steps // 10), min_lr_ratio=0.01, grad_clip=1.0))
  return c
