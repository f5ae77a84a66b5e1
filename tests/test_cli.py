"""Command-line surface: help texts, config precedence, info, resume through the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from hgad.cli import build_parser, main
from hgad.config import HGADConfig, preset
from hgad.errors import ConfigError


def _subparsers() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_every_command_and_option_has_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    top = capsys.readouterr().out
    for name, sub in _subparsers().items():
        assert name in top
        for action in sub._actions:
            if action.option_strings or action.dest != "help":
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_train_help_lists_every_config_setting(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(HGADConfig):
        flag = {"use_mi": "--mi", "use_entropy": "--entropy-loss", "n_intra": "--intra-centers"}.get(
            f.name, "--" + f.name.replace("_", "-"))
        assert flag in text, flag
    for switch in ("--no-mi", "--no-entropy-loss", "--no-two-stage", "--prior"):
        assert switch in text


def test_config_precedence_preset_yaml_flags(tmp_path: Path, tiny_data: Path):
    from hgad.cli import resolve_config

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("n-blocks: 5\nlr: 0.01\nuse_mi: false\n")
    args = build_parser().parse_args(["train", "--data", f"mvtec:{tiny_data}", "--out", "x", "--preset", "paper",
                                      "--config", str(yaml_file), "--lr", "0.5", "--taps", "2"])
    cfg = resolve_config(args)
    assert cfg.backbone == "tf_efficientnet_b6" and cfg.img_size == 1024  # preset
    assert cfg.n_blocks == 5 and cfg.use_mi is False  # YAML
    assert cfg.lr == 0.5 and cfg.taps == (2,)  # flags beat YAML
    assert preset("fast").n_blocks == HGADConfig().n_blocks


def test_unknown_yaml_key_is_named(tmp_path: Path, tiny_data: Path, capsys):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("n_blockz: 3\n")
    rc = main(["train", "--data", f"mvtec:{tiny_data}", "--out", str(tmp_path / "r"), "--config", str(yaml_file)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "n_blockz" in err and str(yaml_file) in err and "\n" not in err


def test_info_prints_classes_and_parameters(tiny_run: Path, capsys):
    assert main(["info", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    assert "2 classes: alpha, bottle" in out and "trainable parameters per flow" in out
    assert json.loads(out[out.index("{"):])["n_blocks"] == 2


def test_existing_run_folder_is_not_overwritten_silently(tiny_run: Path, tiny_data: Path, capsys):
    before = (tiny_run / "model.safetensors").read_bytes()
    rc = main(["train", "--data", f"mvtec:{tiny_data}", "--out", str(tiny_run), "--no-progress"])
    assert rc == 2 and "--resume" in capsys.readouterr().err
    assert (tiny_run / "model.safetensors").read_bytes() == before


def test_resume_of_a_finished_run_changes_nothing(tiny_run: Path, tmp_path: Path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    before = (run / "model.safetensors").read_bytes()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0  # data comes from config.json
    assert (run / "model.safetensors").read_bytes() == before
    assert "resuming" in capsys.readouterr().out


def test_small_usability_fixes(tiny_data, tmp_path, capsys) -> None:
    """Issue 15 item 5: train prints only what it reads; predict --help names no missing flag; --threads."""
    import torch

    from conftest import tiny_flags

    run = tmp_path / "r"
    assert main(["train", "--data", f"mvtec:{tiny_data}", "--out", str(run), "--no-progress",
                 *tiny_flags(meta_epochs=1, stage1_epochs=1, warmup_epochs=0)]) == 0
    out = capsys.readouterr().out
    assert "test good" not in out and "training reads the normal training images only" in out
    assert "map-scale" not in build_parser()._subparsers._group_actions[0].choices["predict"].format_help()
    before = torch.get_num_threads()
    try:
        assert main(["test", str(run), "--threads", "1", "--no-progress", "--no-report"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(["predict", str(run), "x.png", "--threads", "0"])
    assert err.value.code == 2


def test_config_values_are_type_checked() -> None:
    # the API and a config.json hand over Python values: a wrong type is a ConfigError naming the flag
    for kw, message in [({"whiten": "no"}, "--whiten: expected true or false, got 'no'"),
                        ({"knn_hflip": 1}, "--knn-hflip: expected true or false, got 1"),
                        ({"latent_knn": "32"}, "--latent-knn: expected an integer, got '32'"),
                        ({"img_size": 384.5}, "--img-size: expected an integer, got 384.5"),
                        ({"lr": "1e-3"}, "--lr: expected a number, got '1e-3'"),
                        ({"backbone": None}, "--backbone: expected a text value, got None"),
                        ({"taps": 3}, "--taps: expected a list of integers, got 3")]:
        with pytest.raises(ConfigError) as err:
            preset("fast", **kw)
        assert str(err.value) == message
    # numbers of the right kind are normalised: integral floats (JSON) to int, ints to float, lists to tuples
    cfg = preset("fast", img_size=256.0, lr=1, taps=[3.0], backbone_weights=None)
    assert (cfg.img_size, cfg.lr, cfg.taps) == (256, 1.0, (3,))
    assert type(cfg.img_size) is int and type(cfg.lr) is float
