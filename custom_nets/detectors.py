"""Keypoint detectors: fully convolutional networks mapping an image to ``K`` heatmaps.

Both detectors map ``(B, in_channels, I, J, K)`` images to ``(B, num_keypoints, I / s, J / s, K / s)`` heatmaps, where
``s = detector.downsample_factor``; every spatial size must be divisible by ``s``. All downsampling is by
non-overlapping windows (max pooling, or patch convolutions with kernel = stride), so heatmap cell ``u`` covers input
voxels ``s u .. s u + s - 1`` exactly: the cell-centre convention of :func:`custom_nets.geometry.heatmap_to_voxel`.
Heatmaps are raw scores; :class:`custom_nets.keypoints.CenterOfMass` rectifies them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, UpSample
from monai.networks.layers.factories import Pool
from torch import nn

__all__ = ["ConvNetDetector", "TruncatedUNetDetector"]


def _check_divisible(x: torch.Tensor, factor: int, spatial_dims: int, in_channels: int, name: str) -> None:
    if x.ndim != spatial_dims + 2 or x.shape[1] != in_channels:
        raise ValueError(
            f"{name}: expected input of shape (B, {in_channels}, {', '.join('*' * spatial_dims)}), "
            f"got {tuple(x.shape)}."
        )
    bad = [n for n in x.shape[2:] if n % factor]
    if bad:
        raise ValueError(
            f"{name}: every spatial size must be divisible by the downsampling factor {factor}, got spatial shape "
            f"{tuple(x.shape[2:])}."
        )


class ConvNetDetector(nn.Module):
    """The KeyMorph convolutional keypoint detector (journal variant by default).

    A stack of ``Conv -> Norm -> Act`` blocks (MONAI :class:`~monai.networks.blocks.Convolution`) with max pooling
    after the blocks listed in ``pool_after`` and a final plain convolution to ``num_keypoints`` heatmaps. The
    defaults are the journal (MedIA) detector: channels 32-64-64-128-128-256-256-512, pooling after blocks 2, 4, 6
    and 8 (0-based 1, 3, 5, 7), instance norm, ReLU: 128^3 input gives 8^3 heatmaps.

    For CPU budgets, ``strides`` can make blocks strided patch convolutions (kernel = stride, no padding) so the
    first layers run at reduced resolution.

    Args:
        spatial_dims: number of spatial dimensions (3 for volumes).
        in_channels: input channels.
        num_keypoints: number of heatmaps ``K``.
        channels: output channels of the ``Conv -> Norm -> Act`` blocks.
        pool_after: 0-based indices of the blocks followed by ``MaxPool(2)``.
        strides: per-block stride (default all 1); a block with stride ``s > 1`` is a ``s^3`` patch convolution.
        kernel_size: kernel size of the unstrided blocks and the head.
        norm: MONAI norm spec, e.g. ``"instance"``, ``("group", {"num_groups": 8})`` or ``None``.
        act: MONAI activation spec, e.g. ``"relu"``.
        bias: whether convolutions have a bias.

    Shapes:
        input ``(B, in_channels, *S)`` with every size in ``S`` divisible by :attr:`downsample_factor`;
        output ``(B, num_keypoints, *(S / downsample_factor))``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        num_keypoints: int = 128,
        channels: Sequence[int] = (32, 64, 64, 128, 128, 256, 256, 512),
        pool_after: Sequence[int] = (1, 3, 5, 7),
        strides: Sequence[int] | None = None,
        kernel_size: int = 3,
        norm: str | tuple | None = "instance",
        act: str | tuple | None = "relu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        strides = tuple(int(s) for s in strides) if strides is not None else (1,) * len(channels)
        if len(strides) != len(channels):
            raise ValueError(f"expected {len(channels)} strides (one per block), got {len(strides)}.")
        if any(not 0 <= i < len(channels) for i in pool_after):
            raise ValueError(f"pool_after indices must lie in [0, {len(channels)}), got {tuple(pool_after)}.")
        self.spatial_dims, self.in_channels, self.num_keypoints = spatial_dims, in_channels, int(num_keypoints)
        layers: list[nn.Module] = []
        prev = in_channels
        for i, (c, s) in enumerate(zip(channels, strides)):
            k, pad = (s, 0) if s > 1 else (kernel_size, None)
            layers.append(
                Convolution(spatial_dims, prev, c, strides=s, kernel_size=k, padding=pad, norm=norm, act=act, bias=bias)
            )
            if i in pool_after:
                layers.append(Pool[Pool.MAX, spatial_dims](kernel_size=2))
            prev = c
        layers.append(
            Convolution(spatial_dims, prev, self.num_keypoints, kernel_size=kernel_size, conv_only=True, bias=bias)
        )
        self.net = nn.Sequential(*layers)
        self.downsample_factor = math.prod(strides) * 2 ** len(set(pool_after))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_divisible(x, self.downsample_factor, self.spatial_dims, self.in_channels, type(self).__name__)
        return self.net(x)


