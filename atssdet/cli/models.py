"""``atssdet models``: the zoo with its mAP and what is cached."""

from __future__ import annotations

import argparse

from atssdet.cli.common import SubParsers, add_command


def add_parser(sub: SubParsers) -> None:
    p = add_command(
        sub,
        "models",
        help="list the model zoo and what is cached",
        description="List the five zoo models with their COCO val2017 mAP and whether their weights are "
        "in the cache ($ATSSDET_HOME, default ~/.cache/atssdet).",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from atssdet.download import cache_status, converted_path, raw_path
    from atssdet.zoo import ZOO, cache_dir

    rows = [("model", "backbone", "COCO mAP", "cached", "file")]
    for entry in ZOO.values():
        status = cache_status(entry)
        path = {"converted": converted_path(entry), "downloaded": raw_path(entry)}.get(status)
        label = {"converted": "yes", "downloaded": "pkl only (converted on first load)", "no": "no"}[status]
        rows.append((entry.name, entry.config.backbone, f"{entry.coco_map:.1f}", label, str(path or "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"cache: {cache_dir()}")
    return 0
