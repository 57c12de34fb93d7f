"""The repository stands on its own: nothing in it reads or names a directory outside it,
every golden fixture the parity tests read ships with it, and the README is a short front
door whose links lead somewhere."""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Spelled in two parts so that this file does not name it itself.
OUTSIDE = "../" + "shared"


def _tracked_text_files():
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in out.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file():
            try:
                yield name, path.read_text()
            except UnicodeDecodeError:  # binary: a fixture, a plot
                continue


def test_no_file_names_a_directory_outside_the_repository():
    bad = sorted(name for name, text in _tracked_text_files() if OUTSIDE in text)
    assert not bad, f"these files name {OUTSIDE}, which a clone does not have: {bad}"


def test_the_golden_fixtures_ship_with_the_repository():
    fixtures = ROOT / "tests" / "fixtures"
    for name in ("README.md", "selective_scan_ref.npz", "vim_tiny_d4.pth", "vim_tiny_d4_io.npz",
                 "vig/README.md", "vig/gla_ref.npz", "vig/vig_tiny_d2.pth", "vig/vig_tiny_d2_io.npz",
                 "vig/vig_h_tiny_small.pth", "vig/vig_h_tiny_small_io.npz"):
        assert (fixtures / name).is_file(), name
    tracked = subprocess.run(["git", "ls-files", "tests/fixtures"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert "tests/fixtures/vim_tiny_d4.pth" in tracked, "the fixtures must be committed, not only present"


def test_the_readme_is_a_front_door_whose_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250, "the README is a front door: the rest belongs in docs/"
    targets = re.findall(r"\]\(([^)#]+)\)", text)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert len(local) >= 10, local  # the docs pages, the fixtures' README, the results
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
    # Every page of the documentation is linked from the README.
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md") if p.name != "index.md"}
    assert pages <= set(local), sorted(pages - set(local))
