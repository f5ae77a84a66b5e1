"""One training pass the release's way and hgad's way, in one run: same model, same data, same batches.

(a) release-style: every step runs the frozen backbone on every pyramid level of the batch, computes
    the positional code, pushes the vectors through a generic FrEIA 0.2 ``SequenceINN`` of
    ``AllInOneBlock(affine_clamping=1.9, global_affine_type='SOFTPLUS', permute_soft=True)`` with a
    Linear-ReLU-Linear subnet and the code as condition, and does one loss / backward / Adam step per
    scale (the loop of the authors' ``train.py``);
(b) hgad: the features come from the warm in-memory cache (fp16, built once before training), the
    flows are :class:`hgad.flow.ConditionalFlow` and the three scales share one summed loss, one
    backward and one Adam step (hgad.training's loop).

Both start from the same parameters (copied from hgad's initial model into FrEIA's blocks), see the
images in the same order with the same learning rates, and use the same stage-1 loss
(:func:`hgad.losses.hgad_loss`); their step-1 losses must agree (the scales have disjoint
parameters, so the release's first per-scale steps do not change the other scales' step-1 losses).
Decoding the images is left out of both timings: (a) gets them preprocessed in memory.

    python benchmarks/reference_compare.py --out benchmarks/results/reference_compare-cpu.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from typing import Any

import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import nn

from common import (
    SMOKE_NOTE,
    add_common_args,
    demo_data,
    finish,
    machine_info,
    markdown_table,
    setup,
    spread,
    sync,
)
from hgad.config import HGADConfig, preset
from hgad.data import ImageDataset, discover
from hgad.flow import ConditionalFlow, positional_encoding_2d
from hgad.losses import hgad_loss
from hgad.model import HGAD
from hgad.training import FeatureStore, epoch_order, learning_rate

__all__ = ["freia_flow", "compare", "main"]

_SMOKE = {"img_size": 64, "pyramid_levels": 2, "n_blocks": 1, "pos_dim": 16, "n_intra": 2, "batch_size": 4,
          "map_size": 32, "blur_sigma": 1.0}
_STAGE = 1
_TERMS = ("g", "mi", "e", "total")


def _subnet(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, 2 * c_in), nn.ReLU(), nn.Linear(2 * c_in, c_out))


def freia_flow(flow: ConditionalFlow, clamp: float) -> SequenceINN:
    """A FrEIA 0.2 SequenceINN of AllInOneBlocks carrying a copy of ``flow``'s parameters."""
    inn = SequenceINN(flow.dim)
    for block in flow.blocks:
        inn.append(AllInOneBlock, cond=0, cond_shape=(flow.cond_dim,), subnet_constructor=_subnet,
                   affine_clamping=clamp, global_affine_type="SOFTPLUS", permute_soft=True)
        theirs = inn[len(inn) - 1]
        with torch.no_grad():
            theirs.subnet.load_state_dict(block.subnet.state_dict())
            theirs.global_scale.copy_(block.global_scale.view(1, -1))
            theirs.global_offset.copy_(block.global_offset.view(1, -1))
            theirs.w_perm.copy_(block.rotation)
            theirs.w_perm_inv.copy_(block.rotation.T)
    return inn


