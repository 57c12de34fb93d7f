"""Training and evaluation (``train.py``, ``eval.py``): the loop (``loop``), its setup
(``setup``), the jitted steps (``step``), progress and logs (``log``, ``progress``), the
optimiser (``optim``), evaluation (``evaluation``), a run's config (``config``), the
command-line checks (``cli``), and segmentation's losses, metrics and figures
(``segmentation``, ``seg_figure``). Imports TensorFlow only through ``vim_jax.data``."""
