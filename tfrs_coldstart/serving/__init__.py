"""Serving: SavedModel export and publish, top-k indexes, add-items, clients and the local
TF-Serving-compatible server. Nothing here imports training code."""
