"""Input pipeline: record sources, robust decoding and preprocessing, deterministic batching."""

from tdjax.data.pipeline import Pipeline, default_input_config, make_pipeline
from tdjax.data.sources import FashionMNIST, ImageFolder, TfdsSource, make_source, read_idx

__all__ = ["Pipeline", "default_input_config", "make_pipeline", "FashionMNIST", "ImageFolder",
           "TfdsSource", "make_source", "read_idx"]
