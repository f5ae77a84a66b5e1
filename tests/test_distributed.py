"""Training and testing under torchrun: 2 CPU processes (gloo) against one process on the tiny data.

A torchrun launch costs three interpreters importing torch (two import timm too), so there is one:
a small driver that calls ``hgad.cli.main`` (what ``torchrun -m hgad`` runs) for five commands in
the same 2-process group: a fresh run, a resume, ``test`` in both protocols, a NaN on one rank, and
a batch that does not split over the ranks.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hgad
from conftest import TINY, tiny_flags
from hgad import training
from hgad.checkpoint import MODEL_FILE, read_tensors
from hgad.cli import main
from hgad.config import preset
from hgad.data import discover
from hgad.distributed import DistContext, check_batch_size, rank_slice, shard_batches, stage_parameters
from hgad.errors import ConfigError
from hgad.model import HGAD

# Final weights of 2 gloo processes vs one process, same global batch (4) and seed: the largest
# per-tensor difference relative to that tensor's largest magnitude. Measured on the 2-core dev box:
# 1.4e-6 and, after a later flow change, 4.0e-6 (max abs 3.4e-7), from summation order only (per-rank
# means averaged by DDP vs one mean; Adam magnifies it where a gradient is near zero). Broken variants
# measured on the same data: gradients summed instead of averaged 1.1e-2 (Adam is nearly invariant to
# the gradient scale, but its weight decay and eps are not); no all-reduce at all (each rank steps on
# its own half batch) 1.1. So 1e-4 leaves 25x headroom for other CPUs and still fails both by >100x.
RTOL = 1e-4

_DRIVER = '''
import json, os, sys
from pathlib import Path
from hgad.cli import main
from hgad.model import HGAD

jobs, rc_dir = json.loads(sys.argv[1]), Path(sys.argv[2])
rank = int(os.environ["RANK"])
for name, argv, nan_rank in jobs:
    if nan_rank == rank:  # a non-finite loss on this rank only, at its 3rd step
        real, calls = HGAD.loss, []
        def loss(self, *args, **kw):
            terms = real(self, *args, **kw)
            calls.append(1)
            if len(calls) == 3:
                terms["total"] = terms["total"] * float("nan")
            return terms
        HGAD.loss = loss
    (rc_dir / f"{name}.{rank}").write_text(str(main(argv)))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(target: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2`` on 127.0.0.1 with gloo, one thread per process."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(hgad.__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    loopback = {name for _, name in socket.if_nameindex()} & {"lo", "lo0"}
    if loopback:
        env["GLOO_SOCKET_IFNAME"] = loopback.pop()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *target]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _rel_diff(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor: max |got - ref| / max |ref| over finite entries (non-float tensors must be equal)."""
    assert got.keys() == ref.keys()
    out = {}
    for key, r in ref.items():
        g = got[key]
        if not r.is_floating_point():
            assert torch.equal(g, r), key
            continue
        if r.numel() == 0:
            continue
        finite = torch.isfinite(r)
        assert torch.equal(finite, torch.isfinite(g)), key
        r, g = r[finite].double(), g[finite].double()
        out[key] = float((g - r).abs().max() / r.abs().max().clamp_min(1e-6))
    return out


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


# ---- pure helpers ------------------------------------------------------------------------------------
def test_global_batch_is_split_by_stride_and_must_divide():
    ranks = [DistContext(rank=r, world_size=2, device=torch.device("cpu")) for r in range(2)]
    batch = torch.tensor([5, 2, 7, 1])
    assert rank_slice(batch, ranks[0]).tolist() == [5, 7]
    assert rank_slice(batch, ranks[1]).tolist() == [2, 1]
    assert rank_slice(batch, None).tolist() == [5, 2, 7, 1]
    check_batch_size(4, ranks[0])
    check_batch_size(3, None)
    with pytest.raises(ConfigError, match="--batch-size: 3 images per step cannot be split evenly over 2"):
        check_batch_size(3, ranks[1])
    # whole batches alternate between ranks; together they are the single-process batches
    assert shard_batches(7, 3, None) == [[0, 1, 2], [3, 4, 5], [6]]
    assert shard_batches(7, 3, ranks[0]) == [[0, 1, 2], [6]]
    assert shard_batches(7, 3, ranks[1]) == [[3, 4, 5]]
    assert shard_batches(2, 3, ranks[1]) == []


