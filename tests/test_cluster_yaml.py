"""cluster.yaml: valid for Ray's cluster launcher (offline) and shaped as the README promises;
least privilege: bucket-only worker profiles (docs/iam/), a localhost dashboard, and no secret
in what `--working-dir .` uploads.

The launcher's own code does the checking: `prepare_config` merges the AWS defaults exactly as
`ray up` does, and `validate_config` applies the autoscaler JSON schema shipped in the ray
package (ray/autoscaler/ray-schema.json). No cloud call is made. The upload is checked with Ray's
own packaging code, the one `ray job submit --working-dir` runs.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
IAM = REPO / "docs" / "iam"
IMAGE = "rayproject/ray:2.60.0-py311-gpu"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def launcher_view(config: dict) -> dict:
    """The config as `ray up` sees it after merging defaults; raises when the schema rejects it."""
    full = prepare_config(copy.deepcopy(config))
    validate_config(full)
    return full


def test_validates_against_the_autoscaler_schema(config):
    full = launcher_view(config)
    assert full["provider"]["type"] == "aws"
    assert full["head_node_type"] in full["available_node_types"]


def test_the_validator_rejects_a_broken_config(config):
    """The check above means something: the same validator refuses a misspelled key and a
    fractional resource count."""
    misspelled = copy.deepcopy(config)
    misspelled["available_node_types"]["h100"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        launcher_view(misspelled)
    fractional = copy.deepcopy(config)
    fractional["available_node_types"]["h100"]["resources"]["GPU"] = 7.5
    with pytest.raises(jsonschema.ValidationError):
        launcher_view(fractional)


def test_image_is_the_plain_ray_gpu_image_of_the_installed_ray(config):
    assert config["docker"]["image"] == IMAGE
    assert "head_image" not in config["docker"] and "worker_image" not in config["docker"]
    # A client and a cluster on different Ray versions fail at `ray job submit`: keep them equal.
    assert IMAGE.split(":")[1].split("-")[0] == ray.__version__


def test_h100_worker_group(config):
    workers = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    assert list(workers) == ["h100"]
    h100 = workers["h100"]
    assert h100["node_config"]["InstanceType"] == "p5.48xlarge"
    assert h100["resources"] == {"CPU": 192, "GPU": 8}
    assert 0 <= h100["min_workers"] <= h100["max_workers"] <= config["max_workers"]
    assert h100["max_workers"] >= 1
    # Workers write checkpoints to S3 through an instance profile, not copied keys, and not
    # through Ray's default profile (full EC2 + full S3).
    assert h100["node_config"]["IamInstanceProfile"] == {"Name": "inkseed-worker"}


def test_head_is_cpu_only(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] > 0
    # AWS GPU families are p*, g*, and the trn/inf accelerators: the head is none of them.
    assert not re.match(r"^(p|g|trn|inf)\d", head["node_config"]["InstanceType"])
    assert "min_workers" not in head or head["min_workers"] == 0
    assert head["node_config"]["IamInstanceProfile"] == {"Name": "inkseed-head"}


def test_setup_installs_inkseed_and_pinned_torch(config):
    assert config["file_mounts"]["~/inkseed"] == "."
    setup = "\n".join(config["setup_commands"])
    assert "pip install -e ~/inkseed" in setup
    assert "pip install torch==2.13.0" in setup
    # Local outputs and git history stay off the nodes.
    assert ".gitignore" in config["rsync_filter"]
    assert any(".git" in pattern for pattern in config["rsync_exclude"])


def test_token_auth_reaches_every_node(config):
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])


def test_the_dashboard_listens_on_localhost_only(config):
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()


def _statements(name: str) -> list[dict]:
    doc = json.loads((IAM / name).read_text())
    assert doc["Version"] == "2012-10-17"
    assert all(st["Effect"] == "Allow" for st in doc["Statement"])
    return doc["Statement"]


def _actions(st: dict) -> list[str]:
    return [st["Action"]] if isinstance(st["Action"], str) else st["Action"]


def test_the_worker_policy_allows_the_bucket_and_nothing_else():
    for st in _statements("worker-policy.json"):
        assert all(a.startswith("s3:") and "*" not in a for a in _actions(st)), st
        assert st["Resource"] in ("arn:aws:s3:::YOUR-BUCKET", "arn:aws:s3:::YOUR-BUCKET/*"), st
    actions = {a for st in _statements("worker-policy.json") for a in _actions(st)}
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions
    trust = json.loads((IAM / "ec2-trust-policy.json").read_text())["Statement"]
    assert trust == [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]


def test_the_head_policy_manages_only_this_clusters_nodes(config):
    statements = _statements("head-policy.json")
    for st in statements:
        assert not any(a == "*" or a.endswith(":*") for a in _actions(st)), st  # no service-wide grants
        if any(a.startswith("s3:") for a in _actions(st)):
            assert st["Resource"].startswith("arn:aws:s3:::YOUR-BUCKET"), st
    by_action = {a: st for st in statements for a in _actions(st)}
    terminate = by_action["ec2:TerminateInstances"]["Condition"]["StringEquals"]
    assert terminate == {"ec2:ResourceTag/ray-cluster-name": config["cluster_name"]}
    assert by_action["iam:PassRole"]["Resource"].endswith(":role/inkseed-worker")
    assert "iam:CreateRole" not in by_action and "iam:AttachRolePolicy" not in by_action


def test_secrets_stay_out_of_the_working_dir_upload(tmp_path):
    """What `ray job submit --working-dir .` would upload from a checkout holding secrets, built by
    Ray's own packaging code with this repository's .gitignore."""
    from ray._private.runtime_env.packaging import create_package

    checkout = tmp_path / "checkout"
    (checkout / "jobs").mkdir(parents=True)
    shutil.copy(REPO / ".gitignore", checkout / ".gitignore")
    files = {"jobs/train.py": "code", ".env": "WANDB_API_KEY=x", ".env.local": "AWS_SECRET_ACCESS_KEY=x",
             ".env.example": "WANDB_API_KEY=", "deploy.pem": "key", "jobs/credentials": "x",
             ".aws/credentials": "x", "gcp-credentials.json": "{}", ".netrc": "machine api.wandb.ai"}  # fmt: skip
    for name, text in files.items():
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text(text)
    package = tmp_path / "upload.zip"
    create_package(str(checkout), package, include_gitignore=True)
    uploaded = set(zipfile.ZipFile(package).namelist())
    assert {"jobs/train.py", ".env.example", ".gitignore"} <= uploaded
    leaked = {n for n in files if n not in ("jobs/train.py", ".env.example")} & uploaded
    assert not leaked, leaked
