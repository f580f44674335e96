"""Checking a generation output: which parts are done (resume), complete (end of a run), and sound
(`--verify`: every part and every image, in parallel on Ray tasks).

Three depths, one set of rules (a part's rules are in pipeline/generation/manifest.py):
- `part_problem` (resume): the part's footer only: readable, the format's manifest schema, and its
  metadata (run_id, model digest, shard, row count) equal to run.json's and the shard's; for
  webdataset also its tar's size (one HEAD). A part that fails is not done: the rerun regenerates
  its shard and says why.
- `validate` (end of a run): the same, plus the seed column: exactly the shard's seeds, sorted.
- `verify_output` (`--verify`, `python -m jobs.verify`): every column of every part (page checksums
  on), every row's run_id / digest / shard / image path, and each image's existence and sha256,
  one Ray task per part. The image is the file (files), the tar member at the row's tar_offset
  and tar_size, with the <seed>.txt and <seed>.json members beside it (webdataset, the tar read
  once, in one stream), or the row's embedded bytes (parquet). The report counts seeds lost (no
  row at all), duplicated (rows beyond the first) and mismatched (a row that is wrong), and names
  each damaged part; tars of shards the run does not have are named too.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pipeline import storage
from pipeline.generation import formats, lease, manifest
from pipeline.generation.manifest import ManifestError, SeedPlan

EXAMPLES = 3  # problems named per part; the counts cover the rest


@dataclass
class PartCheck:
    """What one shard's part holds and what is wrong with it."""

    shard: int
    status: str = "ok"  # ok | missing | unreadable | foreign (another run or checkpoint) | damaged
    problems: list[str] = field(default_factory=list)
    rows: int = 0
    bad_rows: int = 0  # rows that exist but are wrong (seed, run, digest, path or image)
    seeds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def name(self) -> str:
        return f"part-{manifest.shard_name(self.shard)}.parquet"

    def line(self) -> str:
        return f"{self.name}: {self.status}" + (f" ({'; '.join(self.problems)})" if self.problems else "")


@contextlib.contextmanager
def _open(out: str, shard: int) -> Iterator[pq.ParquetFile]:
    fs, path = storage.filesystem(manifest.part_uri(out, shard))
    with fs.open_input_file(path) as f:
        yield pq.ParquetFile(f, page_checksum_verification=True)


def _footer_problem(
    pf: pq.ParquetFile, out: str, shard: int, rows: int, run_id: str, digest: str, fmt: str
) -> tuple[str, str] | None:
    """(status, problem) from a part's footer (and a webdataset part's tar size), or None when it
    is this run's part of this shard."""
    if not pf.schema_arrow.remove_metadata().equals(manifest.schema_for(fmt)):
        return "damaged", f"its schema is not the manifest schema of the {fmt} format"
    meta = {
        k.decode(errors="replace"): v.decode(errors="replace")
        for k, v in (pf.schema_arrow.metadata or {}).items()
    }
    if not all(k in meta for k in manifest.PART_META):  # a part written before the metadata existed
        cols = pf.read(columns=["run_id", "model_digest"])
        meta["inkseed.run_id"] = cols["run_id"][0].as_py() if len(cols) else ""
        meta["inkseed.model_digest"] = cols["model_digest"][0].as_py() if len(cols) else ""
        meta["inkseed.shard"], meta["inkseed.rows"] = str(shard), str(pf.metadata.num_rows)
    if meta["inkseed.run_id"] != run_id:
        return "foreign", f"written by run {meta['inkseed.run_id']}, run.json says {run_id}"
    if meta["inkseed.model_digest"] != digest:
        return "foreign", f"model digest {meta['inkseed.model_digest'][:12]}..., run.json {digest[:12]}..."
    if meta["inkseed.shard"] != str(shard) or int(meta["inkseed.rows"]) != pf.metadata.num_rows:
        return "damaged", f"its metadata says shard {meta['inkseed.shard']} of {meta['inkseed.rows']} rows"
    if pf.metadata.num_rows != rows:
        return "damaged", f"{pf.metadata.num_rows} rows, the shard has {rows} seeds"
    if fmt == "webdataset":
        return _tar_problem(out, shard, meta.get(manifest.TAR_META))
    return None


