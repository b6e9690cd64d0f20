"""What ``predict`` did, for the console: a row per image (the first :attr:`PredictReport.MAX_ROWS`) and totals."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from atssdet.structures import Detections


def _row(path: str, result: Detections, threshold: float) -> PredictRow:
    h, w = result.image_hw or (0, 0)
    return PredictRow(
        path=str(path),
        height=h,
        width=w,
        num_detections=len(result),
        num_drawn=int((result.scores >= threshold).sum()),
        top=_top_names(result, threshold),
    )


@dataclass
class PredictRow:
    path: str
    height: int
    width: int
    num_detections: int
    num_drawn: int
    top: str


@dataclass
class PredictReport:
    """What :func:`predict_files` did: one row per image done, ``failed`` = ``(input, reason)``."""

    out_dir: Path
    rows: list[PredictRow] = field(default_factory=list)  # the first MAX_ROWS images done
    failed: list[tuple[str, str]] = field(default_factory=list)
    json_path: Path | None = None
    seconds: float = 0.0
    skipped: int = 0  # images the stream already held (a resumed job)
    num_ok: int = 0
    num_detections: int = 0
    drew: bool = True
    recorded: int = 0  # images in the final files (all ranks, earlier runs included); rank 0 only

    MAX_ROWS = 50  # rows kept for the table: memory stays flat over any number of images

    def add(self, path: str, result: Detections, threshold: float) -> None:
        """Count one finished image (an error result goes to ``failed``)."""
        if not result.ok:
            self.failed.append((path, result.error or "unreadable"))
            return
        self.num_ok += 1
        self.num_detections += len(result)
        if len(self.rows) < self.MAX_ROWS:
            self.rows.append(_row(path, result, threshold))

    def table(self, max_rows: int = 50) -> str:
        """A plain-text summary table (first ``max_rows`` images, then totals and failures)."""
        header = ("image", "size", "dets", "drawn", "top classes (drawn)")
        body = [
            (Path(r.path).name, f"{r.width}x{r.height}", str(r.num_detections), str(r.num_drawn), r.top)
            for r in self.rows[:max_rows]
        ]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in [header, *body]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.num_ok > len(body):
            lines.append(f"... {self.num_ok - len(body)} more image(s)")
        rate = self.num_ok / self.seconds if self.seconds > 0 else 0.0
        lines.append(
            f"{self.num_ok} image(s) done, {len(self.failed)} failed, "
            f"{self.num_detections} detections, {self.seconds:.1f} s ({rate:.2f} img/s)"
            + (f"; {self.skipped} already recorded, skipped" if self.skipped else "")
        )
        if self.json_path is not None:
            drawings = f" and drawings to {self.out_dir}" if self.drew else ""
            lines.append(f"wrote {self.json_path}{drawings}")
        return "\n".join(lines)


def _top_names(result: Detections, threshold: float, limit: int = 4) -> str:
    keep = result.scores >= threshold
    names = [n for n, k in zip(result.names, keep.tolist(), strict=True) if k]
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in ranked[:limit])
    return text + (", ..." if len(ranked) > limit else "")
