"""Results out: atomic writing, JSON, ITK affine transform files (checked against SimpleITK) and the preview PNG."""

import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import random_affine, random_rotation, smooth_image
from matplotlib.figure import Figure

import custom_nets.fileio as cio
from custom_nets import resample
from custom_nets.figures import registration_figure, save_registration_png
from custom_nets.fileio import atomic_write, read_itk_affine, to_jsonable, write_itk_affine, write_json

L = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tmp_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".tmp-*"))


def itk_parameters(text: str) -> np.ndarray:
    line = next(ln for ln in text.splitlines() if ln.startswith("Parameters:"))
    return np.array([float(v) for v in line.split(":", 1)[1].split()])


# ----------------------------------------------------------------------------------------------------------------------
# ITK transform files


@pytest.mark.parametrize("seed", range(5))
def test_itk_affine_round_trip(tmp_path, seed):
    gen = torch.Generator().manual_seed(seed)
    t = random_affine(gen, max_angle=math.pi, scale=0.3, shear=0.2, shift=150.0).numpy()
    t[:3, 3] += np.array([1e-7, 12345.678901234567, -0.1])  # awkward decimals survive
    path = write_itk_affine(tmp_path / "sub" / "t.tfm", t)
    assert path == tmp_path / "sub" / "t.tfm"
    text = path.read_text()
    assert text.startswith("#Insight Transform File V1.0\n")
    assert "Transform: AffineTransform_double_3_3\n" in text
    assert "FixedParameters: 0 0 0" in text
    back = read_itk_affine(path)
    assert back.dtype == np.float64 and back.shape == (4, 4)
    assert np.abs(back - t).max() <= 1e-12
    assert tmp_files(tmp_path) == []


def test_itk_file_holds_the_lps_matrix_in_itk_order(tmp_path):
    # RAS fixed_to_moving: x -> R x + t; in LPS the first two rows / columns change sign (computed by hand)
    t = np.array([[0.0, -2.0, 0.5, 10.0], [1.0, 0.0, 0.25, -20.0], [0.125, 3.0, 1.5, 30.0], [0, 0, 0, 1]])
    expected = [0.0, -2.0, -0.5, 1.0, 0.0, -0.25, -0.125, -3.0, 1.5, -10.0, 20.0, 30.0]
    path = write_itk_affine(tmp_path / "t.txt", torch.tensor(t))  # torch input, .txt suffix
    np.testing.assert_array_equal(itk_parameters(path.read_text()), expected)


@pytest.mark.parametrize("kind", ["MatrixOffsetTransformBase_double_3_3", "AffineTransform_double_3_3"])
def test_read_itk_affine_with_centre(tmp_path, kind):
    # ITK (LPS): T(x) = M (x - c) + c + t with M = [[0, -1, 0], [1, 0, 0], [0, 0, 2]], c = (10, 20, 30), t = (1, 2, 3):
    # M c = (-20, 10, 60), offset = t + c - M c = (31, 12, -27). In RAS, rows / columns 0 and 1 flip sign.
    text = (
        "#Insight Transform File V1.0\r\n#Transform 0\r\n\r\n"
        f"Transform: {kind}\r\n"
        "Parameters: 0 -1 0 1 0 0 0 0 2 1 2 3\r\n"
        "FixedParameters: 10 20 30\r\n"
    )
    path = tmp_path / "centre.tfm"
    path.write_bytes(text.encode())
    expected = np.array([[0.0, -1.0, 0.0, -31.0], [1.0, 0.0, 0.0, -12.0], [0.0, 0.0, 2.0, -27.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(read_itk_affine(path), expected, rtol=0, atol=1e-12)
    # the same transform written by us (centre 0) reads back identically
    assert np.abs(read_itk_affine(write_itk_affine(tmp_path / "ours.tfm", expected)) - expected).max() <= 1e-12


@pytest.mark.parametrize(
    "matrix, message",
    [
        (np.eye(3), r"shape \(4, 4\)"),
        (np.eye(4)[None], r"shape \(4, 4\)"),
        (np.diag([1.0, np.nan, 1.0, 1.0]), "finite"),
        (np.diag([1.0, 1.0, np.inf, 1.0]), "finite"),
        (np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0.5, 1.0]]), "last row"),
        ([["a"] * 4] * 4, "numeric"),
    ],
)
def test_write_itk_affine_rejects_bad_matrices(tmp_path, matrix, message):
    with pytest.raises(ValueError, match=message):
        write_itk_affine(tmp_path / "t.tfm", matrix)
    assert list(tmp_path.iterdir()) == []