def _tar_problem(out: str, shard: int, expected_bytes: str | None) -> tuple[str, str] | None:
    """A webdataset part's tar: missing, or of another size than its part says."""
    uri = manifest.tar_uri(out, shard)
    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    rel = f"shards/{manifest.shard_name(shard)}.tar"
    if info.type == pafs.FileType.NotFound:
        return "damaged", f"{rel} missing"
    if str(info.size) != expected_bytes:
        return "damaged", f"{rel} is {info.size} bytes, its part says {expected_bytes}"
    return None


def part_problem(out: str, shard: int, rows: int, run_id: str, digest: str, fmt: str = "files") -> str | None:
    """Why shard `shard`'s existing part cannot count as done (None: it can). Never raises for a
    bad part: a truncated or unreadable one is reported, not fatal."""
    try:
        with _open(out, shard) as pf:
            problem = _footer_problem(pf, out, shard, rows, run_id, digest, fmt)
    except Exception as e:  # noqa: BLE001  (ArrowInvalid, OSError, ...: any unreadable part is not done)
        return f"unreadable ({storage.describe(e)})"
    return None if problem is None else problem[1]


def done_shards(
    out: str, plan: SeedPlan, run_id: str, digest: str, fmt: str = "files"
) -> tuple[set[int], dict[int, str]]:
    """(shards whose part is done, {shard: why its existing part is not}); footers read in threads."""
    shards = [s for s in manifest.part_shards(out) if s < plan.num_shards]

    def problem(s: int) -> str | None:
        return part_problem(out, s, plan.shard_len(s), run_id, digest, fmt)

    with ThreadPoolExecutor(16) as pool:
        problems = dict(zip(shards, pool.map(problem, shards)))
    return {s for s, p in problems.items() if p is None}, {s: p for s, p in problems.items() if p is not None}


def check_part(
    out: str,
    shard: int,
    expected: np.ndarray,
    run_id: str,
    digest: str,
    *,
    images: bool,
    fmt: str = "files",
    threads: int = 8,
) -> PartCheck:
    """Check shard `shard`'s part against its expected seeds (int64) and run.json; with `images`,
    every column and each image's bytes too. Never raises for a bad part or image."""
    check = PartCheck(shard)
    try:
        with _open(out, shard) as pf:
            footer = _footer_problem(pf, out, shard, len(expected), run_id, digest, fmt)
            table = pf.read(columns=None if images else ["seed"])
    except FileNotFoundError:
        check.status = "missing"
        return check
    except Exception as e:  # noqa: BLE001
        check.status, check.problems = "unreadable", [storage.describe(e)]
        return check
    seeds = table["seed"].to_numpy()
    check.rows, check.seeds = len(seeds), seeds
    if footer is not None:
        check.status, check.problems = footer[0], [footer[1]]
    bad = ~np.isin(seeds, expected)
    if bad.any():
        check.problems.append(
            f"{int(bad.sum())} seeds not of this shard, e.g. {seeds[bad][:EXAMPLES].tolist()}"
        )
    absent = np.setdiff1d(expected, seeds)
    if len(absent):
        check.problems.append(f"{len(absent)} of the shard's seeds absent, e.g. {absent[:EXAMPLES].tolist()}")
    if len(seeds) > 1 and not (np.diff(seeds) > 0).all():
        check.problems.append("seeds not sorted and unique")
    if images:
        bad |= _check_rows(out, shard, table.to_pydict(), run_id, digest, fmt, check, threads)
    if footer is not None and footer[0] == "foreign":
        bad[:] = True  # another run's rows are all wrong for this one
    check.bad_rows = int(bad.sum())
    if check.problems and check.status == "ok":
        check.status = "damaged"
    return check