def _adam(groups: list[dict], cfg: HGADConfig) -> torch.optim.Adam:
    return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _release_epoch(model: HGAD, images: torch.Tensor, labels: torch.Tensor, order: torch.Tensor,
                   cfg: HGADConfig, device: torch.device) -> tuple[float, dict[str, float]]:
    """(a): backbone every step, FrEIA flows, one loss/backward/step per scale. Returns seconds, step-1 terms."""
    flows = nn.ModuleList(freia_flow(f, cfg.clamp) for f in model.flows).to(device)
    priors = copy.deepcopy(model.priors)
    opt = _adam([{"params": [p for p in flows.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay},
                 {"params": list(priors.parameters()), "weight_decay": 0.0}], cfg)
    flows.train()
    steps = len(order) // cfg.batch_size
    first: dict[str, float] = {}
    sync(device)
    start = time.perf_counter()
    for step in range(steps):
        _set_lr(opt, learning_rate(cfg, 0, step / steps))
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        image, label = images[idx].to(device), labels[idx].to(device)
        with torch.no_grad():
            feats = model.backbone(image)  # every pyramid level, every step
        for lvl, feat in enumerate(feats):
            b, d, h, w = feat.shape
            e = feat.permute(0, 2, 3, 1).reshape(-1, d)
            pos = positional_encoding_2d(cfg.pos_dim, h, w).to(device)[None].repeat(b, 1, 1, 1)
            pos = pos.permute(0, 2, 3, 1).reshape(-1, cfg.pos_dim)
            z, logdet = flows[lvl](e, c=[pos])
            terms = hgad_loss(z, logdet, label.repeat_interleave(h * w), priors[lvl], stage=_STAGE,
                              cfg=model.loss_cfg)
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            opt.step()
            values = {k: float(v.detach()) for k, v in terms.items()}  # the release prints them every step
            if step == 0:
                for k in _TERMS:
                    first[k] = first.get(k, 0.0) + values[k]
    sync(device)
    return time.perf_counter() - start, first


def _hgad_epoch(model: HGAD, store: FeatureStore, labels: torch.Tensor, order: torch.Tensor,
                cfg: HGADConfig, device: torch.device) -> tuple[float, dict[str, float]]:
    """(b): cached features, hgad flows, one summed loss/backward/step (as hgad.training.fit)."""
    opt = _adam(model.param_groups(cfg.weight_decay), cfg)
    model.train()
    steps = len(order) // cfg.batch_size
    first: dict[str, float] = {}
    sync(device)
    start = time.perf_counter()
    for step in range(steps):
        _set_lr(opt, learning_rate(cfg, 0, step / steps))
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        terms = model.loss(store.get(idx), labels[idx], _STAGE)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()
        values = {k: float(v.detach()) for k, v in terms.items()}
        if step == 0:
            first = {k: values[k] for k in _TERMS}
    sync(device)
    return time.perf_counter() - start, first


def _differences(ours: dict[str, float], ref: dict[str, float]) -> dict[str, float]:
    """Per-term ``|ours - ref| / (|ref| + 1)``."""
    return {k: abs(ours[k] - ref[k]) / (abs(ref[k]) + 1.0) for k in _TERMS}


def _agree(ours: dict[str, float], ref: dict[str, float], tol: float) -> bool:
    return all(d <= tol for d in _differences(ours, ref).values())


def compare(cfg: HGADConfig, data: str, device: torch.device, n_images: int | None) -> dict[str, Any]:
    catalog = discover([f"mvtec:{data}"], need_test=False)
    records = spread(catalog.train, n_images)
    labels = torch.tensor([r.class_index for r in records])
    model = HGAD(cfg, catalog.classes).to(device)
    dataset = ImageDataset(records, cfg.img_size, cfg.map_size, model.input_norm)
    images = torch.stack([dataset[i].image for i in range(len(dataset))])
    initial = copy.deepcopy(model.state_dict())
    order = epoch_order(cfg.seed, 0, len(records))
    first = order[: cfg.batch_size]
    with torch.no_grad():  # hgad's step-1 loss on fresh float32 features: isolates the flows from the cache
        exact = {k: float(v) for k, v in model.loss(model.extract(images[first]), labels[first], _STAGE).items()
                 if k in _TERMS}
    print(f"(a) release-style pass over {len(records)} images ...", flush=True)
    t_ref, loss_ref = _release_epoch(model, images, labels, order, cfg, device)
    model.load_state_dict(initial)  # untouched by (a), restored anyway
    start = time.perf_counter()
    store = FeatureStore(model, records, cfg, progress=False)
    t_cache = time.perf_counter() - start
    print(f"(b) hgad pass (feature cache built in {t_cache:.1f} s) ...", flush=True)
    t_hgad, loss_hgad = _hgad_epoch(model, store, labels, order, cfg, device)
    steps = len(records) // cfg.batch_size
    vectors = steps * cfg.batch_size * sum(h * w for h, w in model.backbone.scale_shapes(cfg.img_size))
    amp = cfg.amp and device.type == "cuda"
    # tolerances |hgad - release| <= tol * (|release| + 1) per term: float32 features (the flows alone,
    # float32 rounding) and the fp16 cache (the features rounded to 11 bits); bf16 autocast on CUDA
    tol_exact, tol_cache = (2e-2, 2e-2) if amp else (1e-5, 1e-3)
    passes = cfg.meta_epochs * cfg.sub_epochs
    return {
        "images": len(records), "steps": steps, "vectors_per_pass": vectors, "img_size": cfg.img_size,
        "release_seconds": t_ref, "hgad_seconds": t_hgad, "cache_seconds": t_cache,
        "speedup": t_ref / t_hgad, "preset_passes": passes,
        "speedup_with_cache_amortised": t_ref / (t_hgad + t_cache / passes),
        "step1_loss_release": loss_ref, "step1_loss_hgad": loss_hgad, "step1_loss_hgad_float32_features": exact,
        "step1_difference_float32_features": _differences(exact, loss_ref),
        "step1_difference_cache": _differences(loss_hgad, loss_ref),
        "step1_tolerances": {"float32_features": tol_exact, "cache": tol_cache},
        "step1_agree": _agree(exact, loss_ref, tol_exact) and _agree(loss_hgad, loss_ref, tol_cache),
        "hgad_amp_bf16": amp, "cache_dtype": cfg.cache_dtype,
    }


def _terms(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.6g}" for k, v in values.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--images", type=int, default=None,
                        help="training images used (default: all 160 of the demo dataset)")
    parser.add_argument("--preset", choices=("fast", "paper"), default="fast",
                        help="model settings; paper runs EfficientNet-B6 with random weights (none ship offline)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input size (default: the preset's; 512 for paper, which uses 1024)")
    args = parser.parse_args(argv)
    setup(parser, args)
    machine = machine_info(args.device)
    data = demo_data(args.data)
    overrides = dict(_SMOKE) if args.smoke else {}
    if args.preset == "paper":
        overrides = {"backbone_weights": "none", "img_size": args.img_size or 512, **overrides}
    elif args.img_size:
        overrides["img_size"] = args.img_size
    cfg = preset(args.preset, **overrides)
    rows, results = [], []
    ok = True
    for device_name in args.device:
        device = torch.device(device_name)
        res = compare(dataclasses.replace(cfg, device=device.type), str(data), device,
                      4 * cfg.batch_size if args.smoke else args.images)
        res["device"] = device.type
        results.append(res)
        ok = ok and res["step1_agree"]
        n, vec = res["images"] // cfg.batch_size * cfg.batch_size, res["vectors_per_pass"]
        amortised = res["hgad_seconds"] + res["cache_seconds"] / res["preset_passes"]
        for name, secs, speedup, loss in (
            ("release-style (FrEIA, backbone every step, per-scale steps)", res["release_seconds"], 1.0,
             res["step1_loss_release"]["total"]),
            ("hgad (feature cache, ConditionalFlow, one step)", res["hgad_seconds"], res["speedup"],
             res["step1_loss_hgad"]["total"]),
            (f"hgad + cache build / {res['preset_passes']} passes", amortised, res["speedup_with_cache_amortised"],
             None),
        ):
            rows.append({"device": device.type, "loop": name, "s / pass": secs, "images/s": n / secs,
                         "vectors/s": vec / secs, "speed-up": speedup, "step-1 loss": loss})
        tol = res["step1_tolerances"]
        print(f"step-1 loss terms, summed over scales: release {_terms(res['step1_loss_release'])}; "
              f"hgad on float32 features {_terms(res['step1_loss_hgad_float32_features'])} "
              f"(largest |diff|/(|ref|+1) {max(res['step1_difference_float32_features'].values()):.1e}, "
              f"tolerance {tol['float32_features']:.0e}); hgad on the fp16 cache {_terms(res['step1_loss_hgad'])} "
              f"({max(res['step1_difference_cache'].values()):.1e}, tolerance {tol['cache']:.0e}): "
              f"{'AGREE' if res['step1_agree'] else 'DISAGREE'}")
    notes = [
        f"{args.preset} preset ({cfg.backbone}, {cfg.img_size} px, {cfg.pyramid_levels} pyramid levels, {cfg.n_blocks} "
        f"blocks, P={cfg.pos_dim}, batch {cfg.batch_size}), demo data, stage-1 loss, one pass each, same run",
        "images are decoded before timing for both loops; hgad's feature-cache build is timed separately "
        "and charged, amortised over the preset's passes, in the last row; speed-up = release s / hgad s",
        "step-1 loss: hgad's flows on the same float32 features give the release's loss to float32 rounding; "
        "the fp16 feature cache moves it slightly (tolerances in the JSON; bf16 autocast on CUDA)",
    ]
    if args.smoke:
        notes.insert(0, SMOKE_NOTE)
    payload = {"benchmark": "reference_compare", "machine": machine, "results": results}
    columns = ["device", "loop", "s / pass", "images/s", "vectors/s", "speed-up", "step-1 loss"]
    finish(payload, markdown_table(rows, columns), args.out, notes)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
