"""The KeyMorph pair step for MONAI / ignite engines.

KeyMorph runs in MONAI's stock ``SupervisedTrainer`` / ``SupervisedEvaluator`` (so AMP, gradient accumulation,
DistributedDataParallel, events and handlers all work unchanged) through three pieces:

* :class:`KeyMorphPrepareBatch` turns a batch of pairs into ``network(moving, fixed, moving_affine=...,
  fixed_affine=...)`` arguments and a ``targets`` dict;
* :class:`~custom_nets.losses.KeyMorphLoss` (or :class:`~custom_nets.losses.KeypointPretrainLoss`) is the
  ``loss_function`` on ``(KeyMorphOutput, targets)``;
* :class:`~custom_nets.metrics.RegistrationMetricsd` is the evaluator's ``postprocessing``: per-pair error in mm
  against the ground truth, warped labels and Dice.

Batch inference isolates failures in the same stock engine: :class:`~custom_nets.data.FailSafeDataset` turns a pair
that cannot be loaded into a failure record, :class:`KeyMorphPrepareBatch` passes such records through (and a batch
with nothing left to register as ``None`` inputs), :class:`FailSafeInferer` runs the
:class:`~custom_nets.inferers.KeyMorphInferer` (search, refinement, verdict) and turns a pair the network cannot
register (or registers to NaN) into a :class:`RegistrationFailure`, and :class:`~custom_nets.writer.RegistrationWriter`
records every failure and writes the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.inferers import Inferer

from .data.datasets import FAILURES_KEY
from .fits import ThinPlateSpline
from .geometry import as_tensor, batch_affine
from .keymorph import KeyMorphOutput

__all__ = ["KeyMorphPrepareBatch", "FailSafeInferer", "RegistrationFailure", "nonfinite_items"]


def _affine_of(x: Any, batch: int, device: torch.device) -> torch.Tensor:
    return batch_affine(getattr(x, "affine", None), batch, device)


class KeyMorphPrepareBatch:
    """``prepare_batch`` for MONAI engines: a batch of pairs -> ``(moving, targets, (fixed,), kwargs)``.

    The batch holds ``moving_image`` and ``fixed_image`` (``MetaTensor`` with batched affines), optionally
    ``moving_label``, ``fixed_label``, ``fixed_to_moving`` (ground truth) and ``moving_image_alt``. The network is
    called as ``network(moving, fixed, moving_affine=..., fixed_affine=..., [transform_type=..., tps_lambda=...,
    moving_alt=...])``; ``targets`` holds the fixed image, affines, labels and ground truth for the loss and metrics.

    A batch from :func:`~custom_nets.data.collate_pairs` may list items that failed to load under ``failures``: they
    are passed on in ``targets["failures"]``; if no item of the batch loaded, the inputs are ``None`` (which
    :class:`FailSafeInferer` passes through without calling the network). The refinement copies ``refine_moving`` /
    ``refine_fixed`` go to the inferer as ``(B, 1, ...)`` tensors with ``(B, 4, 4)`` affines, or, where the items'
    grids differ (a batch of several pairs), as per-item lists of ``(1, 1, ...)`` tensors and ``(1, 4, 4)`` affines.

    Args:
        transform_type: override the network's transform type (``rigid`` / ``affine`` / ``tps``).
        tps_lambda: fixed spline smoothing for ``tps``.
        tps_lambda_max: if set (training), draw ``lambda`` log-uniformly in ``[tps_lambda_min, tps_lambda_max]`` per
            step, so one model serves every smoothing.
        tps_lambda_min: lower end of that draw.
        use_alt: pass ``moving_image_alt`` to the network (keypoint consistency).
    """

    def __init__(
        self,
        transform_type: str | None = None,
        tps_lambda: float | None = None,
        tps_lambda_max: float | None = None,
        tps_lambda_min: float = 1e-3,
        use_alt: bool = False,
    ) -> None:
        self.transform_type, self.tps_lambda = transform_type, tps_lambda
        self.tps_lambda_max, self.tps_lambda_min = tps_lambda_max, float(tps_lambda_min)
        self.use_alt = bool(use_alt)

    def __call__(
        self, batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **kw
    ) -> tuple[torch.Tensor | None, dict[str, Any], tuple[torch.Tensor, ...], dict[str, Any]]:
        """``(moving (B, 1, ...), targets, (fixed (B, 1, ...),), kwargs)`` on ``device``, as MONAI engines call it;
        ``(None, {"failures": [...]}, (), {})`` when no item of the batch loaded.

        Raises:
            KeyError: the batch has no ``moving_image`` or ``fixed_image``.
        """
        failures = list(batchdata.get(FAILURES_KEY) or []) if isinstance(batchdata, Mapping) else []
        if failures and "moving_image" not in batchdata and "fixed_image" not in batchdata:
            return None, {FAILURES_KEY: failures}, (), {}
        for key in ("moving_image", "fixed_image"):
            if key not in batchdata:
                raise KeyError(f"KeyMorphPrepareBatch: the batch has no '{key}' (keys: {sorted(batchdata)}).")
        device = torch.device(device) if device is not None else batchdata["fixed_image"].device
        raw_m, raw_f = batchdata["moving_image"], batchdata["fixed_image"]
        b = raw_f.shape[0]

        def move(x: torch.Tensor) -> torch.Tensor:
            return as_tensor(x).to(device=device, non_blocking=non_blocking)

        moving, fixed = move(raw_m).float(), move(raw_f).float()
        a_m, a_f = _affine_of(raw_m, b, device), _affine_of(raw_f, b, device)
        targets: dict[str, Any] = {"fixed_image": fixed, "fixed_affine": a_f, "moving_affine": a_m}
        if failures:
            targets[FAILURES_KEY] = failures
        for key in ("fixed_label", "moving_label"):
            if isinstance(batchdata.get(key), torch.Tensor):  # (paths, as in inference, stay in the batch)
                targets[key] = move(batchdata[key])
        if isinstance(batchdata.get("fixed_to_moving"), torch.Tensor):
            targets["fixed_to_moving"] = move(batchdata["fixed_to_moving"]).to(torch.float64).reshape(b, 4, 4)
        for key in ("fixed_fov", "moving_fov"):  # field-of-view cuts of the training augmentation
            if isinstance(batchdata.get(key), torch.Tensor):
                targets[key] = move(batchdata[key]).to(torch.float64).reshape(b, 4)
        kwargs: dict[str, Any] = {"moving_affine": a_m, "fixed_affine": a_f}
        if self.transform_type is not None:
            kwargs["transform_type"] = self.transform_type
        if self.tps_lambda_max is not None:
            lo, hi = math.log(self.tps_lambda_min), math.log(self.tps_lambda_max)
            # torch's generator, so monai.utils.set_determinism makes the draws reproducible
            kwargs["tps_lambda"] = float(math.exp(lo + (hi - lo) * float(torch.rand(()))))
        elif self.tps_lambda is not None:
            kwargs["tps_lambda"] = float(self.tps_lambda)
        if self.use_alt and batchdata.get("moving_image_alt") is not None:
            kwargs["moving_alt"] = move(batchdata["moving_image_alt"]).float()
        refine_m, refine_f = batchdata.get("refine_moving"), batchdata.get("refine_fixed")
        if isinstance(refine_m, torch.Tensor) and isinstance(refine_f, torch.Tensor):  # finer images to refine on
            kwargs["refine_moving"], kwargs["refine_fixed"] = move(refine_m).float(), move(refine_f).float()
            kwargs["refine_moving_affine"] = _affine_of(refine_m, b, device)
            kwargs["refine_fixed_affine"] = _affine_of(refine_f, b, device)
        elif isinstance(refine_m, (list, tuple)) and isinstance(refine_f, (list, tuple)):  # one grid per item
            for key, images in (("moving", refine_m), ("fixed", refine_f)):
                kwargs[f"refine_{key}"] = [move(x)[None].float() for x in images]
                kwargs[f"refine_{key}_affine"] = [_affine_of(x, 1, device) for x in images]
        return moving, targets, (fixed,), kwargs


@dataclass
class RegistrationFailure:
    """A pair that produced no result: the stage that failed (``load``, ``register`` or ``write``) and the error."""

    stage: str
    error: str


def _finite_per_item(x: Any, batch: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.shape[0] != batch:
        return torch.ones(batch, dtype=torch.bool)
    return torch.isfinite(x.detach().reshape(batch, -1)).all(1).cpu()


def nonfinite_items(out: KeyMorphOutput | torch.Tensor) -> list[int]:
    """Batch items of a :class:`~custom_nets.keymorph.KeyMorphOutput` with a NaN / Inf transform, keypoint, weight or
    warped voxel (such an item must not be written as a result); for a plain tensor output, items with a NaN / Inf."""
    if isinstance(out, torch.Tensor):
        ok = _finite_per_item(out, int(out.shape[0])) if out.ndim else torch.isfinite(out).reshape(1)
        return [i for i in range(len(ok)) if not ok[i]]
    batch = int(out.keypoints_fixed.shape[0])
    ok = torch.ones(batch, dtype=torch.bool)
    parts: list[Any] = [out.warped, out.keypoints_fixed, out.keypoints_moving, out.weights]
    for t in (out.fixed_to_moving, out.moving_to_fixed):
        if isinstance(t, ThinPlateSpline):
            parts += [t.control, t.kernel_coeffs, t.affine_coeffs]
        else:
            parts.append(t)
    for part in parts:
        ok &= _finite_per_item(part, batch)
    return [i for i in range(batch) if not ok[i]]


def _item(x: Any, i: int, batch: int) -> Any:
    """Batch item ``i`` of a tensor with a leading batch axis (kept as a batch of one) or of a per-item list (kept
    as a list of one); anything else unchanged."""
    if isinstance(x, torch.Tensor) and x.ndim >= 1 and x.shape[0] == batch:
        return x[i : i + 1]
    if isinstance(x, list) and len(x) == batch:
        return x[i : i + 1]
    return x


class FailSafeInferer(Inferer):
    """Run the network on a batch of pairs so that a pair that cannot be registered does not fail the others.

    Args:
        inferer: how the network is run (e.g. :class:`~custom_nets.inferers.KeyMorphInferer`, which adds the
            orientation search, refinement and the quality verdict); default: the network is called directly.

    The network (through ``inferer``) is called once on the whole batch. If that raises, or gives a NaN / Inf result
    for some item (see :func:`nonfinite_items`), each item that raises or is non-finite becomes a
    :class:`RegistrationFailure` with the error: a batch of one from that one call, a larger batch by running its
    items one by one. ``None`` inputs (no pair of the batch could be loaded) give ``[]`` without calling the network.

    Returns:
        The network output (a :class:`~custom_nets.keymorph.KeyMorphOutput`) when every item succeeded, else a list
        with, for each batch item, its one-item ``KeyMorphOutput`` or a :class:`RegistrationFailure`.
    """

    def __init__(self, inferer: Inferer | None = None) -> None:
        super().__init__()
        self.inferer = inferer

    def _run(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        if self.inferer is None:
            return network(inputs, *args, **kwargs)
        return self.inferer(inputs, network, *args, **kwargs)

    def __call__(self, inputs: torch.Tensor | None, network: Any, *args: Any, **kwargs: Any) -> Any:
        if inputs is None:
            return []
        batch = int(inputs.shape[0])
        try:
            out = self._run(inputs, network, *args, **kwargs)
        except Exception as err:  # a batch of one has its message already; larger ones are isolated item by item
            if batch == 1:
                return [_raised(err)]
        else:
            if not nonfinite_items(out):
                return out
            if batch == 1:
                return [_nonfinite()]
        return [self._run_item(network, inputs, args, kwargs, i, batch) for i in range(batch)]

    def _run_item(
        self, network: Any, inputs: torch.Tensor, args: Sequence[Any], kwargs: Mapping[str, Any], i: int, batch: int
    ) -> Any:
        try:
            out = self._run(
                _item(inputs, i, batch),
                network,
                *(_item(a, i, batch) for a in args),
                **{k: _item(v, i, batch) for k, v in kwargs.items()},
            )
        except Exception as err:  # recorded as this pair's failure
            return _raised(err)
        return _nonfinite() if nonfinite_items(out) else out


def _raised(err: Exception) -> RegistrationFailure:
    """The failure record of a pair whose registration raised ``err``."""
    return RegistrationFailure("register", f"{type(err).__name__}: {err}")


def _nonfinite() -> RegistrationFailure:
    """The failure record of a pair whose registration gave NaN / Inf."""
    return RegistrationFailure(
        "register", "the registration gave a non-finite (NaN / Inf) transform, keypoints or warped image"
    )