def _check_rows(
    out: str, shard: int, cols: dict, run_id: str, digest: str, fmt: str, check: PartCheck, threads: int
) -> np.ndarray:
    """Per-row checks of a whole part: run_id, digest, shard, image path, image bytes (files: read
    in threads, S3 latency; webdataset: the tar in one stream). Returns the mask of bad rows; adds
    problems to `check`."""
    seeds = cols["seed"]
    wrong = np.array(
        [
            (r, d, s, p) != (run_id, digest, shard, manifest.image_path(shard, seed, fmt))
            for r, d, s, p, seed in zip(
                cols["run_id"], cols["model_digest"], cols["shard"], cols["image_path"], seeds
            )
        ],
        dtype=bool,
    )
    if wrong.any():
        check.problems.append(f"{int(wrong.sum())} rows with another run_id, digest, shard or image path")
    rows = [dict(zip(cols, values)) for values in zip(*cols.values())]
    if fmt == "webdataset":
        found = _tar_rows(out, shard, rows, check)
    elif fmt == "parquet":
        found = [_embedded_problem(row) for row in rows]
    else:
        with ThreadPoolExecutor(threads) as pool:
            found = list(pool.map(lambda row: _file_problem(out, row), rows))
    broken = np.array([p is not None for p in found], dtype=bool)
    if broken.any():
        check.problems.append(f"{int(broken.sum())} images bad: " + ", ".join(p for p in found if p)[:300])
    return wrong | broken


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_problem(out: str, row: dict) -> str | None:
    rel = row["image_path"]
    try:
        data = storage.read_bytes(storage.join(out, rel))
    except storage.StorageError as e:
        return f"{rel} missing" if "no such file" in str(e) else f"{rel} unreadable ({e})"
    return None if _sha(data) == row["image_sha256"] else f"{rel} differs from its sha256"


def _embedded_problem(row: dict) -> str | None:
    image, name = row["image"] or {}, f"{row['seed']}.png"
    if image.get("bytes") is None:
        return f"{row['image_path']} has no bytes"
    if image.get("path") != name:
        return f"{row['image_path']}: image.path is {image.get('path')!r}, not {name!r}"
    return (
        None
        if _sha(image["bytes"]) == row["image_sha256"]
        else f"{row['image_path']} differs from its sha256"
    )


def _tar_rows(out: str, shard: int, rows: list[dict], check: PartCheck) -> list[str | None]:
    """Each row's problem with the shard's tar: its PNG member where tar_offset / tar_size say and
    with its sha256, its .txt the caption, its .json the row; members of no row are named."""
    rel = f"shards/{manifest.shard_name(shard)}.tar"
    try:
        index = formats.tar_index(out, shard)
    except storage.StorageError as e:
        problem = f"{rel} missing" if "no such file" in str(e) else f"{rel} unreadable"
        return [problem] * len(rows)
    found: list[str | None] = []
    for row in rows:
        png, *others = formats.members(row, b"", row["model_digest"])
        at = index.get(png[0])
        if at is None:
            found.append(f"{rel}#{png[0]} missing")
        elif at != (row["tar_offset"], row["tar_size"], row["image_sha256"]):
            found.append(f"{rel}#{png[0]} differs from its sha256, offset or size")
        else:
            bad = [name for name, data in others if index.get(name, (0, 0, ""))[2] != _sha(data)]
            found.append(f"{rel}#{bad[0]} differs from the row" if bad else None)
    known = {name for row in rows for name, _ in formats.members(row, b"", row["model_digest"])}
    stray = sorted(set(index) - known)
    if stray:
        check.problems.append(f"{len(stray)} members of {rel} belong to no row, e.g. {stray[:EXAMPLES]}")
    return found


def validate(out: str, plan: SeedPlan, run_id: str, digest: str, fmt: str = "files") -> int:
    """After a run: every shard's part is this run's, with exactly its seeds, once each, sorted.
    Returns the row count; raises ManifestError naming the bad parts."""

    def one(shard: int) -> PartCheck:
        return check_part(out, shard, np.sort(plan.shard_seeds(shard)), run_id, digest, images=False, fmt=fmt)

    with ThreadPoolExecutor(16) as pool:
        checks = list(pool.map(one, range(plan.num_shards)))
    bad = [c for c in checks if c.status != "ok"]
    if bad:
        listed = "; ".join(c.line() for c in bad[:5])
        raise ManifestError(f"{out}: {len(bad)} manifest parts are not complete: {listed}")
    return sum(c.rows for c in checks)


