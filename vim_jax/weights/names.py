"""Official PyTorch Vim state_dict <-> this project's model parameters (nested dicts).

Layouts: PyTorch Linear is (out, in), Flax (in, out); Conv2d (out, in, kh, kw) vs
(kh, kw, in, out); the depthwise Conv1d (d_inner, 1, k) becomes (k, d_inner). Per-layer
tensors are stacked on a leading depth axis (the blocks are one scanned module).
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np

_Fn = Callable[[np.ndarray], np.ndarray]
_ID: tuple[_Fn, _Fn] = (lambda x: x, lambda x: x)
_LINEAR: tuple[_Fn, _Fn] = (lambda x: x.T, lambda x: x.T)
_CONV1D: tuple[_Fn, _Fn] = (lambda x: x[:, 0, :].T, lambda x: x.T[:, None, :])
_CONV2D: tuple[_Fn, _Fn] = (lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))

# (official key, path in the NNX state, (to_jax, to_torch)).
_TOP = [
    ("patch_embed.proj.weight", ("patch_embed", "kernel"), _CONV2D),
    ("patch_embed.proj.bias", ("patch_embed", "bias"), _ID),
    ("pos_embed", ("pos_embed",), _ID),
    ("norm_f.weight", ("norm_f", "weight"), _ID),
    ("head.weight", ("head", "kernel"), _LINEAR),
    ("head.bias", ("head", "bias"), _ID),
]
_LAYER = [
    ("norm.weight", ("norm", "weight"), _ID),
    ("mixer.in_proj.weight", ("mixer", "in_proj", "kernel"), _LINEAR),
    ("mixer.out_proj.weight", ("mixer", "out_proj", "kernel"), _LINEAR),
]
for _off, _ours in (("", ""), ("_b", "_b")):
    _LAYER += [
        (f"mixer.conv1d{_off}.weight", ("mixer", f"conv_weight{_ours}"), _CONV1D),
        (f"mixer.conv1d{_off}.bias", ("mixer", f"conv_bias{_ours}"), _ID),
        (f"mixer.x_proj{_off}.weight", ("mixer", f"x_proj{_ours}", "kernel"), _LINEAR),
        (f"mixer.dt_proj{_off}.weight", ("mixer", f"dt_proj{_ours}", "kernel"), _LINEAR),
        (f"mixer.dt_proj{_off}.bias", ("mixer", f"dt_proj{_ours}", "bias"), _ID),
        (f"mixer.A{_off}_log", ("mixer", f"A_log{_ours}"), _ID),
        (f"mixer.D{_off}", ("mixer", f"D{_ours}"), _ID),
    ]
_CLS_KEYS = {"middle": ["cls_token"], "head": ["cls_token"],
             "double": ["cls_token_head", "cls_token_tail"], "none": []}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


class CheckpointMismatch(ValueError):
    """A state_dict does not fit the model: names the keys and shapes at fault."""


MAX_LISTED = 20  # a screenful of a mismatch report; the counts cover the rest


def mismatch_report(source, want: Mapping[str, tuple], got: Mapping[str, tuple],
                    why: str = "") -> str | None:
    """The one report of a checkpoint that does not fit a model, or None when it fits:
    ``source`` and the counts first, then one line per missing key, unexpected key and shape
    mismatch (the first ``MAX_LISTED``). want, got: the shapes by key the model needs and
    the checkpoint holds; ``why`` is appended to the first line (a likely cause)."""
    missing = [f"missing key {k!r}" for k in sorted(set(want) - set(got))]
    unexpected = [f"unexpected key {k!r}" for k in sorted(set(got) - set(want))]
    shapes = [f"shape mismatch for {k!r}: checkpoint {tuple(got[k])}, model expects {tuple(want[k])}"
              for k in sorted(set(want) & set(got)) if tuple(got[k]) != tuple(want[k])]
    lines = missing + unexpected + shapes
    if not lines:
        return None
    more = [f"... and {len(lines) - MAX_LISTED} more"] if len(lines) > MAX_LISTED else []
    return (f"{source} does not fit the model: {len(missing)} missing, {len(unexpected)} "
            f"unexpected and {len(shapes)} mis-shaped keys{why}:\n  "
            + "\n  ".join(lines[:MAX_LISTED] + more))


def infer_model_kwargs(state_dict: Mapping[str, np.ndarray], cls_position: str = "middle") -> dict:
    """depth, num_classes and the patch count (num_patches) read off an official state_dict."""
    layers = {int(m.group(1)) for k in state_dict if (m := _LAYER_RE.match(k))}
    out = {}
    if layers:
        out["depth"] = max(layers) + 1
    if "head.weight" in state_dict:
        out["num_classes"] = int(state_dict["head.weight"].shape[0])
    elif not any(k.startswith("head.") for k in state_dict):
        out["num_classes"] = 0
    if "pos_embed" in state_dict:
        out["num_patches"] = int(state_dict["pos_embed"].shape[1]) - len(_CLS_KEYS[cls_position])
    return out


def _expected(depth: int, cls_position: str, has_head: bool):
    """(official key, path, layer index or None, transforms) for every tensor of a model."""
    rows = [(k, p, None, f) for k, p, f in _TOP if has_head or not k.startswith("head.")]
    for i in range(depth):
        rows += [(f"layers.{i}.{k}", ("layers",) + p, i, f) for k, p, f in _LAYER]
    return rows


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], target: dict, *, cls_position: str,
                         pos_embed_fn=None, source: str = "checkpoint") -> dict:
    """Official state_dict -> nested dict of arrays with the structure and shapes of ``target``.

    target: the model's ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``.
    pos_embed_fn: maps the checkpoint's pos_embed to the model's grid (a resize), if needed.
    Raises CheckpointMismatch naming ``source`` and the missing, unexpected and mis-shaped keys.
    """
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    depth = _get(target, ("layers", "norm", "weight")).shape[0]
    rows = _expected(depth, cls_position, "head" in target)
    cls_keys = _CLS_KEYS[cls_position]
    if "pos_embed" in sd and pos_embed_fn is not None:
        sd["pos_embed"] = np.asarray(pos_embed_fn(sd["pos_embed"]))
    # What the model needs, in the checkpoint's (official) layout.
    want = {}
    for key, path, layer, (_, to_torch) in rows:
        shape = _get(target, path).shape[1 if layer is not None else 0:]
        want[key] = to_torch(np.broadcast_to(np.float32(0), shape)).shape
    for k in cls_keys:
        want[k] = (1, 1, target["cls_token"].shape[-1])
    report = mismatch_report(source, want, {k: v.shape for k, v in sd.items()})
    if report:
        raise CheckpointMismatch(report)

    out: dict = {}
    stacked: dict = {}
    for key, path, layer, (to_jax, _) in rows:
        if layer is None:
            _set(out, path, to_jax(sd[key]))
        else:
            stacked.setdefault(path, [None] * depth)[layer] = to_jax(sd[key])
    if cls_keys:
        out["cls_token"] = np.concatenate([sd[k] for k in cls_keys], axis=1)
    for path, values in stacked.items():
        _set(out, path, np.stack(values))
    return out


def params_to_state_dict(params: dict, *, cls_position: str) -> dict[str, np.ndarray]:
    """Inverse of ``state_dict_to_params``: this project's params -> official state_dict."""
    depth = _get(params, ("layers", "norm", "weight")).shape[0]
    sd = {}
    for key, path, layer, (_, to_torch) in _expected(depth, cls_position, "head" in params):
        value = np.asarray(_get(params, path))
        sd[key] = to_torch(value if layer is None else value[layer])
    cls_keys = _CLS_KEYS[cls_position]
    for i, k in enumerate(cls_keys):
        sd[k] = np.asarray(params["cls_token"])[:, i:i + 1]
    return sd


