"""An independent NumPy transcription of the official Vim forward pass, for tests.

Works on official state dicts (PyTorch layouts) and NCHW images, with the official
code's structure: flipped sequence for the backward branch, causal conv1d, forward
scan, flip back. It shares no code with vim_jax, so agreement checks the port.
"""

import math

import numpy as np


def _silu(x):
    return x / (1 + np.exp(-x))


def _softplus(x):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def _rms(x, w, eps=1e-5):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _scan(u, delta, A, B, C, D, z, bias):
    """Official selective_scan_ref, channels-first: u (b, d, l), B/C (b, n, l)."""
    delta = _softplus(delta + bias[:, None])
    b, d, l = u.shape
    h = np.zeros((b, d, A.shape[1]))
    ys = []
    for t in range(l):
        h = np.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        ys.append(np.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = np.stack(ys, -1) + D[:, None] * u
    return y * _silu(z)


def _branch(x, z, sd, p, sfx):
    """mamba_inner_fn_no_out_proj on channels-first x, z: (b, d_inner, l)."""
    w, cb = sd[f"{p}conv1d{sfx}.weight"][:, 0], sd[f"{p}conv1d{sfx}.bias"]
    k, l = w.shape[1], x.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (k - 1, 0)))
    xc = _silu(sum(xp[:, :, j:j + l] * w[None, :, j, None] for j in range(k)) + cb[:, None])
    x_dbl = np.einsum("bdl,ed->bel", xc, sd[f"{p}x_proj{sfx}.weight"])
    n = sd[f"{p}A{sfx}_log"].shape[1]
    r = x_dbl.shape[1] - 2 * n
    delta = np.einsum("dr,brl->bdl", sd[f"{p}dt_proj{sfx}.weight"], x_dbl[:, :r])
    A = -np.exp(sd[f"{p}A{sfx}_log"])
    return _scan(xc, delta, A, x_dbl[:, r:r + n], x_dbl[:, r + n:], sd[f"{p}D{sfx}"], z,
                 sd[f"{p}dt_proj{sfx}.bias"])


def forward(sd, images_nchw, *, patch=16, stride=16):
    """Returns (features, logits, layer0_residual, layer0_hidden) for a middle-class-token Vim."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    x = np.asarray(images_nchw, np.float64)
    w = sd["patch_embed.proj.weight"]
    bsz, _, hgt, wid = x.shape
    gh, gw = (hgt - patch) // stride + 1, (wid - patch) // stride + 1
    tok = np.zeros((bsz, gh * gw, w.shape[0]))
    for i in range(gh):
        for j in range(gw):
            patch_px = x[:, :, i * stride:i * stride + patch, j * stride:j * stride + patch]
            tok[:, i * gw + j] = np.einsum("bchw,ochw->bo", patch_px, w)
    tok += sd["patch_embed.proj.bias"]
    m = tok.shape[1]
    cls = np.broadcast_to(sd["cls_token"], (bsz, 1, tok.shape[2]))
    h = np.concatenate([tok[:, :m // 2], cls, tok[:, m // 2:]], 1) + sd["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    residual, layer0 = None, None
    for i in range(depth):
        p = f"layers.{i}.mixer."
        residual = h if residual is None else residual + h
        hn = _rms(residual, sd[f"layers.{i}.norm.weight"])
        xz = np.einsum("blc,ec->bel", hn, sd[p + "in_proj.weight"])
        xs, z = np.split(xz, 2, axis=1)
        out = _branch(xs, z, sd, p, "")
        out_b = _branch(xs[:, :, ::-1], z[:, :, ::-1], sd, p, "_b")
        h = np.einsum("bld,cd->blc", ((out + out_b[:, :, ::-1]) / 2).transpose(0, 2, 1),
                      sd[p + "out_proj.weight"])
        if i == 0:
            layer0 = (residual.copy(), h.copy())
    feats = _rms(residual + h, sd["norm_f.weight"])[:, m // 2]
    logits = feats @ sd["head.weight"].T + sd["head.bias"]
    return feats, logits, layer0[0], layer0[1]


def random_state_dict(rng, *, embed_dim, depth, num_classes, num_patches, patch=16, d_state=16,
                      expand=2, d_conv=4):
    """An official-layout state dict with random values of realistic scale."""
    di, r = expand * embed_dim, math.ceil(embed_dim / 16)
    n = lambda *s, scale=0.05: (rng.standard_normal(s) * scale).astype(np.float32)
    sd = {"cls_token": n(1, 1, embed_dim, scale=0.5), "pos_embed": n(1, num_patches + 1, embed_dim, scale=0.5),
          "patch_embed.proj.weight": n(embed_dim, 3, patch, patch, scale=0.02),
          "patch_embed.proj.bias": n(embed_dim), "head.weight": n(num_classes, embed_dim, scale=0.2),
          "head.bias": n(num_classes), "norm_f.weight": 1 + n(embed_dim)}
    for i in range(depth):
        p = f"layers.{i}."
        sd[p + "norm.weight"] = 1 + n(embed_dim)
        sd[p + "mixer.in_proj.weight"] = n(2 * di, embed_dim, scale=embed_dim ** -0.5)
        sd[p + "mixer.out_proj.weight"] = n(embed_dim, di, scale=di ** -0.5)
        for s in ("", "_b"):
            sd[p + f"mixer.conv1d{s}.weight"] = n(di, 1, d_conv, scale=0.3)
            sd[p + f"mixer.conv1d{s}.bias"] = n(di, scale=0.3)
            sd[p + f"mixer.x_proj{s}.weight"] = n(r + 2 * d_state, di, scale=di ** -0.5)
            sd[p + f"mixer.dt_proj{s}.weight"] = n(di, r, scale=r ** -0.5)
            sd[p + f"mixer.dt_proj{s}.bias"] = (np.log(np.expm1(rng.uniform(1e-3, 1e-1, di)))).astype(np.float32)
            sd[p + f"mixer.A{s}_log"] = (np.log(np.tile(np.arange(1, d_state + 1), (di, 1))) + n(di, d_state)).astype(np.float32)
            sd[p + f"mixer.D{s}"] = 1 + n(di)
    return sd
