"""The architectures by name: the named variants of both families (mirroring the official
registries), Vim, plain ViG and hierarchical ViG-H classifiers and the segmenters, and
``build``, which makes one with fresh parameters. Nothing here reads weights: loading is
``vim_jax.weights``, and ``vim_jax.create_model`` composes the two."""

from __future__ import annotations

import difflib
import inspect

import jax
import jax.numpy as jnp
from flax import nnx

from vim_jax.models.seg import ViGHUperNet, VimUperNet
from vim_jax.models.vig import ViG
from vim_jax.models.vig_h import HierViG
from vim_jax.models.vim import VisionMamba

_WIDTHS = {"tiny": 192, "small": 384, "base": 768}

VARIANTS: dict[str, dict] = {}
for _size, _dim in _WIDTHS.items():
    for _stride in (16, 8):
        if _size == "base" and _stride == 8:
            continue  # no official base "+" model
        for _img in (224, 384):
            _name = f"vim_{_size}_patch16{'_stride8' if _stride == 8 else ''}_{_img}"
            VARIANTS[_name] = dict(img_size=_img, patch_size=16, stride=_stride, embed_dim=_dim,
                                   depth=24, d_state=16, expand=2, cls_position="middle")

# ViG (hustvl/ViG configs/vig/*.yaml): the SiLU switches are ViG-T's alone and live in the
# config, not in the weights.
for _size, (_dim, _heads, _act) in {"tiny": (192, 3, True), "small": (384, 6, False),
                                    "base": (768, 12, False)}.items():
    VARIANTS[f"vig_{_size}_patch16_224"] = dict(img_size=224, embed_dim=_dim, depth=12, num_heads=_heads,
                                                act_in_conv=_act, out_act=_act)
# ViG-H (configs/vig-h/*.yaml).
for _size, (_dims, _depths, _heads) in {"tiny": (96, (2, 2, 5, 2), (3, 6, 12, 24)),
                                        "small": (96, (2, 2, 17, 2), (3, 6, 12, 24)),
                                        "base": (128, (2, 2, 17, 2), (4, 8, 16, 32))}.items():
    VARIANTS[f"vig_h_{_size}_224"] = dict(img_size=224, dims=_dims, depths=_depths, num_heads=_heads)

CLASSES = {"vim": VisionMamba, "vig": ViG, "vig_h": HierViG}
SEG_CLASSES = {"vim": VimUperNet, "vig_h": ViGHUperNet}  # by backbone family


def family_of(name: str) -> str:
    """"vim", "vig" or "vig_h": the architecture (and state-dict layout) of variant ``name``."""
    return "vig_h" if name.startswith("vig_h_") else "vig" if name.startswith("vig_") else "vim"


def model_class(name: str):
    """The model class of variant or segmenter ``name`` (short or official long name)."""
    if name in SEG_VARIANTS:
        return SEG_CLASSES[segmenter_family(name)]
    return CLASSES[family_of(resolve_name(name))]

# The official builder names (models_mamba.py), accepted as aliases.
_SUFFIX = "bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
ALIASES = {
    f"vim_tiny_patch16_224_{_SUFFIX}": "vim_tiny_patch16_224",
    f"vim_tiny_patch16_stride8_224_{_SUFFIX}": "vim_tiny_patch16_stride8_224",
    f"vim_small_patch16_224_{_SUFFIX}": "vim_small_patch16_224",
    f"vim_small_patch16_stride8_224_{_SUFFIX}": "vim_small_patch16_stride8_224",
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2":
        "vim_base_patch16_224",
}

def model_args(cls) -> list[str]:
    """The constructor arguments of a model class (what ``build`` and ``create_model`` take)."""
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "rngs")]