def test_write_itk_affine_rejects_binary_suffixes(tmp_path):
    with pytest.raises(ValueError, match="suffix"):
        write_itk_affine(tmp_path / "t.mat", np.eye(4))
    assert list(tmp_path.iterdir()) == []


_HEADER = "#Insight Transform File V1.0\n#Transform 0\n"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello world\n",
        b"\x89HDF\r\n\x1a\n\x00\x00\xff\xfe binary",
        (
            _HEADER + "Transform: Euler3DTransform_double_3_3\nParameters: 0 0 0 1 2 3\nFixedParameters: 0 0 0\n"
        ).encode(),
        (_HEADER + "Transform: AffineTransform_double_3_3\nParameters: 1 0 0 0 1 0 0 0 1 0 0\n").encode(),
        (_HEADER + "Transform: AffineTransform_double_3_3\nParameters: 1 0 0 0 1 0 0 0 1 0 0 x\n").encode(),
        (_HEADER + "Transform: AffineTransform_double_3_3\nParameters: 1 0 0 0 1 0 0 0 1 0 0 nan\n").encode(),
        (
            _HEADER + "Transform: AffineTransform_double_3_3\nParameters: 1 0 0 0 1 0 0 0 1 0 0 0\nFixedParameters: 1\n"
        ).encode(),
        b"Parameters: 1 0 0 0 1 0 0 0 1 0 0 0\n",
        (_HEADER + "Transform: AffineTransform_double_3_3\nFixedParameters: 0 0 0\n").encode(),
        (
            _HEADER
            + "Transform: AffineTransform_double_3_3\nParameters: 1 0 0 0 1 0 0 0 1 0 0 0\nFixedParameters: 0 0 0\n"
            + "#Transform 1\nTransform: AffineTransform_double_3_3\nParameters: 1 0 0 0 1 0 0 0 1 0 0 0\n"
        ).encode(),
    ],
)
def test_read_itk_affine_rejects_other_files_naming_them(tmp_path, content):
    path = tmp_path / "garbage-transform.tfm"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_itk_affine(path)


