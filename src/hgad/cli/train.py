"""``hgad train``: train one unified model into a run folder (fresh, ``--resume`` or ``--overwrite``)."""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hgad.cli.common import DATA_HELP, add_dataset_args, add_settings_args, csv_list, resolve_config
from hgad.config import LEGACY_DEFAULTS, RESUME_MAY_CHANGE, HGADConfig, config_from_dict
from hgad.errors import ConfigError, HgadError, InputError

__all__ = ["NAME", "add_parser", "run", "RUN_ENTRIES"]

NAME = "train"
# what `hgad train` (and `hgad test`'s default report folders) write in a run folder: only a folder
# holding nothing else is replaced by --overwrite
RUN_ENTRIES = ("config.json", "model.safetensors", "last.safetensors", "train_log.jsonl",
               "train_summary.json", "cache", "calibration.json")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``train`` sub-parser."""
    t = sub.add_parser(NAME, help="train one model on the normal images of all classes",
                       description="Train a unified HGAD model. Writes RUN_DIR/config.json, model.safetensors, "
                       "last.safetensors (resume state), train_log.jsonl and train_summary.json.")
    add_dataset_args(t, required=False, help=DATA_HELP)
    t.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run folder to write")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in RUN_DIR (or a finished "
                   "one for more --meta-epochs); only speed settings, --meta-epochs and --lr may change")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in RUN_DIR (only an empty "
                   "folder or a run folder of hgad; the old run is kept until the new one is complete)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_settings_args(t, "fast: small CPU-friendly model (default); paper: the release's settings")


def run(args: argparse.Namespace) -> int:
    """Train under a lock on the run folder: a second ``hgad train`` on it stops at once."""
    from hgad.io import FolderLock, check_writable

    check_writable(args.out)
    # rank 0 (or the only process) locks the run folder
    lock = FolderLock(args.out) if os.environ.get("RANK", "0") == "0" else None
    if lock is not None:
        lock.acquire()
    try:
        return _train(args)
    finally:
        if lock is not None:
            lock.release()


@dataclass
class _Plan:
    """What to train where: settings, data, and how the run folder is treated."""

    cfg: HGADConfig
    data: list[str]
    classes: list[str] | None
    saved: dict[str, Any] | None  # config.json of the run being resumed
    replacing: bool  # --overwrite of an existing run: train beside it, swap at the end


def _plan(args: argparse.Namespace) -> _Plan:
    """Settings and data of a fresh run, a resumed run (from its config.json) or a replaced one."""
    from hgad.checkpoint import CONFIG_FILE, MODEL_FILE, RESUME_FILE, read_run_config

    out: Path = args.out
    if args.resume and (out / CONFIG_FILE).is_file():
        saved = read_run_config(out)
        if (out / MODEL_FILE).is_file() and not (out / RESUME_FILE).is_file():
            raise InputError(out / RESUME_FILE, "missing: the run is finished and cannot be continued (--resume "
                             "would retrain it from pass 0 and replace its model; use --overwrite to retrain)")
        cfg = _absolute_weights(resolve_config(args, base={**LEGACY_DEFAULTS, **saved["config"]}))
        _check_resume_settings(cfg, saved, out, args.data)
        return _Plan(cfg, args.data or saved.get("data"), csv_list(args.classes) or saved.get("class_names"),
                     saved, replacing=False)
    replacing = False
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
    return _Plan(_absolute_weights(resolve_config(args)), args.data, csv_list(args.classes), None, replacing)


def _catalog(plan: _Plan, args: argparse.Namespace) -> Any:
    """The training images; a dataset path read from config.json that moved says so."""
    from hgad.checkpoint import CONFIG_FILE
    from hgad.data import discover

    if not plan.data:
        raise ConfigError("--data", "required: at least one KIND:PATH")
    try:
        catalog = discover(plan.data, plan.classes, need_test=False)
    except InputError as err:
        if plan.saved is not None and not args.data:
            raise InputError(err.path, f"{err.problem} (dataset path from {args.out / CONFIG_FILE}; give --data "
                                       "if the data moved)") from None
        raise
    if plan.saved is not None and catalog.classes != plan.saved["class_names"]:
        raise ConfigError("--resume", f"classes differ from the run's: {', '.join(plan.saved['class_names'])}")
    return catalog


def _remove_leftovers(out: Path) -> None:
    """Folders of a killed --overwrite (we hold the lock, so they are ours to remove)."""
    for stale in (glob.glob(glob.escape(str(out.parent / f".{out.name}.hgad-new")))
                  + glob.glob(glob.escape(str(out.parent / f".{out.name}.old-")) + "*")):
        shutil.rmtree(stale, ignore_errors=True)


def _train(args: argparse.Namespace) -> int:
    from hgad import distributed
    from hgad.calibration import train_calibrated
    from hgad.checkpoint import CONFIG_FILE, RESUME_FILE
    from hgad.data import data_record
    from hgad.device import resolve_device
    from hgad.io import atomic_write_json, replace_folder
    from hgad.model import HGAD

    out: Path = args.out
    plan = _plan(args)
    catalog = _catalog(plan, args)
    device = resolve_device(plan.cfg.device)
    ctx = distributed.init(device)  # under torchrun: DDP; rank 0 alone writes and prints
    distributed.check_batch_size(plan.cfg.batch_size, ctx)  # before anything is written
    main = ctx is None or ctx.is_main
    say = print if main else distributed.silent
    say(catalog.summary(with_test=False))
    say("(training reads the normal training images only; hgad test reads the test images)")
    model = HGAD(plan.cfg, catalog.classes).to(device)
    work = out.parent / f".{out.name}.hgad-new" if plan.replacing else out  # fixed name: all ranks agree on it
    if main:
        _remove_leftovers(out)
    if ctx is not None:
        ctx.barrier()  # every rank has checked the run folder before rank 0 writes
    existed, fresh = work.exists(), not work.exists() or not any(work.iterdir())
    cfg = plan.cfg
    counts = model.flow_parameter_counts()
    say(f"device {device}; backbone {cfg.backbone} ({cfg.feature_mode}, taps {list(cfg.taps)}), "
        f"{len(counts)} scales of dims {model.backbone.feature_dims}; trainable parameters per flow: "
        + ", ".join(f"{c:,}" for c in counts))
    try:
        result = train_calibrated(model, catalog.train, work, resume=args.resume, progress=not args.no_progress,
                                  extra_config={"data": data_record(plan.data)}, log=say)
        if main and plan.replacing:
            replace_folder(work, out)  # the old run stays whole until the new one is complete
    except BaseException as err:
        if main and plan.replacing:
            shutil.rmtree(work, ignore_errors=True)  # the old run is untouched
        elif main and isinstance(err, HgadError) and fresh and not (work / RESUME_FILE).exists():
            _discard(work, keep_folder=existed)  # failed before any checkpoint: leave nothing
        raise
    if main and plan.saved is not None and cfg.to_dict() != plan.saved["config"]:
        # --resume with a longer schedule, another rate or other speed settings: config.json says so
        atomic_write_json(out / CONFIG_FILE, {**plan.saved, "config": cfg.to_dict()})
    terms = ", ".join(f"{k} {v:.4g}" for k, v in result.final_terms.items())
    say(f"trained in {result.seconds:.1f} s ({result.steps} steps); last pass loss terms: {terms}")
    say(f"training vectors assigned to their own class by the inter-class posterior: "
        f"{100 * result.train_vector_accuracy:.1f} %")
    say(f"run written to {out}")
    return 0


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
        if name in RUN_ENTRIES or (name.startswith("test-") and entry.is_dir()) or is_hgad_temporary(name):
            continue
        return f"it holds {name!r}, which hgad does not write"
    return None


def _absolute_weights(cfg: HGADConfig) -> HGADConfig:
    """A weights file named relative to the working folder is stored absolute in config.json."""
    w = cfg.backbone_weights
    if w and w not in ("hub", "none") and Path(w).expanduser().exists():
        cfg.backbone_weights = str(Path(w).expanduser().resolve())
    return cfg


def _check_resume_settings(cfg: HGADConfig, saved: dict[str, Any], out: Path, data: Sequence[str] | None) -> None:
    """--resume continues the same model: refuse any changed setting except speed/length ones."""
    from hgad.checkpoint import CONFIG_FILE
    from hgad.config import flag_of
    from hgad.data import data_record

    old = config_from_dict({**LEGACY_DEFAULTS, **saved["config"]}, source=str(out / CONFIG_FILE)).to_dict()
    new = cfg.to_dict()
    for name, value in new.items():
        if name in RESUME_MAY_CHANGE or old.get(name) == value:
            continue
        if name == "backbone_weights" and old.get(name) and value and \
                Path(old[name]).expanduser().resolve() == Path(value).expanduser().resolve():
            continue
        raise ConfigError(flag_of(name), f"{value!r} differs from the run's {old.get(name)!r} ({out / CONFIG_FILE}); "
                                       "--resume cannot change it (use --overwrite or another --out to retrain)")
    if data and saved.get("data") and data_record(data) != data_record(saved["data"]):
        raise ConfigError("--data", f"differs from the run's {', '.join(saved['data'])} ({out / CONFIG_FILE}); "
                                    "--resume cannot change the training data")


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
