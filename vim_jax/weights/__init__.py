"""Weights in and out: ``create_model`` (an architecture by name with weights loaded), the
official checkpoints on the Hugging Face Hub (``hub``), PyTorch ``.pth`` files read without
PyTorch (``pth``), the official parameter names (``names``), the file formats (``formats``:
state dicts, safetensors, Hugging Face-style directories), the checkpoint directory of a
training run (``checkpoints``) and atomic writes (``files``). May import ``vim_jax.models``;
never imported by it."""
