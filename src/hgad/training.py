"""Training: feature cache, Adam with the release's schedule, two stages, checkpoints and resume.

The backbone is frozen and there is no augmentation, so each training image's features are computed
once and reused for every pass (docs/method.md, "Speed"). Batch order is a pure function of (seed, epoch), which is
what makes ``--resume`` land on exactly the weights of an uninterrupted run. Under ``torchrun`` the
same loop runs on every rank with its slice of each global batch (see ``hgad.distributed``); rank 0
alone writes files.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from hgad import distributed
from hgad.checkpoint import RESUME_FILE, load_resume_state, save_model, save_resume_state, save_run_config
from hgad.config import HGADConfig
from hgad.data import ImageDataset, ImageRecord
from hgad.errors import ConfigError, TrainingError
from hgad.io import atomic_path, atomic_write_json, atomic_write_text
from hgad.map_stats import compute_map_stats, compute_position_stats
from hgad.model import HGAD, LatentMaps

__all__ = ["learning_rate", "FeatureStore", "TrainResult", "fit", "calibrate",
           "epoch_order", "LOG_FILE", "SUMMARY_FILE"]

LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "train_summary.json"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def learning_rate(cfg: HGADConfig, meta_epoch: int, frac: float) -> float:
    """Linear warm-up from lr/10 over the first meta-epochs, then cosine to lr·1e-3 per meta-epoch.

    ``frac`` in [0, 1) is the progress inside the meta-epoch (used only during warm-up).
    """
    eta_min = cfg.lr * 1e-3

    def cosine(epoch: float) -> float:
        return eta_min + (cfg.lr - eta_min) * (1 + math.cos(math.pi * epoch / cfg.meta_epochs)) / 2

    if meta_epoch < cfg.warmup_epochs:
        p = (meta_epoch + frac) / cfg.warmup_epochs
        start, end = cfg.lr / 10, cosine(cfg.warmup_epochs)
        return start + p * (end - start)
    return cosine(meta_epoch)


def epoch_order(seed: int, epoch: int, n: int) -> Tensor:
    """Shuffled image order of one pass, a pure function of (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


class FeatureStore:
    """Per-scale backbone features of the training images, cached in memory or on disk, or recomputed.

    ``get(idx)`` returns a list of (B, D_l, h_l, w_l) tensors for the images ``idx`` (of the images flipped
    left to right with ``hflip``: the memory bank's mirrored copies, see ``knn_hflip``). Under torchrun
    every rank caches all images (each pass reshuffles which rank sees which image): the ranks extract
    alternate batches and exchange them, and rank 0 alone writes the disk cache.
    """

    def __init__(self, model: HGAD, records: Sequence[ImageRecord], cfg: HGADConfig,
                 cache_dir: Path | None = None, progress: bool = True, batch_size: int = 16,
                 hflip: bool = False) -> None:
        self.model = model
        self.hflip = hflip
        self.mode = cfg.cache
        self.dataset = ImageDataset(records, cfg.img_size, cfg.map_size, model.input_norm, cfg.resize)
        self.cfg = cfg
        self.levels: list[Tensor] = []
        if self.mode == "none":
            return
        dtype = _DTYPES[cfg.cache_dtype]
        ctx = distributed.context()
        batches = distributed.shard_batches(len(self.dataset), batch_size, ctx)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                                             pin_memory=model.device.type == "cuda")
        disk = self.mode == "disk" and cache_dir is not None
        loaded = disk and self._load_disk(cache_dir, len(records))
        if ctx is not None:  # all ranks must take the same branch: collectives follow on one of them
            loaded = distributed.count_true(loaded, ctx) == ctx.world_size
            self.levels = self.levels if loaded else []
        if loaded:
            return
        # zeros, not empty, under torchrun: rows other ranks extract are summed in by merge_disjoint_
        alloc = torch.empty if ctx is None else torch.zeros
        bar = tqdm(total=sum(map(len, batches)), desc="mirrored features" if hflip else "features", unit="img",
                   disable=not progress, leave=False)
        for batch in loader:
            feats = self._extract(batch.image)
            if not self.levels:
                self.levels = [alloc((len(self.dataset), *f.shape[1:]), dtype=dtype) for f in feats]
            i = batch.index
            for store, f in zip(self.levels, feats):
                store[i] = f.to("cpu", dtype)
            bar.update(len(i))
        bar.close()
        if ctx is not None:
            if not self.levels:  # fewer batches than ranks: one image gives the shapes
                shapes = [f.shape[1:] for f in self._extract(self.dataset[0].image[None])]
                self.levels = [alloc((len(self.dataset), *s), dtype=dtype) for s in shapes]
            for store in self.levels:
                distributed.merge_disjoint_(store, ctx)
        if disk and (ctx is None or ctx.is_main):
            self._save_disk(cache_dir)

    def _disk_key(self) -> str:
        c = self.cfg
        recs = [str(r.path) for r in self.dataset.records]
        return json.dumps([c.backbone, c.backbone_weights, c.feature_mode, list(c.taps), c.pyramid_levels,
                           c.img_size, c.cache_dtype, c.feature_pool, c.input_norm, c.resize, self.hflip, recs])

    def _save_disk(self, cache_dir: Path) -> None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # the key is written last: a kill while arrays are replaced must not leave an old key beside them
        (cache_dir / "key.json").unlink(missing_ok=True)
        for lvl, t in enumerate(self.levels):
            with atomic_path(cache_dir / f"scale{lvl}.npy") as tmp:
                # bfloat16 has no numpy type: stored as its raw 16 bits
                arr = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
                with open(tmp, "wb") as fh:
                    np.save(fh, arr)
        atomic_write_json(cache_dir / "key.json", {"key": self._disk_key(), "levels": len(self.levels)})

    def _load_disk(self, cache_dir: Path, n: int) -> bool:
        meta = cache_dir / "key.json"
        if not meta.is_file():
            return False
        info = json.loads(meta.read_text())
        if info.get("key") != self._disk_key():
            return False
        dtype = _DTYPES[self.cfg.cache_dtype]
        levels = []
        for lvl in range(info["levels"]):
            arr = np.load(cache_dir / f"scale{lvl}.npy", mmap_mode="r")
            t = torch.from_numpy(np.ascontiguousarray(arr))
            levels.append(t.view(torch.bfloat16) if dtype == torch.bfloat16 else t)
        if any(t.shape[0] != n for t in levels):
            return False
        self.levels = levels
        return True

    def __len__(self) -> int:
        return len(self.dataset)

    def _extract(self, images: Tensor) -> list[Tensor]:
        return self.model.extract(images.flip(-1) if self.hflip else images)

    def get(self, idx: Tensor) -> list[Tensor]:
        """Per-scale features (B, D_l, h_l, w_l) of the images ``idx``, on the model's device."""
        if self.mode == "none":
            return self._extract(torch.stack([self.dataset[int(i)].image for i in idx]))
        return [t[idx].to(self.model.device, non_blocking=True) for t in self.levels]


