"""The accuracy levers of issue 12: backbone input normalisation, local feature averaging, re-scoring,
and a meaningful default score for a one-class model."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import tiny_flags
from hgad.backbone import FeatureExtractor, input_norm
from hgad.cli import main
from hgad.config import preset
from hgad.data import preprocess
from hgad.errors import ConfigError
from hgad.model import HGAD

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.mark.parametrize("name, expected", [
    ("tf_efficientnet_lite0", ((0.5,) * 3, (0.5,) * 3)),
    ("tf_efficientnet_lite2", ((0.5,) * 3, (0.5,) * 3)),
    ("tf_efficientnet_b6", IMAGENET),
    ("resnet18", IMAGENET),
])
def test_input_norm_is_each_backbones_own(name: str, expected) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert [v for t in input_norm(model) for v in t] == pytest.approx([v for t in expected for v in t])


def test_extractor_and_preprocess_use_the_backbone_norm() -> None:
    from PIL import Image

    ext = FeatureExtractor("tf_efficientnet_lite0", weights="none")
    assert ext.norm == ((0.5,) * 3, (0.5,) * 3)
    white = Image.new("RGB", (8, 8), (255, 255, 255))
    assert torch.allclose(preprocess(white, 8, ext.norm), torch.ones(3, 8, 8))  # (1 - 0.5) / 0.5


def test_feature_pool_is_a_local_average_of_the_plain_features() -> None:
    torch.manual_seed(0)
    plain = FeatureExtractor("test_efficientnet", mode="layers", taps=(1, 2), weights="none")
    pooled = FeatureExtractor("test_efficientnet", mode="layers", taps=(1, 2), weights="none", pool=3)
    pooled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for a, b in zip(plain(x), pooled(x)):
        assert b.shape == a.shape
        torch.testing.assert_close(b, F.avg_pool2d(a, 3, stride=1, padding=1, count_include_pad=False))
        # an inner vector is the mean of its 3x3 neighbourhood
        torch.testing.assert_close(b[:, :, 2, 2], a[:, :, 1:4, 1:4].mean((2, 3)))
    with pytest.raises(ConfigError, match="feature-pool"):
        FeatureExtractor("test_efficientnet", weights="none", taps=(1,), pool=2)


def _tiny_model(n_classes: int, **overrides: Any) -> HGAD:
    cfg = preset("fast", backbone="test_efficientnet", backbone_weights="none", taps=(1,), img_size=64,
                 pyramid_levels=2, n_blocks=1, pos_dim=8, n_intra=2, feature_mode="pyramid", **overrides)
    return HGAD(cfg, [f"c{i}" for i in range(n_classes)])


def test_one_class_product_score_falls_back_to_logp() -> None:
    """With one class the posterior is certain everywhere: the entropy map is identically 0, so the
    product would be a constant map; the log-likelihood map is used instead."""
    one, two = _tiny_model(1), _tiny_model(2)
    assert one.score_kind("product") == "logp" and one.score_kind() == "knn"  # needs no posterior
    assert two.score_kind("product") == "product" and two.score_kind("entropy") == "entropy"
    with pytest.raises(ConfigError, match="entropy needs"):
        one.score_kind("entropy")
    with pytest.raises(ConfigError, match="--score"):
        two.score_kind("nonsense")
    feats = one.extract(torch.randn(2, 3, 64, 64))
    lm = one.latent_maps(feats)
    assert all(float(e.abs().max()) < 1e-6 for e in lm.ent)  # the entropy map carries nothing


def test_test_rescore_writes_its_own_folder(tiny_run: Path, capsys) -> None:
    assert main(["test", str(tiny_run), "--score", "product", "--no-progress", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "score `product`" in out
    metrics = json.loads((tiny_run / "test-deploy-inferred-score-product" / "metrics.json").read_text())
    assert metrics["score"] == "product"
    assert main(["test", str(tiny_run), "--no-progress", "--no-report"]) == 0
    default = json.loads((tiny_run / "test-deploy-inferred" / "metrics.json").read_text())
    assert default["score"] == preset("fast").score
    assert default["mean"]["pixel_auroc"] != metrics["mean"]["pixel_auroc"]


def test_test_rescore_over_other_scales(tiny_run: Path, tiny_data: Path, capsys) -> None:
    import hgad
    from hgad.data import discover
    from hgad.evaluation import evaluate

    model = hgad.load(str(tiny_run), device="cpu").model
    catalog = discover([f"mvtec:{tiny_data}"], need_train=False)
    own = evaluate(model, catalog, progress=False)
    same = evaluate(model, catalog, progress=False, score_scales=model.cfg.score_scales)
    every = evaluate(model, catalog, progress=False, score_scales=0)
    assert model.cfg.score_scales == 1 and len(model.flows) == 2
    np.testing.assert_array_equal(same.scores, own.scores)
    assert same.thresholds is not None and every.thresholds is None  # calibrated for the run's own maps only
    assert not np.allclose(every.scores, own.scores)  # the coarse scale's z-map is added
    via_api = hgad.load(str(tiny_run), device="cpu").evaluate([f"mvtec:{tiny_data}"], score_scales=0)
    np.testing.assert_array_equal(via_api.scores, every.scores)
    assert main(["test", str(tiny_run), "--score-scales", "0", "--no-progress", "--no-report"]) == 0
    report = (tiny_run / "test-deploy-inferred-scales-0" / "metrics.json").read_text()
    assert "summed over all finest scale(s)" in report
    for bad in (["--score-scales", "3"], ["--score-scales", "0", "--protocol", "paper"]):
        capsys.readouterr()
        assert main(["test", str(tiny_run), *bad, "--no-progress", "--no-report"]) == 2
        assert "--score-scales" in capsys.readouterr().err


def test_one_class_cli_run_scores_with_the_default(tmp_path: Path, tiny_data: Path, capsys) -> None:
    run = tmp_path / "one"
    assert main(["train", "--data", f"mvtec:{tiny_data}", "--classes", "bottle", "--out", str(run),
                 "--no-progress", *tiny_flags()]) == 0
    assert main(["test", str(run), "--classes", "bottle", "--no-progress", "--no-report"]) == 0
    metrics = json.loads((run / "test-deploy-inferred" / "metrics.json").read_text())
    assert metrics["score"] == "knn"  # the memory bank needs one class only
    assert 0.0 <= metrics["mean"]["image_auroc"] <= 1.0


def test_whiten_makes_the_training_features_white() -> None:
    cfg = preset("fast", backbone="test_efficientnet", backbone_weights="none", taps=(1,), img_size=64,
                 pyramid_levels=2, n_blocks=1, pos_dim=8, n_intra=2, whiten=True)
    model = HGAD(cfg, ["a", "b"])
    torch.manual_seed(0)
    batches = [model.extract(torch.rand(4, 3, 64, 64)) for _ in range(3)]
    model.set_feature_stats(iter(batches))
    for lvl in range(2):
        x = torch.cat([b[lvl] for b in batches]).permute(0, 2, 3, 1).flatten(0, 2).double()
        torch.testing.assert_close(getattr(model, f"feat_mean{lvl}").double(), x.mean(0), rtol=1e-4, atol=1e-5)
        w = getattr(model, f"feat_whiten{lvl}").double()
        torch.testing.assert_close(w, w.T)  # ZCA: symmetric
        cov = torch.cov(x.T, correction=0) + 0.01 * torch.eye(x.shape[1], dtype=x.dtype)
        torch.testing.assert_close(w @ cov @ w.T, torch.eye(x.shape[1], dtype=x.dtype), rtol=1e-3, atol=1e-3)
    assert "feat_whiten0" in model.trainable_state()  # saved with the weights
    raw = HGAD(dataclasses.replace(cfg, whiten=False), ["a", "b"])
    assert "feat_whiten0" not in raw.trainable_state()  # off: the paper's raw features


def test_run_folders_of_hgad_0_1_load_with_their_own_settings(tiny_data: Path, tmp_path: Path) -> None:
    """config.json files written before input_norm / feature_pool / whiten / score_norm existed are read
    with the values hgad 0.1 used (ImageNet statistics, no pooling, raw features, max normalisation),
    not today's defaults."""
    from hgad.checkpoint import load_model
    from hgad.data import IMAGENET_NORM

    old = tmp_path / "old"  # a run as 0.1 trained it, then its config.json stripped of the newer keys
    assert main(["train", "--data", f"mvtec:{tiny_data}", "--out", str(old), "--no-progress",
                 *tiny_flags(meta_epochs=1, stage1_epochs=1, warmup_epochs=0, feature_pool=1, input_norm="imagenet",
                             score_norm="max", score="product"), "--no-whiten"]) == 0
    data = json.loads((old / "config.json").read_text())
    for key in ("input_norm", "feature_pool", "whiten", "score_norm", "latent_gauss", "latent_knn"):
        data["config"].pop(key)
    (old / "config.json").write_text(json.dumps(data))
    model = load_model(old)
    assert model.cfg.input_norm == "imagenet" and model.input_norm == IMAGENET_NORM
    assert model.cfg.feature_pool == 1 and model.cfg.whiten is False and model.cfg.score_norm == "max"


