"""MambaEye in JAX/Flax: image classification from causal glimpse sequences."""