class _DoubleConv(nn.Sequential):
    def __init__(self, spatial_dims: int, cin: int, cout: int, norm: str | tuple | None, act: str | tuple | None):
        super().__init__(
            Convolution(spatial_dims, cin, cout, kernel_size=3, norm=norm, act=act),
            Convolution(spatial_dims, cout, cout, kernel_size=3, norm=norm, act=act),
        )


class TruncatedUNetDetector(nn.Module):
    """A BrainMorph-style truncated 3D U-Net detector: heatmaps at half the input resolution.

    An encoder of ``len(channels)`` levels (two ``Conv -> Norm -> Act`` blocks each, ``MaxPool(2)`` between levels)
    and a decoder (transposed-convolution upsampling, skip concatenation, two blocks) that stops one level short of the
    input resolution, followed by a ``1^3`` convolution to ``num_keypoints`` heatmaps. BrainMorph's S / M / L variants
    are ``channels`` of 4 / 5 / 6 levels starting at 32 and doubling, with group norm.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels.
        num_keypoints: number of heatmaps ``K``.
        channels: features per level, at least 2 levels.
        norm: MONAI norm spec (default group norm with 8 groups).
        act: MONAI activation spec.
        stem_stride: optional stride of a leading patch convolution (kernel = stride) that reduces the resolution the
            U-Net runs at; heatmaps are then at ``1 / (2 * stem_stride)`` of the input.

    Shapes:
        input ``(B, in_channels, *S)`` with every size divisible by :attr:`downsample_factor`
        ``= stem_stride * 2^(len(channels) - 1)``; output ``(B, num_keypoints, *(S / (2 * stem_stride)))``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        num_keypoints: int = 128,
        channels: Sequence[int] = (32, 64, 128, 256),
        norm: str | tuple | None = ("group", {"num_groups": 8}),
        act: str | tuple | None = "relu",
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError(f"expected at least 2 levels of channels, got {channels}.")
        if int(stem_stride) < 1:
            raise ValueError(f"expected stem_stride >= 1, got {stem_stride}.")
        self.spatial_dims, self.in_channels, self.num_keypoints = spatial_dims, in_channels, int(num_keypoints)
        self.stem: nn.Module = nn.Identity()
        prev = in_channels
        if stem_stride > 1:
            self.stem = Convolution(
                spatial_dims,
                in_channels,
                channels[0],
                strides=stem_stride,
                kernel_size=stem_stride,
                padding=0,
                norm=norm,
                act=act,
            )
            prev = channels[0]
        self.encoders = nn.ModuleList()
        for c in channels:
            self.encoders.append(_DoubleConv(spatial_dims, prev, c, norm, act))
            prev = c
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2)
        self.ups, self.decoders = nn.ModuleList(), nn.ModuleList()
        for c in reversed(channels[1:-1]):  # decode down to level 1 (half resolution), not level 0
            self.ups.append(UpSample(spatial_dims, prev, c, scale_factor=2, mode="deconv"))
            self.decoders.append(_DoubleConv(spatial_dims, 2 * c, c, norm, act))
            prev = c
        self.head = Convolution(spatial_dims, prev, self.num_keypoints, kernel_size=1, conv_only=True)
        self.downsample_factor = int(stem_stride) * 2 ** (len(channels) - 1)
        self.heatmap_stride = int(stem_stride) * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_divisible(x, self.downsample_factor, self.spatial_dims, self.in_channels, type(self).__name__)
        x = self.stem(x)
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.ups, self.decoders):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)
