"""Closed-form fits: exact recovery, weights, proper rotations, thin-plate splines, degenerate input."""

import pytest
import torch
from helpers import grid_affine, max_point_error, random_affine, random_rigid

from custom_nets import DegenerateKeypointsError, fit_affine, fit_rigid, fit_tps
from custom_nets.geometry import voxel_grid, voxel_to_world

SHAPES = [(20, 31, 47), (64, 12, 33), (9, 40, 25), (48, 48, 8)]
SPACINGS = [(0.7, 1.3, 2.5), (1.0, 1.0, 6.0), (0.5, 0.5, 3.0), (2.0, 0.9, 1.1)]


def _world_points(gen, k=40):
    """For 4 batch items: k random points inside a non-cubic, anisotropic, oblique grid (world mm), and the corners."""
    pts, corners = [], []
    for shape, spacing in zip(SHAPES, SPACINGS):
        a = grid_affine(spacing, gen).unsqueeze(0)
        vox = torch.rand(1, k, 3, generator=gen, dtype=torch.float64) * (torch.tensor(shape) - 1)
        pts.append(voxel_to_world(vox, a))
        c = voxel_grid((2, 2, 2), dtype=torch.float64).reshape(1, -1, 3) * (torch.tensor(shape) - 1)
        corners.append(voxel_to_world(c, a)[0])
    return torch.cat(pts), corners


def _apply(t, p):
    return p @ t[:, :3, :3].transpose(1, 2) + t[:, None, :3, 3]


@pytest.mark.parametrize("kind", ["affine", "rigid"])
def test_exact_recovery_batch_of_four_world_grids(kind):
    gen = torch.Generator().manual_seed(0)
    src, corners = _world_points(gen)
    truth = torch.stack([(random_affine if kind == "affine" else random_rigid)(gen) for _ in range(4)])
    dst = _apply(truth, src)
    fit = (fit_affine if kind == "affine" else fit_rigid)(src, dst)
    assert fit.shape == (4, 4, 4) and fit.dtype == torch.float64
    for b in range(4):  # each item its own transform, error over the whole field of view below 1e-4 mm
        assert max_point_error(fit[b], truth[b], corners[b]) < 1e-4
    assert torch.equal(fit[:, 3], torch.tensor([0.0, 0, 0, 1], dtype=torch.float64).expand(4, 4))


def test_float32_input_keeps_dtype_and_precision():
    gen = torch.Generator().manual_seed(1)
    src, corners = _world_points(gen)
    truth = torch.stack([random_affine(gen) for _ in range(4)])
    fit = fit_affine(src.float(), _apply(truth, src).float())
    assert fit.dtype == torch.float32
    assert max(max_point_error(fit[b].double(), truth[b], corners[b]) for b in range(4)) < 1e-2


@pytest.mark.parametrize("fit", [fit_affine, fit_rigid])
def test_zero_weight_outliers_are_ignored(fit):
    gen = torch.Generator().manual_seed(2)
    src, corners = _world_points(gen)
    truth = torch.stack([(random_affine if fit is fit_affine else random_rigid)(gen) for _ in range(4)])
    dst = _apply(truth, src)
    weights = torch.rand(4, src.shape[1], generator=gen, dtype=torch.float64) + 0.1
    dst[:, :7] += torch.randn(4, 7, 3, generator=gen, dtype=torch.float64) * 50  # gross outliers
    weights[:, :7] = 0
    est = fit(src, dst, weights)
    for b in range(4):
        assert max_point_error(est[b], truth[b], corners[b]) < 1e-4
    # and the outliers do matter without the weights (so the test can fail)
    assert max(max_point_error(fit(src, dst)[b], truth[b], corners[b]) for b in range(4)) > 1.0