# ----------------------------------------------------------------------------------------------------------------------
# independent check with SimpleITK


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Save float32 NIfTI (qform = sform = affine) and return the affine as stored (float32 sform)."""
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    return nib.load(path).affine


def _sitk_affine_ras(image) -> np.ndarray:
    """Voxel-to-world RAS affine of a SimpleITK image (ITK geometry is LPS)."""
    a = np.eye(4)
    a[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    a[:3, 3] = image.GetOrigin()
    return L @ a


def test_simpleitk_reads_our_transforms_as_point_maps(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    gen = torch.Generator().manual_seed(10)
    t = random_affine(gen, max_angle=1.0, scale=0.2, shear=0.1, shift=30.0).numpy()
    tfm = sitk.ReadTransform(str(write_itk_affine(tmp_path / "t.tfm", t)))
    points = np.random.default_rng(0).uniform(-100, 100, size=(20, 3))
    for p in points:
        expected = (L @ t @ np.append(p, 1.0))[:3]  # LPS image of the LPS point L p
        np.testing.assert_allclose(tfm.TransformPoint((L[:3, :3] @ p).tolist()), expected, rtol=0, atol=1e-9)
    # and a file with a centre is understood the same way by SimpleITK and by read_itk_affine
    centre_file = tmp_path / "centre.tfm"
    centre_file.write_text(
        "#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
        "Parameters: 0.9 -0.2 0.1 0.25 1.1 0 -0.1 0.05 0.95 4 -5 6\nFixedParameters: -12.5 30 7.25\n"
    )
    ras = read_itk_affine(centre_file)
    tfm = sitk.ReadTransform(str(centre_file))
    for p in points:
        expected = L[:3, :3] @ (ras @ np.append(p, 1.0))[:3]
        np.testing.assert_allclose(tfm.TransformPoint((L[:3, :3] @ p).tolist()), expected, rtol=0, atol=1e-9)


def test_simpleitk_resampling_matches_geometry_resample(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    gen = torch.Generator().manual_seed(11)
    mshape, fshape = (24, 28, 20), (26, 22, 24)
    moving = smooth_image(mshape, gen, blur=2, dtype=torch.float64)[0, 0].numpy().astype(np.float32)
    # moving: LPS-like storage (axes 0 / 1 run to the left / posterior), oblique, anisotropic
    a_mov = np.eye(4)
    a_mov[:3, :3] = random_rotation(gen, 0.3).numpy() @ np.diag([-1.0, -1.0, 1.0]) @ np.diag([1.3, 0.9, 2.1])
    a_mov[:3, 3] = [40.0, 25.0, -30.0]
    # fixed: another oblique grid with other voxel sizes
    a_fix = np.eye(4)
    a_fix[:3, :3] = random_rotation(gen, 0.5).numpy() @ np.diag([1.1, 1.2, 1.5])
    t = random_affine(gen, max_angle=0.25, scale=0.08, shear=0.05, shift=0.0).numpy()
    t[:3, 3] += [3.0, -4.0, 2.5]
    # place the fixed grid so that T maps its centre onto the centre of the moving image
    centre_mov = a_mov[:3, :3] @ ((np.array(mshape) - 1) / 2) + a_mov[:3, 3]
    centre_fix = np.linalg.solve(t[:3, :3], centre_mov - t[:3, 3])
    a_fix[:3, 3] = centre_fix - a_fix[:3, :3] @ ((np.array(fshape) - 1) / 2)

    a_mov = _save_nifti(tmp_path / "moving.nii.gz", moving, a_mov)
    a_fix = _save_nifti(tmp_path / "fixed.nii.gz", np.zeros(fshape, np.float32), a_fix)
    tfm_path = write_itk_affine(tmp_path / "fixed_to_moving.tfm", t)

    moving_itk = sitk.ReadImage(str(tmp_path / "moving.nii.gz"))
    fixed_itk = sitk.ReadImage(str(tmp_path / "fixed.nii.gz"))
    # both libraries read the same geometry from the files
    np.testing.assert_allclose(_sitk_affine_ras(moving_itk), a_mov, rtol=0, atol=1e-4)
    np.testing.assert_allclose(_sitk_affine_ras(fixed_itk), a_fix, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(moving_itk).transpose(2, 1, 0), moving)

    def sitk_resample(path: Path) -> np.ndarray:
        out = sitk.Resample(moving_itk, fixed_itk, sitk.ReadTransform(str(path)), sitk.sitkLinear, 0.0)
        return sitk.GetArrayFromImage(out).transpose(2, 1, 0).astype(np.float64)  # (z, y, x) -> (i, j, k)

    ref = sitk_resample(tfm_path)
    assert ref.shape == fshape
    ours = resample(torch.from_numpy(moving).double()[None, None], torch.from_numpy(t), fshape, a_fix, a_mov)
    ours = ours[0, 0].numpy()

    # compare where the sample lies well inside the moving image (the two libraries pad differently at the border)
    vox = np.linalg.inv(a_mov) @ t @ a_fix  # fixed voxel -> moving voxel
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in fshape], indexing="ij"), -1).reshape(-1, 3)
    coords = grid @ vox[:3, :3].T + vox[:3, 3]
    inside = ((coords >= 0.5) & (coords <= np.array(mshape) - 1.5)).all(-1).reshape(fshape)
    assert inside.mean() > 0.3
    assert np.abs(ours - ref)[inside].max() < 1e-5  # float32 output; observed ~2e-7
    assert np.abs(ref[inside]).max() > 0.5  # real content was compared

    # negative control: a file holding the RAS matrix without the LPS flip resamples something else
    wrong = write_itk_affine(tmp_path / "no_flip.tfm", L @ t @ L)
    assert np.abs(sitk_resample(wrong) - ours)[inside].max() > 0.05


# ----------------------------------------------------------------------------------------------------------------------
# JSON and atomic writing


def test_write_json_converts_numpy_and_torch(tmp_path):
    obj = {
        "f32": np.float32(0.5),
        "i64": np.int64(7),
        "flag": np.bool_(True),
        "array": np.arange(6, dtype=np.int16).reshape(2, 3),
        "tensor": torch.tensor([[1.5, 2.5]], dtype=torch.float64),
        "scalar_tensor": torch.tensor(3),
        "nested": [(np.float64(1.25), torch.tensor(True)), {np.int32(3): Path("a/b.nii.gz")}],
        "plain": None,
    }
    path = write_json(tmp_path / "deep" / "metrics.json", obj)
    text = path.read_text()
    assert text.endswith("}\n") and '\n  "f32": 0.5,' in text  # indent 2
    assert json.loads(text) == {
        "f32": 0.5,
        "i64": 7,
        "flag": True,
        "array": [[0, 1, 2], [3, 4, 5]],
        "tensor": [[1.5, 2.5]],
        "scalar_tensor": 3,
        "nested": [[1.25, True], {"3": "a/b.nii.gz"}],
        "plain": None,
    }
    assert type(to_jsonable(np.float32(0.5))) is float and type(to_jsonable(np.int8(1))) is int
    assert tmp_files(tmp_path) == []


def test_write_json_unserialisable_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_json(tmp_path / "bad.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_temporary_file_next_to_target_with_suffix(tmp_path):
    seen = []

    def writer(tmp: Path) -> None:
        seen.append(tmp)
        assert tmp.exists() and not (tmp_path / "a" / "b" / "out.png").exists()
        tmp.write_bytes(b"content")

    path = atomic_write(tmp_path / "a" / "b" / "out.png", writer)
    assert path.read_bytes() == b"content"
    assert seen[0].parent == path.parent and seen[0].name.startswith(".tmp-") and seen[0].suffix == ".png"
    atomic_write(tmp_path / "img.nii.gz", lambda tmp: seen.append(tmp) or tmp.write_bytes(b"x"))
    assert seen[1].name.endswith(".nii.gz")
    assert tmp_files(tmp_path) == []


@pytest.mark.parametrize("previous", [None, b"old content"])
@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_atomic_write_failure_leaves_no_partial_file(tmp_path, previous, error):
    path = tmp_path / "out.bin"
    if previous is not None:
        path.write_bytes(previous)

    def writer(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise error

    with pytest.raises(type(error)):
        atomic_write(path, writer)
    assert (path.read_bytes() if path.exists() else None) == previous
    assert tmp_files(tmp_path) == []


def _partial_then_fail(path, *args, **kwargs):
    Path(path).write_bytes(b"half-writ")
    raise OSError("simulated crash while writing")


@pytest.mark.parametrize("previous", [None, b"old content"])
@pytest.mark.parametrize(
    "name, write",
    [
        ("metrics.json", lambda p: write_json(p, {"a": 1})),
        ("t.tfm", lambda p: write_itk_affine(p, np.eye(4))),
    ],
)
def test_text_writers_are_atomic(tmp_path, monkeypatch, previous, name, write):
    path = tmp_path / name
    if previous is not None:
        path.write_bytes(previous)
    monkeypatch.setattr(cio, "_write_text", _partial_then_fail)
    with pytest.raises(OSError, match="simulated"):
        write(path)
    assert (path.read_bytes() if path.exists() else None) == previous
    assert tmp_files(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------------------
# registration preview PNG


def _scene(seed: int = 0, count: int = 6):
    """Small synthetic fixed / moving / warped volumes, affines and keypoints (world mm)."""
    gen = torch.Generator().manual_seed(seed)
    fixed = smooth_image((20, 16, 12), gen)[0, 0].numpy()
    moving = smooth_image((14, 18, 10), gen)[0, 0].numpy()
    a_fix = np.diag([1.0, 1.5, 2.5, 1.0])
    a_fix[:3, 3] = [-10.0, -12.0, -15.0]
    a_mov = np.eye(4)
    a_mov[:3, :3] = random_rotation(gen, 0.3).numpy() @ np.diag([-1.2, -1.0, 2.0])
    a_mov[:3, 3] = [8.0, 9.0, -10.0]
    warped = resample(torch.from_numpy(moving)[None, None], torch.eye(4), fixed.shape, a_fix, a_mov)[0, 0].numpy()
    rng = np.random.default_rng(seed)
    kp_fix = rng.uniform(1, 10, size=(count, 3)) @ a_fix[:3, :3].T + a_fix[:3, 3]
    kp_mov = rng.uniform(1, 9, size=(count, 3)) @ a_mov[:3, :3].T + a_mov[:3, 3]
    return fixed, moving, warped, a_fix, a_mov, kp_fix, kp_mov


def _check_png(path: Path, dpi: int = 100) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG" and img.size == (11 * dpi, 11 * dpi)
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 10  # not a blank canvas


@pytest.mark.parametrize("weights", [None, "mixed", "zeros"])
def test_save_registration_png_writes_a_png(tmp_path, weights):
    fixed, moving, warped, a_fix, a_mov, kp_fix, kp_mov = _scene()
    w = {None: None, "mixed": np.array([0.0, 1.0, 2.5, 0.0, 0.3, 4.0]), "zeros": np.zeros(6)}[weights]
    path = save_registration_png(
        tmp_path / "png" / "reg.png", fixed, moving, warped, a_fix, a_mov, kp_fix, kp_mov, w, title="a test"
    )
    assert path == tmp_path / "png" / "reg.png"
    _check_png(path)
    assert tmp_files(tmp_path) == []


def test_save_registration_png_accepts_torch_batch_shaped_inputs(tmp_path):
    import matplotlib.image

    fixed, moving, warped, a_fix, a_mov, kp_fix, kp_mov = _scene(1, count=3)
    as_t = lambda x: torch.from_numpy(np.asarray(x))[None, None]  # noqa: E731
    path = save_registration_png(
        tmp_path / "reg.png", as_t(fixed), as_t(moving), as_t(warped), torch.from_numpy(a_fix), a_mov,
        torch.from_numpy(kp_fix), kp_mov, torch.tensor([1.0, 0.0, 2.0]), dpi=40,
    )  # fmt: skip
    _check_png(path, dpi=40)
    assert matplotlib.image.imread(path).shape[:2] == (440, 440)


def test_save_registration_png_is_atomic(tmp_path, monkeypatch):
    fixed, moving, warped, a_fix, a_mov, kp_fix, kp_mov = _scene()
    path = tmp_path / "reg.png"
    monkeypatch.setattr(Figure, "savefig", lambda self, fname, **kwargs: _partial_then_fail(fname))
    with pytest.raises(OSError, match="simulated"):
        save_registration_png(path, fixed, moving, warped, a_fix, a_mov, kp_fix, kp_mov)
    assert not path.exists()
    assert tmp_files(tmp_path) == []


def _to_voxel(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(affine)
    return points @ inv[:3, :3].T + inv[:3, 3]


def test_registration_figure_layout_keypoints_and_orientation():
    fixed, moving, warped, a_fix, a_mov, kp_fix, kp_mov = _scene(2)
    fixed = np.zeros_like(fixed)
    fixed[15, 3, 6] = 1.0  # a single bright voxel: the slices go through it
    kp_fix[0] = (a_fix @ [15.0, 3.0, 6.0, 1.0])[:3]  # keypoint 0 sits on it
    weights = np.array([2.0, 1.0, 0.0, 0.5, 0.0, 1.5])
    fig = registration_figure(fixed, moving, warped, a_fix, a_mov, kp_fix, kp_mov, weights)
    assert len(fig.axes) == 9
    vox = {0: _to_voxel(kp_fix, a_fix), 1: _to_voxel(kp_mov, a_mov)}
    colours: dict[tuple[int, int], np.ndarray] = {}
    alpha_spread = []
    for row in (0, 1):
        for c in range(3):
            ax = fig.axes[3 * row + c]
            a, b = (d for d in range(3) if d != c)
            filled, hollow = ax.collections
            # filled markers: positive weights, area proportional to the weight, largest 60 pt^2
            fk = [next(k for k in range(6) if np.allclose(vox[row][k, [a, b]], o)) for o in filled.get_offsets()]
            assert sorted(fk) == [0, 1, 3, 5]
            np.testing.assert_allclose(filled.get_sizes(), 60.0 * weights[fk] / 2.0)
            # hollow markers: the zero-weight keypoints
            hk = [next(k for k in range(6) if np.allclose(vox[row][k, [a, b]], o)) for o in hollow.get_offsets()]
            assert sorted(hk) == [2, 4]
            assert len(hollow.get_facecolors()) == 0  # facecolors="none"
            for k, rgba in zip(fk, filled.get_facecolors()):
                colours.setdefault((row, k), rgba[:3])
                np.testing.assert_allclose(colours[(row, k)], rgba[:3])  # one colour per keypoint in a row
            for k, rgba in zip(hk, hollow.get_edgecolors()):
                colours.setdefault((row, k), rgba[:3])
                np.testing.assert_allclose(colours[(row, k)], rgba[:3])
            # opacity decreases with the distance from the slice plane
            index = int(ax.get_title().rsplit("=", 1)[1])
            dist = np.abs(vox[row][fk, c] - index)
            alpha = filled.get_facecolors()[:, 3]
            assert np.all(np.diff(alpha[np.argsort(dist)]) <= 1e-12)
            alpha_spread.append(alpha.max() - alpha.min())
    assert max(alpha_spread) > 0.2  # keypoints far from a slice are visibly fainter
    for k in range(6):  # keypoint k has the same colour in the fixed and in the moving row
        np.testing.assert_allclose(colours[(0, k)], colours[(1, k)])
    assert len({tuple(np.round(colours[(0, k)], 6)) for k in range(6)}) == 6

    # orientation: the slice through the bright voxel is shown with its first remaining axis horizontal
    for c, (x, y) in zip(range(3), [(3, 6), (15, 6), (15, 3)]):
        ax = fig.axes[c]
        assert ax.get_title() == f"fixed: voxel axis {c} = {[15, 3, 6][c]}"
        image = ax.images[0]
        assert image.origin == "lower"
        shown = np.asarray(image.get_array())
        assert shown.shape == tuple(n for d, n in enumerate(fixed.shape) if d != c)[::-1]
        assert np.unravel_index(np.argmax(shown), shown.shape) == (y, x)  # row = vertical axis
        spacing = np.diag(a_fix)[:3]
        a, b = (d for d in range(3) if d != c)
        assert ax.get_aspect() == pytest.approx(spacing[b] / spacing[a])
    # the overlay row: fixed green, warped magenta
    overlay = np.asarray(fig.axes[6].images[0].get_array())
    assert overlay.shape == (fixed.shape[2], fixed.shape[1], 3)
    assert overlay[6, 3, 1] == 1.0 and overlay[6, 3, 0] == overlay[6, 3, 2]


def test_registration_figure_rejects_inconsistent_inputs():
    fixed, moving, warped, a_fix, a_mov, kp_fix, kp_mov = _scene()
    with pytest.raises(ValueError, match="fixed grid"):
        registration_figure(fixed, moving, moving, a_fix, a_mov, kp_fix, kp_mov)
    with pytest.raises(ValueError, match="weights"):
        registration_figure(fixed, moving, warped, a_fix, a_mov, kp_fix, kp_mov, np.ones(5))
    with pytest.raises(ValueError, match="weights"):
        registration_figure(fixed, moving, warped, a_fix, a_mov, kp_fix, kp_mov, -np.ones(6))
    with pytest.raises(ValueError, match="equal shapes"):
        registration_figure(fixed, moving, warped, a_fix, a_mov, kp_fix, kp_mov[:5])
    with pytest.raises(ValueError, match=r"\(K, 3\)"):
        registration_figure(fixed, moving, warped, a_fix, a_mov, kp_fix[:, :2], kp_mov[:, :2])
    with pytest.raises(ValueError, match="3D"):
        registration_figure(fixed[0], moving, warped[0], a_fix, a_mov, kp_fix, kp_mov)


def test_write_json_refuses_non_finite_values(tmp_path):
    from custom_nets.fileio import write_json

    with pytest.raises(ValueError, match="non-finite"):
        write_json(tmp_path / "r.json", {"error_mm": float("nan")})
    assert not list(tmp_path.iterdir())


def test_output_stems_drop_every_image_extension_inference_reads():
    from custom_nets.handlers import output_stem

    names = ["a.nii.gz", "b.NII", "c.mgz", "c2.mgh", "d.nrrd", "e.nhdr", "f.mha", "g.mhd", "h.hdr", "i.img", "s.T1.nii"]
    assert [output_stem(f"/data/{n}") for n in names] == ["a", "b", "c", "c2", "d", "e", "f", "g", "h", "i", "s.T1"]
