"""Centre-of-mass layer, keypoint weights and the detectors' shapes."""

import pytest
import torch

from custom_nets import CenterOfMass, ConvNetDetector, TruncatedUNetDetector, power_weights


def test_com_sub_voxel_and_exact():
    heat = torch.zeros(1, 3, 6, 7, 8)
    heat[0, 0, 2, 3, 4] = 5.0  # a single cell
    heat[0, 1, 1, 1, 1] = 1.0  # two cells, 1 : 3 -> a quarter of the way
    heat[0, 1, 1, 1, 5] = 3.0
    heat[0, 2] = -1.0  # negative values never count
    heat[0, 2, 5, 6, 7] = 2.0
    points, mass = CenterOfMass()(heat)
    assert torch.allclose(points[0], torch.tensor([[2.0, 3, 4], [1, 1, 4], [5, 6, 7]]))
    assert torch.allclose(mass[0], torch.tensor([5.0, 4.0, 2.0]))


def test_empty_or_negative_heatmap_gives_centre_and_zero_mass_never_nan():
    heat = torch.full((2, 2, 4, 6, 8), -3.0, requires_grad=True)
    points, mass = CenterOfMass()(heat * 1.0)
    assert torch.equal(mass, torch.zeros(2, 2))
    assert torch.allclose(points, torch.tensor([1.5, 2.5, 3.5]).expand(2, 2, 3))
    (points.sum() + mass.sum()).backward()
    assert torch.isfinite(heat.grad).all()
    z, m = CenterOfMass()(torch.zeros(1, 1, 3, 3, 3))
    assert torch.isfinite(z).all() and m.item() == 0


def test_keypoints_and_world_mm_keep_full_precision_under_autocast():
    """Mixed-precision training (the trainer's autocast) must not round keypoints: the centre of mass and the
    voxel-to-world mapping run in float32 whatever autocast is on. CPU autocast (bfloat16, 8 bits of mantissa) stands
    in for CUDA's float16 here: on a 64^3 heatmap its rounding alone would move keypoints by up to 0.25 voxel."""
    from custom_nets.geometry import voxel_to_world

    gen = torch.Generator().manual_seed(0)
    heat = torch.rand(2, 8, 64, 64, 64, generator=gen) ** 8
    affine = torch.tensor([[0.9, 0.1, 0.0, -90.3], [0.0, 1.1, 0.2, 120.7], [0.1, 0.0, 1.2, -70.1], [0, 0, 0, 1.0]])
    affine = affine.expand(2, 4, 4)
    ref_points, ref_mass = CenterOfMass()(heat)
    ref_world = voxel_to_world(ref_points, affine)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        points, mass = CenterOfMass()(heat)
        world = voxel_to_world(points, affine)
    assert points.dtype == mass.dtype == world.dtype == torch.float32
    assert torch.allclose(points, ref_points, atol=1e-4) and torch.allclose(mass, ref_mass, rtol=1e-5)
    assert torch.allclose(world, ref_world, atol=1e-4)


def test_power_weights():
    mf = torch.tensor([[1.0, 1.0, 2.0, 0.0]])
    mm = torch.tensor([[2.0, 1.0, 1.0, 3.0]])
    w = power_weights(mf, mm)
    assert torch.allclose(w.mean(1), torch.ones(1))
    assert w[0, 3] == 0  # empty in the fixed image -> ignored
    assert torch.allclose(w[0, :3] / w[0, 0], torch.tensor([1.0, 0.5, 1.0]))
    assert torch.allclose(power_weights(mf * 10, mm), w)  # scale of either image's heat does not matter
    assert torch.equal(power_weights(mm, mf), power_weights(mf, mm))  # symmetric
    # an item with no keypoint in one image keeps all-zero weights (the fit reports it), never NaN, in float32 too
    none = power_weights(torch.zeros(2, 4), torch.stack([mm[0], torch.zeros(4)]))
    assert torch.equal(none, torch.zeros(2, 4))


def test_convnet_default_is_journal_variant():
    net = ConvNetDetector(num_keypoints=128)
    assert net.downsample_factor == 16
    n_params = sum(p.numel() for p in net.parameters())
    assert 8.0e6 < n_params < 9.5e6  # about 8.8M for K = 128 (REFERENCE)
    out = net(torch.randn(1, 1, 32, 32, 48))
    assert out.shape == (1, 128, 2, 2, 3)


def test_convnet_strided_stem_and_errors():
    net = ConvNetDetector(num_keypoints=10, channels=(8, 16, 16), pool_after=(1,), strides=(2, 1, 1))
    assert net.downsample_factor == 4
    assert net(torch.randn(2, 1, 16, 24, 8)).shape == (2, 10, 4, 6, 2)
    with pytest.raises(ValueError, match=r"divisible by the downsampling factor 4, got spatial shape \(16, 24, 10\)"):
        net(torch.randn(1, 1, 16, 24, 10))
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 1"):
        net(torch.randn(1, 2, 16, 16, 16))


def test_truncated_unet_half_resolution():
    net = TruncatedUNetDetector(num_keypoints=16, channels=(8, 16, 32, 64))
    assert net.downsample_factor == 8
    assert net(torch.randn(1, 1, 16, 24, 32)).shape == (1, 16, 8, 12, 16)
    with pytest.raises(ValueError, match="expected stem_stride >= 1, got 0"):
        TruncatedUNetDetector(num_keypoints=4, channels=(8, 16), stem_stride=0)
    small = TruncatedUNetDetector(num_keypoints=4, channels=(8, 16), stem_stride=2)
    assert small(torch.randn(1, 1, 16, 16, 16)).shape == (1, 4, 4, 4, 4)
    s_params = sum(p.numel() for p in TruncatedUNetDetector(num_keypoints=128).parameters())
    assert 3e6 < s_params < 7e6  # BrainMorph-S is about 4M
