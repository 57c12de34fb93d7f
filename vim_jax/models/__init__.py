"""The architectures: Vim (``vim``), plain ViG (``vig``), hierarchical ViG-H (``vig_h``), the
UperNet segmenters (``seg``), DeiT for comparisons (``deit``), and the registry of names
(``registry.build(name)``: fresh parameters; weights are ``vim_jax.weights``)."""
