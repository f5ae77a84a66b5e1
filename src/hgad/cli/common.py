"""Arguments shared by several ``hgad`` commands, and the parser class they all use.

Imports nothing heavy: building the parser (``--help``, argument errors) must answer without torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

from hgad.config import CHOICES, FLAG_NAMES, PRESETS, HGADConfig, config_from_dict, load_yaml

__all__ = ["Parser", "DATA_HELP", "parse_taps", "positive_int", "add_config_flags", "add_weights_arg",
           "add_dataset_args", "add_settings_args", "add_device_args", "resolve_config", "csv_list",
           "apply_threads", "load_run_model"]

DATA_HELP = ("dataset as KIND:PATH, KIND one of mvtec, visa, btad, mvtec3d, folder; repeat to train one "
             "model on several datasets")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (usage is in --help)."""

    def error(self, message: str) -> typing.NoReturn:
        """Exit 2 with one line on stderr."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_taps(text: str) -> tuple[int, ...]:
    """``--taps 1,2,3``."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer of at least 1 (batch sizes, thread counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`HGADConfig` field; unset flags stay out of the namespace (preset/YAML win)."""
    group = p.add_argument_group("model and training settings (override the preset and --config)")
    hints = typing.get_type_hints(HGADConfig)
    for f in dataclasses.fields(HGADConfig):
        flag = "--" + FLAG_NAMES.get(f.name, f.name.replace("_", "-"))
        help_text = f"{f.metadata['help']} (fast preset: {f.default})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        hint = hints[f.name]
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if f.name == "taps":
            kw["type"], kw["metavar"] = parse_taps, "I[,I...]"
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


def add_device_args(p: argparse.ArgumentParser) -> None:
    """``--batch-size``, ``--device`` and ``--threads`` of the scoring commands."""
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per batch")
    p.add_argument("--device", choices=CHOICES["device"], default="auto", help="where to run")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's, one per core)")


def resolve_config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> HGADConfig:
    """Preset (or ``base``), then ``--config``, then the flags given: the settings of a run."""
    values: dict[str, Any] = dict(PRESETS[args.preset]) if base is None else dict(base)
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    for f in dataclasses.fields(HGADConfig):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return config_from_dict(values, source=str(getattr(args, "config", None) or "settings"))


def csv_list(text: str | None) -> list[str] | None:
    """``"a, b"`` -> ``["a", "b"]``; None or empty -> None."""
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def apply_threads(args: argparse.Namespace) -> None:
    """``--threads N``: torch's CPU thread count for this command."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def load_run_model(run_dir: Path, device: Any, weights: str | None) -> Any:
    """The run's model; --backbone-weights replaces the weights file named in config.json."""
    from hgad.checkpoint import load_model

    return load_model(run_dir, device, **({"backbone_weights": weights} if weights else {}))
