"""What a test report shows first: the decisions that went most wrong, and where the numbers come from.

Defects are ordered by how far their score stays *below* the deployed threshold (the worst misses
first), normal images by how far they go *above* it (the worst false alarms first). Without a
threshold (``paper`` protocol, ``--score`` overrides) the order is the same with threshold 0: the
lowest-scored defects and the highest-scored normal images.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from hgad.version import __version__

__all__ = ["hardest", "test_provenance"]


def hardest(indices: Sequence[int], labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray | None,
            n: int) -> tuple[list[int], list[int]]:
    """(defects, normal images) among ``indices``, up to ``n`` each, worst decision first."""
    idx = np.asarray(list(indices), dtype=np.int64)
    margin = scores[idx] - (thresholds[idx] if thresholds is not None else 0.0)
    defects = idx[labels[idx] == 1][np.argsort(margin[labels[idx] == 1], kind="stable")]
    normal = idx[labels[idx] == 0][np.argsort(-margin[labels[idx] == 0], kind="stable")]
    return [int(i) for i in defects[:n]], [int(i) for i in normal[:n]]


def test_provenance(run_dir: Path, saved: dict[str, Any], data: Sequence[str], protocol: str, class_source: str,
                    score: str) -> dict[str, Any]:
    """Where a test report's numbers come from, as shown at its top and stored in metrics.json."""
    return {"run folder": str(Path(run_dir).resolve()), "data": list(data),
            "trained with": f"hgad {saved.get('hgad_version', '?')}", "tested with": f"hgad {__version__}",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "protocol": protocol,
            "class source": class_source, "score": score,
            "resize": saved["config"].get("resize", "crop (run trained before --resize)")}