@dataclass
class TrainResult:
    """What :func:`fit` reports: timings, steps, the last pass's loss terms and the class accuracy."""

    seconds: float
    steps: int
    final_terms: dict[str, float]
    train_vector_accuracy: float
    history: list[dict] = field(default_factory=list)


def _terms_line(terms: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3g}" for k, v in terms.items())


def fit(model: HGAD, records: Sequence[ImageRecord], run_dir: Path, *, resume: bool = False,
        progress: bool = True, extra_config: dict | None = None, log=print) -> TrainResult:
    """Train ``model`` on the normal images ``records``; checkpoints go to ``run_dir``.

    Under torchrun (an initialised process group of several ranks) this trains with DDP; every rank
    returns the same result and the same calibrated model, and the files are written when it returns.
    """
    cfg = model.cfg
    ctx = distributed.context()
    distributed.check_batch_size(cfg.batch_size, ctx)
    main = ctx is None or ctx.is_main
    if not main:
        progress, log = False, distributed.silent
    run_dir = Path(run_dir)
    if main:  # other ranks only read the run folder
        run_dir.mkdir(parents=True, exist_ok=True)
    n = len(records)
    steps = n // cfg.batch_size
    if steps == 0:
        raise ConfigError("--batch-size", f"{cfg.batch_size} is larger than the {n} training images")
    labels = torch.tensor([r.class_index for r in records])
    optimizer = torch.optim.Adam(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    start_epoch, has_state = _start(model, optimizer, run_dir, resume=resume, extra_config=extra_config, log=log)
    t0 = time.perf_counter()
    store = FeatureStore(model, records, cfg, run_dir / "cache", progress=progress)
    if not has_state:  # resumed runs restored them with the weights
        model.set_feature_stats(store.get(torch.arange(i, min(n, i + 64))) for i in range(0, n, 64))
    t_feat = time.perf_counter() - t0
    last_terms = _train_passes(model, store, labels, optimizer, run_dir, start_epoch=start_epoch, steps=steps,
                               progress=progress)
    t_train = time.perf_counter() - t0 - t_feat
    model.eval()
    # every rank calibrates on the whole cache: same weights and features give the same statistics
    mirrored = FeatureStore(model, records, cfg, run_dir / "cache-hflip", progress=progress, hflip=True) \
        if cfg.latent_knn and cfg.knn_hflip else None
    accuracy = calibrate(model, store, labels, mirrored=mirrored, progress=progress)
    if main:
        save_model(run_dir, model)
    seconds = time.perf_counter() - t0
    total_epochs = cfg.meta_epochs * cfg.sub_epochs
    result = TrainResult(seconds=seconds, steps=(total_epochs - start_epoch) * steps, final_terms=last_terms,
                         train_vector_accuracy=accuracy)
    if main:
        atomic_write_json(run_dir / SUMMARY_FILE, {
            "seconds_total": round(seconds, 2), "seconds_features": round(t_feat, 2),
            "seconds_training": round(t_train, 2), "passes": total_epochs, "steps": result.steps,
            "final_loss_terms": last_terms, "train_vector_class_accuracy": accuracy,
            "n_train_images": n, "device": str(model.device), **({"processes": ctx.world_size} if ctx else {})})
    if ctx is not None:
        ctx.barrier()  # the run folder is complete when fit returns, on every rank
    return result


def _start(model: HGAD, optimizer: torch.optim.Optimizer, run_dir: Path, *, resume: bool,
           extra_config: dict | None, log) -> tuple[int, bool]:
    """The first pass to train and whether a resume state was loaded: a fresh run writes its config and
    drops an old log; a resumed one restores weights and optimizer and keeps the log of the passes done."""
    cfg = model.cfg
    ctx = distributed.context()
    main = ctx is None or ctx.is_main
    log_path = run_dir / LOG_FILE
    has_state = resume and (run_dir / RESUME_FILE).is_file()
    if ctx is not None and 0 < distributed.count_true(has_state, ctx) < ctx.world_size:
        raise ConfigError("--out", f"only some processes see {run_dir / RESUME_FILE}: to resume on several "
                                   "machines the run folder must be on a file system they all share")
    start_epoch = 0
    if has_state:
        state = load_resume_state(run_dir, model, optimizer)
        start_epoch = int(state["epoch"])
        log(f"resuming from {run_dir / RESUME_FILE} at pass {start_epoch} of {cfg.meta_epochs * cfg.sub_epochs}")
        if main:
            _truncate_log(log_path, start_epoch)
            _remove_stale_temporaries(run_dir)
    elif main:
        save_run_config(run_dir, model, extra_config)
        log_path.unlink(missing_ok=True)
    if ctx is not None:
        ctx.barrier()  # every rank has read the resume state before rank 0 may overwrite it
        log(f"DDP over {ctx.world_size} processes: {cfg.batch_size // ctx.world_size} of the "
            f"{cfg.batch_size} images of each step per process")
    return start_epoch, has_state


def _train_passes(model: HGAD, store: FeatureStore, labels: Tensor, optimizer: torch.optim.Optimizer,
                  run_dir: Path, *, start_epoch: int, steps: int, progress: bool) -> dict[str, float]:
    """Every pass from ``start_epoch`` on, each logged and checkpointed; the last pass's mean loss terms."""
    cfg = model.cfg
    ctx = distributed.context()
    main = ctx is None or ctx.is_main
    total_epochs = cfg.meta_epochs * cfg.sub_epochs
    model.train()
    last_terms: dict[str, float] = {}
    bar = tqdm(total=(total_epochs - start_epoch) * steps, desc="train", unit="step", disable=not progress)
    ddp, ddp_stage = None, 0
    with open(run_dir / LOG_FILE, "a", encoding="utf-8") if main else contextlib.nullcontext() as log_fh:
        for epoch in range(start_epoch, total_epochs):
            meta, sub = divmod(epoch, cfg.sub_epochs)
            stage = 1 if cfg.two_stage and meta < cfg.stage1_epochs else 2
            if ctx is not None and stage != ddp_stage:
                ddp = None  # release the previous stage's gradient hooks before registering new ones
                ddp, ddp_stage = distributed.wrap_loss(model, stage, ctx), stage
            sums, n_vec, lr, secs = _one_pass(model, store, labels, optimizer, run_dir, ddp, epoch=epoch,
                                              stage=stage, steps=steps, bar=bar)
            last_terms = {k: v / steps for k, v in sums.items()}
            record = {"epoch": epoch, "meta_epoch": meta, "sub_epoch": sub, "stage": stage, "lr": lr,
                      "seconds": round(secs, 4), "vectors_per_s": round(n_vec / max(secs, 1e-9), 1),
                      **{f"loss_{k}": v for k, v in last_terms.items()}}
            if main:
                log_fh.write(json.dumps(record) + "\n")
                log_fh.flush()
                save_resume_state(run_dir, model, optimizer, {"epoch": epoch + 1})
    ddp = None  # the model goes on alone (calibration, the caller): no DDP hooks left on its parameters
    bar.close()
    return last_terms


def _one_pass(model: HGAD, store: FeatureStore, labels: Tensor, optimizer: torch.optim.Optimizer, run_dir: Path,
              ddp, *, epoch: int, stage: int, steps: int, bar) -> tuple[dict[str, float], int, float, float]:
    """One pass over the training images in the order of (seed, epoch): summed loss terms, vectors seen,
    the last learning rate and the pass's seconds. Non-finite losses or gradients stop training."""
    cfg = model.cfg
    ctx = distributed.context()
    world = 1 if ctx is None else ctx.world_size
    total_epochs = cfg.meta_epochs * cfg.sub_epochs
    meta, sub = divmod(epoch, cfg.sub_epochs)
    order = epoch_order(cfg.seed, epoch, len(labels))
    sums: dict[str, float] = {}
    t_ep = time.perf_counter()
    n_vec = 0
    for step in range(steps):
        lr = learning_rate(cfg, meta, (sub * steps + step) / (cfg.sub_epochs * steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = distributed.rank_slice(order[step * cfg.batch_size:(step + 1) * cfg.batch_size], ctx)
        feats = store.get(idx)
        if ddp is None:
            terms = model.loss(feats, labels[idx], stage)
            shown = {k: v.detach() for k, v in terms.items()}
        else:  # global-batch means: every rank sees the same values, so the guard agrees
            terms = ddp(feats, labels[idx], stage)
            shown = distributed.all_reduce_mean(terms, ctx)
        _check_finite(shown, epoch, step, "loss term", run_dir)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()  # under DDP this also averages the gradients over ranks
        _check_finite({g["name"]: _grad_norm(g["params"]) for g in optimizer.param_groups},
                      epoch, step, "gradient of", run_dir)
        optimizer.step()
        values = {k: float(v) for k, v in shown.items()}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        n_vec += world * sum(f.shape[0] * f.shape[2] * f.shape[3] for f in feats)
        bar.update(1)
        rate = n_vec / max(time.perf_counter() - t_ep, 1e-9)
        bar.set_postfix_str(f"pass {epoch + 1}/{total_epochs} stage {stage} lr {lr:.2e} "
                            f"{_terms_line(values)} {rate:,.0f} vec/s")
    return sums, n_vec, lr, time.perf_counter() - t_ep


def _grad_norm(params: list[Tensor]) -> Tensor:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


def _check_finite(values: dict[str, Tensor], epoch: int, step: int, what: str, run_dir: Path) -> None:
    bad = [k for k, v in values.items() if not torch.isfinite(v).all()]
    if bad:
        keep = run_dir / RESUME_FILE
        kept = f"last good checkpoint kept: {keep}" if keep.exists() else "no checkpoint was written yet"
        raise TrainingError(f"non-finite {what} {', '.join(bad)} at pass {epoch + 1}, step {step + 1}; "
                            f"training stopped ({kept})")


def _truncate_log(path: Path, epochs_done: int) -> None:
    """Drop log lines of passes after the checkpoint (they will be redone), and a line cut by a kill."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("epoch", epochs_done) < epochs_done:
            kept.append(line)
    atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files of writes interrupted by a kill (see hgad.io); never read, so safe to drop."""
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


# the per-scale maps of LatentMaps that calibration gathers statistics of (also the buffer name parts)
_MAP_KINDS = ("logp", "ent", "maha", "knn")


@torch.no_grad()
def calibrate(model: HGAD, store: FeatureStore, labels: Tensor, *, mirrored: FeatureStore | None = None,
              batch_size: int = 16, progress: bool = True) -> float:
    """Deploy-protocol statistics and per-class thresholds from the training images (docs/method.md, "Scoring").

    ``mirrored``: the features of the same images flipped left to right, which the memory bank holds too.

    Returns the fraction of training vectors whose most probable class is their own.
    """
    n = len(store)
    starts = range(0, n, batch_size)

    def batches(with_index: bool = False, source: FeatureStore = store):
        for start in starts:
            idx = torch.arange(start, min(n, start + batch_size))
            yield (source.get(idx), labels[idx], idx) if with_index else (source.get(idx), labels[idx])

    model.set_latent_stats(batches())  # before the maps: the mahalanobis maps need the class Gaussians
    # and the knn maps the memory bank (a mirrored copy keeps its image's index: left out with it)
    model.set_knn_bank(itertools.chain(batches(with_index=True),
                                       batches(with_index=True, source=mirrored) if mirrored is not None else ()))
    collected: dict[str, list[list[Tensor]]] = {kind: [] for kind in _MAP_KINDS}
    hits, total = 0, 0
    try:
        for feats, batch_labels, idx in tqdm(batches(with_index=True), total=len(starts), desc="calibrate",
                                             disable=not progress, leave=False):
            # a training image is scored against a bank without its own vectors, as a new image would be
            lm = model.latent_maps(feats, batch_labels, images=idx)
            for kind, parts in collected.items():
                if getattr(lm, kind) is not None:
                    parts.append([m.cpu() for m in getattr(lm, kind)])
            if lm.class_maps is not None:
                for cm in lm.class_maps:
                    hits += int((cm == lm.classes.view(-1, 1, 1)).sum())
                    total += cm.numel()
    finally:
        model.forget_knn_owners()
    y, size = model.n_classes, model.cfg.map_size
    levels = {kind: [torch.cat(level) for level in zip(*parts)] for kind, parts in collected.items() if parts}
    model.set_stats(compute_map_stats(levels["logp"], labels, y, size),
                    compute_map_stats(levels["ent"], labels, y, size) if "ent" in levels else None)
    if model.cfg.score_norm == "zscore":
        for kind, maps in levels.items():
            model.set_position_stats(kind, compute_position_stats(maps, labels, y))
    scores = torch.empty(n)
    norm, score = model.deploy_norm(), model.score_kind()
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        batch = {kind: [m[sl].to(model.device) for m in maps] for kind, maps in levels.items()}
        lm = LatentMaps(logp=batch["logp"], ent=batch.get("ent"), maha=batch.get("maha"), knn=batch.get("knn"),
                        posterior=None, classes=labels[sl].to(model.device))
        scores[sl] = model.score_latent(lm, score=score, norm=norm).scores.cpu()
    for c in range(y):
        own = scores[labels == c]
        if len(own):
            model.threshold[c] = torch.quantile(own.double(), model.cfg.threshold_quantile).float()
    return hits / total if total else float("nan")
