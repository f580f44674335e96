"""Tests of pipeline/training/ and jobs/train.py: real Ray Train runs of the tiny model on CPU.

One 2-worker DDP run (gloo) through all three phases (joint, prior, decoder sharpening), killed
once in each (after epoch 1, prior epoch 10 and sharpen step 3), serves several tests: the data
is sharded, the losses fall, Ray Train's FailureConfig resumes each phase from its checkpoint and
the schedule continues, sharpening trains the decoder alone, the exported checkpoint loads and
generates, and W&B's offline files hold the metrics. A second run on s3:// storage (moto) is
stopped by a failure and resumed by running it again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_builders import TINY, failing, metrics_rows, tiny

from jobs.train import parse_args, provenance, smoke_test_config
from model.checkpoint import load_checkpoint
from pipeline import storage
from pipeline.training.config import TrainError, load_train_config
from pipeline.training.driver import run_training
from pipeline.training.metrics_log import wandb_run_id

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ddp_run(ray_local, data, tmp_path_factory):
    """2 workers, 3 epochs, 20 prior epochs, 6 sharpen steps (configs/tiny.yaml); every worker
    raises once in each phase, right after a checkpoint (max_failures 3)."""
    cfg = tiny(data, str(tmp_path_factory.mktemp("runs")), "ddp", num_workers=2, max_failures=3, log_every=1)
    with failing(epoch=1, prior_epoch=10, sharpen_step=3):
        export = run_training(cfg)
    return cfg, export, metrics_rows(cfg, "epoch")


@pytest.mark.slow  # a Ray Train run
def test_two_workers_each_train_on_half_the_data(ddp_run, data):
    cfg, _, epochs = ddp_run
    n_train = sum(1 for _ in open(os.path.join(data, "metadata.jsonl"))) * 0.9  # ~10% is val
    for row in epochs:
        per_worker = row["perf/samples_per_worker"]
        assert len(per_worker) == 2
        assert per_worker[0] == per_worker[1]  # equal split: DDP steps stay in lockstep
        assert 0.35 * n_train <= per_worker[0] <= 0.5 * n_train
        assert row["perf/samples_per_s"] > 0


@pytest.mark.slow  # a Ray Train run
def test_losses_fall(ddp_run):
    _, _, epochs = ddp_run
    assert epochs[-1]["train_epoch/loss_total"] < 0.8 * epochs[0]["train_epoch/loss_total"]
    assert epochs[-1]["val/loss_total"] < epochs[0]["val/loss_total"]
    for key in ("val/image_mse", "val/caption_perplexity", "train_epoch/grad_norm", "perf/rss_gb"):
        assert all(np.isfinite(r[key]) for r in epochs)


@pytest.mark.slow  # a Ray Train run
def test_failure_resumes_from_the_epoch_1_checkpoint(ddp_run):
    """Epoch 1 ran once: after the injected failure, Ray Train restarted the workers from
    epoch 1's checkpoint (epoch 2 continues its step count), not from scratch."""
    cfg, _, epochs = ddp_run
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    steps = epochs[0]["global_step"]
    assert [r["global_step"] for r in epochs] == [steps, 2 * steps, 3 * steps]
    run = Path(cfg.storage_path) / cfg.name
    assert (run / "final" / "train_state.json").exists()
    assert len(list(run.glob("epoch-*"))) <= cfg.num_to_keep


