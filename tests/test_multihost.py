"""Several JAX processes on this machine (``python -m vim_jax.launch``, gloo collectives on the
CPU): training, checkpoints, preemption, resume and evaluation across processes, and the
launcher's handling of dead processes and bad settings."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "vim_jax.launch"]
STEPS = 40


def _train_args(workdir, data_dir, *extra) -> list:
    """The digits demo (real scans) shrunk to a model that steps in milliseconds."""
    return [sys.executable, "train.py", "--config", "configs/digits.py", "--workdir", str(workdir),
            f"--config.data.data_dir={data_dir}", "--config.model.overrides.embed_dim=32",
            "--config.model.overrides.depth=2", "--config.optim.batch_size=32",
            f"--config.train.num_steps={STEPS}", "--config.train.log_every_steps=4",
            "--config.train.checkpoint_every_steps=8", "--config.optim.warmup_epochs=0",
            "--config.optim.base_lr=0.2", *extra]


def _cpu_env() -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return env


def _run(cmd, timeout=600, **kw):
    return subprocess.run(cmd, cwd=ROOT, env=_cpu_env(), capture_output=True, text=True, timeout=timeout, **kw)


def _start_launcher(args) -> subprocess.Popen:
    """The launcher with ``args``, its output readable line by line."""
    return subprocess.Popen(LAUNCH + args, cwd=ROOT, env=_cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _note_pid(line: str, pids: dict) -> None:
    """Records I -> pid from the launcher's '[launch] process I/N: pid P, ...' lines."""
    if line.startswith("[launch] process "):
        pids[int(line.split()[2].split("/")[0])] = int(line.split("pid ")[1].split(",")[0])


def _params(workdir):
    from flax import nnx
    from vim_jax.weights.checkpoints import Checkpoints
    from vim_jax.train.config import build_model, load_config

    model = build_model(load_config(str(workdir)), 10)
    return Checkpoints(str(workdir)).restore_params(nnx.state(model, nnx.Param), ema=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def two_process_run(data_dir, tmp_path_factory):
    """Two processes x one device, uninterrupted: (workdir, launcher output)."""
    workdir = tmp_path_factory.mktemp("two")
    r = _run(LAUNCH + ["--processes", "2", "--"] + _train_args(workdir, data_dir))
    assert r.returncode == 0, r.stdout[-4000:]
    return workdir, r.stdout


def test_two_processes_train_and_one_process_evaluates_the_same(two_process_run):
    """Loss falls; only process 0 logs progress and writes metrics; a one-process eval.py
    of the checkpoint the two wrote reproduces their final evaluation."""
    workdir, out = two_process_run
    metrics = json.loads((workdir / "metrics.json").read_text())
    losses = [h["loss"] for h in metrics["loss_history"]]
    assert metrics["step"] == STEPS and losses[-1] < 0.8 * losses[0], losses
    assert "[p0] " in out and f"step {STEPS}/{STEPS}" in out
    assert not any(l.startswith("[p1] ") and "step " in l and f"/{STEPS} " in l for l in out.splitlines())
    assert metrics["eval"]["count"] == 359  # every held-out scan once, over both processes
    r = _run([sys.executable, "eval.py", "--workdir", str(workdir)])
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads((workdir / f"eval_step{STEPS}.json").read_text())
    assert one["count"] == 359
    assert one["top1"] == metrics["eval"]["top1"] and one["top5"] == metrics["eval"]["top5"]
    assert one["loss"] == pytest.approx(metrics["eval"]["loss"], rel=1e-5)
    # eval.py as two processes: process 0 alone reports, the same numbers.
    r = _run(LAUNCH + ["--processes", "2", "--", sys.executable, "eval.py", "--workdir", str(workdir),
                       "--output", str(workdir / "eval2.json")])
    assert r.returncode == 0, r.stdout[-3000:]
    assert r.stdout.count("top-1 ") == 1 and "[p0] top-1 " in r.stdout
    two = json.loads((workdir / "eval2.json").read_text())
    assert (two["count"], two["top1"], two["top5"]) == (359, one["top1"], one["top5"])
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)


