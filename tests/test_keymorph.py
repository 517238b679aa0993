"""KeyMorph end to end: equivariance, symmetry, gradients, batching, world coordinates, degenerate input."""

import pytest
import torch
from helpers import blob_image, grid_affine, smooth_image
from monai.data import MetaTensor

from custom_nets import ConvNetDetector, DegenerateKeypointsError, KeyMorph, KeyMorphInferer, ThinPlateSpline, resample


def _bias_free_detector(k=12):
    """Random weights, no bias, no normalisation: zero background stays exactly zero, so borders play no role."""
    torch.manual_seed(0)
    return ConvNetDetector(num_keypoints=k, channels=(8, 16), pool_after=(0, 1), norm=None, bias=False)


def _small_detector(k=12, seed=0):
    torch.manual_seed(seed)
    return ConvNetDetector(num_keypoints=k, channels=(8, 16, 16), pool_after=(0, 1))


@pytest.mark.parametrize("shift", [(4, 0, 0), (0, -8, 4), (4, 4, -4)])
def test_translation_equivariance_in_world_mm(shift):
    gen = torch.Generator().manual_seed(1)
    img = blob_image((48, 48, 48), gen, 18, 30)  # after the shift >= 10 voxels of margin > receptive field radius 9
    moved = torch.roll(img, shifts=shift, dims=(2, 3, 4))  # content stays inside the zero background
    affine = grid_affine((1.0, 1.5, 2.0), gen)
    km = KeyMorph(_bias_free_detector())
    with torch.no_grad():
        p0, m0 = km.detect(img, affine)
        p1, m1 = km.detect(moved, affine)
    expected_mm = affine[:3, :3].float() @ torch.tensor(shift, dtype=torch.float32)
    valid = (m0 > 0) & (m1 > 0)
    assert valid.sum() >= 8
    assert torch.allclose((p1 - p0)[valid], expected_mm.expand_as(p0)[valid], atol=1e-3)
    assert torch.allclose(m0, m1, rtol=1e-4)


def test_swapping_images_gives_the_inverse_transform():
    gen = torch.Generator().manual_seed(2)
    fixed = blob_image((48, 48, 48), gen, 18, 30)
    moving = torch.roll(fixed, shifts=(4, -4, 8), dims=(2, 3, 4))
    a_fix, a_mov = grid_affine((1.0, 1.2, 1.5), gen), grid_affine((0.9, 1.1, 1.3), gen)
    with torch.no_grad():
        for kind in ("rigid", "affine"):
            km = KeyMorph(_bias_free_detector(), transform_type=kind)
            fwd = km(moving, fixed, a_mov, a_fix)
            bwd = km(fixed, moving, a_fix, a_mov)
            assert torch.equal(fwd.keypoints_fixed, bwd.keypoints_moving)
            assert torch.equal(fwd.weights, bwd.weights)
            prod = fwd.fixed_to_moving.double() @ bwd.fixed_to_moving.double()
            assert torch.allclose(prod, torch.eye(4, dtype=torch.float64)[None], atol=1e-4), kind
            assert torch.allclose(fwd.moving_to_fixed, bwd.fixed_to_moving, atol=1e-3)
    # rigid is symmetric for any pair, even unrelated images, with normalisation on
    other = smooth_image((32, 32, 32), gen)
    km = KeyMorph(_small_detector(), transform_type="rigid")
    with torch.no_grad():
        a = km(other, fixed[..., 8:40, 8:40, 8:40], a_mov, a_fix)
        b = km(fixed[..., 8:40, 8:40, 8:40], other, a_fix, a_mov)
    assert torch.allclose(
        a.fixed_to_moving.double() @ b.fixed_to_moving.double(), torch.eye(4, dtype=torch.float64)[None], atol=1e-4
    )


def test_known_translation_is_recovered_in_world_mm():
    """Fixed and moving are the same content on grids with different origins: the fit must give the origin offset."""
    gen = torch.Generator().manual_seed(3)
    img = blob_image((48, 48, 48), gen, 16, 32)
    a_fix = grid_affine((1.0, 1.5, 2.0), gen)
    a_mov = a_fix.clone()
    a_mov[:3, 3] += torch.tensor([7.0, -3.0, 12.0], dtype=torch.float64)
    out = KeyMorph(_bias_free_detector())(img, img, a_mov, a_fix)
    expected = torch.eye(4)
    expected[:3, 3] = torch.tensor([7.0, -3.0, 12.0])
    assert torch.allclose(out.fixed_to_moving[0], expected, atol=1e-3)
    assert (out.warped - img).abs().max() < 1e-3  # warped back onto the fixed grid: the same voxels