# ---------------------------------------------------------------------------------------
# ViG (plain and hierarchical): one module per official module, so a parameter's path in
# the NNX state names its official key after a few renames; the leaf gives the layout.

_VIG_RENAMES = {
    "vig": [(r"^patch_embed\.conv1\.", "patch_embed.proj.0."),
            (r"^patch_embed\.norm1\.", "patch_embed.proj.1."),
            (r"^patch_embed\.conv2\.", "patch_embed.proj.3."),
            (r"^patch_embed\.norm2\.", "patch_embed.proj.4."),
            (r"\.mlp\.up\.", ".mlp.gate_proj."), (r"\.mlp\.down\.", ".mlp.down_proj.")],
    "vig_h": [(r"^stem\.conv1\.", "patch_embed.0."), (r"^stem\.norm1\.", "patch_embed.2."),
              (r"^stem\.conv2\.", "patch_embed.5."), (r"^stem\.norm2\.", "patch_embed.7."),
              (r"\.downsample\.conv\.", ".downsample.1."), (r"\.downsample\.norm\.", ".downsample.3."),
              (r"\.mlp\.up\.", ".mlp.fc1."), (r"\.mlp\.down\.", ".mlp.fc2."),
              (r"^norm\.", "classifier.norm."), (r"^head\.", "classifier.head.")],
}
_MIXER_RENAMES = [(r"\.dwconv\.", ".in_proj.0."), (r"\.gk_down\.", ".gk_proj.0."),
                  (r"\.gk_up\.", ".gk_proj.1.")]
