"""Feature columns: per-type preprocessing state, Keras layers and served input specs."""