def test_gradients_reach_every_detector_parameter():
    gen = torch.Generator().manual_seed(4)
    fixed, moving = smooth_image((32, 32, 32), gen), smooth_image((32, 32, 32), gen)
    for kind in ("affine", "rigid", "tps"):
        km = KeyMorph(_small_detector(8, seed=5), transform_type=kind, tps_lambda=1.0)
        out = km(moving, fixed)
        torch.nn.functional.mse_loss(out.warped, fixed).backward()
        for name, p in km.detector.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (kind, name)
            assert p.grad.abs().sum() > 0, (kind, name)


def test_batch_items_are_independent():
    """Upstream bug: B > 1 was wrong. Each item with its own affines must match its own B = 1 run."""
    gen = torch.Generator().manual_seed(6)
    fixed, moving = smooth_image((32, 32, 32), gen, batch=3), smooth_image((32, 32, 32), gen, batch=3)
    a_fix = torch.stack(
        [grid_affine((1.0, 1.0, 1.0)), grid_affine((1.2, 0.8, 2.0), gen), grid_affine((2.0, 2.0, 1.0), gen)]
    )
    a_mov = torch.stack(
        [grid_affine((1.0, 1.1, 1.0), gen), grid_affine((0.9, 0.8, 2.0), gen), grid_affine((1.0, 1.0, 1.0))]
    )
    km = KeyMorph(_small_detector()).eval()
    with torch.no_grad():
        batched = km(moving, fixed, a_mov, a_fix)
        for b in range(3):
            single = km(moving[b : b + 1], fixed[b : b + 1], a_mov[b], a_fix[b])
            assert torch.allclose(single.fixed_to_moving[0], batched.fixed_to_moving[b], atol=1e-4)
            assert torch.allclose(single.keypoints_moving[0], batched.keypoints_moving[b], atol=1e-4)
            assert torch.allclose(single.warped[0], batched.warped[b], atol=1e-5)


def test_metatensor_affines_and_different_shapes():
    gen = torch.Generator().manual_seed(7)
    a_fix, a_mov = grid_affine((1.0, 1.2, 2.0), gen), grid_affine((1.5, 1.0, 1.0), gen)
    fixed = MetaTensor(smooth_image((32, 24, 16), gen), affine=a_fix)
    moving = MetaTensor(smooth_image((16, 32, 32), gen), affine=a_mov)
    km = KeyMorph(_small_detector())
    with torch.no_grad():
        out = km(moving, fixed)
        explicit = km(moving.as_tensor(), fixed.as_tensor(), a_mov, a_fix)
    assert out.warped.shape == (1, 1, 32, 24, 16)
    assert torch.allclose(out.fixed_to_moving, explicit.fixed_to_moving)
    # keypoints are in world mm: mapping them back through the affines lands inside each image
    for pts, a, shape in ((out.keypoints_fixed, a_fix, (32, 24, 16)), (out.keypoints_moving, a_mov, (16, 32, 32))):
        vox = (pts[0].double() - a[:3, 3]) @ torch.linalg.inv(a[:3, :3]).T
        assert (vox > -0.5).all() and (vox < torch.tensor(shape) - 0.5).all()
    # warped is exactly the resampling through the returned transform
    assert torch.allclose(out.warped, resample(moving.as_tensor(), out.fixed_to_moving, (32, 24, 16), a_fix, a_mov))


def test_tps_output_and_per_call_type():
    gen = torch.Generator().manual_seed(8)
    fixed, moving = smooth_image((32, 32, 32), gen), smooth_image((32, 32, 32), gen)
    km = KeyMorph(_small_detector(16))
    with torch.no_grad():
        out = km(moving, fixed, transform_type="tps", tps_lambda=0.0)
    assert isinstance(out.fixed_to_moving, ThinPlateSpline) and out.transform_type == "tps" and out.tps_lambda == 0.0
    assert torch.allclose(out.fixed_to_moving(out.keypoints_fixed), out.keypoints_moving, atol=1e-3)
    assert torch.allclose(out.moving_to_fixed(out.keypoints_moving), out.keypoints_fixed, atol=1e-3)
    assert torch.isfinite(out.warped).all()
    with pytest.raises(ValueError, match="transform_type"):
        km(moving, fixed, transform_type="bspline")


