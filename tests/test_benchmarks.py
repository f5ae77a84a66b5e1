"""The benchmark scripts run (``--smoke``: tiny settings, seconds) and the speed edits keep the maths.

The scripts are run in-process on the tiny dataset; their numbers are not checked (timings in
tests are meaningless on a shared machine), only that they run, agree with themselves and write
the JSON they promise. The speed edits of the library are checked against independent references:
the Haar sampler against LAPACK's QR and scipy's ``special_ortho_group``, the shared-condition path
of the flow against FrEIA 0.2 with the condition repeated per vector.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from scipy import stats
from scipy.stats import special_ortho_group
from torch import nn

from hgad.flow import ConditionalFlow, haar_rotation, positional_encoding_2d

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
MACHINE_KEYS = {"cpu", "cpu_cores_usable", "torch", "torch_threads", "devices", "load_average_1min_at_start"}


def _script(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _smoke(name: str, data: Path, out: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> tuple[int, dict, str]:
    threads = torch.get_num_threads()
    try:
        # one thread: two OpenMP threads on a busy two-core machine wait on each other for seconds
        rc = _script(name, monkeypatch).main(["--smoke", "--threads", "1", "--data", str(data), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    return rc, json.loads(out.read_text()), printed


# ---- the scripts ---------------------------------------------------------------------------------
def test_train_throughput_smoke(tiny_data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    rc, payload, printed = _smoke("train_throughput", tiny_data, tmp_path / "t.json", monkeypatch, capsys)
    assert rc == 0
    assert MACHINE_KEYS <= set(payload["machine"])
    rows = payload["results"]
    assert [(r["preset"], r["cache"]) for r in rows] == [("fast", "memory"), ("fast", "none"), ("paper", "memory"),
                                                        ("paper", "none")]
    for row in rows:
        # smoke: 64 px, 2 pyramid levels, stride-16 tap -> 4x4 + 2x2 vectors; 8 images, batch 4 -> 2 steps
        assert row["vectors/img"] == 20
        assert row["images/s"] == pytest.approx(8 / row["pass s"])
        assert row["vectors/s"] == pytest.approx(8 * 20 / row["pass s"], rel=1e-2)
        assert row["peak MiB"] > 0
    assert rows[0]["cache build s"] is not None and rows[1]["cache build s"] is None
    assert rows[2]["backbone"] == "tf_efficientnet_b6" and rows[2]["backbone_weights"] == "none"
    assert "| preset | device | cache |" in printed and "SMOKE RUN" in printed


def test_reference_compare_smoke(tiny_data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    rc, payload, printed = _smoke("reference_compare", tiny_data, tmp_path / "r.json", monkeypatch, capsys)
    assert rc == 0
    res = payload["results"][0]
    assert res["step1_agree"] is True
    assert max(res["step1_difference_float32_features"].values()) <= 1e-5
    assert res["speedup"] == pytest.approx(res["release_seconds"] / res["hgad_seconds"])
    assert set(res["step1_loss_release"]) == {"g", "mi", "e", "total"}
    assert "| device | loop | s / pass | images/s | vectors/s | speed-up |" in printed and "AGREE" in printed


def test_reference_flow_is_a_faithful_copy(monkeypatch) -> None:
    """The release-style FrEIA flow built by reference_compare computes hgad's flow (float64)."""
    freia_flow = _script("reference_compare", monkeypatch).freia_flow
    ours = ConditionalFlow(9, 8, 3, seed=4)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    theirs = freia_flow(ours, 1.9).double()
    ours = ours.double()
    x = torch.randn(20, 9, generator=gen, dtype=torch.float64)
    c = torch.randn(20, 8, generator=gen, dtype=torch.float64)
    z, logdet = ours(x, c)
    z_ref, logdet_ref = theirs(x, c=[c])
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(logdet, logdet_ref, rtol=0, atol=1e-10)


