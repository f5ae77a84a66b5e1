"""Tests of the conditional flow: positional code, equality with FrEIA 0.2, invertibility, log-det."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import nn

from hgad.errors import ConfigError
from hgad.flow import ConditionalFlow, CouplingBlock, positional_encoding_2d


def _subnet(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, 2 * c_in), nn.ReLU(), nn.Linear(2 * c_in, c_out))


def _freia_block(dim: int, cond_dim: int) -> AllInOneBlock:
    return AllInOneBlock(
        dims_in=[(dim,)],
        dims_c=[(cond_dim,)],
        subnet_constructor=_subnet,
        affine_clamping=1.9,
        global_affine_type="SOFTPLUS",
        permute_soft=True,
    )


def _randomise(block: CouplingBlock, gen: torch.Generator, strength: float = 6.0) -> None:
    """Move the parameters away from their initial values so every part of the block matters."""
    with torch.no_grad():
        for lin in (block.subnet[0], block.subnet[2]):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.5)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen) * 0.5)
        block.subnet[2].weight.mul_(strength)  # 6: drives 0.1*a into the non-linear range of tanh
        block.global_scale.add_(torch.randn(block.global_scale.shape, generator=gen))
        block.global_offset.copy_(torch.randn(block.global_offset.shape, generator=gen))


def _copy_to_freia(ours: CouplingBlock, theirs: AllInOneBlock) -> None:
    with torch.no_grad():
        theirs.subnet.load_state_dict(ours.subnet.state_dict())
        theirs.global_scale.copy_(ours.global_scale.view(1, -1))
        theirs.global_offset.copy_(ours.global_offset.view(1, -1))
        theirs.w_perm.copy_(ours.rotation)
        theirs.w_perm_inv.copy_(ours.rotation.T)


def test_positional_encoding_by_hand() -> None:
    pe = positional_encoding_2d(8, 2, 3)
    assert pe.shape == (8, 2, 3)
    assert pe.dtype == torch.float32
    f1 = math.exp(-2 * math.log(1e4) / 4)  # = 0.01; f0 = 1
    for y in range(2):
        for x in range(3):
            expected = [
                math.sin(x),
                math.cos(x),
                math.sin(x * f1),
                math.cos(x * f1),
                math.sin(y),
                math.cos(y),
                math.sin(y * f1),
                math.cos(y * f1),
            ]
            assert pe[:, y, x].tolist() == pytest.approx(expected, abs=1e-7)
    # a few literal values: column 2 / row 1
    assert pe[0, 0, 2].item() == pytest.approx(0.9092974268, abs=1e-7)
    assert pe[3, 1, 2].item() == pytest.approx(0.9998000067, abs=1e-7)
    assert pe[5, 1, 0].item() == pytest.approx(0.5403023059, abs=1e-7)
    with pytest.raises(ConfigError):
        positional_encoding_2d(6, 2, 3)


@pytest.mark.parametrize("dim", [6, 7])
def test_block_equals_freia(dim: int) -> None:
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 - FrEIA draws its soft permutation from numpy's global generator
    cond_dim = 4
    ours = CouplingBlock(dim, cond_dim, seed=3)
    _randomise(ours, torch.Generator().manual_seed(dim))
    theirs = _freia_block(dim, cond_dim)
    _copy_to_freia(ours, theirs)
    ours, theirs = ours.double(), theirs.double()
    x = torch.randn(32, dim, dtype=torch.float64) * 2
    c = torch.randn(32, cond_dim, dtype=torch.float64)
    z, logdet = ours(x, c)
    (z_ref,), logdet_ref = theirs([x], c=[c])
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(logdet, logdet_ref, rtol=0, atol=1e-10)
    # the other direction: FrEIA's own rotation loaded into ours gives the same map (float32, 1e-5)
    theirs = _freia_block(dim, cond_dim)
    ours = CouplingBlock(dim, cond_dim, seed=5)
    _randomise(ours, torch.Generator().manual_seed(10 + dim))
    with torch.no_grad():
        ours.rotation.copy_(theirs.w_perm.view(dim, dim))
    _copy_to_freia(ours, theirs)
    z, logdet = ours(x.float(), c.float())
    (z_ref,), logdet_ref = theirs([x.float()], c=[c.float()])
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(logdet, logdet_ref, rtol=0, atol=1e-5)
    # and so does FrEIA's reverse pass
    (x_ref,), logdet_inv_ref = theirs([z_ref], c=[c.float()], rev=True)
    x_back, logdet_inv = ours.inverse(z, c.float())
    torch.testing.assert_close(x_back, x_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(logdet_inv, logdet_inv_ref, rtol=0, atol=1e-5)


def test_flow_equals_freia_sequence() -> None:
    dim, cond_dim = 7, 8
    ours = ConditionalFlow(dim, cond_dim, 3, seed=1)
    gen = torch.Generator().manual_seed(1)
    inn = SequenceINN(dim)
    for block in ours.blocks:
        _randomise(block, gen)
        inn.append(
            AllInOneBlock,
            cond=0,
            cond_shape=(cond_dim,),
            subnet_constructor=_subnet,
            affine_clamping=1.9,
            global_affine_type="SOFTPLUS",
            permute_soft=True,
        )
        _copy_to_freia(block, inn[len(inn) - 1])
    ours, inn = ours.double(), inn.double()
    x = torch.randn(16, dim, generator=gen, dtype=torch.float64)
    c = torch.randn(16, cond_dim, generator=gen, dtype=torch.float64)
    z, logdet = ours(x, c)
    z_ref, logdet_ref = inn(x, c=[c])
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(logdet, logdet_ref, rtol=0, atol=1e-10)


def _orthogonalise(flow: ConditionalFlow) -> None:
    """Make the rotations orthogonal to the working precision (float32 storage leaves ~1e-7 off)."""
    with torch.no_grad():
        for block in flow.blocks:
            u, _, vh = torch.linalg.svd(block.rotation)
            block.rotation.copy_(u @ vh)


@pytest.mark.parametrize(
    ("dtype", "strength", "atol"), [(torch.float32, 0.5, 1e-5), (torch.float64, 6.0, 1e-8)]
)
def test_inverse_recovers_input(dtype: torch.dtype, strength: float, atol: float) -> None:
    flow = ConditionalFlow(9, 8, 4, seed=2)
    gen = torch.Generator().manual_seed(2)
    for block in flow.blocks:
        _randomise(block, gen, strength)
    flow = flow.to(dtype)
    if dtype == torch.float64:
        _orthogonalise(flow)
    x = torch.randn(64, 9, generator=gen).to(dtype)
    c = positional_encoding_2d(8, 8, 8).flatten(1).T.to(dtype)  # (64, 8)
    z, logdet = flow(x, c)
    assert z.abs().max() > 3  # the map is far from the identity
    x_back, logdet_inv = flow.inverse(z, c)
    torch.testing.assert_close(x_back, x, rtol=0, atol=atol)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=0, atol=atol)


@pytest.mark.parametrize("dim", [5, 6])
def test_logdet_matches_autograd_jacobian(dim: int) -> None:
    cond_dim = 4
    flow = ConditionalFlow(dim, cond_dim, 3, seed=7)
    gen = torch.Generator().manual_seed(dim)
    for block in flow.blocks:
        _randomise(block, gen)
    flow = flow.double()
    _orthogonalise(flow)  # else log|det W| ~ 1e-7 from the float32 rounding of W
    x = torch.randn(dim, generator=gen, dtype=torch.float64)
    c = torch.randn(1, cond_dim, generator=gen, dtype=torch.float64)
    for module in (flow.blocks[0], flow):
        jac = torch.autograd.functional.jacobian(lambda v, m=module: m(v[None], c)[0][0], x)
        sign, logabs = torch.linalg.slogdet(jac)
        _, logdet = module(x[None], c)
        assert sign.item() == 1.0
        assert logdet.item() == pytest.approx(logabs.item(), abs=1e-9)
        jac_inv = torch.autograd.functional.jacobian(lambda v, m=module: m.inverse(v[None], c)[0][0], x)
        _, logabs_inv = torch.linalg.slogdet(jac_inv)
        _, logdet_inv = module.inverse(x[None], c)
        assert logdet_inv.item() == pytest.approx(logabs_inv.item(), abs=1e-9)


def test_parameter_count_and_buffers() -> None:
    flow = ConditionalFlow(200, 256, 12)
    assert sum(p.numel() for p in flow.parameters() if p.requires_grad) == 4_766_208
    assert sum(p.numel() for p in flow.parameters()) == 4_766_208
    assert "blocks.0.rotation" in dict(flow.named_buffers())
    keys = set(flow.state_dict())
    for name in ("subnet.0.weight", "subnet.2.bias", "global_scale", "global_offset", "rotation"):
        assert f"blocks.11.{name}" in keys


def test_initial_state_and_rotation_seed() -> None:
    block = CouplingBlock(6, 4, seed=0)
    assert torch.equal(block.gamma(), torch.ones(6))
    assert torch.equal(block.global_offset.detach(), torch.zeros(6))
    w = block.rotation.double()
    torch.testing.assert_close(w @ w.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-6)
    assert torch.linalg.det(w).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(CouplingBlock(6, 4, seed=0).rotation, block.rotation)
    assert not torch.allclose(CouplingBlock(6, 4, seed=1).rotation, block.rotation)
    flow = ConditionalFlow(6, 4, 3, seed=0)
    rots = [b.rotation for b in flow.blocks]
    assert not torch.allclose(rots[0], rots[1]) and not torch.allclose(rots[1], rots[2])
    assert torch.equal(ConditionalFlow(6, 4, 3, seed=0).blocks[2].rotation, rots[2])
    assert not torch.allclose(ConditionalFlow(6, 4, 3, seed=1).blocks[0].rotation, rots[0])
    with pytest.raises(ConfigError):
        CouplingBlock(1, 4)
    with pytest.raises(ConfigError):
        ConditionalFlow(6, 4, 0)


def test_autocast_bf16_keeps_logdet_float32() -> None:
    flow = ConditionalFlow(8, 4, 2, seed=0)
    x = torch.randn(10, 8)
    c = torch.randn(10, 4)
    z32, ld32 = flow(x, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z16, ld16 = flow(x, c)
    assert ld16.dtype == torch.float32
    torch.testing.assert_close(ld16, ld32, rtol=0, atol=0.05)
    torch.testing.assert_close(z16.float(), z32, rtol=0.05, atol=0.05)
