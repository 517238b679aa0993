"""The coordinate convention: identity resampling, agreement with scipy, heatmap cells, callable transforms."""

import numpy as np
import pytest
import torch
from helpers import grid_affine, random_affine, smooth_image
from scipy.ndimage import affine_transform

from custom_nets import resample
from custom_nets.geometry import (
    batch_affine,
    heatmap_to_voxel,
    sample_at_voxels,
    voxel_grid,
    voxel_to_normalized,
    voxel_to_world,
    world_to_voxel,
)


def test_identity_transform_reproduces_the_image():
    gen = torch.Generator().manual_seed(0)
    shape = (23, 17, 31)
    img = smooth_image(shape, gen, batch=2) * 1000.0  # intensities in scanner-like units
    img = torch.cat([img, img.flip(2)], dim=1)  # 2 channels
    affine = grid_affine((0.8, 1.2, 3.0), gen)
    out = resample(img, torch.eye(4), shape, affine, affine)
    assert out.shape == img.shape
    assert (out - img).abs().max() <= 1000.0 * 1e-6
    lab = (img > 500).float()
    assert torch.equal(resample(lab, torch.eye(4), shape, affine, affine, mode="nearest"), lab)


def test_resampling_between_grids_agrees_with_scipy():
    gen = torch.Generator().manual_seed(1)
    mshape, fshape = (26, 20, 30), (22, 28, 18)
    moving = smooth_image(mshape, gen, dtype=torch.float64)
    a_mov = grid_affine((1.1, 0.9, 1.6), gen, origin=(-12.0, -10.0, -20.0))
    a_fix = grid_affine((1.3, 0.8, 1.4), gen)
    centre = lambda a, shape: a[:3, :3] @ ((torch.tensor(shape, dtype=torch.float64) - 1) / 2) + a[:3, 3]  # noqa: E731
    a_fix[:3, 3] += centre(a_mov, mshape) - centre(a_fix, fshape)  # the two grids share their centre
    t = random_affine(gen, max_angle=0.3, scale=0.1, shift=3.0)
    ours = resample(moving, t, fshape, a_fix, a_mov)[0, 0].numpy()
    vox = torch.linalg.inv(a_mov) @ t @ a_fix  # fixed voxel -> moving voxel
    ref = affine_transform(
        moving[0, 0].numpy(), vox[:3, :3].numpy(), vox[:3, 3].numpy(), output_shape=fshape, order=1, mode="nearest"
    )
    # compare where the sample lies inside the moving grid (the padding conventions differ outside)
    coords = voxel_grid(fshape, dtype=torch.float64).reshape(-1, 3) @ vox[:3, :3].T + vox[:3, 3]
    inside = ((coords >= 0) & (coords <= torch.tensor(mshape, dtype=torch.float64) - 1)).all(-1).reshape(fshape)
    assert inside.float().mean() > 0.3  # the comparison covers a good part of the grid
    assert np.abs(ours - ref)[inside.numpy()].max() < 1e-10
    assert np.abs(ours[~inside.numpy()]).max() <= 1.0  # and nothing explodes outside


def test_callable_transform_matches_matrix_path():
    gen = torch.Generator().manual_seed(2)
    moving = smooth_image((20, 22, 24), gen, batch=2)
    a_mov = batch_affine(torch.stack([grid_affine((1.0, 1.5, 2.0), gen), grid_affine((2.0, 1.0, 1.0), gen)]), 2, "cpu")
    a_fix = grid_affine((1.2, 1.2, 1.2), gen)
    t = torch.stack([random_affine(gen, 0.4, 0.1, 0.05, 4.0) for _ in range(2)])

    def as_function(points):
        return points @ t[:, :3, :3].transpose(1, 2).float() + t[:, None, :3, 3].float()

    by_matrix = resample(moving, t, (18, 20, 16), a_fix, a_mov)
    by_function = resample(moving, as_function, (18, 20, 16), a_fix, a_mov, chunk_size=1000)
    assert torch.allclose(by_matrix, by_function, atol=1e-4)


def test_voxel_world_round_trip_and_normalised_corners():
    gen = torch.Generator().manual_seed(3)
    a = batch_affine(grid_affine((0.5, 0.5, 6.0), gen), 1, "cpu")
    p = torch.rand(1, 50, 3, generator=gen, dtype=torch.float64) * 30
    assert torch.allclose(world_to_voxel(voxel_to_world(p, a), a), p, atol=1e-10)
    shape = (5, 7, 9)
    corners = torch.tensor([[0.0, 0, 0], [4, 6, 8]])
    n = voxel_to_normalized(corners, shape)
    assert torch.equal(n, torch.tensor([[-1.0, -1, -1], [1, 1, 1]]))
    n = voxel_to_normalized(torch.tensor([[4.0, 0, 0]]), shape)  # i is grid_sample's z, the last coordinate
    assert torch.equal(n, torch.tensor([[-1.0, -1, 1]]))


def test_heatmap_cell_centres():
    # a 16-voxel axis pooled to 4 cells: cell u covers voxels 4u..4u+3, centred at 4u + 1.5
    cells = torch.tensor([[0.0, 1.0, 3.0]])
    assert torch.allclose(heatmap_to_voxel(cells, (4, 4, 4), (16, 16, 16)), torch.tensor([[1.5, 5.5, 13.5]]))
    assert torch.allclose(heatmap_to_voxel(cells, (4, 8, 16), (8, 8, 16)), torch.tensor([[0.5, 1.0, 3.0]]))


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match=r"\(B, C, I, J, K\)"):
        resample(torch.zeros(1, 8, 8, 8), torch.eye(4), (8, 8, 8))
    with pytest.raises(ValueError, match=r"affine of shape \(4, 4\) or \(2, 4, 4\), got \(3, 3\)"):
        resample(torch.zeros(2, 1, 8, 8, 8), torch.eye(4), (8, 8, 8), torch.eye(3))


def test_sample_at_voxels_reads_voxel_centres_and_interpolates_between():
    img = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(1, 2, 3, 4, 5)
    pts = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 3.0, 4.0], [1.0, 2.0, 1.5]]], dtype=torch.float64)
    out = sample_at_voxels(img, pts)
    assert out.shape == (1, 2, 3, 1, 1) and out.dtype == torch.float32
    expected = torch.stack([img[0, :, 0, 0, 0], img[0, :, 2, 3, 4], (img[0, :, 1, 2, 1] + img[0, :, 1, 2, 2]) / 2], -1)
    assert torch.allclose(out[0, :, :, 0, 0], expected)
