"""Many devices and many processes: the data-parallel mesh, FSDP and global batches
(``sharding``) and joining a multi-process run (``distributed``; ``python -m
vim_jax.launch`` starts one on a single host). Imports nothing else of vim_jax."""