@dataclass
class VerifyReport:
    """The result of `verify_output`; `lines()` is what the jobs print."""

    out: str
    run_id: str
    seeds_expected: int
    num_shards: int
    rows: int
    lost: int
    duplicated: int
    mismatched: int
    damaged: list[PartCheck]  # every part that is not ok, missing ones included
    extra: list[str]  # part files of shards the run does not have
    holder: str | None = None  # the live run writing OUT while it was checked, if any
    extra_tars: list[str] = field(default_factory=list)  # shards/<shard>.tar the run does not have

    @property
    def ok(self) -> bool:
        return not (
            self.damaged or self.extra or self.extra_tars or self.lost or self.duplicated or self.mismatched
        )

    @property
    def damaged_shards(self) -> list[int]:
        return sorted(c.shard for c in self.damaged)

    def counts(self) -> str:
        return f"seeds: expected {self.seeds_expected}, lost {self.lost}, duplicated {self.duplicated}, mismatched {self.mismatched}"

    def lines(self) -> list[str]:
        head = f"verify {self.out}: run {self.run_id}, {self.num_shards} parts, {self.rows} rows"
        out = [head] + (
            [f"  note: {self.holder} is writing it now; this is a snapshot"] if self.holder else []
        )
        out += [f"  {c.line()}" for c in self.damaged] + [
            f"  {name}: not a shard of this run" for name in self.extra + self.extra_tars
        ]
        out.append(self.counts())
        if self.ok:
            out.append("ok: every seed once, every image matches its sha256")
        else:
            out.append(
                f"damaged shards: {self.damaged_shards[:20]} ({len(self.damaged)}); rerun with --repair"
            )
        return out


@ray.remote(num_cpus=1)
def _check_task(out: str, shard: int, expected: np.ndarray, run_id: str, digest: str, fmt: str) -> PartCheck:
    return check_part(out, shard, expected, run_id, digest, images=True, fmt=fmt)


def verify_output(
    out: str, plan: SeedPlan | None = None, *, seeds_file: str | None = None, own_token: str | None = None
) -> VerifyReport:
    """Check every part and image of OUT against its run.json, one Ray task per shard (Ray must be
    initialized or startable). `plan` defaults to the one run.json describes; `own_token` is the
    caller's own hold on the lease (--repair), not reported as another writer."""
    info = manifest.read_run(out)
    if info is None:
        raise ManifestError(
            f"{storage.join(out, 'run.json')}: no such file: {out} is not a generation output"
        )
    plan = plan or manifest.plan_of_run(info, seeds_file)
    run_id, digest = info["run_id"], info["model_digest"]
    holder = lease.read(out)
    if holder and (holder.get("token") == own_token or lease.stale_reason(holder) is not None):
        holder = None
    if not ray.is_initialized():
        ray.init()
    refs = [
        _check_task.remote(out, s, np.sort(plan.shard_seeds(s)), run_id, digest, info["format"])
        for s in range(plan.num_shards)
    ]
    checks: list[PartCheck] = ray.get(refs)
    seeds = np.concatenate([c.seeds for c in checks] or [np.zeros(0, np.int64)])
    distinct = np.unique(seeds)
    expected = plan.seeds_at(np.arange(plan.count, dtype=np.int64))
    extra = [
        manifest.part_uri(out, s).rsplit("/", 1)[-1]
        for s in manifest.part_shards(out)
        if s >= plan.num_shards
    ]
    extra_tars = [
        f"shards/{manifest.shard_name(s)}.tar" for s in manifest.tar_shards(out) if s >= plan.num_shards
    ]
    return VerifyReport(
        out=out,
        run_id=run_id,
        seeds_expected=plan.count,
        num_shards=plan.num_shards,
        rows=len(seeds),
        lost=int(plan.count - np.isin(expected, distinct).sum()),
        duplicated=int(len(seeds) - len(distinct)),
        mismatched=sum(c.bad_rows for c in checks),
        damaged=[c for c in checks if c.status != "ok"],
        extra=extra,
        holder=lease.describe(holder) if holder else None,
        extra_tars=extra_tars,
    )
