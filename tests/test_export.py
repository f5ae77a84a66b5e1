"""ONNX export: parity with the PyTorch detector, dynamic batch, a loop-free graph, predict --onnx, errors."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hgad.api import Detector
from hgad.checkpoint import load_model
from hgad.cli import main
from hgad.config import config_from_dict
from hgad.errors import ConfigError
from hgad.model import HGAD

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from hgad.export import INPUT_NAME, InferenceGraph, OnnxDetector, _trace  # noqa: E402

TOL = 1e-4
REL = 2e-5  # z-score maps reach ~100: float32 rounding of onnxruntime vs PyTorch is relative


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return out, _run_cli(["export", str(tiny_run), "--format", "onnx", "--out", str(out)])


@pytest.fixture(scope="module")
def torch_det(tiny_run: Path) -> Detector:
    return Detector.load(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def onnx_det(exported, tiny_run: Path) -> OnnxDetector:
    return OnnxDetector.load(exported[0], "cpu", run_dir=tiny_run)


def _run_cli(argv: list[str]) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return buf.getvalue()


def _test_files(tiny_data: Path) -> list[Path]:
    return sorted(tiny_data.glob("*/test/*/*.png"))


def test_export_writes_checked_model_with_metadata(exported, tiny_run: Path, torch_det: Detector):
    path, stdout = exported
    assert "max relative diff" in stdout and "classes agree 2/2" in stdout
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp file left behind
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    saved = json.loads((tiny_run / "config.json").read_text())
    model = torch_det.model
    assert json.loads(meta["class_names"]) == saved["class_names"] == ["alpha", "bottle"]
    assert json.loads(meta["thresholds"]) == pytest.approx(model.threshold.tolist())
    assert int(meta["img_size"]) == 128 and int(meta["map_size"]) == 64
    assert meta["hgad_version"] == saved["hgad_version"]
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 128, 128]  # dynamic batch only


def test_graph_has_no_loops_and_does_not_grow_with_the_number_of_vectors(exported, tiny_run: Path):
    path, _ = exported
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Loop", "Scan", "If", "SequenceConstruct", "SplitToSequence"}
    # a quarter of the vectors (64 px input): the same graph, only its constant shapes differ (new models:
    # per-position statistics are shaped by the image size; the weights are irrelevant to the graph). The
    # memory bank is read in chunks of 1024 rows, one chunk more per 1024 rows of the model's (fixed) bank:
    # 8 images' worth keeps both sizes' banks within one chunk
    cfg = load_model(tiny_run).cfg.to_dict()
    sizes = {}
    for size in (128, 64):
        model = HGAD(config_from_dict({**cfg, "img_size": size, "latent_knn": 8}), ["a", "b"])
        sizes[size] = len(onnx.load_from_string(_trace(InferenceGraph(model), torch.zeros(1, 3, size, size),
                                                       17)).graph.node)
    assert sizes[64] == sizes[128]


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_pytorch_detector(torch_det: Detector, onnx_det: OnnxDetector, tiny_data: Path,
                                              batch: int):
    images = [Image.open(f).convert("RGB") for f in _test_files(tiny_data)[-batch:]]
    x = torch.stack([torch_det.preprocess(im) for im in images]).numpy()
    maps, scores, classes, conf = onnx_det.session.run(None, {INPUT_NAME: x})
    ref = torch_det.predict(images)
    assert maps.shape == (batch, 64, 64) and classes.dtype == np.int64
    np.testing.assert_allclose(maps, np.stack([p.anomaly_map for p in ref]), rtol=REL, atol=TOL)
    np.testing.assert_allclose(scores, [p.score for p in ref], rtol=REL, atol=TOL)
    np.testing.assert_allclose(conf, [p.class_confidence for p in ref], rtol=REL, atol=TOL)
    assert classes.tolist() == [p.class_index for p in ref]
    # the detector wrapper reads thresholds and names from the metadata
    got = onnx_det.predict(images)
    assert [(p.class_name, p.threshold, p.is_anomalous) for p in got] == \
        [(p.class_name, pytest.approx(p.threshold), p.is_anomalous) for p in ref]


def _scores_csv(folder: Path) -> dict[str, dict[str, str]]:
    with open(folder / "scores.csv", newline="") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def test_predict_cli_with_onnx_matches_pytorch(exported, tiny_run: Path, tiny_data: Path, tmp_path: Path):
    path, _ = exported
    folder = tiny_data / "bottle" / "test"
    args = ["predict", str(tiny_run), str(folder), "--map-format", "npy", "--no-progress", "--device", "cpu"]
    _run_cli([*args, "--out", str(tmp_path / "pt")])
    _run_cli([*args, "--out", str(tmp_path / "onnx"), "--onnx", str(path)])
    pt, ox = _scores_csv(tmp_path / "pt"), _scores_csv(tmp_path / "onnx")
    assert len(pt) == 5 and pt.keys() == ox.keys()
    for key, row in pt.items():
        other = ox[key]
        assert float(other["score"]) == pytest.approx(float(row["score"]), abs=TOL, rel=1e-5)
        assert (other["class"], other["is_anomalous"]) == (row["class"], row["is_anomalous"])
        assert other["error"] == row["error"] == ""
        a, b = np.load(tmp_path / "pt" / row["map"]), np.load(tmp_path / "onnx" / other["map"])
        np.testing.assert_allclose(b, a, rtol=REL, atol=TOL)


def test_user_errors_are_one_line(exported, tiny_run: Path, tiny_data: Path, tmp_path: Path, capsys):
    path, _ = exported
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "m.onnx"), "--opset", "9"]) == 2
    image = str(_test_files(tiny_data)[0])
    base = ["predict", str(tiny_run), image, "--out", str(tmp_path / "p"), "--no-progress"]
    assert main([*base, "--onnx", str(tmp_path / "missing.onnx")]) == 2
    not_onnx = tmp_path / "bad.onnx"
    not_onnx.write_bytes(b"not a model")
    assert main([*base, "--onnx", str(not_onnx)]) == 2
    assert main([*base, "--onnx", str(path), "--class", "alpha"]) == 2
    other_run = tmp_path / "other_run"  # a run with other classes: the export is not from it
    shutil.copytree(tiny_run, other_run, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((other_run / "config.json").read_text())
    cfg["class_names"] = ["bottle", "alpha"]
    (other_run / "config.json").write_text(json.dumps(cfg))
    assert main(["predict", str(other_run), image, "--out", str(tmp_path / "p"), "--onnx", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 6 and all(line.startswith("hgad ") for line in err)
    assert "does not exist" in err[0] and "--opset" in err[1] and "not found" in err[2]
    assert "not a readable ONNX model" in err[3] and "--class" in err[4] and "not exported from" in err[5]


def test_missing_onnxruntime_is_a_config_error(monkeypatch, exported):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"hgad\[onnx\]"):
        OnnxDetector.load(exported[0])


def test_base_cli_does_not_import_onnx():
    code = ("import sys, hgad.cli, hgad.predict, hgad.export; hgad.cli.build_parser(); "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