@pytest.mark.slow  # a Ray Train run
def test_each_phase_resumes_mid_phase_and_its_schedule_continues(ddp_run):
    """After the failure at prior epoch 10 the prior went on from its prior-0010 checkpoint, and
    after the one at sharpen step 3 sharpening went on from step 4: no step ran twice, none was
    skipped, and no earlier phase was redone."""
    cfg, _, _ = ddp_run
    prior = metrics_rows(cfg, "prior")
    summary = [r for r in prior if "prior/start_epoch" in r]
    assert len(summary) == 1 and summary[0]["prior/start_epoch"] == 10 and summary[0]["prior_epoch"] == 20
    assert [r["prior/step"] for r in prior if "prior/step" in r] == list(range(1, int(summary[0]["prior/steps"]) + 1))
    sharpen = metrics_rows(cfg, "sharpen")
    assert [r["sharpen/step"] for r in sharpen if "sharpen/step" in r] == list(range(1, cfg.sharpen.steps + 1))
    (done,) = [r for r in sharpen if "sharpen/start_step" in r]
    assert done["sharpen/start_step"] == 3 and done["sharpen_step"] == cfg.sharpen.steps
    # The adversarial term is off for warmup_steps, then weighted by the (capped) adaptive weight.
    weights = [r["sharpen/weight"] for r in sharpen if "sharpen/step" in r]
    assert weights[: cfg.sharpen.warmup_steps] == [0.0] * cfg.sharpen.warmup_steps
    assert all(0 < w <= cfg.sharpen.max_weight * cfg.sharpen.adv_weight + 1e-6 for w in weights[cfg.sharpen.warmup_steps :])
    state = json.loads((Path(cfg.storage_path) / cfg.name / "final" / "train_state.json").read_text())["state"]
    assert (state["phase"], state["prior_epoch"], state["sharpen_step"]) == ("done", 20, cfg.sharpen.steps)


@pytest.mark.slow  # a Ray Train run
def test_sharpening_trains_the_image_decoder_alone(ddp_run):
    """Between the sharpen-000003 checkpoint and the final one only image_decoder.* weights moved:
    the latent, the captions and the prior stay what phases 1 and 2 made. The discriminator
    lives in the training checkpoints, never in the export."""
    cfg, export, _ = ddp_run
    run = Path(cfg.storage_path) / cfg.name
    mid = load_file(str(run / "sharpen-000003" / "model" / "model.safetensors"))
    end = load_file(str(run / "final" / "model" / "model.safetensors"))
    moved = {k for k in end if not torch.equal(end[k], mid[k])}
    assert moved and all(k.startswith("image_decoder.") for k in moved), sorted(moved)[:5]
    assert (run / "final" / "discriminator.safetensors").is_file()
    assert not any("disc" in p.name for p in Path(export).iterdir())
    assert load_file(str(Path(export) / "model.safetensors")).keys() == end.keys()


@pytest.mark.slow  # a Ray Train run
def test_exported_checkpoint_loads_and_generates(ddp_run):
    cfg, export, _ = ddp_run
    assert export == os.path.join(cfg.storage_path, cfg.name, "export")
    ink = load_checkpoint(export)
    assert ink.extra["phase"] == "done" and ink.extra["run"] == "ddp"
    assert ink.config.image_size == 32
    # Phase 2 fitted the prior's standardization on the training latents.
    assert not torch.allclose(ink.model.prior.latent_std, torch.ones_like(ink.model.prior.latent_std))
    samples = ink.generate([0, 1, 2])
    assert samples.images.shape == (3, 32, 32) and samples.images.dtype == np.uint8
    assert len(samples.captions) == 3 and all(isinstance(c, str) for c in samples.captions)
    again = ink.generate([1])
    assert again.captions[0] == samples.captions[1]


@pytest.mark.slow  # a Ray Train run
def test_a_new_run_starts_from_an_exported_checkpoint(ddp_run, ray_local, data, tmp_path):
    """init_from: the new run starts from the export's weights and tokenizer (its first epoch
    begins where the old run ended, far below a fresh start); another model config is refused."""
    cfg, export, epochs = ddp_run
    with pytest.raises(TrainError, match=r"another model config \(image_size 32 -> 16; "):
        run_training(tiny(data, str(tmp_path), "bad", init_from=export, image_size=16))
    with pytest.raises(TrainError, match="not an exported checkpoint: .*does not exist"):
        run_training(tiny(data, str(tmp_path), "bad", init_from=str(tmp_path / "nowhere")))
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
    more = tiny(data, str(tmp_path), "more", init_from=export, epochs=1, lr=1e-4, log_samples=0,
                wandb_mode="disabled")
    run_training(more)
    assert (tmp_path / "more" / "tokenizer.json").read_text() == (Path(export) / "tokenizer.json").read_text()
    first = metrics_rows(more, "epoch")[0]
    assert first["train_epoch/loss_total"] < 0.8 * epochs[0]["train_epoch/loss_total"]
    assert first["val/loss_total"] < 1.1 * epochs[-1]["val/loss_total"]


