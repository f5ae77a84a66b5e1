"""Reliability, round two (issue #14): run folders, locks, resume, checksums, non-finite scores, write
errors, worker errors, resource limits, FIFOs, predict output names, YAML keys, moved runs, pipes.

Each test names the item of the issue it covers; the README of this folder lists what each observes.
Where the item is about processes, files or memory, the test runs ``python -m hgad`` as a real process.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from relhelp import assert_user_error, changes, command, process_env, run_cli, run_process, snapshot

from builders import make_mvtec, save_mask
from conftest import tiny_flags

FAST = ["--no-progress"]


def _train(data: Path, out: Path, *extra: object) -> list[object]:
    return ["train", "--data", f"mvtec:{data}", "--out", out, *tiny_flags(), *FAST, *extra]


def _copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("test-*"))
    return dst


def _bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(folder: Path) -> list[str]:
    """Hidden entries hgad may leave next to a folder (temporaries, locks)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def _restamp(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Rewrite a model file with changed tensors and a matching checksum (damage a checksum cannot see)."""
    from hgad import __version__
    from hgad.checkpoint import _stamp
    from hgad.io import atomic_save_tensors

    atomic_save_tensors(path, tensors, metadata=_stamp("hgad_version", {"version": __version__}, tensors))


# ---- item 1: --overwrite replaces only an hgad run, and only once the new one is complete -----------------

def test_overwrite_refuses_a_folder_hgad_did_not_write(tiny_data: Path, tmp_path: Path, capsys):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("months of work\n")
    (out / "config.json").write_text('{"not": "hgad"}\n')
    before = snapshot(tmp_path)
    rc, err, _ = run_cli(_train(tiny_data, out, "--overwrite"), capsys)
    assert_user_error(rc, err, [out, "not replaced"])
    assert changes(before, snapshot(tmp_path)) == []


def test_failed_overwrite_keeps_the_old_run_whole(tiny_run: Path, tiny_data: Path, tmp_path: Path, capsys):
    run = _copy_run(tiny_run, tmp_path / "run")
    (run / "test-deploy-inferred").mkdir()  # a report folder of `hgad test` is part of a run folder
    old = _bytes(run)
    # invalid new input: nothing touched
    rc, err, _ = run_cli(_train(tmp_path / "nowhere", run, "--overwrite"), capsys)
    assert_user_error(rc, err, ["nowhere", "does not exist"])
    assert _bytes(run) == old
    # the new run fails mid-training (the loss diverges at pass 1): the old run is still there, whole
    rc, err, _ = run_cli(_train(tiny_data, run, "--overwrite", "--lr", "1e30"), capsys)
    assert_user_error(rc, err, ["non-finite loss"])
    assert _bytes(run) == old
    assert _siblings(run) == []  # no temporary folder, no lock file left
    # a successful overwrite replaces it (other seed: other weights), again without leftovers
    rc, err, _ = run_cli(_train(tiny_data, run, "--overwrite", "--seed", "1"), capsys)
    assert rc == 0, err
    new = _bytes(run)
    assert new["model.safetensors"] != old["model.safetensors"]
    assert "test-deploy-inferred" not in {p.name for p in run.iterdir()}
    assert _siblings(run) == []


# ---- item 2: a second `hgad train` on the same --out stops at once ----------------------------------------

def test_second_train_process_on_the_same_run_is_refused(tiny_data: Path, tmp_path: Path):
    from hgad.io import FolderLock

    out = tmp_path / "run"
    env = {**process_env(), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command(_train(tiny_data, out, "--meta-epochs", "100000")), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lock = tmp_path / ".run.lock"
    try:
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().strip()) and first.poll() is None:
            assert time.monotonic() < deadline, "first process never took the lock"
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read().decode()
        second = run_process(_train(tiny_data, out, "--overwrite"), timeout=120)
        assert first.poll() is None  # still training: the refusal was the lock, not a finished run
        line = assert_user_error(second.returncode, second.stderr, [out, f"process {first.pid}"])
        assert "in use" in line
    finally:
        first.kill()
        first.wait()
    # the kernel dropped the killed holder's lock: the stale file blocks nobody
    with FolderLock(out):
        pass
    assert not lock.exists()


# ---- item 3: --resume refuses what it cannot honestly continue -------------------------------------------

def test_resume_refuses_a_finished_run_without_its_state_and_changed_settings(tiny_run: Path, tiny_data: Path,
                                                                              tmp_path: Path, capsys):
    run = _copy_run(tiny_run, tmp_path / "run")
    (run / "last.safetensors").unlink()
    before = snapshot(tmp_path)
    rc, err, _ = run_cli(["train", "--out", run, "--resume", *FAST], capsys)
    assert_user_error(rc, err, [run / "last.safetensors", "finished"])
    assert changes(before, snapshot(tmp_path)) == []

    run = _copy_run(tiny_run, tmp_path / "run2")
    before = snapshot(run)
    for flags, option in ((["--img-size", "96"], "--img-size"), (["--backbone", "resnet18"], "--backbone"),
                          (["--n-blocks", "3"], "--n-blocks"), (["--blur-sigma", "2"], "--blur-sigma"),
                          (["--data", f"mvtec:{tmp_path}"], "--data")):
        rc, err, _ = run_cli(["train", "--out", run, "--resume", *flags, *FAST], capsys)
        assert_user_error(rc, err, [option, "--resume cannot change"])
    assert changes(before, snapshot(run)) == []


# ---- item 4: checksums, non-finite scores and thresholds -------------------------------------------------

def test_flipped_bit_in_the_model_is_caught(tiny_run: Path, tiny_data: Path, tmp_path: Path, capsys):
    from hgad.checkpoint import MODEL_FILE, read_tensors

    run = _copy_run(tiny_run, tmp_path / "run")
    data = bytearray((run / MODEL_FILE).read_bytes())
    data[-5] ^= 0x40  # one bit of the last tensor's bytes
    (run / MODEL_FILE).write_bytes(bytes(data))
    image = tiny_data / "bottle" / "test" / "good" / "000.png"
    rc, err, _ = run_cli(["predict", run, image, "--out", tmp_path / "p", *FAST], capsys)
    assert_user_error(rc, err, [run / MODEL_FILE, "checksum"])
    assert not (tmp_path / "p").exists()
    # a file written before checksums existed (plain version string) still loads
    tensors, _ = read_tensors(tiny_run / MODEL_FILE)
    from hgad.io import atomic_save_tensors

    atomic_save_tensors(run / MODEL_FILE, tensors, metadata={"hgad_version": "0.1.0"})
    rc, err, _ = run_cli(["predict", run, image, "--out", tmp_path / "p", *FAST], capsys)
    assert rc == 0, err


def test_model_files_stay_byte_identical(tiny_run: Path, tmp_path: Path):
    from hgad.checkpoint import load_model, save_model

    model = load_model(tiny_run)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_model(tmp_path / name, model)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tiny_run / "model.safetensors").read_bytes()


def test_non_finite_scores_and_thresholds_stop_every_command(tiny_run: Path, tiny_data: Path, tmp_path: Path,
                                                             capsys):
    from hgad.checkpoint import MODEL_FILE, read_tensors

    image = tiny_data / "bottle" / "test" / "good" / "000.png"
    nan_run = _copy_run(tiny_run, tmp_path / "nan")
    tensors, _ = read_tensors(nan_run / MODEL_FILE)
    # every normalisation and score: the max statistics and each per-position mean (logp, ent, maha, knn)
    for key in [k for k in tensors if k == "logp_max" or (k.startswith("z_") and "_mean" in k)]:
        tensors[key] = torch.full_like(tensors[key], float("nan"))
    _restamp(nan_run / MODEL_FILE, tensors)
    before = snapshot(tmp_path)
    rc, err, _ = run_cli(["predict", nan_run, image, "--out", tmp_path / "p", *FAST], capsys)
    assert_user_error(rc, err, [nan_run, "non-finite"])
    rc, err, _ = run_cli(["test", nan_run, "--out", tmp_path / "t", *FAST], capsys)
    assert_user_error(rc, err, [nan_run / MODEL_FILE, "non-finite", "test images"])
    assert changes(before, snapshot(tmp_path)) == []
    pytest.importorskip("onnxruntime")
    rc, err, _ = run_cli(["export", nan_run, "--out", tmp_path / "m.onnx"], capsys)
    assert_user_error(rc, err, [nan_run / MODEL_FILE, "non-finite"])
    assert not (tmp_path / "m.onnx").exists()


def test_threshold_must_be_finite(tiny_run: Path, tiny_data: Path, tmp_path: Path, capsys):
    from hgad.checkpoint import MODEL_FILE, read_tensors

    image = tiny_data / "bottle" / "test" / "good" / "000.png"
    for value in ("nan", "inf", "-inf"):
        rc, err, _ = run_cli(["predict", tiny_run, image, "--out", tmp_path / "p", f"--threshold={value}", *FAST],
                             capsys)
        assert_user_error(rc, err, ["--threshold", "finite"])
    run = _copy_run(tiny_run, tmp_path / "run")
    tensors, _ = read_tensors(run / MODEL_FILE)
    tensors["threshold"] = torch.full_like(tensors["threshold"], float("inf"))  # "everything normal" before
    _restamp(run / MODEL_FILE, tensors)
    rc, err, _ = run_cli(["predict", run, image, "--out", tmp_path / "p", *FAST], capsys)
    assert_user_error(rc, err, [run, "threshold", "inf"])
    assert not (tmp_path / "p").exists()


# ---- item 5: write errors, whole output folders, never deleting the user's folders ------------------------

@contextlib.contextmanager
def _tiny_tmpfs(folder: Path, size: str):
    folder.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                         capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_disk_full_is_one_line_and_keeps_the_old_outputs(tiny_run: Path, tiny_data: Path, tmp_path: Path):
    image = tiny_data / "bottle" / "test" / "good" / "000.png"
    with _tiny_tmpfs(tmp_path / "disk", "48k") as disk:
        old = disk / "report"
        old.mkdir()
        (old / "metrics.md").write_text("old metrics\n")
        (old / "report.html").write_text("old report\n")
        proc = run_process(["test", tiny_run, "--data", f"mvtec:{tiny_data}", "--out", old, *FAST])
        line = assert_user_error(proc.returncode, proc.stderr, [old, "No space left on device"])
        assert "cannot write" in line and ".tmp-" not in line  # names the file in its final place
        assert {p.name: p.read_text() for p in old.iterdir()} == {"metrics.md": "old metrics\n",
                                                                  "report.html": "old report\n"}
        assert sorted(p.name for p in disk.iterdir()) == ["report"]  # no temporary folder left
        st = os.statvfs(disk)
        (disk / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - 4096))
        proc = run_process(["predict", tiny_run, image, "--out", disk / "preds", *FAST])
        assert_user_error(proc.returncode, proc.stderr, [disk, "No space left on device"])
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "report"]


def test_write_error_in_process_is_one_line(tiny_run: Path, tiny_data: Path, tmp_path: Path, capsys,
                                            monkeypatch):
    import errno

    import hgad.io

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hgad.io.os, "fsync", full)
    rc, err, _ = run_cli(["test", tiny_run, "--out", tmp_path / "t", *FAST], capsys)
    assert_user_error(rc, err, ["metrics.json", "No space left on device"])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_output_folders_of_the_user_are_never_replaced(tiny_run: Path, tiny_data: Path, tmp_path: Path, capsys):
    image = tiny_data / "bottle" / "test" / "good" / "000.png"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me\n")
    before = snapshot(tmp_path)
    rc, err, _ = run_cli(["predict", tiny_run, image, "--out", mine, *FAST], capsys)
    assert_user_error(rc, err, [mine, "notes.txt"])
    rc, err, _ = run_cli(["test", tiny_run, "--out", mine, *FAST], capsys)
    assert_user_error(rc, err, [mine, "notes.txt"])
    assert changes(before, snapshot(tmp_path)) == []


# ---- item 6: an image error in a DataLoader worker stays one line ----------------------------------------

def test_worker_image_error_is_one_line(tiny_run: Path, tmp_path: Path):
    run = _copy_run(tiny_run, tmp_path / "run")
    saved = json.loads((run / "config.json").read_text())
    saved["config"]["num_workers"] = 1
    (run / "config.json").write_text(json.dumps(saved))
    data = make_mvtec(tmp_path / "m", {"bottle": {}}, n_train=1, n_good=3)
    bad = data / "bottle" / "test" / "good" / "001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    proc = run_process(["test", run, "--data", f"mvtec:{data}", "--out", tmp_path / "t", *FAST])
    assert_user_error(proc.returncode, proc.stderr, [bad, "cannot read image"])


# ---- item 7: bounded work per image and per option ----------------------------------------------------------

_RSS = ("import resource, sys\nfrom hgad.cli import main\nrc = main(sys.argv[1:])\n"
        "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(rc)\n")


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb stand-in, a few bytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_strip_image_is_scored_in_bounded_memory(tiny_run: Path, tmp_path: Path):
    strip = tmp_path / "in" / "strip.png"
    strip.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1, 20000, 3), dtype=np.uint8)).save(strip)
    _png_header_only(tmp_path / "in" / "bomb.png", 30000, 30000)
    out = tmp_path / "p"
    proc = subprocess.run([sys.executable, "-c", _RSS, "predict", str(tiny_run), str(tmp_path / "in"), "--out",
                           str(out), "--no-progress", "--allow-errors"], capture_output=True, text=True,
                          timeout=300, env={**process_env(), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    rss_mb = int(proc.stderr.split("maxrss_kb")[1].split()[0]) / 1024
    print(f"peak RSS of predict on a 1x20000 PNG: {rss_mb:.0f} MB")
    assert rss_mb < 1500, rss_mb  # about 1030 MB, as for a 32x32 image; 2390 MB before the fix
    rows = {Path(r["path"]).name: r for r in csv.DictReader((out / "scores.csv").open())}
    assert rows["strip.png"]["error"] == "" and np.isfinite(float(rows["strip.png"]["score"]))
    assert "more than" in rows["bomb.png"]["error"] and "100,000,000" in rows["bomb.png"]["error"]


def test_size_options_are_bounded(tiny_data: Path, tmp_path: Path, capsys):
    for flag in ("--img-size", "--map-size"):
        out = tmp_path / flag.strip("-")
        rc, err, _ = run_cli(_train(tiny_data, out, flag, "100000"), capsys)
        assert_user_error(rc, err, [flag, "at most 4096"])
        assert not out.exists()


# ---- item 8: FIFOs and devices never hang a command --------------------------------------------------------

def test_fifo_as_an_image_does_not_hang(tiny_run: Path, tiny_data: Path, tmp_path: Path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    good = tiny_data / "bottle" / "test" / "good" / "000.png"
    proc = run_process(["predict", tiny_run, fifo, good, "--out", tmp_path / "p", *FAST], timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    rows = list(csv.DictReader((tmp_path / "p" / "scores.csv").open()))
    assert [Path(r["path"]).name for r in rows] == ["pipe.png", "000.png"]
    assert "FIFO" in rows[0]["error"] and rows[1]["error"] == ""
    data = make_mvtec(tmp_path / "d", {"bottle": {}}, n_train=4, n_good=0)
    os.mkfifo(data / "bottle" / "train" / "good" / "zz.png")
    proc = run_process(_train(data, tmp_path / "run"), timeout=120)
    assert_user_error(proc.returncode, proc.stderr, ["zz.png", "FIFO"])
    assert not (tmp_path / "run").exists()


# ---- item 10: predict output names, order, output folder never an input, exit code -------------------------

def test_predict_names_are_unique_and_rows_keep_the_input_order(tiny_run: Path, tiny_data: Path, tmp_path: Path,
                                                                capsys):
    src = sorted((tiny_data / "bottle" / "test").rglob("*.png"))
    for rel, k in (("a/000.png", 0), ("b/000.png", 1), ("a/000_1.png", 2), ("a/sub/000.png", 3),
                   ("b/000.jpg", 4)):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.open(src[k]).convert("RGB").save(tmp_path / rel)
    (tmp_path / "b" / "001.png").write_bytes(b"not an image")
    out = tmp_path / "a" / "preds"  # inside an input folder: never scanned
    argv = ["predict", tiny_run, tmp_path / "a", tmp_path / "b", "--out", out, *FAST]
    for _ in range(2):
        rc, err, _ = run_cli(argv, capsys)
        assert rc == 1 and "1 of 6 images could not be scored" in err, err
    rows = list(csv.DictReader((out / "scores.csv").open()))
    names = [str(Path(r["path"]).relative_to(tmp_path)) for r in rows]
    assert names == ["a/000.png", "a/000_1.png", "a/sub/000.png", "b/000.jpg", "b/000.png", "b/001.png"]
    maps = [r["map"] for r in rows if r["map"]]
    assert len(maps) == len(set(maps)) == 5
    assert all((out / m).is_file() for m in maps)
    assert "maps/a/sub/000.png" in maps and "maps/b/000.png" in maps
    rc, _, _ = run_cli([*argv, "--allow-errors"], capsys)
    assert rc == 0


# ---- item 11: YAML keys as the flags are spelled, values type-checked -----------------------------------

def test_yaml_accepts_flag_spellings_and_checks_types(tiny_data: Path, tmp_path: Path, capsys):
    from hgad.config import load_yaml

    good = tmp_path / "good.yaml"
    good.write_text("intra-centers: 2\nno-mi: true\nentropy-loss: false\nlr: 1e-3\nimg_size: 128\n"
                    "two-stage: no\ntaps: [3]\n")
    values = load_yaml(good)
    assert values == {"n_intra": 2, "use_mi": False, "use_entropy": False, "lr": 0.001, "img_size": 128,
                      "two_stage": False, "taps": (3,)}
    for text, key, expected in (("batch-size: 2.5\n", "batch-size", "integer"),
                                ("amp: maybe\n", "amp", "true or false"),
                                ("lr: fast\n", "lr", "number"),
                                ("n_blocks: true\n", "n_blocks", "integer"),
                                ("intra-centers: 2\nn_intra: 3\n", "n_intra", "same setting")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        out = tmp_path / "out"
        rc, err, _ = run_cli(_train(tiny_data, out, "--config", bad), capsys)
        assert_user_error(rc, err, [bad, key, expected])
        assert not out.exists()


# ---- item 12: a run folder works from anywhere and after its files moved ----------------------------------

def test_run_works_from_another_folder_and_after_weights_moved(tiny_data: Path, tmp_path: Path, capsys,
                                                               monkeypatch):
    from hgad.backbone import _package_weights

    shipped = _package_weights("tf_efficientnet_lite0")
    if shipped is None:
        pytest.skip("no shipped weights for the default backbone")
    work = tmp_path / "work"
    shutil.copytree(tiny_data, work / "data")
    shutil.copy(shipped, work / f"lite0{Path(shipped).suffix}")
    monkeypatch.chdir(work)
    rc, err, _ = run_cli(["train", "--data", "mvtec:data", "--out", "run", "--backbone-weights",
                          f"lite0{Path(shipped).suffix}", *tiny_flags(), *FAST], capsys)
    assert rc == 0, err
    saved = json.loads((work / "run" / "config.json").read_text())
    assert saved["data"] == [f"mvtec:{work / 'data'}"]
    assert saved["config"]["backbone_weights"] == str(work / f"lite0{Path(shipped).suffix}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc, err, _ = run_cli(["test", work / "run", "--out", "rep", *FAST], capsys)
    assert rc == 0, err
    moved = tmp_path / "weights.bin"
    (work / f"lite0{Path(shipped).suffix}").rename(moved)
    image = work / "data" / "bottle" / "test" / "good" / "000.png"
    rc, err, _ = run_cli(["predict", work / "run", image, "--out", "p", *FAST], capsys)
    assert_user_error(rc, err, ["config.json", "--backbone-weights"])
    rc, err, _ = run_cli(["predict", work / "run", image, "--out", "p", "--backbone-weights", moved, *FAST],
                         capsys)
    assert rc == 0, err
    shutil.move(work / "data", tmp_path / "data-moved")
    rc, err, _ = run_cli(["test", work / "run", "--out", "rep", "--backbone-weights", moved, *FAST], capsys)
    assert_user_error(rc, err, ["config.json", "--data"])


# ---- item 13: broken pipes, empty masks, classes without normal test images ------------------------------

def test_info_into_a_closed_pipe_is_quiet(tiny_run: Path):
    reader = subprocess.Popen(["true"], stdin=subprocess.PIPE)
    reader.wait()  # the reader is gone before hgad writes a byte
    proc = subprocess.run(command(["info", tiny_run]), stdout=reader.stdin, stderr=subprocess.PIPE,
                          timeout=120, env=process_env())
    reader.stdin.close()
    stderr = proc.stderr.decode(errors="replace")
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert proc.returncode == 0, stderr


def test_empty_mask_warns_and_no_normal_class_shows_dashes(tiny_run: Path, tmp_path: Path, capsys):
    data = make_mvtec(tmp_path / "m", {"bottle": {"broken": 2}}, n_train=1, n_good=0)
    black = data / "bottle" / "ground_truth" / "broken" / "001_mask.png"
    save_mask(black, value=0)
    rc, err, out = run_cli(["test", tiny_run, "--data", f"mvtec:{data}", "--out", tmp_path / "t", *FAST], capsys)
    assert rc == 0, err
    assert "warning" in err and str(black) in err
    row = next(line for line in out.splitlines() if line.startswith("| bottle"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    header = next(line for line in out.splitlines() if line.startswith("| class"))
    heads = [c.strip() for c in header.strip("|").split("|")]
    for metric in ("I-AUROC", "I-AP", "I-F1max"):
        assert cells[heads.index(metric)] == "–", (metric, row)
