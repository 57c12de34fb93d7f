"""Winners files (``vim_jax.kernels.tuning``): what a GPU's sweep writes is what later runs
read, for the scan (either layout) and the GLA forward (one walk or two phases)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from vim_jax.kernels import gla, selective_scan, tuning

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_winners_file_round_trips(tmp_path):
    scan = {("fwd", 384, 32, 6085): selective_scan.Config(32, 1, 1, 4, "lanes"),
            ("bwd", 384, 128, 197): selective_scan.Config(16, 4, 1, 1)}
    path = str(tmp_path / "tuned.json")
    tuning.save(path, scan)
    assert json.loads(pathlib.Path(path).read_text())["fwd,384,32,6085"] == [32, 1, 1, 4, "lanes"]
    assert tuning.load(path, selective_scan.Config, "VIM_JAX_SCAN_TUNED") == scan
    two_phase = {("fwd", 32, 64, 4096): gla.Config(8, 1, True)}
    tuning.save(path, two_phase)
    assert tuning.load(path, gla.Config, "VIM_JAX_GLA_TUNED") == two_phase
    assert not os.path.exists(path + ".tmp")


def test_an_unreadable_winners_file_is_reported_and_ignored(tmp_path):
    bad = tmp_path / "tuned.json"
    bad.write_text("{not json")
    with pytest.warns(UserWarning, match="VIM_JAX_SCAN_TUNED=.*not a sweep's winners file"):
        assert tuning.load(str(bad), selective_scan.Config, "VIM_JAX_SCAN_TUNED") == {}


def test_the_kernels_read_the_files_the_environment_names(tmp_path):
    """As the GPU suite's later stages do: the winners at their shapes, the defaults elsewhere."""
    tuning.save(str(tmp_path / "scan.json"), {("fwd", 384, 32, 6085): selective_scan.Config(32, 1, 1, 4, "lanes")})
    tuning.save(str(tmp_path / "gla.json"), {("fwd", 32, 64, 4096): gla.Config(8, 1, True)})
    script = (
        "from vim_jax.kernels import gla, selective_scan as s\n"
        "print(s.config_for('fwd', 32, 6085, 384, 16), s.config_for('fwd', 32, 6085, 384, 16, layout='tile'),\n"
        "      s.config_for('bwd', 32, 6085, 384, 16), gla.config_for('fwd', 32, 64, 4096),\n"
        "      gla.config_for('fwd', 32, 64, 196), sep='|')\n")
    env = {**os.environ, "VIM_JAX_SCAN_TUNED": str(tmp_path / "scan.json"),
           "VIM_JAX_GLA_TUNED": str(tmp_path / "gla.json"), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    tuned, tile, bwd, two_phase, other = out.stdout.strip().split("|")
    assert tuned == str(selective_scan.Config(32, 1, 1, 4, "lanes"))
    assert tile == str(selective_scan.default_config(32, 6085, 384, 16, "fwd", "tile"))
    assert bwd == str(selective_scan.default_config(32, 6085, 384, 16, "bwd"))
    assert two_phase == str(gla.Config(8, 1, True)) and other == str(gla.default_config(32, 64, "fwd"))
