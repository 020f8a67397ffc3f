"""siglip2-jax: SigLIP 2 in JAX/Flax."""
