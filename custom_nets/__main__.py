"""Command line: ``python -m custom_nets <command> [--flags]`` (python-fire).

Commands:
    demo_data   write the built-in demo set (synthetic brains, three contrasts, labels, datalist.json).
    score       compare inference results with the ground truth of a pair list (e.g. the demo test pairs).
    release     record the weights' URL and SHA-256 in large_files.yml and pack the bundle zip.
    table       print an evaluation summary.json as a Markdown table (for the model card).
"""

from __future__ import annotations

import fire


def demo_data(
    out_dir: str = "demo_data",
    num_subjects: int = 10,
    pixdim: float = 2.0,
    seed: int = 0,
    contrasts: tuple[str, ...] | list[str] | str = ("t1", "t2", "pd"),
) -> str:
    """Write the demo set to OUT_DIR and print the path of its datalist.json.

    Args:
        out_dir: output folder (created).
        num_subjects: synthetic subjects (split about 70 / 10 / 20 % into training / validation / test).
        pixdim: voxel size in mm.
        seed: random seed (the set is a deterministic function of it).
        contrasts: contrasts to image every subject in (t1, t2, pd, random; any case), as a comma list or a list.
    """
    from .data.demo import write_demo_data

    if isinstance(contrasts, str):
        contrasts = contrasts.split(",")
    contrasts = [c.strip().lower() if isinstance(c, str) else c for c in contrasts]  # T1 and t1 alike
    contrasts = [c for c in contrasts if c != ""]
    return str(
        write_demo_data(out_dir, num_subjects=num_subjects, contrasts=tuple(contrasts), pixdim=pixdim, seed=seed)
    )


def score(results: str = "demo_out", datalist: str = "demo_data/datalist.json") -> None:
    """Print, per pair, the error (mm) of RESULTS/<moving>.json against the ground truth in DATALIST.

    Args:
        results: folder of inference outputs (``<moving stem>.json``).
        datalist: JSON with a ``test_pairs`` list carrying ``fixed_to_moving_ras``.
    """
    from .scoring import format_scores, score_results

    print(format_scores(score_results(results, datalist)))


def release(bundle_dir: str = "bundle", out_dir: str = "dist", url_base: str | None = None) -> str:
    """Refresh BUNDLE_DIR/large_files.yml (the SHA-256 of every weights file it lists) and pack
    OUT_DIR/<name>_v<version>.zip.

    Args:
        bundle_dir: the bundle folder.
        out_dir: where the zip goes.
        url_base: where the weights will be downloadable from (each URL becomes <url_base>/<file name>); if omitted,
            every entry keeps its URL (the weights of one release may live at different release URLs) and only the
            hashes are refreshed.
    """
    from .release import listed_large_files, pack_bundle, refresh_large_files, write_large_files

    if url_base is None:
        refresh_large_files(bundle_dir)
    else:
        write_large_files(bundle_dir, url_base, [e["path"] for e in listed_large_files(bundle_dir)])
    return str(pack_bundle(bundle_dir, out_dir))


def table(summary: str = "runs/eval/summary.json") -> None:
    """Print SUMMARY (written by the bundle's evaluating workflow) as a Markdown table by rotation angle."""
    import json

    from .scoring import summary_markdown

    with open(summary) as f:
        print(summary_markdown(json.load(f)))


def main() -> None:
    fire.Fire({"demo_data": demo_data, "score": score, "release": release, "table": table})


if __name__ == "__main__":
    main()