@pytest.mark.slow  # a Ray Train run
def test_wandb_offline_files_hold_the_metrics(ddp_run):
    cfg, _, _ = ddp_run
    run_id = wandb_run_id(cfg.storage_path, cfg.name)
    wandb_root = Path(cfg.storage_path) / cfg.name / "wandb" / "wandb"
    runs = sorted(wandb_root.glob("offline-run-*"))
    # One offline run per attempt (the first and one after each failure), all under the same run id.
    assert len(runs) == 4 and all(r.name.endswith(run_id) for r in runs)
    records = b"".join((r / f"run-{run_id}.wandb").read_bytes() for r in runs)
    for name in (
        "train/loss_total", "train/caption_ce", "train/grad_norm", "train/lr", "train_epoch/image_mse",
        "val/loss_total", "val/caption_accuracy", "val/caption_perplexity", "val/latent_std",
        "perf/samples_per_s", "perf/epoch_time_s", "perf/rss_gb", "samples/table", "prior/loss",
        "sharpen/rec", "sharpen/disc", "sharpen/adv", "sharpen/weight", "sharpen/prior_sharpness",
    ):
        assert name.encode() in records, name
    media = runs[-1] / "files" / "media"
    assert list(media.rglob("*.table.json")) and list(media.rglob("*.png"))  # samples table + gallery


@pytest.mark.slow  # a Ray Train run
def test_stopped_run_resumes_when_run_again_on_s3(ray_local, data):
    """max_failures=0: the injected failure ends the job; the same command with another model is
    refused, the same command again continues from epoch 1's checkpoint on S3, and a third run of
    the finished job only re-exports."""
    cfg = tiny(data, "s3://inkseed-test/runs", "resume", epochs=2, max_failures=0, log_samples=0,
               wandb_mode="disabled")
    with failing(epoch=1), pytest.raises(Exception, match="injected failure after epoch 1"):
        run_training(cfg)
    assert [r["epoch"] for r in metrics_rows(cfg, "epoch")] == [1]
    with pytest.raises(TrainError, match=r"another model config \(image_size 32 -> 16; channels "):
        run_training(cfg.replace(image_size=16))  # a different model cannot continue this run
    export = run_training(cfg)
    assert [r["epoch"] for r in metrics_rows(cfg, "epoch")] == [1, 2]
    assert export == "s3://inkseed-test/runs/resume/export"
    assert storage.exists(storage.join(export, "model.safetensors"))
    assert run_training(cfg) == export
    assert [r["epoch"] for r in metrics_rows(cfg, "epoch")] == [1, 2]


