"""Offline batch retrieval over exported models: in-process and Apache Beam."""
