"""The ``hgad`` command line: demo-data, train, test, predict, info.

User mistakes (paths, options, corrupt files) end with one line on stderr and exit code 2; only bugs
show a traceback. Long work shows progress bars on stderr; results go to stdout and files.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import glob
import json
import math
import os
import shutil
import sys
import tempfile
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hgad import __version__
from hgad.config import (
    CHOICES,
    FLAG_NAMES,
    LEGACY_DEFAULTS,
    PRESETS,
    RESUME_MAY_CHANGE,
    HGADConfig,
    config_from_dict,
    load_yaml,
)
from hgad.errors import ConfigError, HgadError, InputError

__all__ = ["main", "build_parser", "add_config_flags", "add_dataset_args", "add_settings_args", "resolve_config",
           "check_writable"]

# friendlier names for the ablation switches (issue: --no-mi, --no-entropy-loss, --intra-centers, ...)
_FLAG_NAMES = FLAG_NAMES


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (usage is in --help)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parse_taps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_config_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("model and training settings (override the preset and --config)")
    hints = typing.get_type_hints(HGADConfig)
    for f in dataclasses.fields(HGADConfig):
        flag = "--" + _FLAG_NAMES.get(f.name, f.name.replace("_", "-"))
        help_text = f"{f.metadata['help']} (fast preset: {f.default})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        hint = hints[f.name]
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if f.name == "taps":
            kw["type"], kw["metavar"] = _parse_taps, "I[,I...]"
        elif f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        elif hint is int:
            kw["type"] = int
        elif hint is float:
            kw["type"] = float
        if f.name == "n_intra":
            group.add_argument(flag, "--n-intra", **kw)
        else:
            group.add_argument(flag, **kw)


def add_weights_arg(p: argparse.ArgumentParser) -> None:
    """``--backbone-weights`` for the commands that load a run (its stored weights file may have moved)."""
    p.add_argument("--backbone-weights", metavar="FILE", help="backbone weights file to use instead of the one "
                   "named in the run's config.json (e.g. after moving it; must hold the same weights)")


def add_dataset_args(p: argparse.ArgumentParser, *, required: bool, help: str) -> None:
    """``--data`` (repeatable) and ``--classes``, for the commands that read datasets to train."""
    p.add_argument("--data", action="append", required=required, metavar="KIND:PATH", help=help)
    p.add_argument("--classes", help="comma-separated subset of classes (default: all)")


def add_settings_args(p: argparse.ArgumentParser, preset_help: str) -> None:
    """``--preset``, ``--config`` and one flag per config field (see :func:`resolve_config`)."""
    p.add_argument("--preset", choices=sorted(PRESETS), default="fast", help=preset_help)
    p.add_argument("--config", type=Path, metavar="YAML", help="YAML file of settings (keys as the flags below)")
    add_config_flags(p)


def resolve_config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> HGADConfig:
    values: dict[str, Any] = dict(PRESETS[args.preset]) if base is None else dict(base)
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    for f in dataclasses.fields(HGADConfig):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return config_from_dict(values, source=str(getattr(args, "config", None) or "settings"))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hgad", description="Unified multi-class visual anomaly detection with hierarchical "
                "Gaussian-mixture normalizing flows (HGAD, ECCV 2024).")
    p.add_argument("--version", action="version", version=f"hgad {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    d = sub.add_parser("demo-data", help="write the built-in demo dataset (MVTec AD layout)",
                       description="Write a small MVTec-AD-layout dataset made from real photographs bundled "
                       "with scikit-image (CC0), with synthetic defects and exact masks.")
    d.add_argument("out_dir", type=Path, help="folder to create")
    d.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    d.add_argument("--n-train", type=int, default=40, help="normal training images per class")
    d.add_argument("--n-test-good", type=int, default=10, help="normal test images per class")
    d.add_argument("--n-test-defect", type=int, default=18, help="defective test images per class")
    d.add_argument("--size", type=int, default=256, help="image size in pixels")

    data_help = ("dataset as KIND:PATH, KIND one of mvtec, visa, btad, mvtec3d, folder; repeat to train one "
                 "model on several datasets")
    t = sub.add_parser("train", help="train one model on the normal images of all classes",
                       description="Train a unified HGAD model. Writes RUN_DIR/config.json, model.safetensors, "
                       "last.safetensors (resume state), train_log.jsonl and train_summary.json.")
    add_dataset_args(t, required=False, help=data_help)
    t.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run folder to write")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in RUN_DIR (or a finished "
                   "one for more --meta-epochs); only speed settings, --meta-epochs and --lr may change")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in RUN_DIR (only an empty "
                   "folder or a run folder of hgad; the old run is kept until the new one is complete)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_settings_args(t, "fast: small CPU-friendly model (default); paper: the release's settings")

    e = sub.add_parser("test", help="evaluate a run on a dataset's test split",
                       description="Score the test images, compute image/pixel AUROC, AUPRO, AP and F1-max per "
                       "class, and write metrics.json, metrics.md and report.html.")
    e.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run folder written by hgad train")
    e.add_argument("--data", action="append", metavar="KIND:PATH",
                   help=data_help + " (default: the training data of the run)")
    e.add_argument("--classes", help="comma-separated subset of classes")
    e.add_argument("--protocol", choices=("deploy", "paper"), default="deploy",
                   help="deploy: statistics stored at training, each image scored alone (default); "
                   "paper: the release's normalisation by each class's whole test set")
    e.add_argument("--class-source", choices=("inferred", "known"), default="inferred",
                   help="class used to score an image: inferred from the latent posterior (default) or the "
                   "ground truth (paper)")
    e.add_argument("--score", choices=CHOICES["score"], help="re-score with this pixel score without retraining: "
                   "product of the log-likelihood and entropy maps, logp only, or entropy only (default: the "
                   "run's; with one class product means logp)")
    e.add_argument("--out", type=Path, help="report folder (default: RUN_DIR/test-PROTOCOL-CLASSSOURCE, "
                   "with -score-SCORE appended when --score is given)")
    e.add_argument("--batch-size", type=_positive_int, default=8, help="images per batch")
    e.add_argument("--device", choices=CHOICES["device"], default="auto", help="where to run")
    e.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's, one per core)")
    e.add_argument("--no-report", action="store_true", help="skip report.html")
    add_weights_arg(e)
    e.add_argument("--no-progress", action="store_true", help="no progress bars")

    r = sub.add_parser("predict", help="score image files or folders (no dataset layout needed)",
                       description="Score images with the deploy protocol. Writes, per image, the anomaly map "
                       "(16-bit PNG whose full scale is the png16_full_scale column of scores.csv, or .npy) "
                       "and a colour overlay, plus scores.csv.")
    r.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run folder written by hgad train")
    r.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="image files or folders")
    r.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default: predictions)")
    r.add_argument("--threshold", type=float, help="decision threshold (default: the per-class one stored at "
                   "training: the --threshold-quantile of the training images' scores)")
    r.add_argument("--class", dest="class_name", help="score every image as this class (default: inferred)")
    r.add_argument("--map-format", choices=("png16", "npy"), default="png16", help="anomaly map file format")
    r.add_argument("--batch-size", type=_positive_int, default=8, help="images per batch")
    r.add_argument("--device", choices=CHOICES["device"], default="auto", help="where to run")
    r.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's, one per core)")
    r.add_argument("--onnx", type=Path, metavar="FILE", help="run this model exported by 'hgad export' with "
                   "onnxruntime instead of the PyTorch weights (needs hgad[onnx]); RUN_DIR must be the run it "
                   "was exported from (checked); --class is not supported")
    r.add_argument("--allow-errors", action="store_true", help="exit 0 even when some images could not be "
                   "scored (they are listed in scores.csv with their error; default: exit 1)")
    add_weights_arg(r)
    r.add_argument("--no-progress", action="store_true", help="no progress bars")

    i = sub.add_parser("info", help="describe a run folder", description="Print a run's settings, classes "
                       "and parameter counts.")
    i.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run folder written by hgad train")
    add_weights_arg(i)
    for module in _plugins():
        module.add_parser(sub)
    return p


# Subcommands that live in their own module: each has add_parser(subparsers) and run(args) -> int,
# and its parser sets `command` to its name (argparse does so from the sub-parser name).
_PLUGIN_MODULES = ("hgad.ablate", "hgad.export", "hgad.calibration")


def _plugins() -> list:
    import importlib

    found = []
    for name in _PLUGIN_MODULES:
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as err:
            if err.name != name:  # the module exists but one of its imports is missing: a real bug
                raise
    return found


def _csv(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def check_writable(folder: Path) -> None:
    """InputError unless ``folder`` is, or can be created as, a folder we can write in (creates nothing)."""
    probe = Path(folder)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(probe, "is a file, not a folder" if probe == Path(folder)
                         else "is a file, cannot create the output folder in it")
    try:  # a real write (an unnamed temporary file): permission bits say nothing for root or /proc
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise InputError(probe, f"output folder is not writable ({err.strerror or type(err).__name__})") from None


def cmd_demo_data(args: argparse.Namespace) -> int:
    from hgad.data import discover
    from hgad.demo import make_demo_dataset

    check_writable(args.out_dir)
    t0 = time.perf_counter()
    make_demo_dataset(args.out_dir, seed=args.seed, n_train=args.n_train, n_test_good=args.n_test_good,
                      n_test_defect=args.n_test_defect, size=args.size, progress=True)
    print(discover([("mvtec", args.out_dir)]).summary())
    print(f"demo dataset written to {args.out_dir} in {time.perf_counter() - t0:.1f} s "
          f"(use --data mvtec:{args.out_dir})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from hgad.io import FolderLock

    check_writable(args.out)
    # rank 0 (or the only process) locks the run folder: a second `hgad train` on it stops at once
    lock = FolderLock(args.out) if os.environ.get("RANK", "0") == "0" else None
    if lock is not None:
        lock.acquire()
    try:
        return _train(args)
    finally:
        if lock is not None:
            lock.release()


# what `hgad train` (and `hgad test`'s default report folders) write in a run folder: only a folder
# holding nothing else is replaced by --overwrite
_RUN_ENTRIES = ("config.json", "model.safetensors", "last.safetensors", "train_log.jsonl",
                "train_summary.json", "cache", "calibration.json")


def _not_a_run(out: Path) -> str | None:
    """Why ``out`` (an existing, non-empty folder) is not an hgad run folder; None when it is one."""
    from hgad.checkpoint import CONFIG_FILE
    from hgad.io import is_hgad_temporary

    try:
        saved = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
        if not (isinstance(saved, dict) and "hgad_version" in saved and "config" in saved):
            return f"its {CONFIG_FILE} was not written by hgad"
    except (OSError, ValueError):
        return f"it has no readable {CONFIG_FILE} written by hgad"
    for entry in sorted(out.iterdir()):
        name = entry.name
        if name in _RUN_ENTRIES or (name.startswith("test-") and entry.is_dir()) or is_hgad_temporary(name):
            continue
        return f"it holds {name!r}, which hgad does not write"
    return None


def _data_record(data: Sequence[str | tuple[str, Path]]) -> list[str]:
    """``--data`` as stored in config.json: absolute paths, so the run works from any folder."""
    from hgad.data import parse_data_arg

    out = []
    for d in data:
        kind, path = parse_data_arg(d) if isinstance(d, str) else (d[0], Path(d[1]))
        out.append(f"{kind}:{Path(path).expanduser().resolve()}")
    return out


def _absolute_weights(cfg: HGADConfig) -> HGADConfig:
    """A weights file named relative to the working folder is stored absolute in config.json."""
    w = cfg.backbone_weights
    if w and w not in ("hub", "none") and Path(w).expanduser().exists():
        cfg.backbone_weights = str(Path(w).expanduser().resolve())
    return cfg


def _check_resume_settings(cfg: HGADConfig, saved: dict[str, Any], out: Path, data: Sequence[str] | None) -> None:
    """--resume continues the same model: refuse any changed setting except speed/length ones."""
    from hgad.checkpoint import CONFIG_FILE
    from hgad.config import _flag

    old = config_from_dict({**LEGACY_DEFAULTS, **saved["config"]}, source=str(out / CONFIG_FILE)).to_dict()
    new = cfg.to_dict()
    for name, value in new.items():
        if name in RESUME_MAY_CHANGE or old.get(name) == value:
            continue
        if name == "backbone_weights" and old.get(name) and value and \
                Path(old[name]).expanduser().resolve() == Path(value).expanduser().resolve():
            continue
        raise ConfigError(_flag(name), f"{value!r} differs from the run's {old.get(name)!r} ({out / CONFIG_FILE}); "
                                       "--resume cannot change it (use --overwrite or another --out to retrain)")
    if data and saved.get("data") and _data_record(data) != _data_record(saved["data"]):
        raise ConfigError("--data", f"differs from the run's {', '.join(saved['data'])} ({out / CONFIG_FILE}); "
                                    "--resume cannot change the training data")


def _train(args: argparse.Namespace) -> int:
    from hgad import distributed
    from hgad.calibration import train_calibrated
    from hgad.checkpoint import CONFIG_FILE, MODEL_FILE, RESUME_FILE, read_run_config
    from hgad.data import discover
    from hgad.io import atomic_write_json, replace_folder
    from hgad.model import HGAD
    from hgad.training import resolve_device

    out: Path = args.out
    saved = None
    replacing = False  # --overwrite of an existing run: train beside it, swap at the end
    if args.resume and (out / CONFIG_FILE).is_file():
        saved = read_run_config(out)
        if (out / MODEL_FILE).is_file() and not (out / RESUME_FILE).is_file():
            raise InputError(out / RESUME_FILE, "missing: the run is finished and cannot be continued (--resume "
                             "would retrain it from pass 0 and replace its model; use --overwrite to retrain)")
        cfg = _absolute_weights(resolve_config(args, base={**LEGACY_DEFAULTS, **saved["config"]}))
        _check_resume_settings(cfg, saved, out, args.data)
        data, classes = args.data or saved.get("data"), _csv(args.classes) or saved.get("class_names")
    else:
        if out.exists() and any(out.iterdir()):
            if args.resume:
                raise InputError(out, f"has no {CONFIG_FILE}: not a hgad run folder to resume")
            if not args.overwrite:
                raise InputError(out, "run folder exists and is not empty (use --resume to continue it or "
                                 "--overwrite to replace it)")
            why = _not_a_run(out)
            if why is not None:
                raise InputError(out, f"not replaced: {why}; --overwrite replaces only an empty folder or a run "
                                 "folder of hgad (move it away or choose another --out)")
            replacing = True
        cfg = _absolute_weights(resolve_config(args))
        data, classes = args.data, _csv(args.classes)
    if not data:
        raise ConfigError("--data", "required: at least one KIND:PATH")
    from_config = saved is not None and not args.data
    try:
        catalog = discover(data, classes, need_test=False)
    except InputError as err:
        if from_config:
            raise InputError(err.path, f"{err.problem} (dataset path from {out / CONFIG_FILE}; give --data "
                                       "if the data moved)") from None
        raise
    if saved is not None and catalog.classes != saved["class_names"]:
        raise ConfigError("--resume", f"classes differ from the run's: {', '.join(saved['class_names'])}")
    device = resolve_device(cfg.device)
    ctx = distributed.init(device)  # under torchrun: DDP; rank 0 alone writes and prints
    distributed.check_batch_size(cfg.batch_size, ctx)  # before anything is written
    main = ctx is None or ctx.is_main
    say = print if main else _quiet
    say(catalog.summary(with_test=False))
    say("(training reads the normal training images only; hgad test reads the test images)")
    model = HGAD(cfg, catalog.classes).to(device)
    work = out.parent / f".{out.name}.hgad-new" if replacing else out  # fixed name: all ranks agree on it
    if main:  # we hold the lock: leftovers of a killed --overwrite are ours to remove
        for stale in (glob.glob(glob.escape(str(out.parent / f".{out.name}.hgad-new")))
                      + glob.glob(glob.escape(str(out.parent / f".{out.name}.old-")) + "*")):
            shutil.rmtree(stale, ignore_errors=True)
    if ctx is not None:
        ctx.barrier()  # every rank has checked the run folder before rank 0 writes
    existed, fresh = work.exists(), not work.exists() or not any(work.iterdir())
    counts = model.flow_parameter_counts()
    say(f"device {device}; backbone {cfg.backbone} ({cfg.feature_mode}, taps {list(cfg.taps)}), "
          f"{len(counts)} scales of dims {model.backbone.feature_dims}; trainable parameters per flow: "
          + ", ".join(f"{c:,}" for c in counts))
    try:
        result = train_calibrated(model, catalog.train, work, resume=args.resume, progress=not args.no_progress,
                                  extra_config={"data": _data_record(data)}, log=say)
        if main and replacing:
            replace_folder(work, out)  # the old run stays whole until the new one is complete
    except BaseException as err:
        if main and replacing:
            shutil.rmtree(work, ignore_errors=True)  # the old run is untouched
        elif main and isinstance(err, HgadError) and fresh and not (work / RESUME_FILE).exists():
            _discard(work, keep_folder=existed)  # failed before any checkpoint: leave nothing
        raise
    if main and saved is not None and cfg.to_dict() != saved["config"]:
        # --resume with a longer schedule, another rate or other speed settings: config.json says so
        atomic_write_json(out / CONFIG_FILE, {**saved, "config": cfg.to_dict()})
    terms = ", ".join(f"{k} {v:.4g}" for k, v in result.final_terms.items())
    say(f"trained in {result.seconds:.1f} s ({result.steps} steps); last pass loss terms: {terms}")
    say(f"training vectors assigned to their own class by the inter-class posterior: "
        f"{100 * result.train_vector_accuracy:.1f} %")
    say(f"run written to {out}")
    return 0


def _quiet(*_args: object) -> None:
    """``print`` of torchrun ranks other than 0."""


def _discard(folder: Path, *, keep_folder: bool) -> None:
    """Remove what a failed fresh run wrote: the folder, or only its contents when it existed before."""
    if not keep_folder:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


_REPORT_ENTRIES = frozenset({"metrics.json", "metrics.md", "image_scores.csv", "report.html"})


def _load_run_model(run_dir: Path, device: Any, weights: str | None) -> Any:
    """The run's model; --backbone-weights replaces the weights file named in config.json."""
    from hgad.checkpoint import load_model

    return load_model(run_dir, device, **({"backbone_weights": weights} if weights else {}))


