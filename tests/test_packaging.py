"""What ``pip install vim-jax`` puts into site-packages."""

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_installs_only_the_vim_jax_package(tmp_path):
    """The repository's kernels/ goes in as vim_jax.kernels and configs/ stays out: no
    top-level package named "kernels" or "configs" (other distributions use those names)."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel, = tmp_path.glob("vim_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert all(t == "vim_jax" or t.startswith("vim_jax-") for t in tops), tops
    assert "vim_jax/kernels/selective_scan.py" in names and "vim_jax/mixers/gla.py" in names
    assert "vim_jax/models/vim.py" in names and "vim_jax/data/pipeline.py" in names


def test_importing_vim_jax_pulls_in_neither_torch_nor_tensorflow():
    code = ("import sys, vim_jax, vim_jax.predict, vim_jax.export, vim_jax.weights.hub; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'tensorflow', 'tensorflow_datasets', 'ml_collections'}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