def test_inference_latency_smoke(tiny_data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    rc, payload, printed = _smoke("inference_latency", tiny_data, tmp_path / "i.json", monkeypatch, capsys)
    assert rc == 0
    rows = payload["results"]
    assert [r["batch"] for r in rows] == [1, 2]
    single = rows[0]
    for key in ("preprocess s", "backbone s", "flows+prior s", "maps s"):
        assert single[key] > 0
    assert single["p90 s"] >= single["median s"] > 0
    assert rows[1]["images/s"] == pytest.approx(2 / rows[1]["median s"])
    assert "| device | batch | median s |" in printed


# ---- speed edits of the library --------------------------------------------------------------------
@pytest.mark.parametrize("dim", [1, 2, 5, 112])
def test_haar_rotation_is_the_sign_fixed_qr_rotation(dim: int) -> None:
    """Same matrix as LAPACK's QR of the same Gaussian draw with the sign fix; in SO(dim); seeded."""
    q = haar_rotation(dim, 7).numpy()
    g = np.random.default_rng(7).standard_normal((dim, dim))
    q_ref, r_ref = np.linalg.qr(g)
    q_ref = q_ref * np.sign(np.diag(r_ref))
    if np.linalg.det(q_ref) < 0:
        q_ref[:, 0] = -q_ref[:, 0]
    np.testing.assert_allclose(q, q_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(q @ q.T, np.eye(dim), rtol=0, atol=1e-12)
    assert np.linalg.det(q) == pytest.approx(1.0, abs=1e-10)
    assert torch.equal(haar_rotation(dim, 7), haar_rotation(dim, 7))
    if dim > 1:
        assert not torch.allclose(haar_rotation(dim, 8), haar_rotation(dim, 7))


def test_haar_rotation_distribution_matches_scipy() -> None:
    """Haar on SO(n): entries and trace distributed as scipy's special_ortho_group draws (KS tests)
    and trace moments E[tr] = 0, E[tr^2] = 1 (n >= 3). Without the sign fix Q_00 would be one-signed."""
    n, draws = 4, 400
    ours = np.stack([haar_rotation(n, s).numpy() for s in range(draws)])
    theirs = special_ortho_group.rvs(n, size=draws, random_state=12345)
    assert stats.ks_2samp(ours[:, 0, 0], theirs[:, 0, 0]).pvalue > 1e-3
    assert stats.ks_2samp(ours[:, 2, 1], theirs[:, 2, 1]).pvalue > 1e-3
    trace = np.trace(ours, axis1=1, axis2=2)
    assert stats.ks_2samp(trace, np.trace(theirs, axis1=1, axis2=2)).pvalue > 1e-3
    assert abs(trace.mean()) < 5 / np.sqrt(draws)  # sd of tr is 1
    assert abs((trace**2).mean() - 1) < 5 * np.sqrt(2 / draws)  # var of tr^2 is 2
    assert 0.3 < (ours[:, 0, 0] > 0).mean() < 0.7


def _subnet(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, 2 * c_in), nn.ReLU(), nn.Linear(2 * c_in, c_out))


def test_shared_condition_equals_repeated_condition_and_freia() -> None:
    """A condition given once per position ``(L, P)`` conditions every image like the repeated ``(B*L, P)``."""
    dim, pos, h, w, batch = 7, 8, 3, 4, 5
    flow = ConditionalFlow(dim, pos, 3, seed=3)
    gen = torch.Generator().manual_seed(3)
    inn = SequenceINN(dim)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    for block in flow.blocks:
        inn.append(AllInOneBlock, cond=0, cond_shape=(pos,), subnet_constructor=_subnet, affine_clamping=1.9,
                   global_affine_type="SOFTPLUS", permute_soft=True)
        theirs = inn[len(inn) - 1]
        with torch.no_grad():
            theirs.subnet.load_state_dict(block.subnet.state_dict())
            theirs.global_scale.copy_(block.global_scale.view(1, -1))
            theirs.global_offset.copy_(block.global_offset.view(1, -1))
            theirs.w_perm.copy_(block.rotation)
            theirs.w_perm_inv.copy_(block.rotation.T)
    flow, inn = flow.double(), inn.double()
    c = positional_encoding_2d(pos, h, w).flatten(1).T.double()  # (L, P)
    x = torch.randn(batch * h * w, dim, generator=gen, dtype=torch.float64)
    z, logdet = flow(x, c)
    z_rep, logdet_rep = flow(x, c.repeat(batch, 1))
    z_ref, logdet_ref = inn(x, c=[c.repeat(batch, 1)])
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(logdet, logdet_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(z, z_rep, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet, logdet_rep, rtol=0, atol=1e-12)
    with torch.no_grad():  # exact inverse needs rotations orthogonal to float64 precision
        for block in flow.blocks:
            u, _, vh = torch.linalg.svd(block.rotation)
            block.rotation.copy_(u @ vh)
    z, logdet = flow(x, c)
    x_back, logdet_inv = flow.inverse(z, c)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-9)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=0, atol=1e-9)
    # the condition's columns of the first layer get the same gradient as with the repeated condition
    grads = []
    for cond in (c, c.repeat(batch, 1)):
        flow.zero_grad()
        zz, ld = flow(x, cond)
        (zz.square().sum() + ld.sum()).backward()
        grads.append(flow.blocks[1].subnet[0].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)