def test_stage_parameters_are_exactly_those_with_gradients(tiny_data: Path):
    catalog = discover([f"mvtec:{tiny_data}"], need_test=False)
    for overrides, stage in (({}, 1), ({}, 2), ({"n_intra": 1}, 2), ({"prior": "gaussian"}, 2)):
        model = HGAD(preset("fast", **{**TINY, **overrides}), catalog.classes)
        feats = [torch.randn(2, d, 4, 4) for d in model.backbone.feature_dims]
        model.loss(feats, torch.tensor([0, 1]), stage)["total"].backward()
        with_grad = {id(p) for g in model.param_groups(0.0) for p in g["params"] if p.grad is not None}
        assert {id(p) for p in stage_parameters(model, stage)} == with_grad
    assert len(with_grad) < len(list(model.parameters()))  # the frozen backbone is never in


# ---- end to end under torchrun --------------------------------------------------------------------------
class _Interrupted(Exception):
    pass


def _one_process_runs(tiny_data: Path, root: Path, whole: list[str]) -> tuple[Path, Path]:
    """The one-process reference run, and a one-process run stopped right after the checkpoint of pass 1 (of
    2), for --resume under torchrun."""
    resumed = root / "resumed"
    real_save = training.save_resume_state

    def save_then_stop(run_dir, model, optimizer, progress):
        real_save(run_dir, model, optimizer, progress)
        if progress["epoch"] == 1:
            raise _Interrupted

    catalog = discover([f"mvtec:{tiny_data}"], need_test=False)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(_Interrupted):
        mp.setattr(training, "save_resume_state", save_then_stop)
        training.fit(HGAD(preset("fast", **TINY, calibration_split=0.0), catalog.classes), catalog.train, resumed,
                     progress=False, log=lambda *_: None, extra_config={"data": [f"mvtec:{tiny_data}"]})
    assert not (resumed / MODEL_FILE).exists()
    # the one-process reference: all 16 training images, no calibration hold-out (DDP equals one process
    # to rounding on this data; with 12 images it differs by ~4e-3, with or without a hold-out)
    reference = root / "reference"
    assert main(["train", "--data", f"mvtec:{tiny_data}", "--out", str(reference), "--no-progress", *whole]) == 0
    return reference, resumed