# Segmenters, FCN auxiliary head 256 channels, 512 crops. Vim (official seg/configs/vim/
# upernet): UperNet channels = the backbone width. (The official small segmenter adds rotary
# position embeddings to its backbone, which this port does not have: not registered.)
# ViG has no official segmenter: mmseg's UperNet for hierarchical backbones of its size
# (Swin-T), 512 channels.
SEG_VARIANTS: dict[str, dict] = {
    "upernet_vim_tiny": dict(backbone="vim_tiny_patch16_224", channels=192),
    "upernet_vig_h_tiny": dict(backbone="vig_h_tiny_224", channels=512),
}
# The segmenter arguments that describe its backbone, per backbone family: taken from the
# backbone's variant, or from the classification checkpoint loaded into it.
SEG_BACKBONE_ARGS = {"vim": ("patch_size", "stride", "embed_dim", "depth"),
                      "vig_h": ("dims", "depths", "num_heads")}


def known_names() -> list[str]:
    """Every registered name: the classifiers' short names, then the segmenters'."""
    return sorted(VARIANTS) + sorted(SEG_VARIANTS)


def resolve_name(name: str) -> str:
    """Short variant name for a short or official long name; ValueError names the choices."""
    name = ALIASES.get(name, name)
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(known_names())} "
                         f"(and the official long names {', '.join(sorted(ALIASES))})")
    return name


def segmenter_family(name: str) -> str:
    """The backbone family ("vim" or "vig_h") of segmenter ``name``."""
    return family_of(SEG_VARIANTS[name]["backbone"])


def segmenter_defaults(name: str) -> dict:
    """Segmenter ``name``'s arguments before overrides: ADE20K's 150 classes, 512 crops, its
    head width, and its backbone variant's shape."""
    family = segmenter_family(name)
    backbone = VARIANTS[SEG_VARIANTS[name]["backbone"]]
    return dict(num_classes=150, img_size=512, channels=SEG_VARIANTS[name]["channels"],
                **{k: backbone[k] for k in SEG_BACKBONE_ARGS[family]})


def build(name: str, *, seed: int = 0, **kwargs):
    """A model of variant or segmenter ``name`` with fresh parameters drawn from ``seed``,
    in eval mode; ``kwargs`` (the class's arguments) win over the variant's. ``model.config``
    records the name and every argument (what a checkpoint directory's model.json holds).
    TypeError names an unknown argument and the allowed ones."""
    segmenter = name in SEG_VARIANTS
    name = name if segmenter else resolve_name(name)
    cls, defaults = model_class(name), (segmenter_defaults(name) if segmenter else VARIANTS[name])
    allowed = model_args(cls)
    bad = sorted(set(kwargs) - set(allowed))
    if bad:
        near = {b: difflib.get_close_matches(b, allowed, n=1) for b in bad}
        hint = "".join(f" (did you mean {m[0]!r} for {b!r}?)" for b, m in near.items() if m)
        raise TypeError(f"unknown argument(s) {bad} for {name}{hint}; allowed: {allowed}")
    kwargs = {**defaults, **kwargs}
    kwargs["dtype"] = jnp.dtype(kwargs.get("dtype") or "float32")
    model = _init(cls, kwargs, seed)
    model.config = {"name": name, **{k: (v.name if k == "dtype" else v) for k, v in kwargs.items()}}
    return model


def _init(cls, kwargs: dict, seed: int):
    """``cls(**kwargs)`` with parameters drawn from ``seed``, initialised as one compiled
    program (hundreds of eager ops are ~2x slower). XLA's backend optimisations are off for
    it: the program runs once, and they made compiling it 5x longer (a four-stage ViG-H on a
    2-core CPU: 13 s against 2.6 s; running it: 10 ms against 26 ms)."""
    graphdef = []  # the module's structure, kept while the initialiser is traced

    def init():
        g, state = nnx.split(cls(**kwargs, rngs=nnx.Rngs(seed)))
        graphdef.append(g)
        return state

    # Compiler options are for top-level jits only; under a trace (nnx.eval_shape of
    # create_model), where a constant is a tracer, nothing is compiled anyway.
    traced = isinstance(jnp.zeros(()), jax.core.Tracer)
    options = None if traced else {"xla_backend_optimization_level": 0}
    state = jax.jit(init, compiler_options=options)()
    return nnx.merge(graphdef[0], state)
