"""Shared test helpers: the bundle command line, random transforms, oblique anisotropic grids, smooth random
images."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"

#: Bundle CLI overrides for a tiny, fast network (32^3 at 8 mm, K = 16); refinement (on in inference) runs on 8 mm
#: copies, so its path is tested cheaply.
TINY = [
    "--spatial_size",
    "32",
    "--pixdim",
    "8.0",
    "--num_keypoints",
    "16",
    "--detector#channels",
    "[8, 16, 16]",
    "--detector#pool_after",
    "[0, 1]",
    "--refine_pixdim",
    "8.0",
]


def benchmark_module(name: str):
    """A script of ``benchmarks/`` (not a package) imported as a module, e.g. ``benchmark_module("bench_stress")``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchrun_command(nproc: int = 2) -> list[str]:
    """``torchrun --standalone --nproc_per_node N`` (a free rendezvous port on this host) as a command prefix; the
    processes then run ``-m <module> ...`` on CPU with gloo."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def bundle_cli(
    *args: str,
    timeout: int = 600,
    check: bool = True,
    launcher: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle ...`` in the bundle folder (``launcher``: another command prefix than
    ``python``, e.g. :func:`torchrun_command`; ``env``: extra environment variables). With ``check`` the test fails
    with the command's output unless it succeeded; otherwise the return code is the caller's to check."""
    res = subprocess.run(
        [*(launcher or [sys.executable]), "-m", "monai.bundle", *args],
        cwd=BUNDLE,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONWARNINGS="ignore", **(env or {})),
    )
    if check:
        assert res.returncode == 0, f"monai.bundle {' '.join(args)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}"
    return res


def random_rotation(gen: torch.Generator, max_angle: float = math.pi, dtype=torch.float64) -> torch.Tensor:
    """A random proper rotation (3 x 3) about a random axis by an angle up to ``max_angle``."""
    axis = torch.randn(3, generator=gen, dtype=dtype)
    axis = axis / axis.norm()
    angle = (torch.rand(1, generator=gen, dtype=dtype) * 2 - 1) * max_angle
    kx = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=dtype)
    return torch.eye(3, dtype=dtype) + torch.sin(angle) * kx + (1 - torch.cos(angle)) * kx @ kx


def random_affine(gen: torch.Generator, max_angle=math.pi, scale=0.2, shear=0.1, shift=20.0, dtype=torch.float64):
    """A random 4 x 4 affine: rotation, scale, shear and translation (mm)."""
    rot = random_rotation(gen, max_angle, dtype)
    s = torch.diag(1 + (torch.rand(3, generator=gen, dtype=dtype) * 2 - 1) * scale)
    sh = torch.eye(3, dtype=dtype)
    sh[0, 1], sh[0, 2], sh[1, 2] = ((torch.rand(3, generator=gen, dtype=dtype) * 2 - 1) * shear).tolist()
    out = torch.eye(4, dtype=dtype)
    out[:3, :3] = rot @ s @ sh
    out[:3, 3] = (torch.rand(3, generator=gen, dtype=dtype) * 2 - 1) * shift
    return out


def random_rigid(gen: torch.Generator, shift=20.0, dtype=torch.float64) -> torch.Tensor:
    out = torch.eye(4, dtype=dtype)
    out[:3, :3] = random_rotation(gen, math.pi, dtype)
    out[:3, 3] = (torch.rand(3, generator=gen, dtype=dtype) * 2 - 1) * shift
    return out


def grid_affine(spacing, gen: torch.Generator | None = None, origin=(-40.0, 30.0, -15.0), dtype=torch.float64):
    """A voxel-to-world affine with the given spacing, a random (oblique) direction matrix and an origin."""
    a = torch.eye(4, dtype=dtype)
    direction = random_rotation(gen, math.pi, dtype) if gen is not None else torch.eye(3, dtype=dtype)
    a[:3, :3] = direction @ torch.diag(torch.tensor(spacing, dtype=dtype))
    a[:3, 3] = torch.tensor(origin, dtype=dtype)
    return a


def smooth_image(shape, gen: torch.Generator, batch=1, blur=2, dtype=torch.float32) -> torch.Tensor:
    """A smooth random positive image (B, 1, *shape)."""
    x = torch.rand(batch, 1, *shape, generator=gen, dtype=dtype)
    for _ in range(blur):
        x = torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = x - x.amin(dim=(2, 3, 4), keepdim=True)
    return x / x.amax(dim=(2, 3, 4), keepdim=True)


def blob_image(shape, gen: torch.Generator, lo, hi, dtype=torch.float32) -> torch.Tensor:
    """Zero background with smooth random content inside the box [lo, hi) along every axis: (1, 1, *shape)."""
    img = torch.zeros(1, 1, *shape, dtype=dtype)
    inner = smooth_image([hi - lo] * 3, gen, dtype=dtype) + 0.1
    img[..., lo:hi, lo:hi, lo:hi] = inner
    return img


def max_point_error(a: torch.Tensor, b: torch.Tensor, points: torch.Tensor) -> float:
    """Largest distance between the images of ``points (N, 3)`` under 4 x 4 matrices ``a`` and ``b``."""
    ph = torch.cat([points, torch.ones(points.shape[0], 1, dtype=points.dtype)], 1)
    return float(((ph @ a.T.to(points.dtype) - ph @ b.T.to(points.dtype))[:, :3]).norm(dim=1).max())
