"""Brain extraction on held-out synthetic heads: Dice against the truth brain mask, by contrast and kind, and time.

    python benchmarks/bench_brainmask.py [--num 30 --out_dir bench_brainmask_out --weights <state dict>]

Heads come from the ``test`` seed stream (never trained on): contrast ``t1`` / ``t2`` / ``pd`` / ``flair`` /
``random`` and kind ``raw`` (full field of view) / ``brain_only`` (skull-stripped) / ``cut`` (neck or vertex out)
in turn, each in a random pose (any rotation up to 180 degrees about a random axis, scale, shift). Every head is
synthesised twice from its seed: on the network's own 4 mm grid (80^3) and on a 2 mm grid (160^3, the network then
sees it average-pooled to 4 mm and the mask comes back to 2 mm). Dice is measured on the image's own grid. Time is
the wall clock of :func:`~custom_nets.brainmask.extract_brain_mask` per image with one torch thread.

The same run calibrates the quality check of brain masks given by the user
(``QualityThresholds.min_mask_agreement``): on each 2 mm head, the Dice of the extractor's mask with masks a user
might give: the truth (``right``), the truth 3 mm too generous (``generous``) or 2 mm too tight (``tight``), and
wrong ones: the truth moved 10, 20 or 40 mm along a voxel axis (``moved_10mm`` ...), and the truth mask of another
scan of the same head in another pose (``other_pose``: masks swapped between the two images of a pair).

Writes ``table.md`` (the printed tables), ``results.json`` (per head) and ``montage.png`` (a few 2 mm heads, three
orthogonal mid-brain slices, predicted mask contour red, truth green) to ``out_dir``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from custom_nets.brainmask import extract_brain_mask, load_brain_extractor
from custom_nets.brainmask_train import HEAD_KINDS, dice, random_pose, sample_head
from custom_nets.data.heads import HEAD_CONTRASTS, HeadSynthesizer
from custom_nets.data.synth import subject_seed
from custom_nets.data.transforms import dilate_mask
from custom_nets.fileio import atomic_write
from custom_nets.quality import QualityThresholds


def _row(name: str, rows: list[dict]) -> str:
    d4 = np.array([r["dice_4mm"] for r in rows])
    d2 = np.array([r["dice_2mm"] for r in rows])
    return (
        f"| {name} | {len(rows)} | {d4.mean():.3f} | {d4.min():.3f} | {d2.mean():.3f} | {d2.min():.3f} "
        f"| {int((d4 >= 0.95).sum())}/{len(rows)} | {int((d2 >= 0.95).sum())}/{len(rows)} |"
    )


def _table(rows: list[dict]) -> str:
    lines = [
        "| group | n | Dice 4 mm mean | min | Dice 2 mm mean | min | >= 0.95 (4 mm) | >= 0.95 (2 mm) |",
        "|---|---|---|---|---|---|---|---|",
        _row("all", rows),
    ]
    for c in HEAD_CONTRASTS:
        lines.append(_row(f"contrast {c}", [r for r in rows if r["contrast"] == c]))
    for k in HEAD_KINDS:
        lines.append(_row(f"kind {k}", [r for r in rows if r["kind"] == k]))
    t4 = np.array([r["seconds_4mm"] for r in rows])
    t2 = np.array([r["seconds_2mm"] for r in rows])
    lines += [
        "",
        f"time per image, 1 thread: 4 mm grid (80^3) median {np.median(t4):.2f} s (max {t4.max():.2f}); "
        f"2 mm grid (160^3) median {np.median(t2):.2f} s (max {t2.max():.2f})",
    ]
    return "\n".join(lines)


#: Masks a user might give, made from the truth mask ``(1, I, J, K)`` of a 2 mm head (see the module docstring).
GIVEN_MASKS = ("right", "generous", "tight", "moved_10mm", "moved_20mm", "moved_40mm", "other_pose")


def _given_masks(
    truth: torch.Tensor, other_pose: torch.Tensor, affine: torch.Tensor, axis: int
) -> dict[str, torch.Tensor]:
    spacing = float(affine[:3, :3].norm(dim=0).mean())
    return {
        "other_pose": other_pose,
        "right": truth,
        "generous": dilate_mask(truth, affine, 3.0),
        "tight": 1.0 - dilate_mask(1.0 - truth, affine, 2.0),
        "moved_10mm": torch.roll(truth, round(10.0 / spacing), dims=1 + axis),
        "moved_20mm": torch.roll(truth, round(20.0 / spacing), dims=1 + axis),
        "moved_40mm": torch.roll(truth, round(40.0 / spacing), dims=1 + axis),
    }


def _agreement_table(rows: list[dict], limit: float) -> str:
    lines = [
        f"| given mask | n | agreement min | median | max | below {limit} |",
        "|---|---|---|---|---|---|",
    ]
    for name in GIVEN_MASKS:
        a = np.array([r["agreement"][name] for r in rows])
        below = f"{int((a < limit).sum())}/{len(a)}"
        lines.append(f"| {name} | {len(a)} | {a.min():.3f} | {np.median(a):.3f} | {a.max():.3f} | {below} |")
    return "\n".join(lines)


def _montage(cases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(cases), 3, figsize=(9, 3 * len(cases)))
    for row, case in zip(np.atleast_2d(axes), cases):
        img, pred, truth = case["image"][0].numpy(), case["pred"][0].numpy(), case["mask"][0].numpy()
        idx = np.argwhere(truth > 0.5)
        centre = idx.mean(0).round().astype(int) if len(idx) else np.array(img.shape) // 2
        for axis, ax in enumerate(row):
            sl = [slice(None)] * 3
            sl[axis] = int(centre[axis])
            ax.imshow(np.rot90(img[tuple(sl)]), cmap="gray", vmin=0, vmax=float(np.quantile(img, 0.995)) or 1.0)
            if truth[tuple(sl)].any():
                ax.contour(np.rot90(truth[tuple(sl)]), [0.5], colors="lime", linewidths=0.8)
            if pred[tuple(sl)].any():
                ax.contour(np.rot90(pred[tuple(sl)]), [0.5], colors="red", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"{case['contrast']} {case['kind']}\nDice {case['dice']:.3f}", fontsize=9)
    fig.suptitle("brain extraction, 2 mm synthetic test heads (voxel axes; red: predicted, green: truth)", fontsize=10)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.98))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80))
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=30, help="test heads")
    parser.add_argument("--out_dir", default="bench_brainmask_out")
    parser.add_argument("--weights", default=None, help="state dict (default: the shipped, SHA-256 checked)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--montage", type=int, default=6, help="heads in the montage")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    net = load_brain_extractor(args.weights)
    synth4, synth2 = HeadSynthesizer(80, 4.0), HeadSynthesizer(160, 2.0)
    rows, shown = [], []
    for i in range(args.num):
        seed = subject_seed("test", i)
        contrast, kind = HEAD_CONTRASTS[i % len(HEAD_CONTRASTS)], HEAD_KINDS[i % len(HEAD_KINDS)]
        pose = random_pose(np.random.default_rng([seed, 303]), max_angle_deg=180.0)
        row = {"index": i, "seed": seed, "contrast": contrast, "kind": kind}
        for name, synth in (("4mm", synth4), ("2mm", synth2)):
            case = sample_head(synth, seed, contrast, kind, pose)
            t0 = time.perf_counter()
            pred = extract_brain_mask(net, case["image"], case["affine"])
            row[f"seconds_{name}"] = time.perf_counter() - t0
            row[f"dice_{name}"] = dice(pred, case["mask"])
            if name == "2mm":
                # the mask of another scan of the head (another pose), as when the two masks of a pair are swapped
                other = sample_head(synth, seed, contrast, kind, random_pose(np.random.default_rng([seed, 404])))
                affine = torch.as_tensor(case["affine"], dtype=torch.float64)
                given = _given_masks(case["mask"].float(), other["mask"].float(), affine, i % 3)
                row["agreement"] = {k: dice(m, pred) for k, m in given.items()}
            if name == "2mm" and len(shown) < args.montage:
                shown.append({**case, "pred": pred, "dice": row["dice_2mm"]})
        rows.append(row)
        print(
            f"{i:3d} {contrast:>6} {kind:>10}  Dice 4 mm {row['dice_4mm']:.3f} ({row['seconds_4mm']:.2f} s)"
            f"  2 mm {row['dice_2mm']:.3f} ({row['seconds_2mm']:.2f} s)",
            flush=True,
        )
    limit = QualityThresholds().min_mask_agreement
    table = _table(rows) + "\n\nagreement of a given brain mask with the extractor's (2 mm heads):\n\n"
    table += _agreement_table(rows, limit)
    print()
    print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "table.md", lambda tmp: tmp.write_text(table + "\n"))
    atomic_write(out_dir / "results.json", lambda tmp: tmp.write_text(json.dumps(rows, indent=1)))
    if shown:
        _montage(shown, out_dir / "montage.png")
    print(f"\nwrote {out_dir / 'table.md'}, {out_dir / 'results.json'}, {out_dir / 'montage.png'}")


if __name__ == "__main__":
    main()
