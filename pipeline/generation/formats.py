"""Writing and reading a shard's images in each output format (the layouts are in manifest.py).

    files       the actors write OUT/images/<shard>/<seed>.png; the driver writes the part
    webdataset  the actors return PNG bytes; the driver assembles OUT/shards/<shard>.tar once the
                shard is complete, writes it atomically and durably, then the part
    parquet     the actors return PNG bytes; the driver writes them into the part (`image` column)

A tar is built in memory, seed by seed in seed order (<seed>.png, <seed>.txt, <seed>.json: the
grouping by key that webdataset expects), with every header field fixed (ustar, mtime 0, uid/gid
0, mode 0644), so the same shard always gives the same bytes. `tar_index` streams a tar back in
one sequential read (verification); `read_images` fetches single images in any format (the
contact sheet), a tar member with one ranged read.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.generation import manifest

# The manifest columns a tar's <seed>.json holds: not created_at or run_id (a regenerated shard is
# byte-identical), nor the member offsets (the reader has the tar).
JSON_COLUMNS = ("seed", "shard", "caption", "image_path", "image_sha256", "width", "height", "alignment")


def json_member(row: dict, model_digest: str) -> bytes:
    """The <seed>.json member of a manifest row (a dict with at least JSON_COLUMNS)."""
    content = {k: row[k] for k in JSON_COLUMNS}
    content["model_digest"] = model_digest
    return json.dumps(content).encode()


def members(row: dict, png: bytes, model_digest: str) -> list[tuple[str, bytes]]:
    """A seed's tar members, in order: (name, data)."""
    seed = row["seed"]
    return [
        (f"{seed}.png", png),
        (f"{seed}.txt", row["caption"].encode()),
        (f"{seed}.json", json_member(row, model_digest)),
    ]


def build_tar(rows: list[dict], pngs: list[bytes], model_digest: str) -> tuple[bytes, list[int]]:
    """A shard's tar from its rows (sorted by seed) and their PNG bytes; returns the tar's bytes
    and each PNG member's data offset."""
    buf, offsets = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for row, png in zip(rows, pngs):
            for name, data in members(row, png, model_digest):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644  # uid/gid 0, no user names
                if name.endswith(".png"):
                    offsets.append(tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors)))
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), offsets


def write_shard(
    out: str, fmt: str, shard: int, columns: dict[str, list], model_digest: str, run_id: str
) -> None:
    """Write one complete shard in format `fmt`: `columns` holds manifest.WORKER_COLUMNS, plus
    `png` (the PNG bytes) for webdataset and parquet. The part is always written last."""
    if fmt == "files":
        manifest.write_part(out, shard, columns, model_digest, run_id)
        return
    order = np.argsort(np.asarray(columns["seed"], dtype=np.int64), kind="stable")
    columns = {name: [values[i] for i in order] for name, values in columns.items()}
    pngs = columns.pop("png")
    meta = {}
    if fmt == "webdataset":
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        data, offsets = build_tar(rows, pngs, model_digest)
        storage.write_bytes(manifest.tar_uri(out, shard), data, durable=True)
        columns["tar_offset"], columns["tar_size"] = offsets, [len(p) for p in pngs]
        meta[manifest.TAR_META] = str(len(data))
    else:
        columns["image"] = [{"bytes": p, "path": f"{s}.png"} for s, p in zip(columns["seed"], pngs)]
    manifest.write_part(out, shard, columns, model_digest, run_id, fmt, meta)


def tar_index(out: str, shard: int) -> dict[str, tuple[int, int, str]]:
    """Every member of a shard's tar: name -> (data offset, size, hex sha256 of the data), in one
    sequential read. Raises StorageError naming the tar when it is missing or not a tar."""
    uri = manifest.tar_uri(out, shard)
    fs, path = storage.filesystem(uri)
    index = {}
    try:
        with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                data = tar.extractfile(m).read() if m.isfile() else b""
                index[m.name] = (m.offset_data, m.size, hashlib.sha256(data).hexdigest())
    except FileNotFoundError as e:
        raise storage.StorageError(f"{uri}: no such file") from e
    except Exception as e:  # noqa: BLE001  (tarfile.ReadError, OSError, a backend error: unusable)
        raise storage.StorageError(f"{uri}: unreadable ({storage.describe(e)})") from e
    return index


def read_images(out: str, rows: list[dict]) -> list[bytes]:
    """The PNG bytes of manifest rows (each with image_path, seed, and tar_offset / tar_size for a
    webdataset output), whatever the format: one read per image file or tar member, one per part."""
    found: dict[int, bytes] = {}
    by_part: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        container, _, member = row["image_path"].partition("#")
        uri = storage.join(out, container)
        if not member:
            found[i] = storage.read_bytes(uri)
        elif container.endswith(".tar"):
            fs, path = storage.filesystem(uri)
            try:
                with fs.open_input_file(path) as f:
                    found[i] = f.read_at(row["tar_size"], row["tar_offset"])
            except Exception as e:  # noqa: BLE001
                raise storage.StorageError(f"read {uri}: {storage.describe(e)}") from e
        else:
            by_part[uri].append(i)
    for uri, picked in by_part.items():
        fs, path = storage.filesystem(uri)
        seeds = [rows[i]["seed"] for i in picked]
        try:
            table = pq.read_table(
                path, filesystem=fs, columns=["seed", "image"], filters=[("seed", "in", seeds)]
            )
        except Exception as e:  # noqa: BLE001
            raise storage.StorageError(f"read {uri}: {storage.describe(e)}") from e
        images = dict(zip(table["seed"].to_pylist(), (v["bytes"] for v in table["image"].to_pylist())))
        for i in picked:
            if rows[i]["seed"] not in images:
                raise storage.StorageError(f"{uri}: no image for seed {rows[i]['seed']}")
            found[i] = images[rows[i]["seed"]]
    return [found[i] for i in range(len(rows))]
