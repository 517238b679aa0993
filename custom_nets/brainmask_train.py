"""Train the brain extractor (:class:`~custom_nets.brainmask.BrainExtractor`) on synthetic heads.

Every second step draws a fresh head from the ``train`` seed stream (:func:`~custom_nets.data.synth.subject_seed`),
each step a new image of it. Random pose (half of them any rotation up to 180 degrees about a random axis, half
within 30 degrees; isotropic scale 0.85-1.15 with 5 % anisotropy; shift up to 25 mm), random contrast (``random``
40 %, ``t1`` / ``t2`` / ``pd`` / ``flair`` 15 % each), 25 % skull-stripped brains (image times brain mask), the others
raw heads whose field of view is cut with the synthesizer's probability. The image goes through the same
:func:`~custom_nets.brainmask.brain_cube` as at inference; the target is the truth brain mask resampled onto that
cube. Loss: soft Dice + binary cross-entropy; Adam with a cosine learning rate over the wall-clock budget; the weights
with the best validation Dice (full :func:`~custom_nets.brainmask.extract_brain_mask` on heads of the ``validation``
stream) are saved atomically as a plain state dict.

    python -m custom_nets.brainmask_train --out bundle/models/brain_extractor.pt --minutes 58
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceLoss

from .brainmask import BrainExtractor, brain_cube, extract_brain_mask
from .brainmask import mask_dice as dice
from .data.augment import rotation_matrix
from .data.heads import HEAD_CONTRASTS, HeadSynthesizer, brain_mask
from .data.synth import subject_seed
from .data.template import BRAIN_CENTRE_MNI
from .fileio import atomic_write
from .geometry import resample

__all__ = ["HEAD_KINDS", "dice", "random_pose", "sample_head", "train"]

logger = logging.getLogger(__name__)

#: Kinds of synthetic test images: a raw head with its full field of view, a skull-stripped brain, a cut head.
HEAD_KINDS = ("raw", "brain_only", "cut")
_CONTRAST_P = (0.15, 0.15, 0.15, 0.15, 0.40)  # for HEAD_CONTRASTS = t1, t2, pd, flair, random


def random_pose(rng: np.random.Generator, max_angle_deg: float | None = None) -> np.ndarray:
    """A random ``(4, 4)`` head pose about the brain centre: rotation about a uniformly random axis by an angle up to
    ``max_angle_deg`` (default: half the draws up to 180 degrees, half up to 30), scale 0.85-1.15 (x 0.95-1.05 per
    axis), shift up to 25 mm per axis."""
    if max_angle_deg is None:
        max_angle_deg = 180.0 if rng.random() < 0.5 else 30.0
    rot = rotation_matrix(rng.normal(size=3), rng.uniform(-max_angle_deg, max_angle_deg))
    lin = rot @ np.diag(rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, size=3))
    centre = np.asarray(BRAIN_CENTRE_MNI, dtype=np.float64)
    pose = np.eye(4)
    pose[:3, :3] = lin
    pose[:3, 3] = centre - lin @ centre + rng.uniform(-25.0, 25.0, size=3)
    return pose


def sample_head(
    synth: HeadSynthesizer,
    seed: int,
    contrast: str | None = None,
    kind: str | None = None,
    pose: np.ndarray | None = None,
) -> dict:
    """One synthetic test / training case (deterministic in ``seed``).

    Returns a dict: ``image`` ``(1, S, S, S)`` float32, ``mask`` (truth brain mask, same shape), ``affine`` ``(4, 4)``
    float64 tensor, ``contrast``, ``kind`` (:data:`HEAD_KINDS`; drawn 25 % ``brain_only`` when not given, else a raw
    head whose field of view is cut with the synthesizer's probability, reported as ``cut`` if it was), ``pose``.
    """
    rng = np.random.default_rng([int(seed), 202])
    contrast = contrast if contrast is not None else str(rng.choice(HEAD_CONTRASTS, p=_CONTRAST_P))
    pose = pose if pose is not None else random_pose(rng)
    draw = rng.random()
    if kind is None:
        labels = synth.head(seed, pose)
        kind = "brain_only" if draw < 0.25 else "cut" if bool((labels < 0).any()) else "raw"
    elif kind in HEAD_KINDS:
        labels = synth.head(seed, pose, cut=kind == "cut")
    else:
        raise ValueError(f"expected kind in {HEAD_KINDS} or None, got {kind!r}.")
    mask = brain_mask(labels)
    image = synth.image(labels, contrast, seed)
    if kind == "brain_only":
        image = image * mask
    return {
        "image": image,
        "mask": mask,
        "affine": torch.from_numpy(synth.affine),
        "contrast": contrast,
        "kind": kind,
        "pose": pose,
    }


def _training_case(synth: HeadSynthesizer, step: int, reuse: int, cache: dict) -> dict:
    """The training case of ``step``: head ``step // reuse`` of the ``train`` stream (pose and field-of-view cut drawn
    from its seed), imaged with the contrast and kind (25 % brain-only) of this step. One head serves ``reuse``
    consecutive steps (its labels cost most of the synthesis, images are cheap); ``cache`` keeps the current one."""
    index = step // reuse
    seed = subject_seed("train", index)
    if cache.get("index") != index:
        cache["index"], cache["labels"] = index, synth.head(seed, random_pose(np.random.default_rng([seed, 202])))
    labels = cache["labels"]
    rng = np.random.default_rng([seed, 203, step % reuse])
    contrast = str(rng.choice(HEAD_CONTRASTS, p=_CONTRAST_P))
    mask = brain_mask(labels)
    image = synth.image(labels, contrast, int(rng.integers(2**62)))
    if rng.random() < 0.25:
        image = image * mask
    return {"image": image, "mask": mask, "affine": torch.from_numpy(synth.affine)}


def _training_pair(case: dict, pixdim: float, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    cube, cube_aff = brain_cube(case["image"], case["affine"], pixdim, size)
    target = resample(case["mask"][None], torch.eye(4, dtype=torch.float64), (size,) * 3, cube_aff, case["affine"])
    return cube, (target > 0.5).float()


def train(
    out: str | Path,
    steps: int | None = None,
    minutes: float = 58.0,
    lr: float = 1e-3,
    val_every: int = 150,
    num_val: int = 20,
    pixdim: float = 4.0,
    size: int = 80,
    threads: int = 1,
    log: str | Path | None = None,
    init: str | Path | None = None,
    reuse: int = 2,
) -> dict:
    """Train a :class:`BrainExtractor`; the best weights (validation Dice) are written atomically to ``out``.

    Args:
        out: weights file (a plain state dict).
        steps: stop after this many steps (default: only the time budget stops training).
        minutes: wall-clock budget; the cosine learning-rate schedule spans it (or ``steps``, if given).
        lr: initial Adam learning rate.
        val_every: validate (and maybe save) every this many steps, and at the end.
        num_val: validation heads (``validation`` seed stream).
        pixdim, size: the network's cube (must match inference).
        threads: torch threads.
        log: optional JSON-lines log of the validations.
        init: optional state dict to start from.
        reuse: consecutive steps that share one head (each with its own image: contrast, noise, brain-only).

    Returns:
        ``{"best_dice", "best_step", "steps", "minutes"}``.
    """
    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    synth = HeadSynthesizer(size, pixdim)
    val = [sample_head(synth, subject_seed("validation", i)) for i in range(num_val)]
    net = BrainExtractor()
    if init is not None:
        net.load_state_dict(torch.load(init, map_location="cpu", weights_only=True))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    dice_loss = DiceLoss(sigmoid=True)
    bce = torch.nn.BCEWithLogitsLoss()
    start = time.monotonic()
    best, best_step, step, losses, cache = -1.0, -1, 0, [], {}

    def progress() -> float:
        by_time = (time.monotonic() - start) / (60.0 * minutes)
        return max(by_time, step / steps) if steps else by_time

    def validate() -> None:
        nonlocal best, best_step
        scores = [dice(extract_brain_mask(net, c["image"], c["affine"], pixdim, size), c["mask"]) for c in val]
        mean = float(np.mean(scores))
        record = {
            "step": step,
            "minutes": round((time.monotonic() - start) / 60, 2),
            "loss": round(float(np.mean(losses[-val_every:])), 4) if losses else None,
            "val_dice": round(mean, 4),
            "val_min": round(float(np.min(scores)), 4),
            "lr": opt.param_groups[0]["lr"],
        }
        if mean > best:
            best, best_step = mean, step
            state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            atomic_write(out, lambda tmp: torch.save(state, tmp))
            record["saved"] = str(out)
        print(json.dumps(record), flush=True)
        if log is not None:
            with open(log, "a") as f:
                f.write(json.dumps(record) + "\n")

    while progress() < 1.0:
        net.train()
        case = _training_case(synth, step, reuse, cache)
        x, y = _training_pair(case, pixdim, size)
        for group in opt.param_groups:
            group["lr"] = lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress(), 1.0))))
        logits = net(x)
        loss = dice_loss(logits, y) + bce(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % val_every == 0:
            validate()
    if step % val_every:
        validate()
    return {"best_dice": best, "best_step": best_step, "steps": step, "minutes": (time.monotonic() - start) / 60}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="weights file to write (best validation Dice)")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--minutes", type=float, default=58.0, help="wall-clock budget")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--val-every", type=int, default=150)
    parser.add_argument("--num-val", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log", default=None, help="JSON-lines log of the validations")
    parser.add_argument("--init", default=None, help="state dict to start from")
    parser.add_argument("--reuse", type=int, default=2, help="steps per synthetic head (one image each)")
    args = parser.parse_args(argv)
    result = train(
        args.out,
        steps=args.steps,
        minutes=args.minutes,
        lr=args.lr,
        val_every=args.val_every,
        num_val=args.num_val,
        threads=args.threads,
        log=args.log,
        init=args.init,
        reuse=args.reuse,
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