@pytest.fixture(scope="module")
def ddp(tiny_data: Path, tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One torchrun launch of 2 processes running six hgad commands; their folders, exit codes and output."""
    root = tmp_path_factory.mktemp("ddp")
    # the one-process runs use one thread, as each rank does: the backbone's float rounding depends on the
    # thread count (~1e-5), and where that crosses a step of the fp16 feature cache it becomes ~1e-3
    data = f"mvtec:{tiny_data}"
    whole = [*tiny_flags(), "--calibration-split", "0"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference, resumed = _one_process_runs(tiny_data, root, whole)
    finally:
        torch.set_num_threads(threads)
    jobs = [["fresh", ["train", "--data", data, "--out", str(root / "fresh"), "--no-progress", *whole], -1],
            ["resume", ["train", "--resume", "--out", str(resumed), "--no-progress"], -1],
            *[[f"test-{p}", ["test", str(tiny_run), "--protocol", p, "--out", str(root / f"test-{p}"),
                             "--no-report", "--no-progress"], -1] for p in ("deploy", "paper")],
            ["nan", ["train", "--data", data, "--out", str(root / "nan"), "--no-progress", *tiny_flags()], 1],
            ["odd", ["train", "--data", data, "--out", str(root / "odd"), *tiny_flags(batch_size=3)], -1]]
    driver = root / "driver.py"
    driver.write_text(_DRIVER)
    rc_dir = root / "rc"
    rc_dir.mkdir()
    proc = _torchrun([str(driver), json.dumps(jobs), str(rc_dir)])
    return {"root": root, "reference": reference, "output": proc.stdout + proc.stderr, "stdout": proc.stdout,
            "rc": {p.name: int(p.read_text()) for p in rc_dir.iterdir()}}


def _max_rel(run: Path, ref: Path) -> tuple[float, list]:
    diff = _rel_diff(read_tensors(run / MODEL_FILE)[0], read_tensors(ref / MODEL_FILE)[0])
    return max(diff.values()), sorted(diff.items(), key=lambda kv: -kv[1])[:5]


@pytest.mark.slow
def test_every_command_ran_on_both_ranks(ddp: dict):
    expected = {f"{job}.{rank}": 2 if job in ("nan", "odd") else 0
                for job in ("fresh", "resume", "test-deploy", "test-paper", "nan", "odd") for rank in (0, 1)}
    assert ddp["rc"] == expected, ddp["output"]


@pytest.mark.slow
def test_ddp_training_equals_one_process(ddp: dict):
    out, tiny_run = ddp["root"] / "fresh", ddp["reference"]
    worst, top = _max_rel(out, tiny_run)
    assert worst < RTOL, top
    assert ddp["stdout"].count(f"run written to {out}\n") == 1  # rank 0 alone prints
    log, ref_log = _log(out), _log(tiny_run)
    assert [r["epoch"] for r in log] == [0, 1]  # rank 0 alone logs
    for row, ref_row in zip(log, ref_log):
        for key in (k for k in ref_row if k.startswith("loss_")):
            assert row[key] == pytest.approx(ref_row[key], rel=1e-5), key
    assert json.loads((out / "train_summary.json").read_text())["processes"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_run.iterdir()
                                                           if not p.name.startswith("test-"))


@pytest.mark.slow
def test_ddp_resume_lands_on_the_uninterrupted_weights(ddp: dict):
    run = ddp["root"] / "resumed"
    assert f"resuming from {run / 'last.safetensors'} at pass 1 of 2" in ddp["stdout"]
    assert [r["epoch"] for r in _log(run)] == [0, 1]
    worst, top = _max_rel(run, ddp["reference"])
    assert worst < RTOL, top


@pytest.mark.slow
def test_ddp_test_gathers_the_one_process_scores(ddp: dict, tiny_run: Path, tmp_path: Path):
    torch.set_num_threads(1)  # as each torchrun worker: then the scores agree to the last bit here
    try:
        for protocol in ("deploy", "paper"):
            one_dir, two_dir = tmp_path / f"one-{protocol}", ddp["root"] / f"test-{protocol}"
            assert main(["test", str(tiny_run), "--protocol", protocol, "--out", str(one_dir), "--no-report",
                         "--no-progress"]) == 0
            one, two = (list(csv.reader((d / "image_scores.csv").open())) for d in (one_dir, two_dir))
            assert len(two) == len(one) == 1 + 9
            for a, b in zip(one[1:], two[1:]):
                assert a[:4] + a[5:] == b[:4] + b[5:]  # path, class, label, defect, scored_as, in order
                assert float(b[4]) == pytest.approx(float(a[4]), abs=1e-6)
            m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one_dir, two_dir))
            assert m2["mean"] == pytest.approx(m1["mean"], abs=1e-6)
    finally:
        torch.set_num_threads(2)


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_stops_both(ddp: dict):
    # rank 1 alone sees a NaN at step 3: both ranks stop with the same one-line error, nobody hangs
    assert ddp["output"].count("hgad train: error: non-finite loss term total at pass 1, step 3;") == 2
    assert not (ddp["root"] / "nan").exists()  # failed before any checkpoint: rank 0 removed the new folder


@pytest.mark.slow
def test_batch_that_does_not_split_is_refused_before_any_write(ddp: dict):
    assert ddp["output"].count("hgad train: error: --batch-size: 3 images per step cannot be split evenly "
                               "over 2 processes (use a multiple of 2)") == 2
    assert not (ddp["root"] / "odd").exists()
