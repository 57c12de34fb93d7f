"""Input pipeline: tensorflow-datasets sources, host-side augmentation, on-device mixing.

Nothing here is imported by ``vim_jax`` itself: the models and kernels work without
TensorFlow. Import ``vim_jax.data.pipeline`` (TensorFlow) or ``vim_jax.data.mixing`` (JAX only).
"""