def test_zscore_map_by_hand() -> None:
    from hgad.scoring import zscore_map

    # two scales of one image: 2x2 and 1x1; upsampled to 2x2 (align_corners) and summed, no blur
    fine = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    coarse = torch.tensor([[[0.0]]])
    means = [torch.full((1, 2, 2), 2.0), torch.tensor([[[1.0]]])]
    stds = [torch.full((1, 2, 2), 0.5), torch.tensor([[[2.0]]])]
    out = zscore_map([fine, coarse], means, stds, out_size=2, sigma=0)
    expected = (2.0 - fine) / 0.5 + (1.0 - 0.0) / 2.0  # the 1x1 scale upsamples to a constant
    torch.testing.assert_close(out, expected)


def test_position_stats_by_hand() -> None:
    from hgad.map_stats import compute_position_stats

    maps = [torch.tensor([[[1.0, 5.0]], [[3.0, 5.0]], [[10.0, 0.0]]])]  # 3 images of 1x2, classes 0, 0, 1
    [(mean, std)] = compute_position_stats(maps, torch.tensor([0, 0, 1]), 3)
    torch.testing.assert_close(mean, torch.tensor([[[2.0, 5.0]], [[10.0, 0.0]], [[0.0, 0.0]]]))
    # population std; a constant position and a one-image class get the floor 1e-3; an empty class 1
    torch.testing.assert_close(std, torch.tensor([[[1.0, 1e-3]], [[1e-3, 1e-3]], [[1.0, 1.0]]]))


