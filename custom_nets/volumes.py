"""Image files at their full resolution, for the registration writer and the brain extractor: opening (any format
the preprocessing reads), reading voxels, saving NIfTI on another image's grid, and the output names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .fileio import atomic_write

__all__ = ["load_volume", "output_stem", "read_volume", "save_like"]


def output_stem(path: str) -> str:
    """The name inference outputs of an image get: its file name without the image extension."""
    name = Path(path).name
    return re.sub(r"\.nii(\.gz)?$|\.mg[hz]$|\.n(rrd|hdr)$|\.mh[ad]$|\.hdr$|\.img$", "", name, flags=re.IGNORECASE)


def load_volume(path: str) -> Any:
    """Open an image with nibabel (data stays on disk until read); a 4D file holding one volume is squeezed to 3D.

    Formats nibabel does not read (e.g. NRRD, MetaImage, which the preprocessing reads through MONAI's ITK reader) are
    read with MONAI's ``LoadImage``, the reader the registration saw them with, so voxels and RAS affine are the same;
    they come back as an in-memory NIfTI image, and the outputs on their grid are NIfTI.

    Raises:
        ValueError: naming the file, if it cannot be read or is not a 3D volume.
    """
    from .data.checks import nibabel_reads

    try:
        if nibabel_reads(path):
            img = nib.load(path)
        else:
            from monai.transforms import LoadImage

            loaded = LoadImage(image_only=True, dtype=np.float32)(path)
            img = nib.Nifti1Image(np.asarray(loaded), np.asarray(loaded.affine, dtype=np.float64))
    except Exception as err:
        raise ValueError(f"{path}: cannot be read as an image ({type(err).__name__}: {err}).") from err
    if len(img.shape) > 3 and all(n == 1 for n in img.shape[3:]):
        img = nib.funcs.squeeze_image(img)
    if len(img.shape) != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {img.shape}.")
    return img


def read_volume(img: Any, path: str) -> np.ndarray:
    """The voxels of a nibabel image as float32 (errors, e.g. truncated data, name the file)."""
    try:
        return np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:
        raise ValueError(f"{path}: cannot read the image data ({type(err).__name__}: {err}).") from err


def save_like(data: np.ndarray, like: Any, path: str, dtype: Any) -> None:
    """Save ``data`` as NIfTI on the grid of image ``like``: its affine, and its NIfTI header fields (units, codes,
    description) when ``like`` is NIfTI; data type ``dtype``, no intensity scaling."""
    header = like.header.copy() if isinstance(like, nib.Nifti1Image) else None
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), like.affine, header=header)  # no copy if already dtype
    img.header.set_data_dtype(dtype)
    codes = (int(like.header["qform_code"]), int(like.header["sform_code"])) if header is not None else (0, 0)
    img.set_qform(like.affine, code=codes[0] or 1)
    img.set_sform(like.affine, code=codes[1] or 1)
    img.header.set_slope_inter(1.0, 0.0)
    atomic_write(path, lambda tmp: nib.save(img, tmp))
