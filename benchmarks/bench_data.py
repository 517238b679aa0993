"""Does data generation keep up with training? Prints synthetic pairs/s beside the model's training step time.

    python benchmarks/bench_data.py [--spatial_size 128 --pixdim 2.0 --pairs 8 --keypoints 128]

Both figures are measured in this run on this machine; the ratio (pairs generated per training step, one worker)
is what matters: above 1, one data worker keeps the model busy.
"""

from __future__ import annotations

import time

import fire
import torch

from custom_nets import ConvNetDetector, KeyMorph
from custom_nets.data import RandAffineMovingd, SynthPaird


def main(spatial_size: int = 128, pixdim: float = 2.0, pairs: int = 8, keypoints: int = 128, steps: int = 2) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    make = SynthPaird({"spatial_size": spatial_size, "pixdim": pixdim}, contrasts=("t1", "t2", "pd", "random"))
    aug = RandAffineMovingd()
    aug(make({"seed": 0}))  # warm-up (template load, first allocation)
    t0 = time.perf_counter()
    for i in range(pairs):
        d = aug(make({"seed": i + 1}))
    data_s = (time.perf_counter() - t0) / pairs

    model = KeyMorph(ConvNetDetector(num_keypoints=keypoints))
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    fixed, moving = d["fixed_image"].as_tensor()[None], d["moving_image"].as_tensor()[None]

    def step() -> None:
        opt.zero_grad()
        out = model(moving, fixed, d["moving_image"].affine, d["fixed_image"].affine)
        torch.nn.functional.mse_loss(out.warped, fixed).backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    step_s = (time.perf_counter() - t0) / steps
    result = {
        "grid": f"{spatial_size}^3 at {pixdim} mm",
        "data_pairs_per_s": round(1 / data_s, 2),
        "data_s_per_pair": round(data_s, 3),
        "train_step_s": round(step_s, 3),
        "pairs_per_step_one_worker": round(step_s / data_s, 1),
    }
    for k, v in result.items():
        print(f"{k:>28}: {v}")


if __name__ == "__main__":
    fire.Fire(main)
