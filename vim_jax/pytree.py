"""Naming pytree leaves independently of the container kinds that hold them."""


def path_name(path) -> str:
    """'layers.mixer.A_log.value' for a key path, whether its keys are dict keys, attributes
    or indices (an nnx.State and its orbax metadata then name a leaf the same way)."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
