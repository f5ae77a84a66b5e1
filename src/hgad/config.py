"""Run configuration: one dataclass, two presets, YAML files and command-line overrides.

Every knob of the method is a field here with its help text, so the CLI flags, the YAML keys and the
``config.json`` saved with a run are the same names. Precedence: preset < ``--config`` YAML < flags.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from hgad.errors import ConfigError, InputError, brief

__all__ = ["HGADConfig", "PRESETS", "DEFAULT_PRESET", "LEGACY_DEFAULTS", "preset", "load_yaml", "config_from_dict",
           "CHOICES", "FLAG_NAMES", "MAX_SIZE", "RESUME_MAY_CHANGE", "flag_of"]

# friendlier flag names for the ablation switches (--no-mi, --no-entropy-loss, --intra-centers, ...)
FLAG_NAMES = {"use_mi": "mi", "use_entropy": "entropy-loss", "n_intra": "intra-centers"}
MAX_SIZE = 4096  # largest --img-size / --map-size: beyond it one image's features alone exhaust memory
# settings that --resume may change: speed only, plus the length and rate of training (continuing a
# finished run for more meta-epochs, or at another learning rate, is what --resume is for); any
# other difference changes the model or its statistics and is refused
RESUME_MAY_CHANGE = ("cache", "cache_dtype", "device", "amp", "num_workers", "meta_epochs", "lr")


def _integral(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()


def _same(v: Any) -> Any:
    return v


# each field annotation: (test of a value, what the error says was expected, the value as stored)
_KINDS: dict[str, tuple[Any, str, Any]] = {
    "bool": (lambda v: isinstance(v, bool), "true or false", _same),
    "int": (_integral, "an integer", int),
    "float": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), "a number", float),
    "str": (lambda v: isinstance(v, str), "a text value", _same),
    "str | None": (lambda v: v is None or isinstance(v, str), "a text value or none", _same),
    "tuple[int, ...]": (lambda v: isinstance(v, list | tuple) and all(_integral(t) for t in v), "a list of integers",
                        lambda v: tuple(int(t) for t in v)),
}


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


CHOICES: dict[str, tuple[str, ...]] = {
    "feature_mode": ("pyramid", "layers"),
    "prior": ("hgmm", "gaussian"),
    "input_norm": ("backbone", "imagenet"),
    "score_norm": ("max", "zscore"),
    "score": ("product", "logp", "entropy", "mahalanobis", "knn", "mahalanobis+knn"),
    "cache": ("memory", "disk", "none"),
    "cache_dtype": ("float16", "bfloat16", "float32"),
    "device": ("auto", "cpu", "cuda"),
    "resize": ("squash", "crop", "pad"),
    "knn_space": ("input", "latent"),
}


@dataclass
class HGADConfig:
    """All settings of one run. Defaults are the ``fast`` preset; ``paper`` is the release's."""

    # features (docs/method.md, "Features")
    backbone: str = _opt("tf_efficientnet_lite0", "timm model name of the frozen feature extractor")
    backbone_weights: str | None = _opt(
        None, "weights for the backbone: a local .pth/.safetensors file, 'hub' (download, needs internet) "
        "or 'none' (random init); default: the weights that ship for the backbone")
    feature_mode: str = _opt("pyramid", "pyramid: one tap on an image pyramid (paper); layers: several taps")
    taps: tuple[int, ...] = _opt((3,), "feature indices of the backbone to use (timm features_only order)")
    pyramid_levels: int = _opt(3, "number of image-pyramid levels (pyramid mode)")
    feature_pool: int = _opt(3, "k x k local average of the backbone features (odd k; 1: none, the paper)")
    input_norm: str = _opt("backbone", "input normalisation: the backbone's own mean/std (timm pretrained_cfg) "
                           "or imagenet (hgad 0.1 used ImageNet's for every backbone)")
    whiten: bool = _opt(True, "whiten the features with the training images' mean and covariance before the "
                        "flow (a short schedule starts from a Gaussian fit; the paper feeds raw features)")
    img_size: int = _opt(384, "input image size: every image becomes img_size x img_size as --resize says")
    resize: str = _opt("squash", "how an image becomes a square: squash (whole image, aspect ratio not kept), pad "
                       "(whole image, aspect kept, borders filled with the normalisation mean) or crop (shorter "
                       "side resized, centre crop: the borders of non-square images are never seen)")
    map_size: int = _opt(256, "size of the anomaly maps and of the ground-truth masks")
    # flow (docs/method.md, "Conditional flow")
    n_blocks: int = _opt(8, "coupling blocks per flow")
    pos_dim: int = _opt(128, "positional-encoding dimensions P (multiple of 4)")
    clamp: float = _opt(1.9, "affine clamping of the coupling blocks")
    # prior and losses (docs/method.md, "Hierarchical Gaussian-mixture prior", "Training objective")
    prior: str = _opt("hgmm", "hgmm: hierarchical Gaussian mixture (HGAD); "
                      "gaussian: single N(0,I) (unified NF baseline)")
    n_intra: int = _opt(10, "intra-class centres per class (1 disables the intra-class mixture)")
    lambda1: float = _opt(1.0, "weight of the inter-class Gaussian-mixture likelihood loss")
    lambda2: float = _opt(100.0, "weight of the mutual-information loss")
    use_mi: bool = _opt(True, "use the mutual-information loss")
    use_entropy: bool = _opt(True, "use the entropy loss")
    two_stage: bool = _opt(True, "train intra-class centres only after the first stage")
    # optimisation (docs/method.md, "Training schedule")
    meta_epochs: int = _opt(12, "meta-epochs (the learning-rate schedule steps once per meta-epoch)")
    sub_epochs: int = _opt(2, "passes over the data per meta-epoch")
    stage1_epochs: int = _opt(2, "meta-epochs of stage 1 before the intra-class losses start")
    batch_size: int = _opt(8, "images per training step")
    lr: float = _opt(1e-3, "peak learning rate")
    weight_decay: float = _opt(1e-4, "Adam weight decay on flow parameters (not on the prior)")
    beta1: float = _opt(0.95, "Adam beta1")
    beta2: float = _opt(0.99, "Adam beta2")
    warmup_epochs: int = _opt(2, "meta-epochs of linear warm-up from lr/10")
    seed: int = _opt(0, "random seed (flows, centres, shuffling); a CPU run is repeatable")
    # speed (docs/method.md, differences, "Speed")
    cache: str = _opt("memory", "feature cache: memory, disk (under the run folder) or none (recompute)")
    cache_dtype: str = _opt("float16", "precision of cached features")
    device: str = _opt("auto", "auto (CUDA when present), cpu or cuda")
    amp: bool = _opt(True, "bf16 autocast for the flows on CUDA (ignored on CPU)")
    num_workers: int = _opt(0, "DataLoader workers for image decoding")
    # scoring (docs/method.md, "Scoring")
    score: str = _opt("knn", "pixel score: product of both maps (paper), logp only, entropy only, "
                      "mahalanobis (distance of the latent vector to its class's Gaussian; needs latent_gauss), knn "
                      "(distance to the nearest memory-bank vector of its class; needs latent_knn) or mahalanobis+knn "
                      "(the sum of both standardised maps)")
    score_scales: int = _opt(1, "the anomaly map sums the maps of this many scales, finest first (0: all scales)")
    score_norm: str = _opt("zscore", "deploy normalisation of the maps: max (the release's: exp(m - max), summed, "
                           "s_max - S) or zscore (per class and position: (mean - m) / std over the training "
                           "images, summed over the --score-scales finest scales; with zscore, product means the "
                           "sum of both z maps)")
    latent_gauss: bool = _opt(True, "after training, fit one Gaussian (mean, full covariance) per class and scale "
                              "to the training images' latent vectors, stored with the model (zscore only; "
                              "needed by the mahalanobis score)")
    latent_knn: int = _opt(32, "after training, keep up to this many training images' worth of vectors per class "
                           "and scale (a random sample) with the model as the memory bank of the knn score "
                           "(0: none; zscore only)")
    knn_hflip: bool = _opt(False, "the memory bank also holds the vectors of the training images flipped left "
                           "to right (latent_knn images' worth of each copy: twice the rows), so that a normal image "
                           "showing a mirrored variant of the training content is not flagged; for surfaces whose "
                           "mirror image is normal too, never for parts whose mirror image is a defect")
    knn_space: str = _opt("input", "what the memory bank holds: input (what the flow reads: the features, whitened "
                          "with --whiten) or latent (the flow's latent vectors)")
    blur_sigma: float = _opt(4.0, "Gaussian blur of the anomaly maps (0 disables)")
    threshold_quantile: float = _opt(
        0.99, "decision threshold when a class has no calibration images: this quantile of its training "
        "images' scores")
    calibration_split: float = _opt(
        0.2, "fraction of each class's training images held out from the flow to calibrate its decision "
        "threshold and the unknown-input limits (0: none, thresholds from --threshold-quantile)")
    target_fpr: float = _opt(0.05, "false-positive rate the calibrated threshold aims at on normal images "
                             "(resolution: 1 / the calibration images of a class)")

    def __post_init__(self) -> None:
        self._check_types()
        self.validate()

    def _check_types(self) -> None:
        """Every value of its field's type (integral numbers to int, numbers to float, taps to a tuple):
        a wrong type from the API or a hand-edited config.json is a ConfigError naming the flag, never a
        traceback later, and never a truthy string read as ``True``."""
        for f in fields(self):
            test, expected, stored = _KINDS[str(f.type)]
            value = getattr(self, f.name)
            if not test(value):
                raise ConfigError(flag_of(f.name), f"expected {expected}, got {value!r}")
            setattr(self, f.name, stored(value))

    def validate(self) -> None:
        """Raise ConfigError for values that cannot work (before any heavy work starts)."""
        self._check_sizes()
        self._check_training()
        self._check_features()

    def _check_sizes(self) -> None:
        """Choices, counts and sizes."""
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(flag_of(name), f"must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        positive = ("pyramid_levels", "img_size", "map_size", "n_blocks", "pos_dim", "n_intra", "meta_epochs",
                    "sub_epochs", "batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(flag_of(name), f"must be a positive integer, got {getattr(self, name)}")
        for name in ("img_size", "map_size"):
            if getattr(self, name) > MAX_SIZE:
                raise ConfigError(flag_of(name), f"must be at most {MAX_SIZE}, got {getattr(self, name)}")
        if self.pos_dim % 4:
            raise ConfigError("--pos-dim", f"must be a multiple of 4, got {self.pos_dim}")

    def _check_training(self) -> None:
        """Schedule, loss weights and optimiser settings."""
        if self.stage1_epochs < 0 or self.warmup_epochs < 0 or self.num_workers < 0:
            raise ConfigError("--stage1-epochs/--warmup-epochs/--num-workers", "must not be negative")
        if not self.lr > 0:
            raise ConfigError("--lr", f"must be positive, got {self.lr}")
        for name in ("lambda1", "lambda2", "weight_decay", "clamp", "blur_sigma"):
            value = getattr(self, name)
            if not (value >= 0 and value < 1e6):
                raise ConfigError(flag_of(name), f"must be in [0, 1e6), got {value}")
        if self.lambda1 == 0 and self.prior == "hgmm":
            raise ConfigError("--lambda1", "must be > 0: without the likelihood term the flow is not trained")
        if not 0 < self.beta1 < 1 or not 0 < self.beta2 < 1:
            raise ConfigError("--beta1/--beta2", "must be in (0, 1)")
        if not 0 < self.threshold_quantile <= 1:
            raise ConfigError("--threshold-quantile", f"must be in (0, 1], got {self.threshold_quantile}")
        if not 0 <= self.calibration_split <= 0.5:
            raise ConfigError("--calibration-split", f"must be in [0, 0.5], got {self.calibration_split}")
        if not 0 < self.target_fpr < 1:
            raise ConfigError("--target-fpr", f"must be in (0, 1), got {self.target_fpr}")

    def _check_features(self) -> None:
        """Backbone taps; a single-Gaussian prior scores with the log-likelihood alone."""
        if not self.taps or any(t < 0 for t in self.taps):
            raise ConfigError("--taps", f"need one or more non-negative indices, got {self.taps}")
        if self.feature_mode == "pyramid" and len(self.taps) != 1:
            raise ConfigError("--taps", "pyramid mode uses exactly one tap")
        if self.latent_knn < 0:
            raise ConfigError("--latent-knn", f"must be >= 0, got {self.latent_knn}")
        latent_scores = {"mahalanobis": "maha" in self.score, "knn": "knn" in self.score}
        if any(latent_scores.values()) and self.score_norm != "zscore":
            raise ConfigError("--score", f"{self.score} needs --score-norm zscore")
        if self.score_norm != "zscore":  # their maps are only ever used standardised per position, and the
            # release's max normalisation combines every scale
            self.latent_gauss, self.latent_knn, self.score_scales = False, 0, 0
        if not 0 <= self.score_scales <= self.n_scales:
            raise ConfigError("--score-scales", f"must be 0 (all) to {self.n_scales} (the scales there are), "
                                                f"got {self.score_scales}")
        if latent_scores["mahalanobis"] and not self.latent_gauss:
            raise ConfigError("--score", f"{self.score} needs --latent-gauss (the class Gaussians of the latents)")
        if latent_scores["knn"] and not self.latent_knn:
            raise ConfigError("--score", f"{self.score} needs --latent-knn N > 0 (a memory bank of training vectors)")
        if self.prior == "gaussian" and not (self.score == "logp" or any(latent_scores.values())):
            # a single Gaussian has no class posterior, hence no entropy map
            self.score = "logp"

    @property
    def n_scales(self) -> int:
        """Number of feature scales (one flow and one prior each)."""
        return self.pyramid_levels if self.feature_mode == "pyramid" else len(self.taps)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-able values (as stored in config.json)."""
        d = dataclasses.asdict(self)
        d["taps"] = list(self.taps)
        return d

    def to_json(self) -> str:
        """The settings as sorted, indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def flag_of(name: str) -> str:
    """The command-line flag of a config field (``n_intra`` -> ``--intra-centers``)."""
    return "--" + FLAG_NAMES.get(name, name.replace("_", "-"))


_FAST: dict[str, Any] = {}  # the dataclass defaults are the fast preset

_PAPER: dict[str, Any] = {
    "backbone": "tf_efficientnet_b6",
    "feature_mode": "pyramid",
    "feature_pool": 1,
    "input_norm": "backbone",  # tf_efficientnet_b6 was trained with ImageNet's statistics: the same values
    "whiten": False,
    "latent_gauss": False,
    "latent_knn": 0,
    "taps": (3,),
    "pyramid_levels": 3,
    "img_size": 1024,
    "map_size": 256,
    "n_blocks": 12,
    "pos_dim": 256,
    "n_intra": 10,
    "lambda1": 1.0,
    "lambda2": 100.0,
    "meta_epochs": 25,
    "sub_epochs": 8,
    "stage1_epochs": 2,
    "batch_size": 8,
    "lr": 2e-4,
    "weight_decay": 1e-4,
    "beta1": 0.95,
    "beta2": 0.99,
    "warmup_epochs": 2,
    "seed": 0,
    "score": "product",
    "score_scales": 0,
    "score_norm": "max",
    "blur_sigma": 4.0,
}

PRESETS: dict[str, dict[str, Any]] = {"fast": _FAST, "paper": _PAPER}
DEFAULT_PRESET = "fast"


# Settings added after hgad 0.1 with the value that reproduces what 0.1 did: a run folder whose
# config.json predates them is loaded with these, never with today's defaults.
LEGACY_DEFAULTS: dict[str, Any] = {"feature_pool": 1, "input_norm": "imagenet", "whiten": False,
                                   "score_norm": "max", "latent_gauss": False, "latent_knn": 0, "resize": "crop",
                                   "calibration_split": 0.0, "knn_space": "latent", "score_scales": 0,
                                   "knn_hflip": False}


def config_from_dict(values: dict[str, Any], *, source: str = "config") -> HGADConfig:
    """Build a config, rejecting unknown keys with the key named (typos must not pass silently)."""
    known = {f.name for f in fields(HGADConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(source, f"unknown setting(s) {', '.join(unknown)}")
    try:
        return HGADConfig(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(source, str(err)) from None


def preset(name: str, **overrides: Any) -> HGADConfig:
    """The named preset with keyword overrides applied."""
    if name not in PRESETS:
        raise ConfigError("--preset", f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return config_from_dict({**PRESETS[name], **overrides}, source=f"preset {name}")


def _yaml_keys() -> dict[str, tuple[str, bool]]:
    """YAML key (as a field or as its flag is spelled) -> (field, whether the value is negated)."""
    keys: dict[str, tuple[str, bool]] = {}
    for f in fields(HGADConfig):
        flag = FLAG_NAMES.get(f.name, f.name.replace("_", "-"))
        for key in {f.name, f.name.replace("_", "-"), flag, flag.replace("-", "_")}:
            keys[key] = (f.name, False)
        if f.type in (bool, "bool"):
            for key in (f"no-{flag}", f"no_{flag.replace('-', '_')}"):
                keys[key] = (f.name, True)
    if "n_intra" in keys:
        keys["n-intra"] = ("n_intra", False)
    return keys


_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def _typed(key: str, name: str, value: Any, source: str) -> Any:
    """``value`` checked (and numeric strings converted) for the field ``name``; ConfigError names ``key``."""
    hint = {f.name: f.type for f in fields(HGADConfig)}[name]
    where = f"{source}: {key}"
    if name == "taps":
        items = value if isinstance(value, list) else str(value).split(",") if isinstance(value, str | int) \
            and not isinstance(value, bool) else None
        try:
            return tuple(_as_int(v) for v in items)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ConfigError(where, f"expected a list of integers, got {value!r}") from None
    if hint in (bool, "bool"):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(where, f"expected true or false, got {value!r}")
    if hint in (int, "int"):
        try:
            return _as_int(value)
        except (TypeError, ValueError):
            raise ConfigError(where, f"expected an integer, got {value!r}") from None
    if hint in (float, "float"):
        if isinstance(value, bool):
            raise ConfigError(where, f"expected a number, got {value!r}")
        try:
            return float(value)  # PyYAML reads 1e-3 (no dot) as a string
        except (TypeError, ValueError):
            raise ConfigError(where, f"expected a number, got {value!r}") from None
    if name == "backbone_weights" and value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(where, f"expected a text value, got {value!r}")
    return value


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("bool")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return int(value.strip())
    raise ValueError(value)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of settings: keys as the fields or as the flags are spelled (``intra-centers``,
    ``no-mi``, ``entropy-loss: false``...), each value type-checked; returns field name -> value."""
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "config file does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise InputError(p, f"not valid YAML: {brief(err, 300)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(p, "expected a mapping of settings at the top level")
    keys = _yaml_keys()
    unknown = sorted(str(k) for k in data if str(k) not in keys)
    if unknown:
        raise ConfigError(str(p), f"unknown setting(s) {', '.join(unknown)}")
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for raw, value in data.items():
        name, negate = keys[str(raw)]
        if name in given:
            raise ConfigError(str(p), f"{given[name]} and {raw} set the same setting")
        given[name] = str(raw)
        value = _typed(str(raw), name, value, str(p))
        out[name] = (not value) if negate else value
    return out
