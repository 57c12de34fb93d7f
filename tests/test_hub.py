"""Official weights by name through the Hugging Face Hub cache, offline: a cache the test
fills itself (HF_HUB_OFFLINE=1), never the network."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

from conftest import fixture_path

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import json, numpy as np
    from vim_jax import create_model, list_models
    from vim_jax.weights.hub import WeightsUnavailableError
    out = {"with_weights": list_models(pretrained=True), "all": len(list_models())}
    io = np.load(IO)
    model = create_model("vim_tiny_patch16_224", pretrained=True)
    x = np.asarray(io["input_nchw"]).transpose(0, 2, 3, 1)
    out["logits_err"] = float(np.abs(np.asarray(model(x)) - io["logits"]).max())
    out["depth"] = model.depth
    for name, io_file in VIG:
        io = np.load(io_file)
        x = np.asarray(io["input_nchw"]).transpose(0, 2, 3, 1)
        out[name] = float(np.abs(np.asarray(create_model(name, pretrained=True)(x)) - io["logits"]).max())
    try:
        create_model("vim_small_patch16_224", pretrained=True)
    except WeightsUnavailableError as e:
        out["error"] = str(e)
    try:
        create_model("vim_tiny_patch16_384", pretrained=True)
    except ValueError as e:
        out["no_weights"] = str(e)
    print(json.dumps(out))
""")


def test_weights_by_name_from_an_offline_hub_cache(tmp_path):
    cache = tmp_path / "hub"
    repo = cache / "models--hustvl--Vim-tiny-midclstok"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    # The fixture (official format, depth 4, 10 classes) stands in for the Vim-Ti file.
    shutil.copy(fixture_path("vim_tiny_d4.pth"), snapshot / "vim_t_midclstok_76p1acc.pth")
    # ViG's repository: the plain and hierarchical fixtures stand in for ViG-T and ViG-H-T.
    vig = cache / "models--hustvl--ViG"
    (vig / "refs").mkdir(parents=True)
    (vig / "refs" / "main").write_text(commit)
    (vig / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(fixture_path("vig/vig_tiny_d2.pth"), vig / "snapshots" / commit / "vig_t_77p2acc.pth")
    shutil.copy(fixture_path("vig/vig_h_tiny_small.pth"), vig / "snapshots" / commit / "vig_h_t_82p8acc.pth")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    vig_io = [("vig_tiny_patch16_224", str(fixture_path("vig/vig_tiny_d2_io.npz"))),
              ("vig_h_tiny_224", str(fixture_path("vig/vig_h_tiny_small_io.npz")))]
    script = _SCRIPT.replace("IO", repr(str(fixture_path("vim_tiny_d4_io.npz")))).replace("VIG", repr(vig_io))
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["with_weights"] == [
        "vig_base_patch16_224", "vig_h_base_224", "vig_h_small_224", "vig_h_tiny_224",
        "vig_small_patch16_224", "vig_tiny_patch16_224", "vim_base_patch16_224",
        "vim_small_patch16_224", "vim_small_patch16_stride8_224", "vim_tiny_patch16_224",
        "vim_tiny_patch16_stride8_224"]
    # Official weights give the official eval logits (plain ViG's (o_f + o_b) / 4 path).
    assert out["vig_tiny_patch16_224"] < 1e-4 and out["vig_h_tiny_224"] < 1e-4
    assert out["all"] > len(out["with_weights"])
    assert out["depth"] == 4 and out["logits_err"] < 1e-4
    # Not in the cache and offline: the repository, the file and the alternative.
    for part in ("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth", "pretrained="):
        assert part in out["error"], out["error"]
    assert "has no official pretrained weights" in out["no_weights"]
