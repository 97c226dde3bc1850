r"""Official checkpoints -> tdjax checkpoints that the sampling CLI loads.

  python -m tdjax.convert --kind detailflow_gpt --input DetailFlow-16-GPT-L/checkpoints/128.pt \
      --output runs/df16_gpt_l --tokens 128 [--tokenizer TOKENIZER_WORKDIR]

  python -m tdjax.convert --kind detailflow_tokenizer --input DetailFlow-16/checkpoints/128.pt \
      --output runs/df16_tok [--group 8]
  python -m tdjax.convert --kind mar_vae --input kl16.ckpt --output kl16.npz
  python -m tdjax.convert --kind mar_head --input mar_large/checkpoint-last.pth --output mar_l_head.npz
  python -m tdjax.convert --kind transdiff --input transdiff_l.pth --output runs/td_l --vae kl16.npz
  python -m tdjax.convert --kind inception --input pt_inception-2015-12-05-6726825d.pth \
      --output inception.npz
  python -m tdjax.convert --kind lpips --input vgg16-397923af.pth,lpips_vgg.pth --output lpips.npz
  python -m tdjax.convert --kind siglip2 --input siglip2-so400m-patch16-naflex/model.safetensors \
      --output siglip2.npz [--num_heads 16]
  python -m tdjax.convert --kind teacher --input runs/teacher --output runs/teacher.npz
  python -m tdjax.convert --kind dino --input dino_deitsmall16_pretrain.pth --output dino_s16.npz

Input: a PyTorch `.pt` (needs torch: `pip install tdjax[torch]`), a `.safetensors` file (needs `pip
install safetensors`) or an `.npz` of the state dict.  Every missing, unexpected or mis-shaped key
is reported by name with both shapes, and nothing is written unless the conversion is complete; an
existing checkpoint at --output is never replaced.
"""

from __future__ import annotations

import os

from absl import flags

from tdjax import cli
from tdjax.convert import KINDS, REGISTRY
from tdjax.convert.common import ConversionError, likely_kind, read_state_dict

FLAGS = flags.FLAGS

# `--help` prints this docstring; it ends with the kinds, one line each from REGISTRY
__doc__ = (__doc__ or "") + "\nKinds:\n" + "".join(
    f"  {kind:<21} {k.description}\n" for kind, k in REGISTRY.items())


def _define_flags():
  flags.DEFINE_enum("kind", None, list(KINDS), "What the input file holds.")
  flags.DEFINE_string("input", None, "Official checkpoint (.pt/.pth) or its state dict as .npz; "
                      "lpips: the VGG16 and LPIPS-heads files, comma-separated; teacher: "
                      "a configs/classifier.py:arch=vit workdir.")
  flags.DEFINE_string("output", None, "New tdjax workdir to write the checkpoint into.")
  flags.DEFINE_integer("tokens", 128, "detailflow_gpt: token count N (not stored in the weights).")
  flags.DEFINE_integer("num_heads", 0, "detailflow_gpt / transdiff: attention heads (0: from the "
                       "size tables); siglip2: 0 = 16 (so400m); dino: 0 = 6 (ViT-S).")
  flags.DEFINE_string("tokenizer", "", "detailflow_gpt: tokenizer workdir that decodes samples.")
  flags.DEFINE_string("vae", "", "transdiff: the KL-16 VAE .npz (--kind mar_vae) that decodes.")
  flags.DEFINE_integer("group", 8, "detailflow_tokenizer: group size g (not stored in the weights).")
  flags.DEFINE_string("tokenizer_heads", "", "detailflow_tokenizer: ENC,DEC attention heads "
                      "(default: widths / 72 and / 64, SigLIP2's head widths).")


# The keyword arguments that each kind's converter takes from the flags (a kind not named: none)
_OPTIONS = {
    "detailflow_tokenizer": lambda: dict(group=FLAGS.group, **_tokenizer_heads()),
    "detailflow_gpt": lambda: dict(tokens=FLAGS.tokens, num_heads=FLAGS.num_heads,
                                   tokenizer=FLAGS.tokenizer),
    "transdiff": lambda: dict(num_heads=FLAGS.num_heads, vae=FLAGS.vae),
    "siglip2": lambda: dict(num_heads=FLAGS.num_heads or 16),
    "dino": lambda: dict(num_heads=FLAGS.num_heads or 6),
}


def _tokenizer_heads() -> dict:
  """--tokenizer_heads ENC,DEC (empty: 0, 0, the converter's defaults)."""
  heads = [int(h) for h in FLAGS.tokenizer_heads.split(",")] if FLAGS.tokenizer_heads else [0, 0]
  return dict(enc_heads=heads[0], dec_heads=heads[1])


def main(argv):
  del argv
  options = _OPTIONS.get(FLAGS.kind, dict)()
  try:
    print(REGISTRY[FLAGS.kind].convert(FLAGS.input, FLAGS.output, **options))
  except ConversionError as err:            # a file of another kind: say which it looks like
    guess = _likely_kind_of(FLAGS.input)
    if guess and guess != FLAGS.kind:
      raise ConversionError(f"--input={FLAGS.input} looks like a {guess} checkpoint, not "
                            f"{FLAGS.kind} (use --kind {guess}): {err}") from err
    raise


def _likely_kind_of(path: str) -> str | None:
  if "," in path or not os.path.isfile(path):     # lpips' two files, a teacher workdir
    return None
  try:
    return likely_kind(read_state_dict(path))
  except Exception:  # noqa: BLE001 - unreadable: the converter's own error stands
    return None


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["kind", "input", "output"])
  cli.run(main)
