"""Model factories by name, one per backend (torch here; flax in the jax backend)."""
