"""Shared layers for the tokenizers, AR transformers and diffusion heads."""

from tdjax.nn.attention import (Attention, HeadProjection, block_causal_mask,
                                blocked_attention, dot_product_attention, fused_attention, group_causal_mask,
                                key_padding_mask)
from tdjax.nn.layers import (ACTIVATIONS, REMAT_POLICIES, LayerNorm, Mlp, PosEmbed1D, PosEmbed2D,
                             RMSNorm, SwiGLU, TransformerBlock, TransformerStack, find_multiple,
                             llama_block_kwargs, llama_ffn_hidden, modulate, resize_pos_grid, stack_layers,
                             unstack_layers, vit_block_kwargs)
from tdjax.nn.rope import apply_rope, rope_1d, rope_2d, rope_2d_grid

__all__ = [
    "Attention", "HeadProjection", "blocked_attention", "fused_attention", "block_causal_mask", "dot_product_attention", "group_causal_mask",
    "key_padding_mask", "ACTIVATIONS", "REMAT_POLICIES", "LayerNorm", "Mlp", "PosEmbed1D",
    "PosEmbed2D", "RMSNorm", "SwiGLU", "TransformerBlock", "TransformerStack", "find_multiple",
    "llama_block_kwargs", "llama_ffn_hidden", "modulate", "resize_pos_grid", "stack_layers", "unstack_layers",
    "vit_block_kwargs", "apply_rope", "rope_1d", "rope_2d", "rope_2d_grid",
]
