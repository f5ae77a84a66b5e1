"""hgad: unified multi-class visual anomaly detection with hierarchical Gaussian-mixture normalizing flows.

Reproduces HGAD (Yao et al., ECCV 2024) and adds deployable single-image scoring. The Python API
mirrors the CLI::

    import hgad
    det = hgad.train(["mvtec:demo_data"], "runs/demo", preset="fast")   # hgad train
    det = hgad.load("runs/demo")                                         # a trained run
    [pred] = det.predict(PIL.Image.open("part.png"))                     # hgad predict
    result = det.evaluate(["mvtec:demo_data"])                           # hgad test
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hgad.version import __version__

__all__ = ["__version__", "train", "load", "Detector", "Prediction"]

if TYPE_CHECKING:
    from hgad.api import Detector, Prediction


def train(data: list[str], out: str, **kwargs: Any) -> Detector:
    """Train a unified model; see :meth:`hgad.api.Detector.fit`."""
    from hgad.api import Detector

    return Detector.fit(data, out, **kwargs)


def load(run_dir: str, device: str = "auto") -> Detector:
    """Load a trained run folder; see :meth:`hgad.api.Detector.load`."""
    from hgad.api import Detector

    return Detector.load(run_dir, device)


def __getattr__(name: str) -> Any:  # lazy: `import hgad` stays light for the CLI
    if name in ("Detector", "Prediction"):
        from hgad import api

        return getattr(api, name)
    raise AttributeError(name)
