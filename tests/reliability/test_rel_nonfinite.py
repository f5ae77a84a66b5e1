"""A loss or gradient that stops being finite stops ``hgad train`` cleanly, from the command line.

No hook or injection: a learning rate of 1e30 is accepted by the config (it is positive) and really
blows the flows up within two steps. The first step moves every weight by about 1e30, so the next
step's loss is not finite. Two situations:

* continuing a finished 2-pass run for a third pass (``--resume --meta-epochs 3 --lr 1e30``): the
  message names pass 3, the step and the loss terms; ``last.safetensors`` and ``model.safetensors``
  are byte-for-byte untouched, and a later ``--resume`` at the normal rate finishes from them;
* a fresh run: the error names pass 1, no checkpoint exists yet, and no run folder is left behind.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from relhelp import assert_user_error, run_cli

from conftest import tiny_flags
from hgad.checkpoint import MODEL_FILE, RESUME_FILE, read_tensors

_MESSAGE = r"non-finite (loss term|gradient of) [a-z_, ]+ at pass {p}, step (\d+); training stopped"


def test_resume_into_a_diverging_pass_keeps_the_last_good_checkpoint(tiny_run: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("test-*"))
    before = {name: (run / name).read_bytes() for name in (RESUME_FILE, MODEL_FILE, "train_log.jsonl")}

    rc, err, _ = run_cli(["train", "--out", run, "--resume", "--meta-epochs", "3", "--lr", "1e30",
                          "--no-progress"], capsys)
    line = assert_user_error(rc, err, [f"last good checkpoint kept: {run / RESUME_FILE}"])
    match = re.search(_MESSAGE.format(p=3), line)
    assert match, line
    assert int(match.group(2)) >= 2  # step 1 of pass 3 is still finite: it is what blows the weights up
    assert "total" in line
    for name, data in before.items():
        assert (run / name).read_bytes() == data, name

    # the kept checkpoint is good: continuing at the run's own learning rate finishes the third pass
    rc, err, _ = run_cli(["train", "--out", run, "--resume", "--meta-epochs", "3", "--no-progress"], capsys)
    assert rc == 0, err
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    tensors, _ = read_tensors(run / MODEL_FILE)
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_fresh_run_that_diverges_leaves_no_run_folder(tiny_data: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    rc, err, _ = run_cli(["train", "--data", f"mvtec:{tiny_data}", "--out", out, "--no-progress",
                          *tiny_flags(lr=1e30)], capsys)
    line = assert_user_error(rc, err, ["no checkpoint was written yet"])
    assert re.search(_MESSAGE.format(p=1), line), line
    assert not out.exists()
