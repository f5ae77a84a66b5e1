"""bf16 autocast: the loss and its gradients computed with the flows in bfloat16 agree with float32.

On CUDA the model runs its flows under ``torch.autocast("cuda", dtype=torch.bfloat16)`` (config
``amp``) while the losses upcast to float32. The same code runs on the CPU under
``torch.autocast("cpu", dtype=torch.bfloat16)``, which is what these tests use, so they run anywhere.
Stated tolerance: every loss term within 1e-2 of its float32 value, relative (measured: about 1e-4,
3e-3 for the small entropy term); gradients with cosine similarity >= 0.99 to the float32 ones.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import TINY
from hgad.config import preset
from hgad.flow import ConditionalFlow, positional_encoding_2d
from hgad.losses import LossConfig, hgad_loss
from hgad.model import HGAD
from hgad.prior import HierarchicalPrior

RTOL = 1e-2
_DIM, _POS, _H, _W, _CLASSES = 64, 32, 8, 8, 3


def _problem() -> tuple[ConditionalFlow, HierarchicalPrior, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    flow = ConditionalFlow(_DIM, _POS, 4, seed=0)
    prior = HierarchicalPrior(_CLASSES, _DIM, 4, seed=0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4 * _H * _W, _DIM, generator=gen) * 2 + 0.5
    c = positional_encoding_2d(_POS, _H, _W).flatten(1).T
    labels = torch.arange(4).repeat_interleave(_H * _W) % _CLASSES
    return flow, prior, x, c, labels


def _run(stage: int, bf16: bool) -> tuple[dict[str, float], torch.Tensor, torch.Tensor, torch.dtype]:
    """Loss terms, flattened gradient of the total, per-vector log-det and the flow's output dtype."""
    flow, prior, x, c, labels = _problem()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx:
        z, logdet = flow(x, c)
    terms = hgad_loss(z, logdet, labels, prior, stage=stage, cfg=LossConfig())
    terms["total"].backward()
    params = [*flow.parameters(), *prior.parameters()]
    grad = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in params])
    return {k: float(v.detach()) for k, v in terms.items()}, grad, logdet.detach(), z.dtype


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_loss_and_gradients_agree_with_fp32(stage: int) -> None:
    ref, grad_ref, logdet_ref, dtype_ref = _run(stage, bf16=False)
    out, grad, logdet, dtype = _run(stage, bf16=True)
    assert dtype_ref == torch.float32 and dtype == torch.bfloat16  # the flow really ran in bf16
    assert logdet.dtype == torch.float32
    expected = {"g", "mi", "e", "total"} | ({"in", "z"} if stage == 2 else set())
    assert set(out) == set(ref) == expected
    assert out != ref  # not silently the float32 computation
    for key in ref:
        assert out[key] == pytest.approx(ref[key], rel=RTOL), key
    # per-vector log-determinants stay float32 sums: bf16 only perturbs the summed terms
    torch.testing.assert_close(logdet, logdet_ref, rtol=0, atol=0.05)
    cosine = torch.nn.functional.cosine_similarity(grad, grad_ref, dim=0)
    assert cosine >= 0.99
    assert grad.norm().item() == pytest.approx(grad_ref.norm().item(), rel=5e-2)


def test_model_autocast_is_cuda_only_and_the_cuda_path_agrees_on_cpu() -> None:
    """``HGAD.encode`` enters autocast only on CUDA; under an outer CPU autocast (the same code path
    as on CUDA, where the model enters it itself) ``HGAD.loss`` agrees with float32."""
    cfg = preset("fast", **{**TINY, "backbone_weights": "none"})
    model = HGAD(cfg, ["a", "b"])
    assert cfg.amp and isinstance(model._autocast(), contextlib.nullcontext)
    gen = torch.Generator().manual_seed(1)
    shapes = model.backbone.scale_shapes(cfg.img_size)
    feats = [torch.randn(3, model.backbone.feature_dims[lvl], h, w, generator=gen) for lvl, (h, w) in
             enumerate(shapes)]
    labels = torch.tensor([0, 1, 1])
    z, logdet = model.encode(feats[0], 0)
    z_ref, logdet_ref = model.flows[0](feats[0].permute(0, 2, 3, 1).reshape(-1, feats[0].shape[1]),
                                       model._positions(*shapes[0], torch.device("cpu")).repeat(3, 1))
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, z_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logdet, logdet_ref, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        ref = model.loss(feats, labels, 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.loss(feats, labels, 2)
            z16, _ = model.encode(feats[0], 0)
    assert z16.dtype == torch.float32  # encode hands the losses float32 whatever the flow ran in
    assert not torch.equal(z16, z)
    for key in ref:
        assert float(out[key]) == pytest.approx(float(ref[key]), rel=RTOL), key
