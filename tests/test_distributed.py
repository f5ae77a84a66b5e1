"""Training and testing under torchrun: 2 CPU processes (gloo) against one process on the tiny data.

Each torchrun launch costs ~10-25 s here (two interpreters importing torch and timm on 2 cores), so
there are two: the plain CLI for a fresh DDP run, and one small driver that calls ``hgad.cli.main``
several times inside the same process group (resume, test in both protocols, the non-finite guard).
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
# 1.4e-6 (max abs 9.5e-7), from summation order only (per-rank means averaged by DDP vs one mean).
# Broken variants measured with the same data: gradients summed instead of averaged 8.7e-3 (Adam is
# nearly scale-invariant, but weight decay and eps are not); no all-reduce at all (each rank steps on
# its own half batch) 1.0. So 2e-5 leaves >10x headroom for other CPUs and still fails both by >400x.
RTOL = 2e-5

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
           "PYTHONPATH": os.pathsep.join([str(Path(hgad.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
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
    for n_intra, stage in ((3, 1), (3, 2), (1, 2)):
        model = HGAD(preset("fast", **{**TINY, "n_intra": n_intra}), catalog.classes)
        feats = [torch.randn(2, d, 4, 4) for d in model.backbone.feature_dims]
        model.loss(feats, torch.tensor([0, 1]), stage)["total"].backward()
        with_grad = {id(p) for g in model.param_groups(0.0) for p in g["params"] if p.grad is not None}
        assert {id(p) for p in stage_parameters(model, stage)} == with_grad
    assert len(with_grad) < len(list(model.parameters()))  # the frozen backbone is never in


# ---- end to end under torchrun --------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_training_equals_one_process(tiny_data: Path, tiny_run: Path, tmp_path: Path):
    out = tmp_path / "ddp"
    proc = _torchrun(["-m", "hgad", "train", "--data", f"mvtec:{tiny_data}", "--out", str(out), "--no-progress",
                      *tiny_flags()])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("run written to") == 1  # rank 0 alone prints
    got, _ = read_tensors(out / MODEL_FILE)
    ref, _ = read_tensors(tiny_run / MODEL_FILE)
    diff = _rel_diff(got, ref)
    assert max(diff.values()) < RTOL, sorted(diff.items(), key=lambda kv: -kv[1])[:5]
    assert max(diff.values()) > 0  # really two processes: summation order differs somewhere
    log, ref_log = _log(out), _log(tiny_run)
    assert [r["epoch"] for r in log] == [0, 1]  # one writer
    for row, ref_row in zip(log, ref_log):
        for key in (k for k in ref_row if k.startswith("loss_")):
            assert row[key] == pytest.approx(ref_row[key], rel=1e-5), key
    assert json.loads((out / "train_summary.json").read_text())["processes"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_run.iterdir()
                                                           if not p.name.startswith("test-"))


class _Interrupted(Exception):
    pass


@pytest.mark.slow
def test_ddp_resume_test_sharding_and_nonfinite_guard(tiny_data: Path, tiny_run: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch):
    # a one-process run stopped right after the checkpoint of pass 1 (of 2)
    run = tmp_path / "resumed"
    real_save = training.save_resume_state

    def save_then_stop(run_dir, model, optimizer, progress):
        real_save(run_dir, model, optimizer, progress)
        if progress["epoch"] == 1:
            raise _Interrupted

    monkeypatch.setattr(training, "save_resume_state", save_then_stop)
    catalog = discover([f"mvtec:{tiny_data}"], need_test=False)
    with pytest.raises(_Interrupted):
        training.fit(HGAD(preset("fast", **TINY), catalog.classes), catalog.train, run, progress=False,
                     log=lambda *_: None, extra_config={"data": [f"mvtec:{tiny_data}"]})
    monkeypatch.undo()
    assert not (run / MODEL_FILE).exists()

    # one process, one thread (as each torchrun worker): the reference test reports
    torch.set_num_threads(1)
    try:
        for protocol in ("deploy", "paper"):
            assert main(["test", str(tiny_run), "--protocol", protocol, "--out", str(tmp_path / f"one-{protocol}"),
                         "--no-report", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(2)

    bad = tmp_path / "nan"
    jobs = [["resume", ["train", "--resume", "--out", str(run), "--no-progress"], -1],
            *[[f"test-{p}", ["test", str(tiny_run), "--protocol", p, "--out", str(tmp_path / f"two-{p}"),
                             "--no-report", "--no-progress"], -1] for p in ("deploy", "paper")],
            ["nan", ["train", "--data", f"mvtec:{tiny_data}", "--out", str(bad), "--no-progress", *tiny_flags()], 1]]
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    proc = _torchrun([str(driver), json.dumps(jobs), str(tmp_path)])
    output = proc.stdout + proc.stderr
    rcs = {p.name: int(p.read_text()) for p in tmp_path.glob("*.[01]")}
    assert rcs == {"resume.0": 0, "resume.1": 0, "test-deploy.0": 0, "test-deploy.1": 0, "test-paper.0": 0,
                   "test-paper.1": 0, "nan.0": 2, "nan.1": 2}, output

    # resume: continues at pass 2 and lands on the uninterrupted one-process weights
    assert "resuming from" in output
    assert [r["epoch"] for r in _log(run)] == [0, 1]
    diff = _rel_diff(read_tensors(run / MODEL_FILE)[0], read_tensors(tiny_run / MODEL_FILE)[0])
    assert max(diff.values()) < RTOL, sorted(diff.items(), key=lambda kv: -kv[1])[:5]

    # test: batches alternate between the ranks, rank 0 gathers and writes; same scores as one process
    for protocol in ("deploy", "paper"):
        one, two = (list(csv.reader(open(tmp_path / f"{k}-{protocol}" / "image_scores.csv"))) for k in ("one", "two"))
        assert len(two) == len(one) == 1 + 9
        for a, b in zip(one[1:], two[1:]):
            assert a[:4] + a[5:] == b[:4] + b[5:]  # path, class, label, defect, predicted class, in order
            assert float(b[4]) == pytest.approx(float(a[4]), abs=1e-6)
        m1, m2 = (json.loads((tmp_path / f"{k}-{protocol}" / "metrics.json").read_text()) for k in ("one", "two"))
        assert m2["mean"] == pytest.approx(m1["mean"], abs=1e-6)

    # a NaN loss on rank 1 only: both ranks stop with the same one-line error, nobody hangs
    assert output.count("hgad train: error: non-finite loss term total at pass 1, step 3") == 2
    assert not bad.exists()  # failed before any checkpoint: rank 0 removed the fresh run folder
