"""tdjax: autoregressive transformers marry diffusion, in JAX/Flax, for TPU pods and GPU clusters."""

__version__ = "0.1.0"
