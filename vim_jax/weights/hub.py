"""The official Vim and ViG checkpoints on the Hugging Face Hub, by model name.

``create_model(name, pretrained=True)`` downloads the official weights once into the
standard Hugging Face cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``) and
reads them from there afterwards; with ``HF_HUB_OFFLINE=1`` only the cache is used.
"""

from __future__ import annotations

# Variant name -> (repository, file, reported ImageNet top-1), as the official README
# (hustvl/Vim) lists them; the "+" models are the stride-8 fine-tunes.
WEIGHTS = {
    "vim_tiny_patch16_224": ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth", 76.1),
    "vim_tiny_patch16_stride8_224": ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_ft_78p3acc.pth", 78.3),
    "vim_small_patch16_224": ("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth", 80.5),
    "vim_small_patch16_stride8_224": ("hustvl/Vim-small-midclstok", "vim_s_midclstok_ft_81p6acc.pth", 81.6),
    "vim_base_patch16_224": ("hustvl/Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth", 81.9),
    # ViG (hustvl/ViG README): plain and hierarchical.
    "vig_tiny_patch16_224": ("hustvl/ViG", "vig_t_77p2acc.pth", 77.2),
    "vig_small_patch16_224": ("hustvl/ViG", "vig_s_81p7acc.pth", 81.7),
    "vig_base_patch16_224": ("hustvl/ViG", "vig_b_82p6acc.pth", 82.6),
    "vig_h_tiny_224": ("hustvl/ViG", "vig_h_t_82p8acc.pth", 82.8),
    "vig_h_small_224": ("hustvl/ViG", "vig_h_s_83p8acc.pth", 83.8),
    "vig_h_base_224": ("hustvl/ViG", "vig_h_b_84p2acc.pth", 84.2),
}


class WeightsUnavailableError(RuntimeError):
    """The official weights could not be fetched and are not in the local cache."""


def weights_path(name: str) -> str:
    """Local path of the official checkpoint of variant ``name`` (downloaded if needed)."""
    if name not in WEIGHTS:
        raise ValueError(f"{name} has no official pretrained weights; models that do: "
                         f"{', '.join(sorted(WEIGHTS))}")
    repo, filename, _ = WEIGHTS[name]
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=repo, filename=filename)
    except Exception as e:  # offline, unreachable, or not found: the same advice for each
        raise WeightsUnavailableError(
            f"could not fetch {filename} from the Hugging Face Hub repository {repo} and it is "
            f"not in the local cache ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"Download it yourself (https://huggingface.co/{repo}) and pass "
            f"pretrained='/path/to/{filename}'.") from e
