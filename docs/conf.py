"""Sphinx configuration: Markdown pages (MyST) and an API reference from the docstrings,
as JAX, Flax and Optax document themselves. Build: ``sphinx-build -W -b html docs docs/_build``."""

project = "vim-jax"
author = "the vim-jax developers"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = "vim-jax"
myst_heading_anchors = 3
# The docstrings describe arguments in prose after "Args:" (Google style).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Cross-references that cannot resolve (a type hint naming a third-party class) are not
# this project's to fix; every link between these pages must resolve.
nitpicky = False
