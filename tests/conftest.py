"""Shared fixtures: a tiny two-class MVTec-layout dataset and one tiny trained run (session scope)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from builders import make_mvtec

torch.set_num_threads(2)

# small enough to train in seconds on 2 CPU cores, big enough to exercise every code path
TINY: dict = {"img_size": 128, "pyramid_levels": 2, "n_blocks": 2, "pos_dim": 16, "n_intra": 3,
              "meta_epochs": 2, "sub_epochs": 1, "stage1_epochs": 1, "warmup_epochs": 1, "batch_size": 4,
              "map_size": 64, "blur_sigma": 1.0, "seed": 0}


def tiny_flags(**overrides) -> list[str]:
    """TINY (plus overrides) as command-line flags."""
    flags = []
    for key, value in {**TINY, **overrides}.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "mvtec"
    return make_mvtec(root, {"bottle": {"broken": 2, "crack": 1}, "alpha": {"hole": 2}}, n_train=8, n_good=2)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data) -> Path:
    from hgad.cli import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "--data", f"mvtec:{tiny_data}", "--out", str(out), "--no-progress", *tiny_flags()]) == 0
    return out
