"""pipeline/training/state.py: the optimizer state of a training checkpoint, in today's layout
(model.checkpoint's serialiser) and in the layout runs were checkpointed with before it."""

from __future__ import annotations

import json

import torch

from model.checkpoint import load_state, optimizer_state_from_tensors, optimizer_state_to_tensors, save_state
from pipeline.training.state import legacy_optimizer_state


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
