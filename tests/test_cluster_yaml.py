"""cluster.yaml: valid for Ray's cluster launcher (offline) and shaped as the README promises.

The launcher's own code does the checking: `prepare_config` merges the AWS defaults exactly as
`ray up` does, and `validate_config` applies the autoscaler JSON schema shipped in the ray
package (ray/autoscaler/ray-schema.json). No cloud call is made.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
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
    # Workers write checkpoints to S3 through an instance profile, not copied keys.
    assert "IamInstanceProfile" in h100["node_config"]


def test_head_is_cpu_only(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] > 0
    # AWS GPU families are p*, g*, and the trn/inf accelerators: the head is none of them.
    assert not re.match(r"^(p|g|trn|inf)\d", head["node_config"]["InstanceType"])
    assert "min_workers" not in head or head["min_workers"] == 0


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
