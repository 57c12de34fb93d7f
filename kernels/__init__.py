"""Pallas kernels, installed as ``vim_jax.kernels`` (Triton for CUDA GPUs, Mosaic for TPUs;
interpret mode on the CPU). Importable without TensorFlow or ml_collections."""
