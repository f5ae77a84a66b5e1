"""Bad input to ``hgad train/test/predict/export``: exit code 2, one line naming the culprit, nothing written.

Every case runs the real command line (``hgad.cli.main``) in this process and checks four things:
the exit code is 2; stderr shows exactly one line, naming the file or option and the problem; no
traceback; and no file or folder was created, removed or modified under the case's folder, the shared
tiny dataset or the shared tiny run. A few cases also run as separate processes to prove that nothing
else reaches a real terminal. The README of this folder lists what hgad answers to each case.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from relhelp import (
    assert_user_error,
    changes,
    run_cli,
    run_process,
    snapshot,
    visible_lines,
    write_booby_pickle,
    write_corrupt,
    write_text_as,
    write_truncated,
    write_zero_byte,
)
from safetensors.torch import save_file

from builders import make_mvtec, save_image, save_mask
from conftest import tiny_flags

FAST = ["--no-progress"]
# fresh runs without a calibration hold-out: these cases break a given training image, which must reach the
# flow's feature pass (a bad held-out image is tested in tests/test_decisions.py)
NO_HOLDOUT = ["--calibration-split", "0"]


@dataclass
class Ctx:
    """What a case may use: its own folder, the shared tiny dataset and the shared tiny run (read only)."""

    tmp: Path
    data: Path
    run: Path

    @property
    def good(self) -> Path:
        """A folder of normal test images of the shared dataset."""
        return self.data / "bottle" / "test" / "good"

    def run_copy(self, name: str = "run") -> Path:
        dst = self.tmp / name
        shutil.copytree(self.run, dst, ignore=shutil.ignore_patterns("test-*"))
        return dst

    def one_class(self, n_train: int = 4) -> Path:
        """A one-class MVTec folder (training images only) to break."""
        return make_mvtec(self.tmp / "d", {"bottle": {}}, n_train=n_train, n_good=0)

    def with_masks(self) -> Path:
        """A one-class MVTec folder with test images and masks, a class the tiny run knows."""
        return make_mvtec(self.tmp / "m", {"bottle": {"broken": 2}}, n_train=1, n_good=1)


def train(ctx: Ctx, data: list[str], *extra: object, out: Path | None = None) -> list[object]:
    argv: list[object] = ["train", "--out", out or ctx.tmp / "out"]
    for d in data:
        argv += ["--data", d]
    return [*argv, *tiny_flags(), *FAST, *NO_HOLDOUT, *extra]


# ---- cases: (argv, what the message must name) --------------------------------------------------------

def t_missing_path(c: Ctx):
    return train(c, [f"mvtec:{c.tmp / 'nowhere'}"]), [c.tmp / "nowhere", "does not exist"]


def t_file_instead_of_folder(c: Ctx):
    f = c.tmp / "data.zip"
    f.write_bytes(b"PK\x03\x04")
    return train(c, [f"mvtec:{f}"]), [f, "is a file"]


def t_unknown_layout(c: Ctx):
    root = c.tmp / "photos"
    save_image(root / "holiday" / "a.png")
    return train(c, [f"mvtec:{root}"]), [root, "no class folders"]


def t_wrong_layout_kind(c: Ctx):
    return train(c, [f"btad:{c.data}"]), [c.data, "looks like the mvtec layout"]


def t_unknown_kind(c: Ctx):
    return train(c, [f"imagenet:{c.data}"]), ["--data", "KIND"]


def t_no_data(c: Ctx):
    return ["train", "--out", c.tmp / "out", *FAST], ["--data", "required"]


def t_empty_class(c: Ctx):
    root = c.one_class()
    (root / "empty" / "train" / "good").mkdir(parents=True)
    return train(c, [f"mvtec:{root}"]), [root / "empty" / "train" / "good", "no training images"]


def _broken_train_image(writer, problem: str):
    def case(c: Ctx):
        root = c.one_class()
        bad = writer(root / "bottle" / "train" / "good" / "002.png")
        return train(c, [f"mvtec:{root}"]), [bad, problem]

    return case


def t_jpg_text(c: Ctx):
    root = c.one_class()
    bad = write_text_as(root / "bottle" / "train" / "good" / "note.jpg")
    return train(c, [f"mvtec:{root}"]), [bad, "not a recognised image format"]


def _two_datasets(c: Ctx, same_root_name: bool) -> tuple[Path, Path]:
    names = ("mvtec", "mvtec") if same_root_name else ("plant_a", "plant_b")
    a = make_mvtec(c.tmp / "a" / names[0], {"bottle": {}}, n_train=1, n_good=0)
    b = make_mvtec(c.tmp / "b" / names[1], {"bottle": {}}, n_train=1, n_good=0)
    return a, b


def t_duplicate_dataset_names(c: Ctx):
    a, b = _two_datasets(c, same_root_name=True)
    return train(c, [f"mvtec:{a}", f"mvtec:{b}"]), [b, "collides with", a]


def t_ambiguous_class(c: Ctx):
    a, b = _two_datasets(c, same_root_name=False)
    return (train(c, [f"mvtec:{a}", f"mvtec:{b}"], "--classes", "bottle"),
            ["--classes", "ambiguous", "mvtec-plant_a/bottle", "mvtec-plant_b/bottle"])


def t_unknown_class(c: Ctx):
    return train(c, [f"mvtec:{c.data}"], "--classes", "bottle,zebra"), ["--classes", "zebra", "alpha, bottle"]


def t_weights_pickle(c: Ctx):
    w = write_booby_pickle(c.tmp / "weights.pth", c.tmp / "pwned")
    return train(c, [f"mvtec:{c.data}"], "--backbone-weights", w), [w, "refused", "could run code"]


def t_weights_other_backbone(c: Ctx):
    import timm

    w = c.tmp / "resnet18.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(w))
    return (train(c, [f"mvtec:{c.data}"], "--backbone-weights", w),
            [w, "do not fit backbone 'tf_efficientnet_lite0'"])


def t_weights_truncated(c: Ctx):
    w = c.tmp / "lite0.safetensors"
    save_file({"conv_stem.weight": torch.zeros(32, 3, 3, 3)}, str(w))
    w.write_bytes(w.read_bytes()[:-100])
    return train(c, [f"mvtec:{c.data}"], "--backbone-weights", w), [w, "cannot read weights"]


def t_out_under_file(c: Ctx):
    f = c.tmp / "notes.txt"
    f.write_text("x")
    return train(c, [f"mvtec:{c.data}"], out=f / "run"), [f, "is a file"]


def t_out_is_file(c: Ctx):
    f = c.tmp / "run.txt"
    f.write_text("x")
    return train(c, [f"mvtec:{c.data}"], out=f), [f, "is a file, not a folder"]


def t_out_unwritable(c: Ctx):  # root ignores permission bits; /proc refuses new files even to root
    return train(c, [f"mvtec:{c.data}"], out=Path("/proc/hgad-run")), ["/proc", "not writable"]


def t_existing_run(c: Ctx):
    return train(c, [f"mvtec:{c.data}"], out=c.run), [c.run, "--resume", "--overwrite"]


def t_resume_other_classes(c: Ctx):
    run = c.run_copy()
    return (["train", "--out", run, "--resume", "--classes", "bottle", *FAST],
            ["--resume", "classes differ"])


def t_resume_pickled_state(c: Ctx):
    run = c.run_copy()
    write_booby_pickle(run / "last.safetensors", c.tmp / "pwned")
    return (["train", "--out", run, "--resume", "--meta-epochs", "3", *FAST],
            [run / "last.safetensors", "refused: a pickle"])


def t_resume_truncated_state(c: Ctx):
    run = c.run_copy()
    data = (run / "last.safetensors").read_bytes()
    (run / "last.safetensors").write_bytes(data[: len(data) // 2])
    return (["train", "--out", run, "--resume", "--meta-epochs", "3", *FAST],
            [run / "last.safetensors", "not a readable safetensors file"])


def t_img_size_pyramid(c: Ctx):
    argv = train(c, [f"mvtec:{c.data}"], "--img-size", "130", "--pyramid-levels", "3")
    return argv, ["--img-size", "130", "multiple of 4"]


def t_img_size_small(c: Ctx):
    return train(c, [f"mvtec:{c.data}"], "--img-size", "16"), ["--img-size", "too small"]


def _bad_setting(flag: str, value: str, *words: str):
    def case(c: Ctx):
        return train(c, [f"mvtec:{c.data}"], flag, value), [flag, *words]

    return case


def t_batch_over_data(c: Ctx):
    root = c.one_class(n_train=3)
    argv = train(c, [f"mvtec:{root}"], "--batch-size", "4")
    return argv, ["--batch-size", "larger than the 3 training images"]


def t_yaml_missing(c: Ctx):
    y = c.tmp / "run.yaml"
    return train(c, [f"mvtec:{c.data}"], "--config", y), [y, "does not exist"]


def t_yaml_unknown_key(c: Ctx):
    y = c.tmp / "run.yaml"
    y.write_text("lambda3: 5\n")
    return train(c, [f"mvtec:{c.data}"], "--config", y), [y, "lambda3"]


# ---- test ------------------------------------------------------------------------------------------

def e_missing_run(c: Ctx):
    return ["test", c.tmp / "nothing", *FAST], [c.tmp / "nothing", "does not exist"]


def e_not_a_run(c: Ctx):
    (c.tmp / "folder").mkdir()
    return ["test", c.tmp / "folder", *FAST], [c.tmp / "folder" / "config.json", "not a hgad run folder"]


def e_pickle_checkpoint(c: Ctx):
    run = c.run_copy()
    write_booby_pickle(run / "model.safetensors", c.tmp / "pwned")
    return ["test", run, *FAST], [run / "model.safetensors", "refused: a pickle"]


def e_tensors_vs_config_shapes(c: Ctx):
    run = c.run_copy()
    saved = json.loads((run / "config.json").read_text())
    saved["config"]["pos_dim"] = 32
    (run / "config.json").write_text(json.dumps(saved))
    return ["test", run, *FAST], [run / "model.safetensors", "does not match its config.json", "shape"]


def e_tensors_vs_config_blocks(c: Ctx):
    run = c.run_copy()
    saved = json.loads((run / "config.json").read_text())
    saved["config"]["n_blocks"] = 3
    (run / "config.json").write_text(json.dumps(saved))
    return ["test", run, *FAST], [run / "model.safetensors", "does not match its config.json", "missing"]


def e_truncated_safetensors(c: Ctx):
    run = c.run_copy()
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    return ["test", run, *FAST], [run / "model.safetensors", "not a readable safetensors file"]


def e_corrupt_config(c: Ctx):
    run = c.run_copy()
    (run / "config.json").write_text('{"config": {"img_size": 1')
    return ["test", run, *FAST], [run / "config.json", "not a hgad run config"]


def e_config_wrong_type(c: Ctx):
    run = c.run_copy()
    saved = json.loads((run / "config.json").read_text())
    saved["config"]["whiten"] = "no"  # a truthy string must not be read as True
    (run / "config.json").write_text(json.dumps(saved))
    return ["test", run, *FAST], [run / "config.json", "bad stored setting --whiten", "expected true or false"]


def e_mask_missing(c: Ctx):
    root = c.with_masks()
    (root / "bottle" / "ground_truth" / "broken" / "001_mask.png").unlink()
    return (["test", c.run, "--data", f"mvtec:{root}", "--out", c.tmp / "rep", *FAST],
            [root / "bottle" / "test" / "broken" / "001.png", "has no mask"])


def e_mask_wrong_size(c: Ctx):
    root = c.with_masks()
    mask = save_mask(root / "bottle" / "ground_truth" / "broken" / "000_mask.png", size=(32, 30))
    return (["test", c.run, "--data", f"mvtec:{root}", "--out", c.tmp / "rep", *FAST],
            [mask, "mask size 32x30 differs from image size 32x32"])


def e_mask_without_image(c: Ctx):
    root = c.with_masks()
    mask = save_mask(root / "bottle" / "ground_truth" / "broken" / "007_mask.png")
    return (["test", c.run, "--data", f"mvtec:{root}", "--out", c.tmp / "rep", *FAST],
            [mask, "mask has no matching image"])


def e_corrupt_test_image(c: Ctx):
    root = c.with_masks()
    bad = write_corrupt(root / "bottle" / "test" / "good" / "000.png")
    return (["test", c.run, "--data", f"mvtec:{root}", "--out", c.tmp / "rep", *FAST],
            [bad, "cannot read image"])


def e_unknown_class_known_source(c: Ctx):
    root = make_mvtec(c.tmp / "m", {"zebra": {"stripe": 1}}, n_train=1, n_good=1)
    argv = ["test", c.run, "--data", f"mvtec:{root}", "--class-source", "known", "--out", c.tmp / "r", *FAST]
    return argv, ["--data", "zebra", "not in the model"]


def e_out_under_file(c: Ctx):
    f = c.tmp / "notes.txt"
    f.write_text("x")
    return ["test", c.run, "--out", f / "rep", *FAST], [f, "is a file"]


# ---- predict ---------------------------------------------------------------------------------------

def p_missing_image(c: Ctx):
    return (["predict", c.run, c.tmp / "part.png", "--out", c.tmp / "pred", *FAST],
            [c.tmp / "part.png", "does not exist"])


def p_no_images(c: Ctx):
    (c.tmp / "empty").mkdir()
    (c.tmp / "empty" / "readme.txt").write_text("no pictures here")
    return (["predict", c.run, c.tmp / "empty", "--out", c.tmp / "pred", *FAST],
            [c.tmp / "empty", "no image files found"])


def p_missing_run(c: Ctx):
    return (["predict", c.tmp / "norun", c.good, "--out", c.tmp / "pred", *FAST],
            [c.tmp / "norun", "does not exist"])


def p_unknown_class(c: Ctx):
    argv = ["predict", c.run, c.good, "--class", "zebra", "--out", c.tmp / "pred", *FAST]
    return argv, ["--class", "zebra", "alpha, bottle"]


def p_pickle_checkpoint(c: Ctx):
    run = c.run_copy()
    write_booby_pickle(run / "model.safetensors", c.tmp / "pwned")
    return (["predict", run, c.good, "--out", c.tmp / "pred", *FAST],
            [run / "model.safetensors", "refused: a pickle"])


def p_out_unwritable(c: Ctx):
    return (["predict", c.run, c.good, "--out", "/proc/hgad-pred", *FAST],
            ["/proc", "not writable"])


def p_onnx_not_onnx(c: Ctx):
    f = write_text_as(c.tmp / "model.onnx")
    return (["predict", c.run, c.good, "--onnx", f, "--out", c.tmp / "pred", *FAST],
            [f, "not a readable ONNX model"])


# ---- export ----------------------------------------------------------------------------------------

def x_missing_run(c: Ctx):
    return ["export", c.tmp / "norun", "--out", c.tmp / "m.onnx"], [c.tmp / "norun", "does not exist"]


def x_out_is_folder(c: Ctx):
    (c.tmp / "exports").mkdir()
    return ["export", c.run, "--out", c.tmp / "exports"], [c.tmp / "exports", "is a folder"]


def x_out_under_file(c: Ctx):
    f = c.tmp / "notes.txt"
    f.write_text("x")
    return ["export", c.run, "--out", f / "m.onnx"], [f, "is a file"]


def x_pickle_checkpoint(c: Ctx):
    run = c.run_copy()
    write_booby_pickle(run / "model.safetensors", c.tmp / "pwned")
    return ["export", run, "--out", c.tmp / "m.onnx"], [run / "model.safetensors", "refused: a pickle"]


def x_truncated_safetensors(c: Ctx):
    run = c.run_copy()
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[:200])
    return ["export", run, "--out", c.tmp / "m.onnx"], [run / "model.safetensors", "not a readable"]


def x_bad_opset(c: Ctx):
    return ["export", c.run, "--out", c.tmp / "m.onnx", "--opset", "7"], ["--opset", "7"]


CASES: dict[str, Callable[[Ctx], tuple[list, list]]] = {
    "train-missing-path": t_missing_path,
    "train-file-instead-of-folder": t_file_instead_of_folder,
    "train-unknown-layout": t_unknown_layout,
    "train-wrong-layout-kind": t_wrong_layout_kind,
    "train-unknown-kind": t_unknown_kind,
    "train-no-data": t_no_data,
    "train-empty-class": t_empty_class,
    "train-corrupt-image": _broken_train_image(write_corrupt, "cannot read image"),
    "train-truncated-image": _broken_train_image(write_truncated, "cannot read image"),
    "train-zero-byte-image": _broken_train_image(write_zero_byte, "empty file"),
    "train-text-as-png": _broken_train_image(write_text_as, "not a recognised image format"),
    "train-text-as-jpg": t_jpg_text,
    "train-duplicate-dataset-names": t_duplicate_dataset_names,
    "train-ambiguous-class": t_ambiguous_class,
    "train-unknown-class": t_unknown_class,
    "train-weights-pickle": t_weights_pickle,
    "train-weights-other-backbone": t_weights_other_backbone,
    "train-weights-truncated": t_weights_truncated,
    "train-out-under-file": t_out_under_file,
    "train-out-is-file": t_out_is_file,
    "train-out-unwritable": t_out_unwritable,
    "train-existing-run": t_existing_run,
    "train-resume-other-classes": t_resume_other_classes,
    "train-resume-pickled-state": t_resume_pickled_state,
    "train-resume-truncated-state": t_resume_truncated_state,
    "train-img-size-pyramid": t_img_size_pyramid,
    "train-img-size-too-small": t_img_size_small,
    "train-meta-epochs-zero": _bad_setting("--meta-epochs", "0", "positive"),
    "train-sub-epochs-negative": _bad_setting("--sub-epochs", "-1", "positive"),
    "train-batch-size-zero": _bad_setting("--batch-size", "0", "positive"),
    "train-batch-over-data": t_batch_over_data,
    "train-lambda1-negative": _bad_setting("--lambda1", "-1", "[0, 1e6)"),
    "train-lambda1-zero": _bad_setting("--lambda1", "0", "> 0"),
    "train-lambda2-huge": _bad_setting("--lambda2", "1e7", "[0, 1e6)"),
    "train-lambda2-nan": _bad_setting("--lambda2", "nan", "nan"),
    "train-lambda2-inf": _bad_setting("--lambda2", "inf", "inf"),
    "train-lr-zero": _bad_setting("--lr", "0", "positive"),
    "train-threshold-quantile": _bad_setting("--threshold-quantile", "1.5", "(0, 1]"),
    "train-pos-dim": _bad_setting("--pos-dim", "18", "multiple of 4"),
    "train-tap-out-of-range": _bad_setting("--taps", "9", "out of range"),
    "train-unknown-backbone": _bad_setting("--backbone", "resnet_9000", "unknown timm model"),
    "train-yaml-missing": t_yaml_missing,
    "train-yaml-unknown-key": t_yaml_unknown_key,
    "test-missing-run": e_missing_run,
    "test-not-a-run": e_not_a_run,
    "test-pickle-checkpoint": e_pickle_checkpoint,
    "test-tensors-vs-config-shape": e_tensors_vs_config_shapes,
    "test-tensors-vs-config-blocks": e_tensors_vs_config_blocks,
    "test-truncated-safetensors": e_truncated_safetensors,
    "test-corrupt-config": e_corrupt_config,
    "test-config-wrong-type": e_config_wrong_type,
    "test-mask-missing": e_mask_missing,
    "test-mask-wrong-size": e_mask_wrong_size,
    "test-mask-without-image": e_mask_without_image,
    "test-corrupt-image": e_corrupt_test_image,
    "test-unknown-class-known-source": e_unknown_class_known_source,
    "test-out-under-file": e_out_under_file,
    "predict-missing-image": p_missing_image,
    "predict-no-images": p_no_images,
    "predict-missing-run": p_missing_run,
    "predict-unknown-class": p_unknown_class,
    "predict-pickle-checkpoint": p_pickle_checkpoint,
    "predict-out-unwritable": p_out_unwritable,
    "predict-onnx-not-onnx": p_onnx_not_onnx,
    "export-missing-run": x_missing_run,
    "export-out-is-folder": x_out_is_folder,
    "export-out-under-file": x_out_under_file,
    "export-pickle-checkpoint": x_pickle_checkpoint,
    "export-truncated-safetensors": x_truncated_safetensors,
    "export-bad-opset": x_bad_opset,
}

# argparse-level mistakes: exit 2 through SystemExit, before any work
USAGE_CASES: dict[str, tuple[list[str], list[str]]] = {
    "usage-batch-size-not-int": (["train", "--out", "x", "--batch-size", "abc"], ["--batch-size", "abc"]),
    "usage-epochs-float": (["train", "--out", "x", "--meta-epochs", "1.5"], ["--meta-epochs", "1.5"]),
    "usage-test-batch-size-zero": (["test", "run", "--batch-size", "0"], ["--batch-size", "positive"]),
    "usage-predict-batch-size-negative": (["predict", "run", "a.png", "--batch-size", "-3"],
                                          ["--batch-size", "-3"]),
    "usage-unknown-protocol": (["test", "run", "--protocol", "fancy"], ["--protocol", "fancy"]),
    "usage-export-format": (["export", "run", "--out", "m.x", "--format", "tflite"], ["--format", "tflite"]),
    "usage-unknown-option": (["train", "--out", "x", "--lambda3", "1"], ["--lambda3"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(case: str, tmp_path: Path, tiny_data: Path,
                                                      tiny_run: Path, capsys):
    ctx = Ctx(tmp=tmp_path, data=tiny_data, run=tiny_run)
    argv, mentions = CASES[case](ctx)
    roots = [tmp_path, tiny_data, tiny_run]
    before = snapshot(*roots)
    rc, err, _ = run_cli(argv, capsys)
    assert_user_error(rc, err, mentions)
    assert changes(before, snapshot(*roots)) == []
    assert not (tmp_path / "pwned").exists()  # a pickle given as weights or checkpoint was never executed


@pytest.mark.parametrize("case", list(USAGE_CASES))
def test_usage_errors_exit_2_with_one_line(case: str, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv, mentions = USAGE_CASES[case]
    rc, err, _ = run_cli(argv, capsys)
    assert_user_error(rc, err, mentions)
    assert list(tmp_path.iterdir()) == []


def test_booby_pickle_really_runs_code_when_unpickled(tmp_path: Path):
    """The refusals above prove something only if the file is dangerous: plain torch.load runs it."""
    path = write_booby_pickle(tmp_path / "w.pth", tmp_path / "pwned")
    torch.load(path, weights_only=False)
    assert (tmp_path / "pwned").exists()


def test_existing_empty_out_folder_is_kept_empty_on_failure(tmp_path: Path, capsys):
    """A failure after the run folder was written into (bad image found while extracting features)
    leaves a folder the user created as it was: empty."""
    root = make_mvtec(tmp_path / "d", {"bottle": {}}, n_train=4, n_good=0)
    bad = write_truncated(root / "bottle" / "train" / "good" / "001.png")
    out = tmp_path / "out"
    out.mkdir()
    rc, err, _ = run_cli(["train", "--data", f"mvtec:{root}", "--out", out, *tiny_flags(), *NO_HOLDOUT], capsys)
    assert_user_error(rc, err, [bad])  # progress bars on: they must not share or wipe the error line
    assert out.is_dir() and list(out.iterdir()) == []


# ---- the same guarantees seen from a real terminal: separate processes -------------------------------

def test_process_bad_image_with_progress_bars(tmp_path: Path):
    root = make_mvtec(tmp_path / "d", {"bottle": {}}, n_train=4, n_good=0)
    bad = write_zero_byte(root / "bottle" / "train" / "good" / "003.png")
    out = tmp_path / "out"
    proc = run_process(["train", "--data", f"mvtec:{root}", "--out", out, *tiny_flags(), *NO_HOLDOUT])
    line = assert_user_error(proc.returncode, proc.stderr, [bad, "empty file"])
    assert line == f"hgad train: error: {bad}: cannot read image: empty file"
    assert not out.exists()


def test_process_pickle_checkpoint(tmp_path: Path, tiny_data: Path, tiny_run: Path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("test-*"))
    write_booby_pickle(run / "model.safetensors", tmp_path / "pwned")
    proc = run_process(["predict", run, tiny_data / "bottle" / "test" / "good", "--out", tmp_path / "pred"])
    assert_user_error(proc.returncode, proc.stderr, [run / "model.safetensors"])
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "pred").exists()


def test_process_usage_error(tmp_path: Path):
    proc = run_process(["train", "--out", tmp_path / "out", "--batch-size", "abc"])
    assert_user_error(proc.returncode, proc.stderr, ["--batch-size", "abc"])
    assert visible_lines(proc.stderr)[0].startswith("hgad train: error: argument --batch-size")
    assert list(tmp_path.iterdir()) == []


def test_readme_table_lists_every_case():
    readme = (Path(__file__).parent / "README.md").read_text()
    missing = [case for case in [*CASES, *USAGE_CASES] if f"| `{case}` |" not in readme]
    assert missing == []