def _apply_threads(args: argparse.Namespace) -> None:
    """``--threads N``: torch's CPU thread count for this command."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def cmd_test(args: argparse.Namespace) -> int:
    _apply_threads(args)
    from hgad import distributed
    from hgad.checkpoint import CONFIG_FILE, read_run_config
    from hgad.data import discover
    from hgad.inference import evaluate
    from hgad.io import whole_folder
    from hgad.predict import check_output_folder
    from hgad.report import markdown_table, write_reports
    from hgad.review import test_provenance
    from hgad.training import resolve_device

    saved = read_run_config(args.run_dir)
    data = args.data or saved.get("data")
    if not data:
        raise ConfigError("--data", "required (the run does not record its training data)")
    suffix = f"-score-{args.score}" if args.score else ""
    out = args.out or args.run_dir / f"test-{args.protocol}-{args.class_source}{suffix}"
    check_writable(out)
    check_output_folder(out, _REPORT_ENTRIES, "hgad test report")
    device = resolve_device(args.device)
    ctx = distributed.init(device)  # under torchrun the test images are shared out; rank 0 reports
    main = ctx is None or ctx.is_main
    try:
        # a run trained on some classes is tested on those unless other data or classes are asked for
        classes = _csv(args.classes) or (None if args.data else saved.get("class_names"))
        catalog = discover(data, classes, need_train=False)  # cheap checks first: fail before loading
    except InputError as err:
        if not args.data:
            raise InputError(err.path, f"{err.problem} (dataset path from {args.run_dir / CONFIG_FILE}; give "
                                       "--data if the data moved)") from None
        raise
    model = _load_run_model(args.run_dir, device, args.backbone_weights)
    t0 = time.perf_counter()
    try:
        result = evaluate(model, catalog, protocol=args.protocol, class_source=args.class_source,
                          batch_size=args.batch_size, progress=main and not args.no_progress,
                          num_workers=model.cfg.num_workers, score=args.score)
    except InputError as err:
        if err.path != "model":
            raise
        from hgad.checkpoint import MODEL_FILE

        raise InputError(args.run_dir / MODEL_FILE, err.problem) from None
    seconds = time.perf_counter() - t0
    if not main:
        return 0
    for warning in result.warnings:
        print(f"hgad test: warning: {warning}", file=sys.stderr)
    provenance = test_provenance(args.run_dir, saved, data, args.protocol, args.class_source, result.score)
    with whole_folder(out) as work:  # the report folder is replaced as a whole: never new metrics beside an old report
        write_reports(result, work, html=not args.no_report, seconds=seconds, provenance=provenance)
    names = ["metrics.json", "metrics.md", "image_scores.csv"] + ([] if args.no_report else ["report.html"])
    print(markdown_table(result))
    if result.unseen:
        print(f"classes not in the model (scored with the inferred class, flagged): {', '.join(result.unseen)}")
    print(f"tested {len(result.records)} images in {seconds:.1f} s; reports: "
          + ", ".join(str(out / n) for n in names))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    _apply_threads(args)
    from hgad.predict import predict_paths

    if args.threshold is not None and not math.isfinite(args.threshold):
        raise ConfigError("--threshold", f"must be a finite number, got {args.threshold}")
    check_writable(args.out)
    summary = predict_paths(args.run_dir, args.paths, args.out, threshold=args.threshold,
                            class_name=args.class_name, map_format=args.map_format, batch_size=args.batch_size,
                            device=args.device, progress=not args.no_progress, onnx=args.onnx,
                            backbone_weights=args.backbone_weights)
    print(summary)
    if summary.n_bad and not args.allow_errors:
        print(f"hgad predict: error: {summary.n_bad} of {summary.n_files} images could not be scored (their "
              f"errors are in {args.out / 'scores.csv'}; --allow-errors exits 0 anyway)", file=sys.stderr)
        return 1
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    model = _load_run_model(args.run_dir, "cpu", args.backbone_weights)
    cfg = model.cfg
    print(f"run {args.run_dir}: {model.n_classes} classes: {', '.join(model.class_names)}")
    print(f"backbone {cfg.backbone} {cfg.feature_mode} taps {list(cfg.taps)} dims {model.backbone.feature_dims}")
    print("trainable parameters per flow: " + ", ".join(f"{c:,}" for c in model.flow_parameter_counts()))
    print(f"deploy statistics stored: {bool(model.calibrated)}")
    print(cfg.to_json())
    return 0


_COMMANDS = {"demo-data": cmd_demo_data, "train": cmd_train, "test": cmd_test, "predict": cmd_predict,
             "info": cmd_info}


def _close_progress_bars() -> None:
    """Close bars an error left open, so the error gets a line of its own (not glued to, then wiped by, a bar)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's final flush does not raise BrokenPipeError again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a real file (e.g. captured by a test)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    commands = dict(_COMMANDS)
    for module in _plugins():
        commands.update(module.COMMANDS)
    try:
        rc = commands[args.command](args)
        sys.stdout.flush()  # inside the try: a reader that left shows up here, not at interpreter exit
        return rc
    except BrokenPipeError:  # `hgad info RUN | head`: the reader left, nothing more to say
        _silence_stdout()
        return 0
    except OSError as err:
        if err.errno not in _DISK_ERRNOS:
            raise
        _close_progress_bars()  # a write outside hgad.io failed for lack of space or a broken disk
        where = f"{err.filename}: " if err.filename else ""
        print(f"hgad {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except HgadError as err:
        _close_progress_bars()
        print(f"hgad {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"hgad {args.command}: interrupted", file=sys.stderr)
        return 130
