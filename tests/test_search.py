"""Orientation search: exact cube rotations of the voxel grid, and large rotations recovered by an untrained
detector because one of the 24 views undoes them."""

import pytest
import torch
from helpers import blob_image, grid_affine

from custom_nets import ConvNetDetector, KeyMorph, KeyMorphInferer, resample
from custom_nets.fits import keypoint_residual_mm
from custom_nets.search import cube_rotations, rotate_volume


def test_the_24_rotations_are_proper_and_distinct():
    rots = cube_rotations()
    assert len(rots) == 24 and len(set(rots)) == 24 and rots[0] == ((0, 1, 2), (1, 1, 1))
    for perm, signs in rots:
        _, v = rotate_volume(torch.zeros(1, 1, 2, 3, 4), perm, signs)
        assert torch.det(v[:3, :3]).item() == pytest.approx(1.0)


def test_rotated_volume_keeps_its_world_content():
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(1, 1, 5, 6, 7, generator=gen)
    a = grid_affine((1.0, 1.5, 2.0), gen).unsqueeze(0)
    for perm, signs in cube_rotations():
        rot, v = rotate_volume(img, perm, signs)
        assert rot.shape[2:] == tuple(img.shape[2 + p] for p in perm)
        back = resample(rot, torch.eye(4), img.shape[2:], a, a @ torch.linalg.inv(v))
        assert torch.allclose(back, img, atol=1e-5)


@pytest.mark.parametrize("rank", ["residual", "similarity"])
@pytest.mark.parametrize("k", [0, 5, 17])
def test_search_recovers_a_cube_rotation_with_an_untrained_detector(k, rank):
    gen = torch.Generator().manual_seed(1)
    fixed = blob_image((32, 32, 32), gen, 8, 24)
    perm, signs = cube_rotations()[k]
    rotated, v = rotate_volume(fixed, perm, signs)
    a = grid_affine((2.0, 2.0, 2.0), gen)
    # same header, voxels rotated: in world the moving content is the fixed content rotated about the grid centre
    truth = (a @ v @ torch.linalg.inv(a)).float()  # fixed world -> moving world: moving voxel V i holds fixed voxel i
    torch.manual_seed(0)
    det = ConvNetDetector(num_keypoints=16, channels=(8, 16), pool_after=(0, 1), norm=None, bias=False)
    model = KeyMorph(det).eval()
    out = KeyMorphInferer(orientation_search=True, search_rank=rank)(rotated, model, fixed, a, a)
    assert torch.allclose(out.fixed_to_moving[0], truth, atol=1e-3)
    assert (out.warped - fixed).abs().max() < 1e-3
    if k:  # without the search the untrained detector does not get it
        plain = KeyMorph(det).eval()(rotated, fixed, a, a)
        assert not torch.allclose(plain.fixed_to_moving[0], truth, atol=1.0)


def test_keypoint_residual_is_zero_for_corresponding_points_and_grows_with_mismatch():
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(2, 20, 3, generator=gen, dtype=torch.float64) * 30
    a = grid_affine((1.2, 0.9, 1.1), gen).double()
    q = p @ a[:3, :3].T + a[:3, 3]
    w = torch.rand(2, 20, generator=gen, dtype=torch.float64)
    assert keypoint_residual_mm(p, q, w).max() < 1e-9
    noisy = q + torch.randn(q.shape, generator=gen, dtype=torch.float64) * torch.tensor([[[0.5]], [[5.0]]])
    r = keypoint_residual_mm(p, noisy, w)
    assert 0.1 < r[0] < 1.0 < 2.0 < r[1] < 10.0, r  # about the noise level, item by item
    shuffled = q[:, torch.randperm(20, generator=gen)]  # points that do not correspond: a wrong view
    assert (keypoint_residual_mm(p, shuffled, w) > 10.0).all()
    w_out = w.clone()
    w_out[:, :3] = 0.0  # zero-weight points do not count
    bad = q.clone()
    bad[:, :3] += 100.0
    assert keypoint_residual_mm(p, bad, w_out).max() < 1e-9


def test_unknown_search_rank_is_refused():
    with pytest.raises(ValueError, match="search_rank"):
        KeyMorphInferer(search_rank="mi")