def test_rigid_is_proper_rotation_even_from_reflected_noisy_points():
    gen = torch.Generator().manual_seed(3)
    src = torch.randn(4, 30, 3, generator=gen, dtype=torch.float64) * 30
    reflect = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    truth = torch.stack([random_rigid(gen) @ reflect for _ in range(4)])
    dst = _apply(truth, src) + torch.randn(4, 30, 3, generator=gen, dtype=torch.float64)
    est = fit_rigid(src, dst)
    rot = est[:, :3, :3]
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(4, 3, 3), atol=1e-10)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(4, dtype=torch.float64), atol=1e-10)


def test_rigid_is_exactly_symmetric():
    gen = torch.Generator().manual_seed(4)
    src = torch.randn(3, 25, 3, generator=gen, dtype=torch.float64) * 30
    dst = torch.randn(3, 25, 3, generator=gen, dtype=torch.float64) * 30  # no relation: residuals are large
    w = torch.rand(3, 25, generator=gen, dtype=torch.float64)
    fwd, bwd = fit_rigid(src, dst, w), fit_rigid(dst, src, w)
    assert torch.allclose(fwd @ bwd, torch.eye(4, dtype=torch.float64).expand(3, 4, 4), atol=1e-10)


def test_tps_interpolates_with_zero_lambda_and_tends_to_affine():
    gen = torch.Generator().manual_seed(5)
    src = torch.randn(2, 20, 3, generator=gen, dtype=torch.float64) * 40
    dst = src + torch.randn(2, 20, 3, generator=gen, dtype=torch.float64) * 3
    tps = fit_tps(src, dst, lam=0.0)
    assert torch.allclose(tps(src), dst, atol=1e-6)
    # large lambda: the spline approaches the weighted least-squares affine fit, everywhere
    w = torch.rand(2, 20, generator=gen, dtype=torch.float64) + 0.2
    query = torch.randn(2, 100, 3, generator=gen, dtype=torch.float64) * 40
    aff = fit_affine(src, dst, w)
    err = [(fit_tps(src, dst, lam=lam, weights=w)(query) - _apply(aff, query)).norm(dim=-1).max() for lam in (1, 1e7)]
    assert err[1] < 1e-3 < err[0]
    assert torch.allclose(fit_tps(src, dst, lam=1e7, weights=w).affine_part(), aff, atol=1e-4)


def test_tps_is_differentiable_and_batched():
    gen = torch.Generator().manual_seed(6)
    src = (torch.randn(3, 12, 3, generator=gen) * 20).requires_grad_()
    dst = (torch.randn(3, 12, 3, generator=gen) * 20).requires_grad_()
    tps = fit_tps(src, dst, lam=0.5)
    tps(torch.randn(3, 50, 3, generator=gen) * 20).sum().backward()
    assert torch.isfinite(src.grad).all() and torch.isfinite(dst.grad).all()
    assert src.grad.abs().sum() > 0 and dst.grad.abs().sum() > 0
    # batch item 1 alone gives the same spline as in the batch
    single = fit_tps(src[1:2].detach(), dst[1:2].detach(), lam=0.5)
    q = torch.randn(1, 30, 3, generator=gen) * 20
    assert torch.allclose(single(q), tps(q.expand(3, -1, -1))[1:2], atol=1e-4)


def test_tps_zero_weight_point_does_not_pull():
    gen = torch.Generator().manual_seed(7)
    src = torch.randn(1, 15, 3, generator=gen, dtype=torch.float64) * 30
    dst = src * 1.1
    dst_bad = dst.clone()
    dst_bad[0, 0] += 100
    w = torch.ones(1, 15, dtype=torch.float64)
    w[0, 0] = 0
    q = torch.randn(1, 40, 3, generator=gen, dtype=torch.float64) * 30
    assert torch.allclose(fit_tps(src, dst_bad, lam=1.0, weights=w)(q), fit_tps(src, dst, lam=1.0, weights=w)(q))


