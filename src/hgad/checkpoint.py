"""Run folders: ``config.json`` + ``model.safetensors`` (never pickle), written atomically.

A run folder holds everything ``hgad test``/``predict``/``export`` need except the backbone weights,
which the config names (the shipped default, a file, or the hub). ``last.safetensors`` additionally
holds the optimizer state and progress counters for ``--resume``, in one file so that model and
optimizer can never be out of step.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from hgad.config import LEGACY_DEFAULTS, config_from_dict
from hgad.errors import ConfigError, InputError, brief
from hgad.io import atomic_save_tensors, atomic_write_json
from hgad.model import HGAD
from hgad.version import __version__

__all__ = ["CONFIG_FILE", "MODEL_FILE", "RESUME_FILE", "save_run_config", "save_model", "load_model",
           "read_run_config", "read_tensors", "rewrite_model_tensors", "save_resume_state", "load_resume_state",
           "tensor_digest"]

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
RESUME_FILE = "last.safetensors"


def save_run_config(run_dir: Path, model: HGAD, extra: dict[str, Any] | None = None) -> None:
    """Resolved config, class names and provenance; written once when a run starts."""
    payload = {"hgad_version": __version__, "config": model.cfg.to_dict(), "class_names": model.class_names,
               **(extra or {})}
    atomic_write_json(run_dir / CONFIG_FILE, payload)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.json (settings, classes, data); a missing or foreign file is an InputError."""
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise InputError(run_dir, "run folder does not exist")
    if not path.is_file():
        raise InputError(path, "missing: not a hgad run folder (expected config.json and model.safetensors)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        _ = data["config"], data["class_names"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise InputError(path, f"not a hgad run config ({type(err).__name__}: {err})") from None
    return data


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and raw bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _stamp(meta_key: str, payload: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """One metadata key (safetensors writes several in hash-map order: files would differ run to run)
    whose JSON value carries the tensors' checksum."""
    return {meta_key: json.dumps({**payload, "sha256": tensor_digest(tensors)}, sort_keys=True)}


def _verify(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """InputError when the stored checksum (if any: older files have none) does not match the tensors."""
    for value in meta.values():
        try:
            record = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            continue
        if isinstance(record, dict) and isinstance(record.get("sha256"), str):
            if tensor_digest(tensors) != record["sha256"]:
                raise InputError(path, "damaged: its tensors do not match the sha256 checksum stored in it "
                                       "(bit rot or a partial copy); restore it from a backup or retrain")
            return


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; anything else (pickle...) is refused unread.

    A checksum stored by hgad in the metadata is verified (files written before it existed load as is).
    """
    if not path.is_file():
        raise InputError(path, "missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        if _looks_pickled(path):
            raise InputError(path, "refused: a pickle (torch.save) file, not safetensors; it was not loaded, "
                             "since unpickling can run code") from None
        raise InputError(path, f"not a readable safetensors file ({brief(err)})") from None
    _verify(path, tensors, meta)
    return tensors, meta


def _looks_pickled(path: Path) -> bool:
    """A torch.save zip archive or a raw pickle stream (protocol 2+), from its first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head == b"PK\x03\x04" or (len(head) == 4 and head[0] == 0x80 and 2 <= head[1] <= 5)


def save_model(run_dir: Path, model: HGAD) -> Path:
    """Write the trained state (everything but the backbone) to ``run_dir/model.safetensors``, atomically."""
    return rewrite_model_tensors(run_dir, model.trainable_state())


def rewrite_model_tensors(run_dir: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``model.safetensors`` atomically with its checksum (also used to change stored thresholds)."""
    path = Path(run_dir) / MODEL_FILE
    # one metadata key only: safetensors writes metadata in hash-map order, which varies between runs
    atomic_save_tensors(path, tensors, metadata=_stamp("hgad_version", {"version": __version__}, tensors))
    return path


def _load_into(model: HGAD, tensors: dict[str, torch.Tensor], path: Path, *, resume: bool = False) -> None:
    expected = model.resume_state() if resume else model.trainable_state()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = (f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing
                else f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        raise InputError(path, f"does not match its config.json: {what}")
    for key, value in expected.items():
        if tensors[key].shape != value.shape:
            raise InputError(path, f"does not match its config.json: {key} has shape "
                                   f"{tuple(tensors[key].shape)}, config implies {tuple(value.shape)}")
    model.load_state_dict(tensors, strict=False)


def load_model(run_dir: Path, device: torch.device | str = "cpu", **overrides: Any) -> HGAD:
    """Rebuild the model of a run folder from its config and weights (backbone from the config)."""
    run_dir = Path(run_dir)
    data = read_run_config(run_dir)
    saved = {**LEGACY_DEFAULTS, **data["config"]}
    try:  # a bad stored value (a hand-edited file) is the file's problem, a bad override the caller's
        cfg = config_from_dict(saved, source=str(run_dir / CONFIG_FILE))
    except ConfigError as err:
        raise InputError(run_dir / CONFIG_FILE, f"bad stored setting {err}") from None
    if overrides:
        cfg = config_from_dict({**saved, **overrides}, source=str(run_dir / CONFIG_FILE))
    tensors, _ = read_tensors(run_dir / MODEL_FILE)
    try:
        model = HGAD(cfg, list(data["class_names"]))
    except InputError as err:
        stored = data["config"].get("backbone_weights")
        if "backbone_weights" in overrides or not stored or Path(stored).expanduser() != Path(err.path):
            raise
        raise InputError(err.path, f"{err.problem} (named in {run_dir / CONFIG_FILE}; give --backbone-weights "
                                   "FILE if it moved)") from None
    _load_into(model, tensors, run_dir / MODEL_FILE)
    return model.to(device).eval()


def save_resume_state(run_dir: Path, model: HGAD, optimizer: torch.optim.Optimizer,
                      progress: dict[str, Any]) -> None:
    """Model + Adam moments + progress counters, one atomic file."""
    tensors = {f"model.{k}": v for k, v in model.resume_state().items()}
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            for name, value in optimizer.state.get(p, {}).items():
                tensors[f"optim.{gi}.{pi}.{name}"] = torch.as_tensor(value).reshape(-1) if name == "step" else value
    atomic_save_tensors(Path(run_dir) / RESUME_FILE, tensors, metadata=_stamp("progress", progress, tensors))


def load_resume_state(run_dir: Path, model: HGAD, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore what :func:`save_resume_state` wrote; returns the progress counters."""
    path = Path(run_dir) / RESUME_FILE
    tensors, meta = read_tensors(path)
    _load_into(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path, resume=True)
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            state = {}
            for name in ("step", "exp_avg", "exp_avg_sq"):
                key = f"optim.{gi}.{pi}.{name}"
                if key in tensors:
                    value = tensors[key]
                    state[name] = value.reshape(()) if name == "step" else value.to(p.device)
            if state:
                optimizer.state[p] = state
    try:
        return json.loads(meta["progress"])
    except (KeyError, json.JSONDecodeError):
        raise InputError(path, "resume checkpoint has no progress record") from None
