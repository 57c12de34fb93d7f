"""The TPU compile check's verdicts (``benchmarks/tpu_compile.py``): which rows fail the run,
the ratios to DeiT-Ti, the largest-batch estimate, and the rows a rerun skips. The check
itself runs in a venv of its own with libtpu (``.ci/run``); these are its rules on rows
whose answer is known."""

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tpu_compile", ROOT / "benchmarks" / "tpu_compile.py")
tpu_compile = importlib.util.module_from_spec(_spec)
sys.modules["tpu_compile"] = tpu_compile
_spec.loader.exec_module(tpu_compile)


def recipe(name, status="ok", gib=8.0, half=False, per_chip=128, **kw):
    row = dict(section="recipes", recipe=name, chip="v5e", chips=16, topology="v5e:4x4", status=status,
               per_chip_batch=per_chip // 2 if half else per_chip, compile_s=1.0, mosaic_calls=0, **kw)
    if half:
        row["half_batch"] = True
    if status == "ok":
        row.update(gib=gib, temp_gib=gib - 0.5)
    return row


def forward(model, size, gib):
    return dict(section="forward", model=model, size=size, batch=8, dtype="bfloat16", chip="v5e", status="ok",
                gib=gib, temp_gib=gib, mosaic_calls=0, compile_s=1.0)


@pytest.fixture
def budget(monkeypatch):
    monkeypatch.setattr(tpu_compile, "usable_gib", lambda chip: {"v5e": 15.75, "v6e": 31.25, "v5p": 95.74}[chip])


def test_a_ti_recipe_that_does_not_fit_v5e_fails_the_run_and_others_only_say_so(budget):
    rows = [recipe("vim_tiny"), recipe("vig_h_tiny", status="does not fit", needs_gib=20.5),
            recipe("vim_base", status="does not fit", needs_gib=20.1)]
    _, bad = tpu_compile.summarise(rows)
    assert len(bad) == 1 and "vig_h_tiny" in bad[0]


def test_a_compile_failure_fails_the_run(budget):
    row = dict(recipe("vim_small", status="failed"), error="MosaicError: E2003")
    _, bad = tpu_compile.summarise([recipe("vim_tiny"), row])
    assert len(bad) == 1 and "compile failure" in bad[0]


def test_ratios_to_deit_and_the_largest_batch_estimate(budget):
    """Memory is affine in the batch: 4 GiB at 64 a chip and 8 at 128 give 1/16 GiB an
    image and 0 fixed, so (15.75 - 0) * 16 = 252 images on v5e."""
    rows = [forward("deit_tiny", 1248, 7.0), forward("vim_tiny", 1248, 0.75),
            recipe("vim_small", gib=8.0), recipe("vim_small", gib=4.0, half=True)]
    lines, bad = tpu_compile.summarise(rows)
    assert not bad
    assert rows[1]["ratio_to_deit"] == pytest.approx(0.75 / 7.0, abs=1e-4)
    assert rows[2]["max_batch_estimate"]["v5e"] == 252
    # v6e without a compile of its own: v5e's line to v6e's 31.25 GiB; with one (10 GiB at
    # 128), v5e's slope from there: 128 + 21.25 * 16 = 468.
    assert rows[2]["max_batch_estimate"]["v6e"] == 500
    rows.append(dict(recipe("vim_small", gib=10.0), chip="v6e"))
    tpu_compile.summarise(rows)
    assert rows[2]["max_batch_estimate"]["v6e"] == 468
    assert any("10.7% of DeiT-Ti" in line for line in lines)


def test_what_fits_where_table(budget):
    """One line a recipe, one column a slice compiled (16-chip slices first), the per-chip
    GiB or the GiB needed and "no"; half-batch rows and failures are not cells."""
    rows = [recipe("vim_tiny", gib=8.83, commit="aaa"), recipe("vim_base", status="does not fit", needs_gib=30.207),
            dict(recipe("vim_tiny", gib=8.73, commit="bbb"), chip="v6e"),
            dict(recipe("vim_tiny", gib=8.0), chips=64), recipe("vim_tiny", gib=4.0, half=True),
            dict(recipe("vim_base", status="failed"), chip="v6e", error="E")]
    table = [line for line in tpu_compile.fits_table(rows) if line.startswith("|")]
    assert table[0] == "| recipe | per-chip batch | v5e x16 (15.75 GiB) | v6e x16 (31.25 GiB) | v5e x64 (15.75 GiB) |"
    assert table[2:] == ["| vim_tiny | 128 | 8.83 | 8.73 | 8.00 |", "| vim_base | 128 | 30.21 no |  |  |"]
    assert "commits ?, aaa, bbb" in tpu_compile.fits_table(rows)[-2]


def test_a_rerun_skips_compiled_rows_and_retries_failures(tmp_path, monkeypatch, budget):
    """The planned row's identity matches the compiled row's, which has more keys; a failed
    row is compiled again, and the new row names its commit."""
    planned = next(tpu_compile.recipe_rows(ci=True))
    done = dict(planned, status="ok", gib=8.19, temp_gib=7.99, mosaic_calls=2, compile_s=17.0,
                per_chip_batch=128, model="vim_tiny_patch16_224", dtype="float32")
    assert tpu_compile.key(planned) == tpu_compile.key(done)
    failed = dict(next(tpu_compile.forward_rows(ci=True)), status="failed", error="x", compile_s=0)
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(done) + "\n" + json.dumps(failed) + "\n")
    compiled = []
    monkeypatch.setattr(tpu_compile, "compile_row", lambda row, lower: compiled.append(row) or row.update(
        status="ok", gib=0.1, temp_gib=0.1, mosaic_calls=0, compile_s=0.0))
    monkeypatch.setattr(tpu_compile, "SECTIONS", {
        "recipes": (lambda ci: [dict(planned)], lambda row: None),
        "forward": (lambda ci: [dict(failed, status=None)], lambda row: None)})
    monkeypatch.setattr(sys, "argv", ["tpu_compile.py", "--ci", "--jsonl", str(path), "--only", "recipes,forward"])
    with pytest.raises(SystemExit) as exit_:
        tpu_compile.main()
    assert exit_.value.code == 0
    assert [r["section"] for r in compiled] == ["forward"]
    # The row compiled now names the commit that compiled it.
    written = json.loads(path.read_text().splitlines()[-1])
    assert written["section"] == "forward" and written["commit"] not in ("", None)
