"""Input pipeline: tensorflow-datasets sources, host-side augmentation, on-device mixing.

Nothing here is imported by ``vim_jax`` itself: the models and kernels work without
TensorFlow. Import ``vim_jax.data.pipeline`` (TensorFlow) or ``vim_jax.data.mixing`` (JAX only).
"""

# The label of pixels that count nowhere (mmseg's ``ignore_index``): padding and "don't care"
# regions. Here, not in the training code, because the pipeline writes it into label maps.
IGNORE = 255