def test_tps_interpolation_ignores_weight_zero_points():
    """With lam = 0 (the config default) the spline interpolates the weighted points and ignores weight-0 ones, as at
    lam > 0: two empty heatmaps (both placed at the grid centre, weight 0) neither raise as coincident points nor bend
    the warp towards wherever the other image's empty heatmaps sit."""
    gen = torch.Generator().manual_seed(8)
    src = torch.randn(1, 14, 3, generator=gen, dtype=torch.float64) * 30
    dst = src * 1.1 + torch.randn(1, 14, 3, generator=gen, dtype=torch.float64)
    src_empty, dst_empty = src.clone(), dst.clone()
    src_empty[0, 12:] = 0.0  # two coincident points of weight 0
    dst_empty[0, 12:] = torch.tensor([[40.0, -30.0, 5.0], [-20.0, 10.0, 60.0]], dtype=torch.float64)
    w = torch.ones(1, 14, dtype=torch.float64)
    w[0, 12:] = 0.0
    q = torch.randn(1, 40, 3, generator=gen, dtype=torch.float64) * 30
    spline = fit_tps(src_empty, dst_empty, lam=0.0, weights=w)
    assert torch.allclose(spline(src[:, :12]), dst[:, :12], atol=1e-6)  # still interpolates the weighted points
    assert torch.allclose(spline(q), fit_tps(src[:, :12], dst[:, :12], lam=0.0)(q), atol=1e-6)


def test_spline_select_is_the_batch_item():
    gen = torch.Generator().manual_seed(9)
    src = torch.randn(3, 10, 3, generator=gen, dtype=torch.float64) * 30
    spline = fit_tps(src, src * 0.9 + 2.0, lam=0.3)
    q = torch.randn(3, 20, 3, generator=gen, dtype=torch.float32) * 30
    item = spline.select(1).to("cpu")
    assert item.batch_size == 1
    assert torch.allclose(item(q[1:2]), spline(q)[1:2], atol=1e-5) and item(q[1:2]).dtype == torch.float32


@pytest.mark.parametrize(
    "call, nonzero",
    [
        (lambda s, d, w: fit_affine(s, d, w), 3),  # an affine needs 4
        (lambda s, d, w: fit_rigid(s, d, w), 2),  # a rigid fit needs 3
        (lambda s, d, w: fit_tps(s, d, 1.0, w), 3),
    ],
)
def test_too_few_effective_points_is_a_clear_error(call, nonzero):
    gen = torch.Generator().manual_seed(8)
    src = torch.randn(2, 10, 3, generator=gen)
    w = torch.ones(2, 10)
    w[1, nonzero:] = 0
    with pytest.raises(DegenerateKeypointsError, match="batch item 1"):
        call(src, src + 1, w)


def test_coplanar_collinear_and_coincident_points_are_clear_errors():
    gen = torch.Generator().manual_seed(9)
    planar = torch.randn(1, 20, 3, generator=gen)
    planar[..., 2] = 5.0
    with pytest.raises(DegenerateKeypointsError, match="fewer than 3 dimensions"):
        fit_affine(planar, planar)
    line = torch.linspace(0, 1, 10).view(1, 10, 1) * torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(DegenerateKeypointsError, match="fewer than 2 dimensions"):
        fit_rigid(line, line)
    pts = torch.randn(1, 10, 3, generator=gen)
    pts[0, 3] = pts[0, 4]
    with pytest.raises(DegenerateKeypointsError, match="coincident"):
        fit_tps(pts, pts + 1, lam=0.0)
    assert torch.isfinite(fit_tps(pts, pts + 1, lam=0.1)(pts)).all()  # smoothing handles it


def test_bad_shapes_and_values_are_reported():
    with pytest.raises(ValueError, match=r"expected src of shape \(B, K, 3\), got \(10, 3\)"):
        fit_affine(torch.zeros(10, 3), torch.zeros(10, 3))
    with pytest.raises(ValueError, match="weights of shape"):
        fit_affine(torch.randn(1, 10, 3), torch.randn(1, 10, 3), torch.ones(10))
    bad = torch.randn(1, 10, 3)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit_rigid(bad, torch.randn(1, 10, 3))
    with pytest.raises(ValueError, match="non-negative"):
        fit_affine(torch.randn(1, 10, 3), torch.randn(1, 10, 3), -torch.ones(1, 10))
