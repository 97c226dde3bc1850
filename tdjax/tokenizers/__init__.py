"""Image tokenizers: DetailFlow's 1D coarse-to-fine tokenizer, its bottlenecks and resizers."""

from tdjax.tokenizers.detailflow import (SIZES, DetailFlowTokenizer, build_tokenizer,
                                         encoder_mask, patchify, unpatchify)
from tdjax.tokenizers.quantizers import ContinuousBottleneck, VectorQuantizer, l2_normalize
from tdjax.tokenizers.resolution import (PrefixPlan, area_resize, bicubic_resize,
                                         decoder_resolution, degraded_target,
                                         resolution_for_prefix, sample_noise_index,
                                         sample_prefix_length)

__all__ = [
    "SIZES", "DetailFlowTokenizer", "build_tokenizer", "encoder_mask", "patchify", "unpatchify",
    "ContinuousBottleneck", "VectorQuantizer", "l2_normalize", "PrefixPlan", "area_resize",
    "bicubic_resize", "decoder_resolution", "degraded_target", "resolution_for_prefix",
    "sample_noise_index", "sample_prefix_length",
]
