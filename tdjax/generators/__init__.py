"""AR generators: DetailFlow's next-detail transformer (`next_detail`)."""

from tdjax.generators.next_detail import (NextDetailTransformer, benchmark_cache_vs_recompute,
                                          check_tokenizer_pair, decode_codes, drop_labels,
                                          group_causal_mask, model_from_config,
                                          next_detail_inputs, next_detail_targets,
                                          num_forward_passes, sample, self_correction_mix,
                                          sequence_layout)

__all__ = [
    "NextDetailTransformer", "benchmark_cache_vs_recompute", "check_tokenizer_pair",
    "decode_codes", "drop_labels", "group_causal_mask", "model_from_config", "next_detail_inputs",
    "next_detail_targets", "num_forward_passes", "sample", "self_correction_mix",
    "sequence_layout",
]
