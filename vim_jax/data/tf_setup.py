"""Imports TensorFlow for the input pipeline only: no GPUs, no log spam, no network lookups."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# tfds would otherwise ask Google Cloud Storage for dataset metadata (no network here, slow).
os.environ.setdefault("NO_GCE_CHECK", "true")

import tensorflow as tf  # noqa: E402

# TensorFlow must not take GPU memory that JAX needs: the pipeline runs on the host.
tf.config.set_visible_devices([], "GPU")

import tensorflow_datasets as tfds  # noqa: E402

__all__ = ["tf", "tfds"]