@pytest.mark.slow
def test_sigterm_to_one_process_saves_and_resumes_bit_identically(two_process_run, data_dir, tmp_path):
    """SIGTERM to process 1 mid-run: both save the same step and exit 0; rerunning the
    launcher resumes and ends with the uninterrupted run's parameters, bit for bit."""
    workdir = tmp_path / "preempted"
    p = _start_launcher(["--processes", "2", "--"] + _train_args(workdir, data_dir))
    pids, lines = {}, []
    for line in p.stdout:
        lines.append(line)
        _note_pid(line, pids)
        if f"step 8/{STEPS} " in line:
            os.kill(pids[1], signal.SIGTERM)
    assert p.wait(timeout=60) == 0, "".join(lines[-40:])
    out = "".join(lines)
    from vim_jax.weights.checkpoints import Checkpoints
    saved = Checkpoints(str(workdir)).steps()[-1]
    assert 8 <= saved < STEPS, saved  # agreed at the log step 8 or a later one
    for p in (0, 1):  # both processes stopped at the same step (warnings print on every process)
        assert any(l.startswith(f"[p{p}] ") and f"preempted at step {saved}:" in l for l in lines), out[-3000:]
    r = _run(LAUNCH + ["--processes", "2", "--"] + _train_args(workdir, data_dir))
    assert r.returncode == 0 and f"resumed at step {saved}" in r.stdout, r.stdout[-3000:]
    (sa, a), (sb, b) = _params(two_process_run[0]), _params(workdir)
    assert sa == sb == STEPS
    import jax
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_fsdp_over_two_processes_equals_data_parallel(data_dir, tmp_path):
    """Two processes x two devices: FSDP and replicated parameters train alike."""
    import jax

    results = {}
    for fsdp in (False, True):
        w = tmp_path / f"fsdp{fsdp}"
        r = _run(LAUNCH + ["--processes", "2", "--devices-per-process", "2", "--"]
                 + _train_args(w, data_dir, f"--config.train.fsdp={fsdp}", "--config.train.num_steps=8"))
        assert r.returncode == 0, r.stdout[-3000:]
        assert "on 4 device(s) x 2 process(es)" in r.stdout
        results[fsdp] = _params(w)[1]
    for x, y in zip(jax.tree.leaves(results[False]), jax.tree.leaves(results[True])):
        x, y = np.asarray(x), np.asarray(y)
        assert np.abs(x - y).max() <= 1e-5 * (np.abs(x).max() + 1e-12)


def test_vig_trains_over_two_processes_and_one_process_evaluates_the_same(data_dir, tmp_path):
    """ViG through the same multi-process machinery: two processes train, both save one
    checkpoint, and a one-process evaluation of it reproduces their final evaluation."""
    w = tmp_path / "vig"
    args = _train_args(w, data_dir, "--config.model.overrides.num_heads=1", "--config.model.overrides.depth=1",
                       "--config.data.image_size=32", "--config.train.num_steps=8")
    args = [x if x != "configs/digits.py" else "configs/digits_vig.py" for x in args]
    r = _run(LAUNCH + ["--processes", "2", "--"] + args)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "vig_tiny_patch16_224 (classification) on 2 device(s) x 2 process(es)" in r.stdout
    metrics = json.loads((w / "metrics.json").read_text())
    assert metrics["step"] == 8 and metrics["eval"]["count"] == 359
    from vim_jax.train.evaluation import evaluate_workdir  # what eval.py runs, in this one process

    one = evaluate_workdir(str(w))
    assert (one["count"], one["top1"]) == (359, metrics["eval"]["top1"])
    assert one["loss"] == pytest.approx(metrics["eval"]["loss"], rel=1e-5)


_STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"


def test_a_killed_process_stops_the_launcher_and_the_others():
    """SIGKILL to one of two processes: the launcher names it, stops the other (which
    ignores SIGTERM, as a process stuck in a collective would: SIGKILL after the grace
    period), and exits non-zero within that bounded time; no process is left."""
    p = _start_launcher(["--processes", "2", "--grace", "2", "--", sys.executable, "-c", _STUBBORN])
    pids, lines = {}, []
    for line in p.stdout:
        lines.append(line)
        _note_pid(line, pids)
        if sum(l.endswith("up\n") for l in lines) == 2:
            break
    t = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    rest = p.communicate(timeout=30)[0]
    assert p.returncode != 0 and time.monotonic() - t < 15
    assert f"process 1 (pid {pids[1]}) killed by SIGKILL" in rest
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_bad_process_settings_fail_fast_naming_the_value(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    base = [sys.executable, "train.py", "--config", "configs/digits.py", "--workdir", str(tmp_path)]
    r = _run(base + ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                     "--process_id", "2"], timeout=120)
    assert r.returncode == 1 and "process id 2 is outside 0..1" in r.stderr, r.stderr[-2000:]
    t = time.monotonic()
    r = _run(base + ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                     "--process_id", "1", "--init_timeout", "5"], timeout=120)
    assert r.returncode == 1 and f"could not join the coordinator at 127.0.0.1:{port}" in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - t < 60


_POLITE = ("import signal, sys, time\n"
           "def stop(*_):\n    print('got SIGTERM', flush=True); sys.exit(0)\n"
           "signal.signal(signal.SIGTERM, stop); print('up', flush=True); time.sleep(600)")


def test_ctrl_c_to_the_launcher_reaches_every_process_as_sigterm():
    """Ctrl-C (SIGINT) to the launcher: every process gets SIGTERM (training's signal to save
    and stop), they exit 0, and so does the launcher."""
    p = _start_launcher(["--processes", "2", "--", sys.executable, "-c", _POLITE])
    lines = []
    for line in p.stdout:
        lines.append(line)
        if sum(l.endswith("up\n") for l in lines) == 2:
            break
    p.send_signal(signal.SIGINT)
    rest = p.communicate(timeout=30)[0]
    assert p.returncode == 0, rest
    assert "[launch] SIGINT: SIGTERM to every process" in rest
    assert "[p0] got SIGTERM" in rest and "[p1] got SIGTERM" in rest
