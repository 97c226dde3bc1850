"""Input: record sources, robust decoding and preprocessing, deterministic batching.

`make_pipeline(config.input, ...)` gives this process's iterator for the source the config names:
images (`pipeline`: 'fashion_mnist', 'folder', 'tfds'), a tokenizer's codes (`codes`: 'codes')
or TransDiff's latent cache (`latents`: 'latents').
"""

from tdjax.data import codes, latents, pipeline
from tdjax.data.pipeline import Pipeline, default_input_config, with_defaults
from tdjax.data.sources import FashionMNIST, ImageFolder, TfdsSource, make_source, read_idx

_FACTORIES = {"codes": codes.make_codes_pipeline, "latents": latents.make_latent_pipeline}


def make_pipeline(input_config, *, seed: int, process_index: int = 0, process_count: int = 1,
                  split: str = "train", train: bool = True):
  """This process's iterator over `split` of `input_config.source`: process `process_index` of
  `process_count` reads its block of every global batch (`tdjax.parallel.data_shard`)."""
  factory = _FACTORIES.get(input_config.get("source"), pipeline.make_image_pipeline)
  return factory(input_config, seed=seed, process_index=process_index,
                 process_count=process_count, split=split, train=train)


__all__ = ["Pipeline", "default_input_config", "with_defaults", "make_pipeline", "FashionMNIST",
           "ImageFolder", "TfdsSource", "make_source", "read_idx"]