def test_zscore_run_scores_alone_as_in_a_batch_and_exports(tiny_data: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from hgad.api import Detector

    run = tmp_path / "z"
    assert main(["train", "--data", f"mvtec:{tiny_data}", "--out", str(run), "--no-progress",
                 *tiny_flags(score_norm="zscore", feature_pool=3), "--whiten"]) == 0
    det = Detector.load(run, device="cpu")
    assert det.model.cfg.score_norm == "zscore" and "z_logp_mean0" in det.model.trainable_state()
    files = sorted(tiny_data.glob("*/test/*/*.png"))[:3]
    images = [Image.open(f).convert("RGB") for f in files]
    batch = det.predict(images)
    [alone] = det.predict(images[0])
    assert alone.score == pytest.approx(batch[0].score, rel=1e-4, abs=1e-4)
    assert all(torch.isfinite(torch.as_tensor(p.anomaly_map)).all() for p in batch)
    assert main(["test", str(run), "--no-progress", "--no-report"]) == 0
    metrics = json.loads((run / "test-deploy-inferred" / "metrics.json").read_text())
    assert 0 <= metrics["mean"]["pixel_auroc"] <= 1
    assert main(["test", str(run), "--protocol", "paper", "--class-source", "known", "--no-progress",
                 "--no-report"]) == 0  # the release's protocol works for any run


def test_fit_class_gaussians_by_hand() -> None:
    from hgad.scoring import fit_class_gaussians

    # class 0: the vectors (1, 0), (3, 0), (2, 2), (2, -2): mean (2, 0), population covariance diag(0.5, 2);
    # class 1 has no vectors
    v = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 2.0], [2.0, -2.0]], dtype=torch.float64)
    sums = torch.stack([v.sum(0), torch.zeros(2, dtype=torch.float64)])
    outers = torch.stack([v.T @ v, torch.zeros(2, 2, dtype=torch.float64)])
    mean, root = fit_class_gaussians(sums, outers, torch.tensor([4.0, 0.0]), ridge=0.5)
    torch.testing.assert_close(mean, torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    # (C + 0.5 I)^(-1/2) = diag(1, 2.5)^(-1/2)
    torch.testing.assert_close(root[0], torch.diag(torch.tensor([1.0, 2.5 ** -0.5])))
    torch.testing.assert_close(root[1], torch.eye(2))


def test_mahalanobis_by_hand() -> None:
    from hgad.scoring import mahalanobis

    z = torch.tensor([[[3.0, 1.0], [1.0, 0.0]]])  # one image, two vectors
    mean = torch.tensor([[1.0, 0.0]])
    root = torch.tensor([[[0.5, 0.0], [0.0, 1.0]]])
    # u = (2, 1) -> W u = (1, 1) -> sqrt(2); the mean itself is at distance 0
    torch.testing.assert_close(mahalanobis(z, mean, root), torch.tensor([[2.0 ** 0.5, 0.0]]))


def _two_batches(model: HGAD) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Features of two batches of four random images, and their labels (both classes in each batch)."""
    torch.manual_seed(0)
    feats = [model.extract(torch.rand(4, 3, 64, 64)) for _ in range(2)]
    return feats, [torch.tensor([0, 0, 1, 1]), torch.tensor([1, 0, 1, 0])]


def test_latent_gauss_fits_the_latents_of_each_class() -> None:
    model = _tiny_model(2)
    assert model.cfg.latent_gauss and "lat_root0" in model.trainable_state()
    feats, labels = _two_batches(model)
    model.set_latent_stats(zip(feats, labels))
    for lvl in range(2):
        z = torch.cat([model.encode(f[lvl], lvl)[0].view(4, -1, f[lvl].shape[1]) for f in feats]).double()
        y = torch.cat(labels)
        for c in range(2):
            own = z[y == c].reshape(-1, z.shape[-1])
            torch.testing.assert_close(getattr(model, f"lat_mean{lvl}")[c].double(), own.mean(0),
                                       rtol=1e-4, atol=1e-4)
            w = getattr(model, f"lat_root{lvl}")[c].double()
            cov = torch.cov(own.T, correction=0) + 0.01 * torch.eye(own.shape[1], dtype=own.dtype)
            torch.testing.assert_close(w @ cov @ w, torch.eye(own.shape[1], dtype=own.dtype), rtol=1e-3, atol=1e-3)
    lm = model.latent_maps(feats[0], labels[0])
    assert len(lm.maha) == 2 and all(bool((m <= 0).all()) for m in lm.maha)  # minus a distance
    legacy = HGAD(dataclasses.replace(model.cfg, latent_gauss=False, score="logp"), ["a", "b"])
    assert "lat_root0" not in legacy.trainable_state() and legacy.latent_maps(feats[0]).maha is None
    with pytest.raises(ConfigError, match="latent-gauss"):
        legacy.score_kind("mahalanobis")


def test_nearest_distance_by_hand() -> None:
    from hgad.scoring import nearest_distance

    z = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])  # one image, two vectors
    bank = torch.tensor([[[1.0, 0.0], [3.0, 3.0], [10.0, 10.0]]])
    # nearest rows: (1, 0) at 1 and (3, 3) at 1; the chunk size (2 then 1 row) changes nothing
    torch.testing.assert_close(nearest_distance(z, bank, chunk=2), torch.tensor([[1.0, 1.0]]))
    # row 0 banned: (0, 0) must go to (3, 3), at sqrt(18)
    banned = torch.tensor([[True, False, False]])
    torch.testing.assert_close(nearest_distance(z, bank, banned, chunk=2), torch.tensor([[18.0 ** 0.5, 1.0]]))


@pytest.mark.parametrize("space", ["input", "latent"])
def test_knn_bank_holds_each_class_vectors_and_leaves_an_image_out(space: str) -> None:
    model = _tiny_model(2, knn_space=space, knn_hflip=True)
    assert model.cfg.latent_knn and "knn_bank0" in model.trainable_state()
    feats, labels = _two_batches(model)
    model.set_knn_bank(zip(feats, labels, [torch.arange(0, 4), torch.arange(4, 8)]))
    y = torch.cat(labels)
    for lvl in range(2):
        made = {"input": model.flow_input, "latent": lambda f, level: model.encode(f, level)[0]}[space]
        z = torch.cat([made(f[lvl], lvl).view(4, -1, f[lvl].shape[1]) for f in feats])
        assert torch.equal(model.bank_vectors(feats[0][lvl], lvl), made(feats[0][lvl], lvl))
        bank = getattr(model, f"knn_bank{lvl}")
        # 32 images' worth of each copy (the images and their mirrored copies): 4 images, repeated
        assert model.cfg.knn_hflip and bank.shape[1] == 2 * model.cfg.latent_knn * z.shape[1]
        for c in range(2):
            own = z[y == c].reshape(-1, z.shape[-1])
            # every row of the bank is one of the class's vectors, and every vector is in the bank
            dist = torch.cdist(bank[c], own, compute_mode="donot_use_mm_for_euclid_dist")
            assert bool(dist.amin(1).max() < 1e-5) and bool(dist.amin(0).max() < 1e-5)
    # scored as a member of the bank, an image finds itself (distance 0); left out, it does not
    member = model.latent_maps(feats[0], labels[0])
    idx = torch.tensor([0, 1, 2, 3])  # the first batch's images, in set_knn_bank's order
    left_out = model.latent_maps(feats[0], labels[0], images=idx)
    assert all(bool((m.abs() < 1e-3).all()) for m in member.knn)
    assert all(bool((m < -1e-3).all()) for m in left_out.knn)
    assert model.latent_maps(feats[0], labels[0], knn=False).knn is None  # a score that does not read it
    assert model.reads_knn() and not model.reads_knn("mahalanobis")
    # the bank is filled after training: resume checkpoints leave it out
    assert "knn_bank0" not in model.resume_state() and "lat_root0" in model.resume_state()
    model.forget_knn_owners()
    with pytest.raises(RuntimeError, match="calibration"):
        model.latent_maps(feats[0], labels[0], images=idx)
    legacy = HGAD(dataclasses.replace(model.cfg, latent_knn=0, score="mahalanobis"), ["a", "b"])
    assert "knn_bank0" not in legacy.trainable_state() and legacy.latent_maps(feats[0]).knn is None
    with pytest.raises(ConfigError, match="latent-knn"):
        legacy.score_kind("mahalanobis+knn")


def test_a_training_image_is_left_out_of_the_bank_with_its_mirrored_copy() -> None:
    """The mirrored copy of a feature map holds the same vectors (at mirrored positions): were it not left
    out with its image, a training image would find itself at distance 0 and its statistics would be 0."""
    model = _tiny_model(2, knn_hflip=True)
    feats, labels = _two_batches(model)
    flipped = [[f.flip(-1) for f in batch] for batch in feats]
    idx = [torch.arange(0, 4), torch.arange(4, 8)]
    model.set_knn_bank(itertools.chain(zip(feats, labels, idx), zip(flipped, labels, idx)))
    mirror_member = model.latent_maps(flipped[0], labels[0])
    left_out = model.latent_maps(flipped[0], labels[0], images=idx[0])
    assert all(bool((m.abs() < 1e-3).all()) for m in mirror_member.knn)
    assert all(bool((m < -1e-3).all()) for m in left_out.knn)
    model.forget_knn_owners()
    one = HGAD(dataclasses.replace(model.cfg, knn_hflip=False), ["a", "b"])
    assert one.knn_bank0.shape[1] * 2 == model.knn_bank0.shape[1]


def test_a_memory_bank_too_large_is_refused() -> None:
    cfg = preset("fast", backbone="test_efficientnet", backbone_weights="none", taps=(1,), img_size=1024,
                 pyramid_levels=2, n_blocks=1, pos_dim=8, n_intra=2, latent_knn=4096)
    with pytest.raises(ConfigError, match="GiB memory bank.*lower --latent-knn or --img-size$"):
        HGAD(cfg, ["a", "b"])
    with pytest.raises(ConfigError, match=r"vectors \(twice: --knn-hflip\).*or drop --knn-hflip$"):
        HGAD(dataclasses.replace(cfg, knn_hflip=True), ["a", "b"])


# a run of each earlier default, its config.json as that version wrote it (without the keys added since,
# which must load with the value it used), and today's default
_EARLIER = {"mahalanobis": {"latent_knn": 0, "knn_space": "latent", "score_scales": 0},
            "mahalanobis+knn": {"knn_space": "latent", "score_scales": 0}, "knn": {}}


@pytest.mark.parametrize("score", list(_EARLIER))
def test_latent_scores_score_alone_as_in_a_batch(score: str, tiny_data: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from hgad.api import Detector

    run = tmp_path / "m"
    earlier = _EARLIER[score]
    assert main(["train", "--data", f"mvtec:{tiny_data}", "--out", str(run), "--no-progress",
                 *tiny_flags(score=score, **earlier)]) == 0
    data = json.loads((run / "config.json").read_text())
    for key in earlier:
        data["config"].pop(key)
    (run / "config.json").write_text(json.dumps(data))
    det = Detector.load(run, device="cpu")
    assert all(getattr(det.model.cfg, key) == value for key, value in earlier.items())
    assert det.model.deploy_norm().scales == (0 if earlier else 1)  # today's default: the finest scale only
    assert det.model.cfg.score == score and "z_maha_std0" in det.model.trainable_state()
    assert float(det.model.z_maha_std0.min()) > 0 and bool(det.model.lat_root0.abs().sum() > 0)
    if "knn" in score:
        assert float(det.model.z_knn_std0.min()) > 0 and bool(det.model.knn_bank0.abs().sum() > 0)
    files = sorted(tiny_data.glob("*/test/*/*.png"))[:3]
    images = [Image.open(f).convert("RGB") for f in files]
    batch = det.predict(images)
    [alone] = det.predict(images[0])
    assert alone.score == pytest.approx(batch[0].score, rel=1e-4, abs=1e-4)
    assert main(["test", str(run), "--no-progress", "--no-report"]) == 0
    metrics = json.loads((run / "test-deploy-inferred" / "metrics.json").read_text())
    assert metrics["score"] == score and 0 <= metrics["mean"]["pixel_auroc"] <= 1
    pytest.importorskip("onnxruntime")
    from hgad.export import OnnxDetector

    onnx = tmp_path / "m.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(onnx)]) == 0  # checks itself against torch
    [via_onnx] = OnnxDetector.load(onnx, "cpu", run_dir=run).predict(images[0])
    assert via_onnx.score == pytest.approx(alone.score, rel=1e-3, abs=1e-3)
    # the release's protocol has no mahalanobis map: it scores with the release's product
    assert main(["test", str(run), "--protocol", "paper", "--no-progress", "--no-report"]) == 0
    paper = json.loads((run / "test-paper-inferred" / "metrics.json").read_text())
    assert paper["score"] == "product"
    capsys.readouterr()
    assert main(["test", str(run), "--protocol", "paper", "--score", score, "--no-progress",
                 "--no-report"]) == 2
    assert score in capsys.readouterr().err


def test_score_scales_sums_only_the_finest_scales() -> None:
    from hgad.map_stats import Normalisation, PositionStats

    # one image of class 0; its knn log-maps lie 2 (finest, 4x4) and 5 (coarse, 2x2) std below the mean
    levels = [torch.full((1, 4, 4), -2.0), torch.full((1, 2, 2), -5.0)]
    stats = PositionStats([torch.zeros(1, 4, 4), torch.zeros(1, 2, 2)], [torch.ones(1, 4, 4), torch.ones(1, 2, 2)])

    def total(scales: int) -> torch.Tensor:
        norm = Normalisation(logp=stats, ent=None, knn=stats, scales=scales)
        return norm.maps({"knn": levels}, "knn", torch.zeros(1, dtype=torch.long), out_size=4, sigma=0)

    torch.testing.assert_close(total(1), torch.full((1, 4, 4), 2.0))
    torch.testing.assert_close(total(0), torch.full((1, 4, 4), 7.0))
    torch.testing.assert_close(total(2), total(0))
    with pytest.raises(ConfigError, match="score-scales"):
        preset("fast", score_scales=4)  # the fast preset has 3 scales
    # the release's max normalisation combines every scale
    assert preset("fast", score_norm="max", score="product").score_scales == 0
    assert preset("paper").score_scales == 0 and preset("fast").score_scales == 1