VIG_FAMILIES = tuple(_VIG_RENAMES)


def _vig_key(path: tuple, shape: tuple, family: str) -> tuple[str, tuple[_Fn, _Fn]]:
    """(official key, (to_jax, to_torch)) of the parameter at ``path`` (NNX state path)."""
    key = ".".join(map(str, path))
    for pattern, repl in _VIG_RENAMES[family] + _MIXER_RENAMES:
        key = re.sub(pattern, repl, key)
    stem, leaf = key.rsplit(".", 1) if "." in key else ("", key)
    if leaf == "kernel":
        return stem + ".weight", _LINEAR if len(shape) == 2 else _CONV2D
    if leaf == "scale":  # LayerNorm
        return stem + ".weight", _ID
    return key, _ID


def _leaves(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def vig_state_dict_to_params(state_dict: Mapping[str, np.ndarray], target: dict, *, family: str,
                             pos_embed_fn=None, source: str = "checkpoint") -> dict:
    """Official ViG / ViG-H state_dict -> nested dict shaped like ``target`` (the model's
    ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``); ``pos_embed_fn`` resizes the
    checkpoint's pos_embed to the model's grid. Raises CheckpointMismatch naming ``source``
    and every missing, unexpected and mis-shaped key (the official loader is not strict)."""
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    if "pos_embed" in sd and pos_embed_fn is not None:
        sd["pos_embed"] = np.asarray(pos_embed_fn(sd["pos_embed"]))
    rows = [(path, *_vig_key(path, np.shape(leaf), family), np.shape(leaf))
            for path, leaf in _leaves(target)]
    want = {key: fns[1](np.broadcast_to(np.float32(0), shape)).shape for _, key, fns, shape in rows}
    report = mismatch_report(source, want, {k: v.shape for k, v in sd.items()})
    if report:
        raise CheckpointMismatch(report)
    out: dict = {}
    for path, key, (to_jax, _), _ in rows:
        _set(out, path, to_jax(sd[key]))
    return out


def vig_params_to_state_dict(params: dict, *, family: str) -> dict[str, np.ndarray]:
    """Inverse of ``vig_state_dict_to_params``: this project's params -> official state_dict."""
    out = {}
    for path, leaf in _leaves(params):
        key, (_, to_torch) = _vig_key(path, np.shape(leaf), family)
        out[key] = to_torch(np.asarray(leaf))
    return out


def infer_vig_kwargs(state_dict: Mapping[str, np.ndarray], family: str) -> dict:
    """Block counts (depth, or depths per stage), num_classes and, for plain ViG, the patch
    count (num_patches) read off an official ViG state_dict."""
    out = {}
    head = "head.weight" if family == "vig" else "classifier.head.weight"
    if head in state_dict:
        out["num_classes"] = int(state_dict[head].shape[0])
    elif not any(k.startswith(head[:-len("weight")]) for k in state_dict):
        out["num_classes"] = 0
    if family == "vig":
        blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"^blocks\.(\d+)\.", k))}
        if blocks:
            out["depth"] = max(blocks) + 1
        if "pos_embed" in state_dict:
            out["num_patches"] = int(state_dict["pos_embed"].shape[1])
    else:
        stages: dict[int, set] = {}
        for k in state_dict:
            if m := re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.", k):
                stages.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        if stages:
            out["depths"] = tuple(max(stages.get(s, {-1})) + 1 for s in range(max(stages) + 1))
    return out
