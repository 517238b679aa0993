"""Groupwise registration on a synthetic cohort with known poses, against ANTs template building, in one run.

    python benchmarks/bench_groupwise.py main --num 10 --max_angle 180 --out_dir bench_groupwise
    python benchmarks/bench_groupwise.py main --num 10 --max_angle 30 --ants True --out_dir bench_groupwise_30

Cohort (NIfTI under ``out_dir/cohort``, 2 mm RAS voxels, 97 x 113 x 97): ``num`` held-out synthetic subjects (the
test seed stream, never used in training), subject ``i`` posed by a rotation of a random angle in ``[0, max_angle]``
degrees about a random axis through the brain centre and a random translation (+/- 15 mm); contrasts cycle T1, T2,
PD. Scan ``i`` shows template point ``x`` at ``pose_i(x)``, so the truth of the relative transform from scan ``j``'s
world to scan ``i``'s is ``pose_i pose_j^-1``: exact with ``--deform_mm 0`` (every subject has the template's
anatomy, with its own contrast, bias, noise and blur); with the generator's default (3 mm) the subjects' anatomy
differs by a smooth deformation, part of which is near-affine, so the pose is then only approximately the truth
(the pairwise inter-subject evaluation of the model card sees about 3-4 mm for the same reason).

Score: for ordered pairs ``(i, j)`` (all for ``num <= 30``, else 900 random ones), the mean distance (mm) over the
template brain (placed in scan ``j`` by ``pose_j``) between the estimated and the true relative transform; median,
95th percentile, worst, and the share below 2 mm. Time per scan (wall clock, this machine, 2 threads). Methods:
``keymorph`` (the bundle's groupwise workflow with its defaults: orientation search, refinement) and, with ``--ants``,
``ants.build_template`` (affine, 3 iterations) followed by an affine ``ants.registration`` of each scan to the
template (build_template returns only the image). Writes ``summary.json``.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import fire
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_registration import THREADS, _itk_matrix  # noqa: E402


def make_cohort(num: int, max_angle: float, out: Path, seed: int = 0, deform_mm: float = 3.0) -> dict[str, Any]:
    """Write the cohort; returns the image paths, the poses and the brain points (template world, mm).
    ``deform_mm=0``: every subject has the template's anatomy (own contrast, bias, noise, blur), so the relative
    truth is exact."""
    from custom_nets.data import BrainSynthesizer, rotation_matrix, save_nifti, subject_seed
    from custom_nets.data.template import BRAIN_CENTRE_MNI

    rng = np.random.default_rng(seed)
    synth = BrainSynthesizer(spatial_size=(97, 113, 97), pixdim=2.0, deform_mm=float(deform_mm))
    c = np.asarray(BRAIN_CENTRE_MNI, dtype=np.float64)
    paths, poses = [], []
    for i in range(num):
        pose = np.eye(4)
        pose[:3, :3] = rotation_matrix(rng.normal(size=3), float(rng.uniform(0.0, max_angle)))
        pose[:3, 3] = c - pose[:3, :3] @ c + rng.uniform(-15.0, 15.0, size=3)
        subject = subject_seed("test", 100 + i)
        image = synth.image(synth.subject(subject, pose=pose), ("t1", "t2", "pd")[i % 3], 1000 + i)[0].numpy()
        paths.append(str(save_nifti(image, synth.affine, out / f"subject{i:03d}.nii.gz")))
        poses.append(pose)
    brain = np.argwhere(synth.labels(synth.subject(subject_seed("test", 100)))[0].numpy() > 0)[::40]
    points = brain.astype(np.float64) @ synth.affine[:3, :3].T + synth.affine[:3, 3]
    return {"paths": paths, "poses": poses, "brain": points}


def relative_errors(template_to_scan: list[np.ndarray], poses: list[np.ndarray], brain: np.ndarray) -> np.ndarray:
    """Mean mm over the brain of the relative transform error, per ordered pair (see the module docstring)."""
    n = len(poses)
    pairs = list(itertools.permutations(range(n), 2))
    if n > 30:
        rng = np.random.default_rng(1)
        pairs = [pairs[k] for k in rng.choice(len(pairs), 900, replace=False)]
    h = np.c_[brain, np.ones(len(brain))]
    out = []
    for i, j in pairs:
        y = h @ poses[j].T
        est = template_to_scan[i] @ np.linalg.inv(template_to_scan[j])
        truth = poses[i] @ np.linalg.inv(poses[j])
        out.append(np.linalg.norm((y @ est.T - y @ truth.T)[:, :3], axis=1).mean())
    return np.asarray(out)


def run_keymorph(paths: list[str], out: Path) -> list[np.ndarray]:
    """The bundle's groupwise workflow as users run it; returns each scan's template_to_scan (RAS)."""
    import subprocess

    configs = "['configs/inference.json','configs/groupwise.json']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "groupwise", "--config_file", configs, "--images", str(paths),
           "--output_dir", str(out.resolve())]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    subprocess.run(cmd, cwd=ROOT / "bundle", check=True, env=env)
    stems = [Path(p).name.removesuffix(".nii.gz") for p in paths]
    return [np.asarray(json.loads((out / f"{s}_to_template.json").read_text())["template_to_scan_ras"]) for s in stems]


def run_ants(paths: list[str]) -> list[np.ndarray]:
    """ANTs affine template building, then each scan registered to the template; template_to_scan (RAS)."""
    import ants

    images = [ants.image_read(p) for p in paths]
    template = ants.build_template(image_list=images, iterations=3, type_of_transform="Affine")
    out = []
    for img in images:
        reg = ants.registration(template, img, type_of_transform="Affine", aff_metric="mattes")
        tx = ants.read_transform(reg["fwdtransforms"][0])  # template (fixed) point -> scan (moving) point, LPS
        p, c = np.asarray(tx.parameters, dtype=np.float64), np.asarray(tx.fixed_parameters, dtype=np.float64)
        out.append(_itk_matrix(p[:9].reshape(3, 3), p[9:12], c))
    return out


def _stats(errors: np.ndarray, seconds: float, num: int) -> dict[str, float]:
    return {
        "median_mm": float(np.median(errors)), "p95_mm": float(np.percentile(errors, 95)),
        "worst_mm": float(errors.max()), "success_below_2mm": float(np.mean(errors < 2.0)),
        "seconds_per_scan": seconds / num,
    }  # fmt: skip


def main(
    num: int = 10,
    max_angle: float = 180.0,
    out_dir: str = "bench_groupwise",
    ants: bool = False,
    deform_mm: float = 3.0,
) -> dict:
    """Build the cohort, run the methods, print and write ``summary.json``. ``deform_mm=0``: one anatomy for every
    subject (exact relative truth)."""
    from custom_nets.options import parse_bool

    ants = parse_bool(ants, "--ants")  # `--ants false` as people type it (fire passes the string)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(THREADS))
    out = Path(out_dir)
    (out / "cohort").mkdir(parents=True, exist_ok=True)
    cohort = make_cohort(int(num), float(max_angle), out / "cohort", deform_mm=float(deform_mm))
    summary: dict[str, Any] = {"num": int(num), "max_angle": float(max_angle), "deform_mm": float(deform_mm),
                               "methods": {}}  # fmt: skip
    t = time.perf_counter()
    est = run_keymorph(cohort["paths"], out / "keymorph")
    errors = relative_errors(est, cohort["poses"], cohort["brain"])
    summary["methods"]["keymorph"] = _stats(errors, time.perf_counter() - t, int(num))
    if ants:
        t = time.perf_counter()
        est = run_ants(cohort["paths"])
        errors = relative_errors(est, cohort["poses"], cohort["brain"])
        summary["methods"]["ants_build_template"] = _stats(errors, time.perf_counter() - t, int(num))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    fire.Fire({"main": main})
