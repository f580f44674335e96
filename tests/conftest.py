"""Shared fixtures: a real local S3 server (moto), a real local Ray cluster, and one torch thread
per module. Shared data builders (plain functions) are in builders.py."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def wandb_under_tmp(tmp_path_factory):
    """W&B's folders (runs of s3:// storage, cache, config, staged media) under pytest's tmp dir,
    not in the system temp dir or ~. Set before Ray starts, so its workers inherit them."""
    root = tmp_path_factory.mktemp("wandb")
    env = {name: str(root / name.lower()) for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, with AWS_* variables pointing at it and a bucket
    `inkseed-test`. Yields the endpoint URL. Started before Ray so Ray workers inherit the env."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="inkseed-test")
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A small real local Ray cluster shared by the session. 4 logical CPUs on 2 cores so a
    2-worker training run or an actor pool still leaves room for Ray Data's read tasks."""
    import ray

    ray.init(
        num_cpus=4,
        object_store_memory=2 * 1024**3,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def openmoji_source() -> Path:
    """The openmoji npm package folder: the configured one ($INKSEED_OPENMOJI, the fetch cache), else
    fetched now with scripts/fetch_openmoji.sh (the npm registry is reachable; no skip)."""
    from pipeline.data import openmoji

    try:
        return openmoji.find_source()
    except openmoji.OpenMojiError:
        done = subprocess.run(
            ["bash", str(Path(__file__).resolve().parents[1] / "scripts" / "fetch_openmoji.sh")],
            check=True, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        return openmoji.find_source(done.stdout.strip())


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: on a shared 2-core machine, two spin-waiting threads
    run ~4x slower. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
