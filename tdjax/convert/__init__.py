"""Official PyTorch checkpoints -> tdjax checkpoints (`python -m tdjax.convert`, see `__main__`).

One module per source maps its key names and layouts: `detailflow` (tokenizer and GPT),
`transdiff`, `mar` (the KL-16 VAE and MAR's MLP diffusion head), `lpips`, `inception`, `siglip2` (also the `teacher` kind) and
`dino`; `common` holds what they share (reading, checking, writing).  This module holds the
REGISTRY: each kind's converter and a one-line description.
JAX, torch, safetensors and the tdjax models are imported inside the functions that use them, so
that `python -m tdjax.convert --help` and a bad flag answer without loading them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from tdjax.convert.common import ConversionError, read_state_dict
from tdjax.convert.detailflow import (
    convert_detailflow_gpt, convert_detailflow_tokenizer, detailflow_gpt_params,
    detailflow_tokenizer_params, gpt_dims, tokenizer_dims)
from tdjax.convert.dino import convert_dino, dino_params
from tdjax.convert.inception import convert_inception, inception_variables
from tdjax.convert.lpips import convert_lpips, lpips_params
from tdjax.convert.mar import (
    convert_mar_head, convert_mar_vae, load_mar_head, mar_head_dims, mar_head_params,
    mar_vae_params)
from tdjax.convert.siglip2 import convert_siglip2, convert_teacher, siglip2_params
from tdjax.convert.transdiff import (
    convert_transdiff, transdiff_dims, transdiff_params)


class Kind(NamedTuple):
  convert: Callable[..., dict]   # convert(input, output, **options) -> a summary of what it wrote
  description: str


REGISTRY: dict[str, Kind] = {
    "detailflow_tokenizer": Kind(convert_detailflow_tokenizer, "DetailFlow tokenizer -> a workdir "
                                 "for tdjax.reconstruct / tdjax.data.codes"),
    "detailflow_gpt": Kind(convert_detailflow_gpt, "DetailFlow's LlamaGen-style GPT -> a "
                           "next_detail workdir"),
    "transdiff": Kind(convert_transdiff, "TransDiff -> a transdiff workdir (--vae: the KL-16 .npz "
                      "that decodes)"),
    "mar_vae": Kind(convert_mar_vae, "MAR's / TransDiff's KL-16 VAE -> the kl_vae .npz"),
    "mar_head": Kind(convert_mar_head, "MAR's MLP diffusion head (diffloss.net) -> the MLPHead "
                     ".npz"),
    "inception": Kind(convert_inception, "pytorch-fid's FID InceptionV3 -> the .npz of "
                      "tdjax.evaluate --inception"),
    "lpips": Kind(convert_lpips, "torchvision's VGG16 + the LPIPS heads -> the LPIPS .npz"),
    "siglip2": Kind(convert_siglip2, "HF Siglip2VisionModel -> the SigLIP2 .npz (alignment "
                    "teacher, encoder init)"),
    "teacher": Kind(convert_teacher, "a classifier.py:arch=vit workdir's teacher tower -> the "
                    "SigLIP2 layout"),
    "dino": Kind(convert_dino, "DINO ViT-S/16 -> the DINO discriminator's backbone .npz"),
}
KINDS = tuple(REGISTRY)

__all__ = [
    "ConversionError", "read_state_dict", "Kind", "REGISTRY", "KINDS",
    "convert_detailflow_gpt", "convert_detailflow_tokenizer", "detailflow_gpt_params",
    "detailflow_tokenizer_params", "gpt_dims", "tokenizer_dims", "convert_dino", "dino_params",
    "convert_inception", "inception_variables", "convert_lpips", "lpips_params",
    "convert_mar_head", "convert_mar_vae", "load_mar_head", "mar_head_dims", "mar_head_params",
    "mar_vae_params", "convert_siglip2", "convert_teacher", "siglip2_params",
    "convert_transdiff", "transdiff_dims", "transdiff_params",
]
