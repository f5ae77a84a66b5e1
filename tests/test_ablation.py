"""Ablation switches really remove their component, and ``hgad ablate`` runs, writes its table and resumes.

Loss references are written here by hand from the spec's formulas (explicit pairwise differences,
no code shared with ``hgad.losses``); a switch passes when the model's loss *and its gradients* equal
the reference without the component, and the same model with the switch on differs.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_flags
from hgad.ablate import RUNGS
from hgad.cli import add_config_flags, main, resolve_config
from hgad.config import HGADConfig
from hgad.data import discover
from hgad.model import HGAD
from hgad.training import fit

# smaller than TINY: one pass, stage 2 from the start (every loss term is exercised), 64-px images
MICRO = {"img_size": 64, "n_blocks": 1, "pos_dim": 8, "n_intra": 2, "meta_epochs": 1, "stage1_epochs": 0,
         "warmup_epochs": 0, "map_size": 32}
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _cfg(*flags: str) -> HGADConfig:
    """The config the CLI builds from MICRO settings plus ``flags`` (so the switches' flag names are tested)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="fast")
    add_config_flags(parser)
    return resolve_config(parser.parse_args([*tiny_flags(**MICRO), *flags]))


@pytest.fixture(scope="module")
def backbone():
    return HGAD(_cfg(), ["a", "b", "c"]).backbone


def _model(backbone, *flags: str) -> HGAD:
    return HGAD(_cfg(*flags), ["a", "b", "c"], backbone=backbone)


@pytest.fixture(scope="module")
def batch(backbone):
    gen = torch.Generator().manual_seed(7)
    dims = backbone.feature_dims
    feats = [torch.randn(3, d, 3 - lvl, 3 - lvl, generator=gen) for lvl, d in enumerate(dims)]
    return feats, torch.tensor([0, 1, 2])


def _sqdist(z: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    return ((z[:, None, :] - mu[None, :, :]) ** 2).sum(-1)


def _ref_g(z, logdet, mu, phi):
    logits = -0.5 * _sqdist(z, mu) + torch.log_softmax(phi, 0)
    return ((-torch.logsumexp(logits, 1) - logdet) / z.shape[1]).mean()


def _ref_mi(z, labels, mu, phi):
    log_pi = torch.log_softmax(phi, 0).detach()
    post = torch.log_softmax(-0.5 * _sqdist(z, mu) + log_pi, 1)
    target = 0.98 * F.one_hot(labels, mu.shape[0]).float() + 0.02 / mu.shape[0]
    return (target * (post - log_pi)).sum(1).mean()


def _ref_e(z, mu):
    p = torch.softmax(-0.5 * _sqdist(z, mu), 1)
    return -(p * torch.log(p)).sum(1).mean()


def _ref_gauss(z, logdet):
    d = z.shape[1]
    return ((d * HALF_LOG_2PI + 0.5 * (z * z).sum(1) - logdet) / d).mean()


def _reference(model: HGAD, feats, labels, *, g=1.0, mi=0.0, e=0.0, gauss=False) -> torch.Tensor:
    """Hand-written objective summed over scales: g*L_g - mi*L_mi + e*L_e (or the N(0, I) NLL)."""
    total = torch.zeros(())
    for lvl, feat in enumerate(feats):
        z, logdet = model.encode(feat, lvl)
        if gauss:
            total = total + _ref_gauss(z, logdet)
            continue
        prior = model.priors[lvl]
        vec_labels = labels.repeat_interleave(feat.shape[2] * feat.shape[3])
        total = total + g * _ref_g(z, logdet, prior.mu, prior.phi)
        if mi:
            total = total - mi * _ref_mi(z, vec_labels, prior.mu, prior.phi)
        if e:
            total = total + e * _ref_e(z, prior.mu)
    return total


def _grads(model: HGAD, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()
            if not n.startswith("backbone.")}


def _assert_same_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in got:
        if want[name] is None:
            assert got[name] is None or not got[name].any(), name
        else:
            assert got[name] is not None, name
            # relative to the gradient's norm: float32 distances in another form, times lambda2 = 100
            assert (got[name] - want[name]).norm() <= 1e-4 * want[name].norm() + 1e-8, name


def _full_grad_of_mu(backbone, batch, stage: int, twin: HGAD) -> torch.Tensor:
    """Gradient of mu in the default model (every component on), which has ``twin``'s weights."""
    full = _model(backbone)
    for name, value in twin.trainable_state().items():
        assert torch.equal(full.trainable_state()[name], value), name
    return _grads(full, full.loss(*batch, stage=stage)["total"])["priors.0.mu"]


def test_no_mi_removes_the_mi_term_from_loss_and_gradient(backbone, batch):
    model = _model(backbone, "--no-mi")
    terms = model.loss(*batch, stage=1)
    assert set(terms) == {"g", "e", "total"}
    got = _grads(model, terms["total"])
    _assert_same_grads(got, _grads(model, _reference(model, *batch, g=1.0, e=1.0)))
    phi_from_g = _grads(model, _reference(model, *batch, g=1.0))
    for lvl in range(len(batch[0])):
        torch.testing.assert_close(got[f"priors.{lvl}.phi"], phi_from_g[f"priors.{lvl}.phi"])
    # the same weights with MI on (the default) do get a different gradient: the switch matters
    with_mi = _full_grad_of_mu(backbone, batch, stage=1, twin=model)
    assert (with_mi - got["priors.0.mu"]).abs().max() > 1e-3


def test_no_entropy_loss_removes_the_entropy_term(backbone, batch):
    model = _model(backbone, "--no-entropy-loss")
    terms = model.loss(*batch, stage=1)
    assert set(terms) == {"g", "mi", "total"}
    got = _grads(model, terms["total"])
    _assert_same_grads(got, _grads(model, _reference(model, *batch, g=1.0, mi=100.0)))
    assert (_full_grad_of_mu(backbone, batch, stage=1, twin=model) - got["priors.0.mu"]).abs().max() > 1e-3


def test_one_intra_centre_means_no_intra_mixture(backbone, batch):
    model = _model(backbone, "--intra-centers", "1")
    terms = model.loss(*batch, stage=2)
    assert set(terms) == {"g", "mi", "e", "total"}  # no "in" / "z" even in stage 2
    got = _grads(model, terms["total"])
    _assert_same_grads(got, _grads(model, _reference(model, *batch, g=1.0, mi=100.0, e=1.0)))
    for prior in model.priors:
        assert prior.delta.numel() == 0 and prior.delta.grad is None and prior.psi.grad is None
    # scoring uses the class's own Gaussian N(mu_y, I): nothing untrained enters the anomaly map
    feats, labels = batch
    lm = model.latent_maps(feats, labels)
    z, logdet = model.encode(feats[0], 0)
    d = z.shape[1]
    mu_y = model.priors[0].mu[labels.repeat_interleave(9)]
    want = (-d * HALF_LOG_2PI - 0.5 * ((z - mu_y) ** 2).sum(1) + logdet) / d
    torch.testing.assert_close(lm.logp[0].flatten(), want.detach(), rtol=1e-5, atol=1e-5)
    # with 2 centres the intra terms are there and train psi
    two = _model(backbone, "--intra-centers", "2")
    terms2 = two.loss(*batch, stage=2)
    assert {"in", "z"} <= set(terms2)
    assert _grads(two, terms2["total"])["priors.0.psi"].abs().max() > 0


def test_gaussian_prior_has_no_prior_parameters(backbone, batch):
    model = _model(backbone, "--prior", "gaussian")
    assert model.priors is None and model.score_kind("product") == "logp"  # no posterior, no entropy
    assert not [n for n, _ in model.named_parameters() if "prior" in n]
    assert [g["name"] for g in model.param_groups(1e-4)] == ["flows"]
    for stage in (1, 2):
        terms = model.loss(*batch, stage=stage)
        assert set(terms) == {"g", "total"}
        ref = _reference(model, *batch, gauss=True)
        torch.testing.assert_close(terms["total"], ref)
    _assert_same_grads(_grads(model, model.loss(*batch, stage=2)["total"]), _grads(model, ref))
    lm = model.latent_maps(batch[0], batch[1])
    z, logdet = model.encode(batch[0][0], 0)
    want = (-z.shape[1] * HALF_LOG_2PI - 0.5 * (z * z).sum(1) + logdet) / z.shape[1]
    torch.testing.assert_close(lm.logp[0].flatten(), want.detach(), rtol=1e-5, atol=1e-5)
    assert lm.ent is None


def test_no_two_stage_trains_intra_terms_from_the_first_pass(backbone, tiny_data, tmp_path):
    # one stage-1 meta-epoch is asked for; --no-two-stage must override it (training.fit picks the stage)
    cfg = _cfg("--stage1-epochs", "1", "--no-two-stage")
    assert (cfg.stage1_epochs, cfg.two_stage) == (1, False)
    catalog = discover([f"mvtec:{tiny_data}"], need_test=False)
    fit(HGAD(cfg, catalog.classes, backbone=backbone), catalog.train, tmp_path, progress=False,
        log=lambda *_: None)
    first = json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[0])
    assert first["epoch"] == 0 and first["stage"] == 2
    assert "loss_in" in first and "loss_z" in first


def test_ablate_runs_every_rung_and_resumes(tiny_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "abl"
    # one 128-px scale: its 8x8 map has cells inside the defect boxes, so there are anomalous vectors
    flags = tiny_flags(**{**MICRO, "img_size": 128, "pyramid_levels": 1})
    argv = ["ablate", "--data", f"mvtec:{tiny_data}", "--out", str(out), "--no-progress", *flags]
    assert main(argv) == 0
    payload = json.loads((out / "ablation.json").read_text())
    assert [r["name"] for r in payload["rungs"]] == [r.name for r in RUNGS]
    assert payload["protocol"] == "deploy" and payload["class_source"] == "known"
    base, gmm, mi, ent, full = payload["rungs"]
    assert (base["prior"], base["score"], base["n_intra"]) == ("gaussian", "knn", None)
    assert (gmm["use_mi"], gmm["use_entropy"], gmm["n_intra"]) == (False, False, 1)
    assert (mi["use_mi"], mi["use_entropy"], ent["use_entropy"], ent["n_intra"]) == (True, False, True, 1)
    assert (full["n_intra"], full["score"]) == (2, "knn")  # the fast preset's score
    for row in payload["rungs"]:
        assert 0 <= row["mean"]["image_auroc"] <= 1 and 0 <= row["vector_auroc"] <= 1
        assert row["n_vectors"]["normal"] > 0 and row["n_vectors"]["anomalous"] > 0
        saved = json.loads((out / row["folder"] / "config.json").read_text())["config"]
        assert saved["seed"] == 0 and saved["meta_epochs"] == 1  # same seed and schedule everywhere
        assert saved["knn_space"] == "latent"  # the map reads what the rung trained, not the flow's input
    assert set(payload["score_variants"]) == {"product", "logp", "entropy", "mahalanobis", "knn",
                                              "mahalanobis+knn"}
    assert payload["score_variants"]["knn"] == full["mean"]
    assert payload["score_variants"]["logp"] != payload["score_variants"]["entropy"]
    md = (out / "ablation.md").read_text()
    assert "class source `known`" in md and "| 5 | +intra |" in md
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"

    # second run: nothing is trained or tested again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")}

    def forbidden(*_a, **_k):
        raise AssertionError("a finished rung was recomputed")

    monkeypatch.setattr("hgad.training.fit", forbidden)
    monkeypatch.setattr("hgad.evaluation.evaluate", forbidden)
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("skipped") == len(RUNGS)
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")}
    assert json.loads((out / "ablation.json").read_text())["rungs"][2]["mean"] == mi["mean"]

    # a rung whose test is missing is tested again (not retrained), with the same result
    monkeypatch.undo()
    monkeypatch.setattr("hgad.training.fit", forbidden)
    (out / "3-mi" / "test-deploy-known" / "metrics.json").unlink()
    assert main(argv) == 0
    assert json.loads((out / "ablation.json").read_text())["rungs"][2]["mean"] == mi["mean"]

    # other settings in the same folder are refused (the numbers would mix), as are ladder flags
    assert main([*argv, "--seed", "1"]) == 2
    assert "other settings (seed)" in capsys.readouterr().err
    assert main([*argv, "--no-mi"]) == 2
    assert "--mi/--no-mi" in capsys.readouterr().err
    assert main([*argv, "--intra-centers", "1"]) == 2  # the full rung would equal the +entropy rung
    assert "--intra-centers: the full-HGAD rung needs at least 2" in capsys.readouterr().err
