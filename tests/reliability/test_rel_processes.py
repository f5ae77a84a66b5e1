"""Whole ``python -m hgad train`` processes: reproducibility and crash safety.

* Two runs with the same seed, in separate processes, write byte-identical ``model.safetensors``;
  another seed writes different bytes.
* A training process killed with SIGKILL at random moments (seeded schedule: during start-up or
  feature caching, in the middle of passes, after the last pass while calibrating and saving), then
  continued with ``--resume`` each time, finishes and writes exactly the weights of the
  uninterrupted run. After every kill, every file in the run folder is whole (atomic writes).

All processes run single-threaded (``OMP_NUM_THREADS=1``) so that results do not depend on how many
cores a machine has and two of them can share a 2-core machine.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from relhelp import command, process_env

from builders import make_mvtec
from conftest import tiny_flags
from hgad.checkpoint import CONFIG_FILE, MODEL_FILE, RESUME_FILE, read_tensors

PASSES = (3, 2)  # meta-epochs x sub-epochs: 6 passes of 3 steps
N_FLOW = 12  # training images the flow sees: 8 per class, 2 of each held out to calibrate (--calibration-split 0.2)
N_KILLS = 4


def _env() -> dict[str, str]:
    return {**process_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _train_argv(data: Path, out: Path, seed: int, *extra: str) -> list[object]:
    flags = tiny_flags(meta_epochs=PASSES[0], sub_epochs=PASSES[1], seed=seed, cache="disk")
    return ["train", "--data", f"mvtec:{data}", "--out", out, "--no-progress", *flags, *extra]


def _start(argv: list[object]) -> subprocess.Popen:
    return subprocess.Popen(command(argv), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    assert b"Traceback" not in err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("proc") / "mvtec"
    return make_mvtec(root, {"bottle": {}, "alpha": {}}, n_train=8, n_good=0)


@pytest.fixture(scope="module")
def timed_reference(data: Path, tmp_path_factory) -> tuple[Path, float]:
    """The uninterrupted run (seed 3) and its start-up time: seconds until its first pass was logged."""
    out = tmp_path_factory.mktemp("ref") / "run"
    t0 = time.monotonic()
    proc = _start(_train_argv(data, out, seed=3))
    while _log_lines(out) == 0 and proc.poll() is None:
        time.sleep(0.02)
    startup = time.monotonic() - t0
    _finish(proc)
    return out, startup


@pytest.fixture(scope="module")
def reference(timed_reference) -> Path:
    return timed_reference[0]


def test_same_seed_same_bytes_other_seed_differs(data: Path, reference: Path, tmp_path: Path):
    same, other = tmp_path / "same", tmp_path / "other"
    procs = [_start(_train_argv(data, same, seed=3)), _start(_train_argv(data, other, seed=4))]
    for proc in procs:
        _finish(proc)
    ref = (reference / MODEL_FILE).read_bytes()
    assert (same / MODEL_FILE).read_bytes() == ref
    assert (other / MODEL_FILE).read_bytes() != ref
    # the resume state too: same seed, same optimizer moments and counters
    assert (same / RESUME_FILE).read_bytes() == (reference / RESUME_FILE).read_bytes()


def _log_lines(run: Path) -> int:
    try:
        return len((run / "train_log.jsonl").read_text().splitlines())
    except OSError:
        return 0


def _passes_saved(run: Path) -> int:
    if not (run / RESUME_FILE).is_file():
        return 0
    _, meta = read_tensors(run / RESUME_FILE)
    return int(json.loads(meta["progress"])["epoch"])


def _check_whole(run: Path) -> None:
    """Every file a reader could open is complete: JSON parses, safetensors load, cached arrays load."""
    if not run.exists():
        return
    for path in run.rglob("*.json"):
        json.loads(path.read_text())
    for name in (MODEL_FILE, RESUME_FILE):
        if (run / name).exists():
            tensors, _ = read_tensors(run / name)
            assert tensors
    if (run / "train_log.jsonl").exists():
        for line in (run / "train_log.jsonl").read_text().splitlines():
            json.loads(line)
    if (run / "cache" / "key.json").exists():
        levels = json.loads((run / "cache" / "key.json").read_text())["levels"]
        for lvl in range(levels):
            assert np.load(run / "cache" / f"scale{lvl}.npy").shape[0] == N_FLOW
    assert (run / CONFIG_FILE).exists() or not (run / RESUME_FILE).exists()


def _kill_when(proc: subprocess.Popen, ready, delay: float, limit: float = 240) -> bool:
    """SIGKILL ``proc`` ``delay`` s after ``ready()`` first holds; False if it finished first."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.monotonic() - t0 < limit, "training made no progress"
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.communicate()  # reap it and close its pipes
    return True


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_weights(data: Path, timed_reference,
                                                                               tmp_path: Path):
    reference, startup_s = timed_reference
    rng = random.Random(20240917)
    run = tmp_path / "run"
    total = PASSES[0] * PASSES[1]
    argv = _train_argv(data, run, 3, "--resume")
    # delays in units of one pass as timed by the reference run (same machine, same load)
    log = [json.loads(x) for x in (reference / "train_log.jsonl").read_text().splitlines()]
    pass_s = sum(r["seconds"] for r in log) / len(log)
    survived = []
    for k in range(N_KILLS):
        done = _passes_saved(run)
        proc = _start(argv)
        if k == 0:  # start-up: imports, model, feature extraction and cache writing
            killed = _kill_when(proc, lambda: True, rng.uniform(0.2, 0.95) * startup_s)
        elif k < N_KILLS - 1:  # in the middle of a pass
            target = done + rng.randint(0, max(0, total - done - 2))
            killed = _kill_when(proc, lambda t=target: _log_lines(run) > t, rng.uniform(0.0, 1.0) * pass_s)
        else:  # after the last pass: calibration, model.safetensors, train_summary.json
            killed = _kill_when(proc, lambda: _log_lines(run) >= total, rng.uniform(0.0, 0.5) * pass_s)
        if not killed:
            _finish(proc)
        survived.append((killed, done, _passes_saved(run)))
        _check_whole(run)
    print("kills (killed, passes saved before, after):", survived)
    assert sum(k for k, _, _ in survived) >= N_KILLS - 1, survived  # at most the last one may come too late
    proc = _start(argv)
    _finish(proc)
    want, _ = read_tensors(reference / MODEL_FILE)
    got, _ = read_tensors(run / MODEL_FILE)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert (run / MODEL_FILE).read_bytes() == (reference / MODEL_FILE).read_bytes()
    epochs = [json.loads(x)["epoch"] for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert epochs == list(range(total))
    leftovers = sorted(p.name for p in run.rglob(".*.tmp"))
    print("temporary files left by kills:", leftovers)
    named = [p for p in run.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert all(p.stat().st_size > 0 for p in named)
