"""Training: schedule, feature cache, resume, non-finite guard, determinism, presets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import TINY
from hgad.checkpoint import MODEL_FILE, RESUME_FILE, load_model, read_tensors
from hgad.config import HGADConfig, preset
from hgad.data import discover
from hgad.errors import ConfigError, TrainingError
from hgad.model import HGAD
from hgad.training import FeatureStore, epoch_order, fit, learning_rate


def _fit(data: Path, out: Path, **overrides) -> HGAD:
    cfg = preset("fast", **{**TINY, **overrides})
    catalog = discover([f"mvtec:{data}"], need_test=False)
    model = HGAD(cfg, catalog.classes)
    fit(model, catalog.train, out, progress=False, log=lambda *_: None)
    return model


def test_learning_rate_schedule_by_hand():
    cfg = HGADConfig(lr=1e-3, meta_epochs=10, warmup_epochs=2)
    eta_min = 1e-6
    cos_at = [eta_min + (1e-3 - eta_min) * (1 + math.cos(math.pi * e / 10)) / 2 for e in range(10)]
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(1e-4)  # warm-up starts at lr / 10
    # halfway through warm-up (meta-epoch 1 start): midpoint between lr/10 and the cosine value at epoch 2
    assert learning_rate(cfg, 1, 0.0) == pytest.approx((1e-4 + cos_at[2]) / 2)
    assert learning_rate(cfg, 5, 0.3) == pytest.approx((1e-3 + eta_min) / 2)  # cos(pi/2) = 0
    assert learning_rate(cfg, 9, 0.9) == pytest.approx(cos_at[9])
    assert cos_at[9] > eta_min


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert torch.equal(epoch_order(0, 3, 10), epoch_order(0, 3, 10))
    assert not torch.equal(epoch_order(0, 3, 10), epoch_order(0, 4, 10))
    assert sorted(epoch_order(1, 0, 10).tolist()) == list(range(10))


def test_fit_writes_run_and_logs_all_terms(tiny_run: Path):
    for name in ("config.json", MODEL_FILE, RESUME_FILE, "train_log.jsonl", "train_summary.json"):
        assert (tiny_run / name).is_file(), name
    log = [json.loads(line) for line in (tiny_run / "train_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [1, 2]
    assert {"loss_g", "loss_mi", "loss_e", "loss_total"} <= set(log[0])
    assert {"loss_in", "loss_z"} <= set(log[1])
    assert all(math.isfinite(v) for r in log for k, v in r.items() if k.startswith("loss_"))
    model = load_model(tiny_run)
    assert bool(model.calibrated) and torch.isfinite(model.threshold).all()
    assert torch.isfinite(model.logp_max).all() and torch.isfinite(model.ent_max).all()


def test_cache_gives_the_same_loss_curve(tiny_data: Path, tmp_path: Path):
    logs = {}
    for mode, dtype in (("none", "float32"), ("memory", "float32"), ("disk", "float32"), ("memory", "float16")):
        out = tmp_path / f"{mode}-{dtype}"
        _fit(tiny_data, out, cache=mode, cache_dtype=dtype)
        logs[mode, dtype] = [json.loads(x)["loss_total"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    ref = logs["none", "float32"]
    assert logs["memory", "float32"] == pytest.approx(ref, rel=1e-5)
    assert logs["disk", "float32"] == pytest.approx(ref, rel=1e-5)
    assert logs["memory", "float16"] == pytest.approx(ref, rel=2e-2)
    assert (tmp_path / "disk-float32" / "cache" / "scale0.npy").is_file()


def test_same_seed_same_bytes_other_seed_differs(tiny_data: Path, tmp_path: Path):
    _fit(tiny_data, tmp_path / "a", seed=3)
    _fit(tiny_data, tmp_path / "b", seed=3)
    _fit(tiny_data, tmp_path / "c", seed=4)
    a, b, c = ((tmp_path / n / MODEL_FILE).read_bytes() for n in "abc")
    assert a == b
    assert a != c


def test_resume_after_interruption_gives_the_uninterrupted_weights(tiny_data: Path, tmp_path: Path, monkeypatch):
    overrides = {"meta_epochs": 3, "sub_epochs": 1, "seed": 5}
    _fit(tiny_data, tmp_path / "full", **overrides)

    import hgad.training as training

    real_save = training.save_resume_state
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if killed right after the second checkpoint

    monkeypatch.setattr(training, "save_resume_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _fit(tiny_data, tmp_path / "cut", **overrides)
    monkeypatch.setattr(training, "save_resume_state", real_save)
    assert not (tmp_path / "cut" / MODEL_FILE).exists()

    cfg = preset("fast", **{**TINY, **overrides})
    catalog = discover([f"mvtec:{tiny_data}"], need_test=False)
    model = HGAD(cfg, catalog.classes)
    result = fit(model, catalog.train, tmp_path / "cut", resume=True, progress=False, log=lambda *_: None)
    assert result.steps == 1 * (16 // 4)  # only the third pass was redone
    full, _ = read_tensors(tmp_path / "full" / MODEL_FILE)
    cut, _ = read_tensors(tmp_path / "cut" / MODEL_FILE)
    assert full.keys() == cut.keys()
    for k in full:
        assert torch.equal(full[k], cut[k]), k
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_non_finite_loss_stops_with_message_and_keeps_checkpoint(tiny_data: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "nan"
    cfg = preset("fast", **TINY)
    catalog = discover([f"mvtec:{tiny_data}"], need_test=False)
    model = HGAD(cfg, catalog.classes)
    real_loss = HGAD.loss
    calls = {"n": 0}

    def poisoned(self, feats, labels, stage):
        terms = real_loss(self, feats, labels, stage)
        calls["n"] += 1
        if calls["n"] == 6:  # second pass, second step
            terms["mi"] = terms["mi"] * float("nan")
            terms["total"] = terms["total"] + terms["mi"]
        return terms

    monkeypatch.setattr(HGAD, "loss", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss term mi, total at pass 2, step 2"):
        fit(model, catalog.train, out, progress=False, log=lambda *_: None)
    state, meta = read_tensors(out / RESUME_FILE)
    assert json.loads(meta["progress"])["epoch"] == 1  # beside the tensors' sha256 (issue #14)
    # every weight is finite (the threshold stays +inf until calibration at the end of training)
    assert all(torch.isfinite(v).all() for k, v in state.items() if v.is_floating_point() and k != "model.threshold")
    assert not (out / MODEL_FILE).exists()


def test_batch_larger_than_data_is_a_config_error(tiny_data: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="--batch-size"):
        _fit(tiny_data, tmp_path / "x", batch_size=64)


def test_paper_preset_has_the_spec_shapes_and_trains_one_step(tmp_path: Path):
    cfg = preset("paper", backbone_weights="none", img_size=128, meta_epochs=1, sub_epochs=1)
    assert (cfg.n_blocks, cfg.pos_dim, cfg.n_intra, cfg.lambda2, cfg.batch_size) == (12, 256, 10, 100.0, 8)
    classes = [f"c{i}" for i in range(15)]
    model = HGAD(cfg, classes)
    assert model.backbone.feature_dims == [200, 200, 200]
    counts = model.flow_parameter_counts()
    print("paper preset trainable parameters per flow:", counts)
    assert counts == [4_766_208] * 3
    assert tuple(model.priors[0].mu.shape) == (15, 200)
    assert tuple(model.priors[0].delta.shape) == (15, 9, 200)
    images = torch.randn(2, 3, 128, 128)
    feats = model.extract(images)
    assert [tuple(f.shape[2:]) for f in feats] == [(8, 8), (4, 4), (2, 2)]
    opt = torch.optim.Adam(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    before = model.flows[0].blocks[0].global_offset.detach().clone()
    terms = model.loss(feats, torch.tensor([0, 3]), stage=1)
    terms["total"].backward()
    opt.step()
    assert torch.isfinite(terms["total"])
    assert not torch.equal(before, model.flows[0].blocks[0].global_offset)
    assert model.priors[0].delta.grad is None  # stage 1: intra-class offsets untouched


def test_feature_store_matches_backbone(tiny_data: Path):
    cfg = preset("fast", **TINY, cache_dtype="float32")
    catalog = discover([f"mvtec:{tiny_data}"], need_test=False)
    model = HGAD(cfg, catalog.classes)
    store = FeatureStore(model, catalog.train, cfg, progress=False)
    idx = torch.tensor([3, 0])
    images = torch.stack([store.dataset[3].image, store.dataset[0].image])
    for a, b in zip(store.get(idx), model.extract(images)):
        assert torch.allclose(a, b, atol=1e-6)
    # the memory bank's mirrored copies: the images flipped left to right before the backbone, cached or not
    for mode in ("memory", "none"):
        mirrored = FeatureStore(model, catalog.train, preset("fast", **TINY, cache_dtype="float32", cache=mode),
                                progress=False, hflip=True)
        for a, b in zip(mirrored.get(idx), model.extract(images.flip(-1))):
            assert torch.allclose(a, b, atol=1e-6)
