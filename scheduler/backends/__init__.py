"""Executors: where admitted jobs really run (local processes here; Kubernetes and Ray later)."""