def test_constant_or_non_finite_image_is_a_clear_error_not_nan():
    km = KeyMorph(_small_detector())
    good = smooth_image((32, 32, 32), torch.Generator().manual_seed(0), batch=2)
    with torch.no_grad(), pytest.raises(ValueError, match="batch item 0 of the moving image is constant"):
        km(torch.ones(2, 1, 32, 32, 32), good)
    bad = good.clone()
    bad[1, 0, 3, 4, 5] = float("nan")
    with torch.no_grad(), pytest.raises(ValueError, match="batch item 1 of the fixed image contains NaN"):
        km(good, bad)
    with torch.no_grad(), pytest.raises(ValueError, match="fixed image is constant"):
        km(good, torch.zeros(2, 1, 16, 16, 16))  # the separate-detection path (different shapes) checks too


def test_collapsed_keypoints_are_a_clear_error():
    """A detector whose heatmaps all peak at one place gives too few distinct points: a named error, never NaN."""

    class OnePeak(torch.nn.Module):
        def forward(self, x):
            h = torch.full((x.shape[0], 6, 4, 4, 4), -1.0) + 0 * x.mean()
            h[:, :, 1, 2, 3] = 1.0
            return h

    good = smooth_image((32, 32, 32), torch.Generator().manual_seed(0))
    for kind in ("rigid", "affine", "tps"):
        with pytest.raises(DegenerateKeypointsError, match="batch item 0"):
            KeyMorph(OnePeak(), transform_type=kind)(good, good)

    class EmptyWhenBright(torch.nn.Module):  # no keypoint at all in the (brighter) fixed image
        def forward(self, x):
            h = torch.rand(x.shape[0], 6, 4, 4, 4, generator=torch.Generator().manual_seed(1))
            return h * (x.mean(dim=(1, 2, 3, 4)) < 0.9).float().view(-1, 1, 1, 1, 1) - 1e-3

    km = KeyMorph(EmptyWhenBright()).eval()
    with pytest.raises(DegenerateKeypointsError, match="found: 0 of 6 in the fixed image, at most 6 in a view"):
        KeyMorphInferer(orientation_search=True)(good * 0.5, km, good * 0.05 + 0.95)


def test_amp_runs_the_detector_in_low_precision_at_inference_only():
    """``amp``: the detector's convolutions run in bfloat16 on the CPU in eval mode (not in training), the keypoints
    come back as float32 world mm, within a small fraction of a voxel of the float32 ones."""
    gen = torch.Generator().manual_seed(3)
    img = smooth_image((32, 32, 32), gen)
    affine = grid_affine((2.0, 2.0, 2.0), gen)
    km, fp32 = KeyMorph(_small_detector(), amp=True), KeyMorph(_small_detector())
    seen = []
    km.detector.net[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad():
        p_amp, m_amp = km.eval().detect(img, affine)
        p_ref, m_ref = fp32.eval().detect(img, affine)
        km.train().detect(img, affine)
    assert seen == [torch.bfloat16, torch.float32]
    assert p_amp.dtype == torch.float32 and m_amp.dtype == torch.float32
    err = (p_amp - p_ref)[(m_amp > 0) & (m_ref > 0)].norm(dim=-1)
    assert 0 < err.max() < 0.25 * 2.0, err.max()  # changed (it did run in bfloat16), by < a quarter voxel


def test_amp_supported_answers_for_the_devices_it_knows():
    from custom_nets import amp_supported

    assert amp_supported("cuda") == torch.cuda.is_available()
    assert amp_supported("meta") is False
    assert isinstance(amp_supported("cpu"), bool)


def test_a_trace_of_the_model_registers_inputs_it_never_saw_as_the_model_does():
    """The orientation search picks a view by comparing fits (data-dependent, a trace would freeze the view of its
    example input): it lives in the inferer, so the model holds no data-dependent choice and its trace is the model
    on any input."""
    gen = torch.Generator().manual_seed(5)
    km = KeyMorph(_small_detector()).eval()
    example = torch.stack([smooth_image((32, 32, 32), gen)[0] for _ in range(2)], dim=1)
    other = torch.stack([smooth_image((32, 32, 32), gen)[0] for _ in range(2)], dim=1)
    with torch.no_grad():
        traced = torch.jit.trace(km, example, check_trace=False)
        assert torch.allclose(traced(other), km(other), atol=1e-5)
        assert torch.allclose(traced(example), km(example), atol=1e-5)
    assert not hasattr(km, "orientation_search") and not hasattr(km, "refiner")
