"""Pallas GPU kernels (Triton backend). Importable without TensorFlow or ml_collections."""
