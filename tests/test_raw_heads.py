"""Raw heads through the bundle's default inference, as a user runs it: a synthetic raw-head pair (skull, scalp,
face, neck, background noise; a held-out subject, rotated by 75 degrees) registers to its exact truth; so does the
same pair with the moving head cropped differently, and the pair with the right brain masks given; a wrong mask given
on the command line changes the result and makes it suspect; the brain masks written lie on the input grids."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import benchmark_module, bundle_cli

from custom_nets.data import save_nifti
from custom_nets.handlers import output_stem

bench = benchmark_module("bench_stress")


@pytest.fixture(scope="module")
def raw_pair(tmp_path_factory):
    """The stress benchmark's raw-head pair ``raw_same`` 0 of 4 (T1 against T1, 75 degrees), written as NIfTI with
    a differently cropped copy of the moving head and the truth brain masks."""
    from custom_nets.data import heads

    out = tmp_path_factory.mktemp("raw")
    synth = heads.HeadSynthesizer(128, 2.0, centre=bench.RAW_CENTRE, cut_prob=0.0)
    built = bench._build_raw_pair(bench._Factory(), heads, synth, "raw_same", 0, 4, 0)["raw"]
    fixed, moving, lab_f, lab_m = built["arrays"]
    aff_f, aff_m = built["affines"]
    rec = dict(built["record"])
    paths = {}
    for name, data, affine, dtype in (
        ("fixed", fixed, aff_f, np.int16),
        ("moving", moving, aff_m, np.int16),
        ("fixed_label", lab_f, aff_f, np.uint8),
        ("moving_label", lab_m, aff_m, np.uint8),
        ("fixed_mask", lab_f > 0, aff_f, np.uint8),
        ("moving_mask", lab_m > 0, aff_m, np.uint8),
    ):
        paths[name] = str(save_nifti(data, affine, out / f"{name}.nii.gz", dtype=dtype))
    # the moving head cropped another way: 36 mm off the low end of the axis nearest the head's inferior direction
    # (neck), 20 mm off one side; the affine shifted exactly
    down = np.linalg.inv(aff_m[:3, :3]) @ (np.asarray(rec["pose_moving"])[:3, :3] @ np.array([0.0, 0.0, -1.0]))
    axis = int(np.abs(down).argmax())
    side = (axis + 1) % 3
    sl = [slice(None)] * 3
    sl[axis] = slice(0, moving.shape[axis] - 18) if down[axis] > 0 else slice(18, None)
    sl[side] = slice(10, None)
    start = np.array([s.start or 0 for s in sl], dtype=np.float64)
    aff_c = aff_m.copy()
    aff_c[:3, 3] = aff_m[:3, :3] @ start + aff_m[:3, 3]
    paths["moving_cropped"] = str(save_nifti(moving[tuple(sl)], aff_c, out / "moving_cropped.nii.gz", dtype=np.int16))
    # a wrong moving mask: the true one moved 40 mm along the head's inferior direction (onto the skull base, neck)
    shift = np.zeros(3, dtype=int)
    shift[axis] = int(np.sign(down[axis])) * 20
    wrong = np.roll(lab_m > 0, tuple(shift), axis=(0, 1, 2))
    paths["wrong_mask"] = str(save_nifti(wrong, aff_m, out / "wrong_mask.nii.gz", dtype=np.uint8))
    rec.update({"fixed_label": paths["fixed_label"], "moving_label": paths["moving_label"]})
    return out, paths, rec


def _infer(*args: str) -> None:
    """The shipped default inference (``configs/inference.json``, shipped weights), no PNG."""
    bundle_cli("run", "inference", "--config_file", "configs/inference.json", "--write_png", "false", *args)


def _result(folder: Path, moving: str) -> dict:
    return json.loads((folder / f"{output_stem(moving)}.json").read_text())


def test_raw_heads_register_to_the_truth_and_masks_steer_the_similarity(raw_pair):
    out, paths, rec = raw_pair
    pairs = [
        {"moving_image": paths["moving"], "fixed_image": paths["fixed"]},
        {"moving_image": paths["moving_cropped"], "fixed_image": paths["fixed"]},
    ]
    (out / "pairs.json").write_text(json.dumps({"test_pairs": pairs}))
    _infer("--datalist", str(out / "pairs.json"), "--output_dir", str(out / "auto"))
    errors = {}
    for key in ("moving", "moving_cropped"):
        result = _result(out / "auto", paths[key])
        errors[key] = bench.score(rec, result["fixed_to_moving_ras"])["error_mm"]
        assert result["quality"]["verdict"] == "ok", (key, result["quality"])
    assert errors["moving"] < 2.0 and errors["moving_cropped"] < 2.0, errors

    # the brain masks the extractor computed are written on each input grid
    for key, name, truth_key in (("moving", "moving_brainmask", "moving_mask"),
                                 ("moving_cropped", "moving_cropped_brainmask", None),
                                 ("fixed", "moving_fixed_brainmask", "fixed_mask")):  # fmt: skip
        mask, image = nib.load(out / "auto" / f"{name}.nii.gz"), nib.load(paths[key])
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine, atol=1e-5), name
        if truth_key is not None:
            got, truth = np.asarray(mask.dataobj) > 0, np.asarray(nib.load(paths[truth_key]).dataobj) > 0
            assert 2 * (got & truth).sum() / (got.sum() + truth.sum()) > 0.6, name  # the brain, not the head

    # masks given on the command line, as people type them: the right ones do not hurt, a wrong one changes the result
    _infer("--moving", paths["moving"], "--fixed", paths["fixed"], "--moving_mask", paths["moving_mask"],
           "--fixed_mask", paths["fixed_mask"], "--output_dir", str(out / "right"))  # fmt: skip
    right = _result(out / "right", paths["moving"])
    assert bench.score(rec, right["fixed_to_moving_ras"])["error_mm"] < 2.0
    # the right masks agree with the brain extractor's (0.91 here), so they raise no doubt
    assert right["quality"]["mask_agreement"] > right["quality"]["thresholds"]["min_mask_agreement"], right["quality"]
    _infer("--moving", paths["moving"], "--fixed", paths["fixed"], "--moving_mask", paths["wrong_mask"],
           "--output_dir", str(out / "wrong"))  # fmt: skip
    wrong = _result(out / "wrong", paths["moving"])
    moved = bench.score({**rec, "fixed_to_moving_ras": right["fixed_to_moving_ras"]}, wrong["fixed_to_moving_ras"])
    # never a silent wrong answer: 39 mm off here with NMI about 1.06 and local NCC 0.19, at the edge of what the
    # similarity limits catch; the wrong mask agrees poorly with the extractor's (0.60), and that makes it suspect
    assert moved["error_mm"] > 5.0 and wrong["quality"]["verdict"] == "suspect", (moved, wrong["quality"])
    assert any("given brain mask disagrees" in r for r in wrong["quality"]["reasons"]), wrong["quality"]