def test_clear_errors_before_training(ray_local, data, tmp_path):
    base = tiny(data, str(tmp_path / "runs"), "errors")
    with pytest.raises(TrainError, match="does not exist"):
        run_training(base.replace(data=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainError, match="empty folder"):
        run_training(base.replace(data=str(tmp_path / "empty")))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(TrainError, match="not writable"):
        run_training(base.replace(storage_path=str(tmp_path / "a-file" / "runs")))
    with pytest.raises(TrainError, match="asked for 64 CPU"):
        run_training(base.replace(num_workers=64))
    assert not (tmp_path / "runs" / "errors").exists()


def test_config_file_and_cli_overrides(tmp_path):
    cfg = parse_args(["--config", TINY, "--epochs", "7", "--num-workers", "2", "--loss-weights", "kl", "0.01",
                      "--storage-path", "s3://b/runs", "--use-gpu"])
    assert (cfg.preset, cfg.epochs, cfg.num_workers, cfg.use_gpu) == ("tiny", 7, 2, True)
    assert cfg.loss_weights == {"kl": 0.01} and cfg.storage_path == "s3://b/runs"
    assert cfg.batch_size == load_train_config(TINY).batch_size  # YAML over defaults, flags over YAML
    with pytest.raises(SystemExit):  # tyro: a value outside the Literal is refused before any work
        parse_args(["--preset", "huge"])
    smoke = smoke_test_config(cfg)
    assert (smoke.epochs, smoke.preset, smoke.name) == (1, "tiny", "inkseed-tiny-smoke")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nbatchsize: 8\n")
    with pytest.raises(ValueError, match="batchsize"):
        load_train_config(str(bad))
    with pytest.raises(ValueError, match="unknown loss weight"):
        from pipeline.training.config import model_config

        model_config(cfg.replace(loss_weights={"klx": 1.0}))


@pytest.mark.slow  # a Ray Train run
def test_early_stopping_ends_phase_one(ray_local, data, tmp_path):
    """With a learning rate too small to move the weights the val loss never improves after epoch
    1, so patience 1 must end phase 1 after epoch 2 (of 5) and go on to the prior."""
    cfg = tiny(data, str(tmp_path), "early", epochs=5, patience=1, lr=1e-12, warmup_steps=1, log_samples=0,
               prior_epochs=2)  # fmt: skip
    export = run_training(cfg)
    epochs = metrics_rows(cfg, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2] and epochs[-1]["val/bad_epochs"] == 1
    assert load_checkpoint(export).extra["phase"] == "done"


@pytest.mark.slow  # a Ray Train run
def test_a_diverging_run_stops_with_a_clear_error(ray_local, data, tmp_path):
    """A learning rate that blows the weights up must stop the run on the first non-finite loss,
    naming it, instead of writing NaN weights into checkpoints (the export would refuse them)."""
    cfg = tiny(data, str(tmp_path), "nan", epochs=2, lr=1e30, warmup_steps=1, grad_clip=1e30, max_failures=0,
               log_samples=0)  # fmt: skip
    with pytest.raises(Exception, match="non-finite training loss at step"):
        run_training(cfg)
    assert not (tmp_path / "nan" / "export").exists()


@pytest.mark.slow  # a Ray Train run
def test_model_overrides_reach_the_workers(ray_local, data, tmp_path):
    """Model overrides from the config reach the workers: a wide decoder (decoder_widths, a list in
    YAML) and the ink cross-entropy train under Ray Train, the last weights are kept, and the
    export generates; an unknown field is an error naming it."""
    cfg = tiny(data, str(tmp_path), "design", epochs=2, log_samples=0, prior_epochs=2, weights="last",
               model={"decoder_widths": [0, 16, 16, 8]}, loss_weights={"image_bce": 1.0})  # fmt: skip
    made_by = provenance(["--config", TINY, "--epochs", "2"])
    export = run_training(cfg, made_by=made_by)
    assert "train_epoch/image_bce" in metrics_rows(cfg, "epoch")[-1]
    ck = load_checkpoint(export)
    # The checkpoint records what made it: the command line and the config file's text.
    assert ck.extra["command"] == f"python -m jobs.train --config {TINY} --epochs 2"
    assert ck.extra["config_yaml"] == Path(TINY).read_text() and ck.extra["sharpen_step"] == cfg.sharpen.steps
    assert ck.config.decoder_widths == (0, 16, 16, 8) and ck.config.loss_weights["image_bce"] == 1.0
    assert any(k.startswith("image_decoder.wide.") for k in ck.model.state_dict())
    out = ck.generate([0, 1])
    assert out.images.shape == (2, 32, 32) and all(out.captions)
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        from pipeline.training.config import model_config

        model_config(cfg.replace(model={"detail_channels": 2}))


@pytest.mark.slow  # ~110 M parameters at 512 px on a CPU: a few steps take a minute or two
def test_the_large_preset_trains_every_phase_at_512_px(ray_local, tmp_path):
    """The `large` preset (H100 clusters) is exercised, not only declared: two joint steps, one
    prior epoch and one sharpening step at 512 px through Ray Train, and the export generates."""
    from pipeline.data.engrave import render_dataset

    data = str(tmp_path / "data")
    render_dataset(data, count=24, size=512, seed=0)
    cfg = tiny(data, str(tmp_path / "runs"), "large", preset="large", image_size=None, epochs=1, batch_size=2,
               max_train_samples=4, max_val_samples=2, prior_epochs=1, prior_batch_size=4, log_samples=0,
               wandb_mode="disabled", num_to_keep=1, precision="fp32",
               sharpen={"steps": 1, "warmup_steps": 0, "prior_bank": 2, "disc_channels": [8, 16]})  # fmt: skip
    export = run_training(cfg)
    assert [r["epoch"] for r in metrics_rows(cfg, "epoch")] == [1]
    assert [r["sharpen/step"] for r in metrics_rows(cfg, "sharpen") if "sharpen/step" in r] == [1]
    ck = load_checkpoint(export)
    assert ck.config.image_size == 512 and ck.config.z_dim == 256
    out = ck.generate([0], steps=2)
    assert out.images.shape == (1, 512, 512) and isinstance(out.captions[0], str)
