"""pipeline/training/state.py and resume.py without a cluster: the optimizer state of a training
checkpoint, in today's layout (model.checkpoint's serialiser) and in the layout runs were
checkpointed with before it; a checkpoint written, verified and read back; and the fallback past
a damaged one (truncated, edited, cut short) to the one before, in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray.train
import torch

from model.checkpoint import load_state, optimizer_state_from_tensors, optimizer_state_to_tensors, save_state
from pipeline.training.config import TrainConfig, TrainError
from pipeline.training.resume import choose
from pipeline.training.state import (
    MANIFEST,
    CheckpointParts,
    TrainState,
    legacy_optimizer_state,
    read_checkpoint,
)

from builders import scrambled_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stepped_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def same_state(a: dict, b: dict) -> bool:
    return all(torch.equal(torch.as_tensor(a["state"][p][k]), torch.as_tensor(b["state"][p][k]))
               for p in a["state"] for k in a["state"][p]) and as_json(a["param_groups"]) == as_json(b["param_groups"])  # fmt: skip


def as_json(x: object) -> object:
    return json.loads(json.dumps(x))  # tuples (AdamW's betas) come back from JSON as lists


def test_todays_layout_round_trips_through_safetensors(tmp_path) -> None:
    model, opt = stepped_optimizer()
    save_state(tmp_path / "optimizer.safetensors", *optimizer_state_to_tensors(opt.state_dict()))
    restored = torch.optim.AdamW(model.parameters(), lr=1e-2)
    restored.load_state_dict(optimizer_state_from_tensors(*load_state(tmp_path / "optimizer.safetensors")))
    assert same_state(restored.state_dict(), opt.state_dict())


def test_a_run_checkpointed_in_the_old_layout_still_resumes() -> None:
    model, opt = stepped_optimizer()
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in sd["state"].items():  # the layout of the checkpoints before issue 11
        for name, value in entries.items():
            (tensors if torch.is_tensor(value) else scalars)[f"{pid}.{name}"] = value
    restored = torch.optim.AdamW(model.parameters(), lr=1e-2)
    restored.load_state_dict(legacy_optimizer_state(tensors, {"param_groups": sd["param_groups"], "scalars": scalars}))
    assert same_state(restored.state_dict(), sd)


# -- today's checkpoint directory: written, verified, read; the fallback past a corrupt one --------
CAPTIONS = ["a print of a ship at sea", "an etching of a windmill among the hills"]


def written_checkpoint(path: Path, seed: int, global_step: int) -> ray.train.Checkpoint:
    """A training checkpoint as CheckpointParts.write makes it, of a stepped tiny model."""
    model, tok = scrambled_tiny(CAPTIONS, seed=seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    state = TrainState(epoch=global_step // 10, global_step=global_step, val_loss=1.0,
                       setup={"data_digest": "ab", "batch_size": 8, "num_workers": 1, "total_steps": 30})  # fmt: skip
    CheckpointParts(model, tok, opt, sched, state, TrainConfig(name="unit")).write(str(path))
    return ray.train.Checkpoint.from_directory(str(path))


@pytest.fixture
def two(tmp_path: Path) -> list[tuple[ray.train.Checkpoint, dict]]:
    """Checkpoints of steps 10 and 20 (Ray's record of them: checkpoint, reported metrics)."""
    return [(written_checkpoint(tmp_path / f"epoch-{s // 10:04d}", s, s), {"global_step": s}) for s in (10, 20)]


def test_a_written_checkpoint_is_verified_and_read_back(two) -> None:
    checkpoint, _ = two[1]
    files = json.loads((Path(checkpoint.path) / MANIFEST).read_text())["sha256"]
    assert set(files) == {"optimizer.safetensors", "train_state.json", "model/config.json"}
    restored = read_checkpoint(checkpoint)
    assert (restored.state.global_step, restored.state.setup["total_steps"]) == (20, 30)
    assert restored.optimizer["param_groups"][0]["lr"] == 1e-3 and restored.prior_optimizer is None


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncate optimizer.safetensors", "optimizer.safetensors: sha256 mismatch: sha256.json expects"),
        ("bad train_state.json", "train_state.json: not readable as JSON"),
        ("edit train_state.json", "train_state.json: sha256 mismatch"),
        ("no sha256.json", "sha256.json: missing from the checkpoint"),
        ("truncate model weights", "model/model.safetensors: truncated or corrupt safetensors file"),
    ],
)
def test_a_damaged_checkpoint_falls_back_to_the_one_before_and_says_so(two, damage: str, expected: str) -> None:
    (earlier, _), (latest, _) = two
    root = Path(latest.path)
    if damage.startswith("truncate"):
        file = root / ("optimizer.safetensors" if "optimizer" in damage else "model/model.safetensors")
        file.write_bytes(file.read_bytes()[:100])
    elif damage == "bad train_state.json":
        (root / "train_state.json").write_text('{"state": {"epoch": 2,')
    elif damage == "edit train_state.json":
        text = (root / "train_state.json").read_text()
        (root / "train_state.json").write_text(text.replace('"global_step": 20', '"global_step": 21'))
    else:
        (root / MANIFEST).unlink()
    said: list[str] = []
    restored = choose(latest, lambda: two, "runs/unit", say=said.append)
    assert restored.checkpoint is earlier and restored.state.global_step == 10
    assert len(said) == 1 and said[0].startswith(f"checkpoint {root} is unusable ({root}/{expected}")
    assert said[0].endswith(f"; resuming from {earlier.path}")


def test_when_no_kept_checkpoint_is_usable_the_error_says_what_to_do(two) -> None:
    for checkpoint, _ in two:
        (Path(checkpoint.path) / "train_state.json").write_text("")
    with pytest.raises(TrainError) as failed:
        choose(two[1][0], lambda: two, "runs/unit", say=print)
    message = str(failed.value)
    assert message.startswith(f"checkpoint {two[1][0].path} is unusable ({two[1][0].path}/train_state.json: ")
    assert "the 1 earlier checkpoints kept are unusable too (num_to_keep)" in message
    assert message.endswith("start over: delete runs/unit or choose another --name")
