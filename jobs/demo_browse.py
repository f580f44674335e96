"""The demo's Browse tab, without the UI: one page of a generation run's manifest, queried in DuckDB.

A run is the folder `jobs.generate --output` writes (OUT/manifest/part-*.parquet + OUT/images/).
Filtering (words of the caption, an alignment range), sorting, counting and paging all happen in
the query (`WHERE ... ORDER BY ... LIMIT page_size OFFSET ...`), so a page of a million-row run
reads one page of rows: the browser only ever receives that page.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

# Sort choices of the UI -> ORDER BY clauses (fixed strings: nothing the user types reaches the SQL).
SORTS = {
    "seed": "seed ASC",
    "alignment, lowest first": "alignment ASC, seed ASC",
    "alignment, highest first": "alignment DESC, seed ASC",
    "caption": "caption ASC, seed ASC",
}
COLUMNS = ("seed", "caption", "alignment", "image_path", "image_sha256")


class BrowseError(ValueError):
    """A run folder that cannot be browsed, or a bad filter (named in the message)."""


@dataclass
class Page:
    """One page of matching rows (dicts of COLUMNS), the match count and where the page is."""

    rows: list[dict[str, Any]]
    total: int
    page: int  # 1-based, clamped to [1, pages]
    pages: int


def manifest_glob(run: str) -> str:
    """The Parquet glob of a local run folder; BrowseError says what is wrong with the folder."""
    if run.startswith("s3://"):
        raise BrowseError(f"{run}: browse a local copy of an S3 run (aws s3 sync {run} LOCAL_DIR)")
    root = Path(run).expanduser()
    if not root.is_dir():
        raise BrowseError(f"{run}: no such folder (give a jobs.generate --output folder)")
    if not any((root / "manifest").glob("part-*.parquet")):
        raise BrowseError(f"{run}: no manifest/part-*.parquet in it (is it a jobs.generate --output folder?)")
    return str(root / "manifest" / "part-*.parquet")


def word_patterns(words: str) -> list[str]:
    """Each whitespace-separated word -> a whole-word, case-insensitive regular expression (RE2)."""
    return [rf"(?i)\b{re.escape(w)}\b" for w in words.split()]


def query_page(
    run: str,
    words: str = "",
    alignment_range: tuple[float, float] = (-1.0, 1.0),
    sort: str = "seed",
    page: int = 1,
    page_size: int = 24,
) -> Page:
    """The rows whose caption has every word and whose alignment is in the (inclusive) range,
    sorted, page `page` of `page_size` rows."""
    if sort not in SORTS:
        raise BrowseError(f"sort must be one of {', '.join(SORTS)}, got {sort!r}")
    lo, hi = (float(x) for x in alignment_range)
    if lo > hi:
        raise BrowseError(f"the alignment range is empty: min {lo} > max {hi}")
    patterns = word_patterns(words)
    where = " AND ".join(["alignment BETWEEN ? AND ?"] + ["regexp_matches(caption, ?)"] * len(patterns))
    source = "read_parquet(?)"
    params = [manifest_glob(run), lo, hi, *patterns]
    with duckdb.connect() as con:
        total = con.execute(f"SELECT count(*) FROM {source} WHERE {where}", params).fetchone()[0]
        pages = max(1, math.ceil(total / page_size))
        page = min(max(1, int(page)), pages)
        sql = f"SELECT {', '.join(COLUMNS)} FROM {source} WHERE {where} ORDER BY {SORTS[sort]} LIMIT ? OFFSET ?"
        rows = con.execute(sql, [*params, page_size, (page - 1) * page_size]).fetchall()
    return Page([dict(zip(COLUMNS, r)) for r in rows], int(total), page, pages)


def image_file(run: str, image_path: str) -> Path | None:
    """The PNG of a manifest row (image_path is relative to the run), or None when it is missing
    or would point outside the run folder."""
    root = Path(run).expanduser().resolve()
    path = (root / image_path).resolve()
    return path if path.is_relative_to(root) and path.is_file() else None
