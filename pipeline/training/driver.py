"""The training driver: check the inputs, build the tokenizer and datasets, run Ray Train, export.

`run_training(cfg)` checks the inputs (a missing dataset, an unwritable storage path, too few
cluster resources, a resume or init_from with another model config, a resume with other data,
batch size or worker count: all before any work), picks the checkpoint to resume from (the
latest usable one: pipeline/training/resume.py), builds
the tokenizer from the training captions (saved once per run as `<run>/tokenizer.json` and reused
on resume, so token ids never shift under a checkpoint), reads the train/val datasets (Ray Data,
decoded once and cached in the object store), runs `TorchTrainer(train_loop_per_worker)`
(pipeline/training/worker.py) and exports the final model as a self-contained checkpoint
(model/checkpoint.py format) to `<storage_path>/<name>/export` (replaced whole:
pipeline/training/export.py).
"""

from __future__ import annotations

import dataclasses
import os

import pyarrow.fs as pafs
import ray
import ray.data
import ray.train
import ray.train.torch

from model.checkpoint import CheckpointError
from model.config import ModelConfig
from model.images import to_uint8
from model.tokenizer import CaptionTokenizer
from pipeline import storage
from pipeline.data.ingest import read_captions, read_dataset, read_options
from pipeline.training.config import TrainConfig, TrainError, model_config, run_dir
from pipeline.training.export import export_checkpoint
from pipeline.training.faults import injected_failures
from pipeline.training.resume import check_setup, choose, current_setup, run_checkpoints
from pipeline.training.state import Restored
from pipeline.training.worker import train_loop_per_worker


def check_inputs(cfg: TrainConfig) -> None:
    """Clear errors for a missing data URI and an unwritable storage path."""
    if not cfg.data:
        raise TrainError("no data URI given (TrainConfig.data / --data)")
    if not storage.exists(cfg.data):
        raise TrainError(f"data URI {cfg.data!r} does not exist (make one with `python -m jobs.prepare_data`)")
    if storage.is_dir(cfg.data):
        fs, path = storage.filesystem(cfg.data)
        if not fs.get_file_info(pafs.FileSelector(path)):
            raise TrainError(f"data URI {cfg.data!r} is an empty folder")
    try:
        storage.check_writable(cfg.storage_path)
    except storage.StorageError as e:
        raise TrainError(f"storage path: {e}") from e


def check_resources(cfg: TrainConfig) -> None:
    """Fail fast when the cluster cannot fit the workers (Ray would wait for them forever)."""
    have = ray.cluster_resources()
    need = {"CPU": cfg.num_workers * cfg.cpus_per_worker, "GPU": cfg.num_workers if cfg.use_gpu else 0}
    for res, amount in need.items():
        if amount > have.get(res, 0):
            raise TrainError(
                f"asked for {amount:g} {res} ({cfg.num_workers} workers x "
                f"{cfg.cpus_per_worker if res == 'CPU' else 1:g}) but the Ray cluster has "
                f"{have.get(res, 0):g}; lower --num-workers / cpus_per_worker, or set "
                "check_resources: false on an autoscaling cluster"
            )


def run_tokenizer(cfg: TrainConfig) -> CaptionTokenizer:
    """The run's tokenizer: trained on the training captions on the first attempt and saved
    in the run folder, reloaded from there on resume (so ids never shift under a checkpoint)."""
    uri = storage.join(run_dir(cfg), "tokenizer.json")
    if storage.exists(uri):
        try:
            return CaptionTokenizer.from_json(storage.read_bytes(uri).decode())
        except storage.StorageError:
            raise
        except Exception as e:  # noqa: BLE001  (tokenizers raises plain Exception subclasses)
            raise TrainError(
                f"{uri} is not a valid tokenizer ({storage.describe(e)}): restore it, or start a new run "
                "with another --name"
            ) from e
    if cfg.init_from:  # the weights' token ids
        tokenizer = storage.open_checkpoint(cfg.init_from).tokenizer
        storage.write_bytes(uri, tokenizer.to_json().encode())
        return tokenizer
    captions = read_captions(cfg.data, split="train", **read_options(cfg))
    if not captions:
        raise TrainError(f"data URI {cfg.data!r} has no training captions")
    tokenizer = CaptionTokenizer.train(captions)
    storage.write_bytes(uri, tokenizer.to_json().encode())
    return tokenizer


def build_datasets(
    cfg: TrainConfig, tokenizer: CaptionTokenizer, mc: ModelConfig
) -> tuple[dict[str, ray.data.Dataset], dict[str, int], dict[str, list]]:
    """Train/val datasets reduced to the `image` and `tokens` columns, their row counts, and
    a few validation (image uint8, caption) pairs for the per-epoch samples table."""
    datasets, counts = {}, {}
    preview: dict[str, list] = {"images": [], "captions": []}
    for split, cap in (("train", cfg.max_train_samples), ("val", cfg.max_val_samples)):
        ds = read_dataset(
            cfg.data, image_size=mc.image_size, split=split, tokenizer=tokenizer,
            max_caption_tokens=mc.max_caption_tokens, **read_options(cfg),
        )
        if split == "val" and cfg.log_samples:
            rows = ds.take(cfg.log_samples)
            preview["images"] = [to_uint8(r["image"]) for r in rows]
            preview["captions"] = [r["caption"] for r in rows]
        ds = ds.select_columns(["image", "tokens"])
        if split == "train":
            # Once, before caching: datasets are often stored in groups (OpenMoji by category),
            # and batches drawn in file order through a local buffer would each hold one group;
            # that non-iid stream kept the decoder from learning anything but a blob.
            ds = ds.random_shuffle(seed=cfg.seed)
        if cap:
            ds = ds.limit(cap)
        if cfg.cache_data:
            ds = ds.materialize()
        datasets[split], counts[split] = ds, ds.count()
    return datasets, counts, preview


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local storage and init_from paths made absolute: workers run in Ray's own working
    directory, where a relative path would put the metrics and W&B files beside nothing."""
    if not storage.is_s3(cfg.storage_path):
        cfg = dataclasses.replace(cfg, storage_path=os.path.abspath(cfg.storage_path))
    if cfg.init_from and not storage.is_s3(cfg.init_from):
        cfg = dataclasses.replace(cfg, init_from=os.path.abspath(cfg.init_from))
    return cfg


def run_training(cfg: TrainConfig, made_by: dict[str, str] | None = None) -> str:
    """Train (or resume) the run `<storage_path>/<name>`; returns the exported checkpoint URI.
    Every check that needs no cluster comes first, then Ray starts (or is joined, under
    `ray job submit`) and the cluster's resources are checked. `made_by` (jobs.train's command
    line and config file) is recorded in every checkpoint's config.json."""
    cfg = absolute_paths(cfg)
    check_inputs(cfg)
    export = storage.join(run_dir(cfg), "export")
    latest, kept = run_checkpoints(cfg)
    restored = choose(latest, lambda: kept, run_dir(cfg))
    if restored is not None and restored.state.finished(cfg):  # the run ended: nothing to train
        return export_checkpoint(restored.checkpoint, export)
    mc = model_config(cfg)
    setup = current_setup(cfg)
    if restored is not None:
        check_resumable(restored, mc, run_dir(cfg))
        check_setup(restored.state.setup, setup, cfg)
    elif cfg.init_from:
        check_init_from(cfg.init_from, mc)
    if not ray.is_initialized():
        ray.init()
    if cfg.check_resources:
        check_resources(cfg)
    tokenizer = run_tokenizer(cfg)
    datasets, counts, preview = build_datasets(cfg, tokenizer, mc)
    steps_per_epoch = counts["train"] // cfg.num_workers // cfg.batch_size
    if steps_per_epoch == 0:
        raise TrainError(
            f"{counts['train']} training rows cannot fill one batch of {cfg.batch_size} on each of "
            f"{cfg.num_workers} workers; lower --batch-size or --num-workers"
        )
    config = {
        "train": cfg.to_dict(),
        "model": mc.to_dict(),
        "tokenizer": tokenizer.to_json(),
        "steps_per_epoch": steps_per_epoch,
        "setup": setup,
        "counts": counts,
        "preview": preview,
        "fail_after": injected_failures(),  # tests only (pipeline/training/faults.py)
        "made_by": made_by or {},
    }
    result = trainer(cfg, config, datasets).fit()
    return export_checkpoint(result.checkpoint, export)


def _config_changes(saved: ModelConfig, mc: ModelConfig) -> list[str]:
    """The model config fields that differ, as "name old -> new"."""
    before, now = saved.to_dict(), mc.to_dict()
    return [f"{k} {before.get(k)!r} -> {v!r}" for k, v in now.items() if before.get(k) != v]


def check_resumable(restored: Restored, mc: ModelConfig, run: str) -> None:
    """Resuming continues the same model: refuse (before any work) a run whose checkpoint was
    made with another model config (another preset, image size, loss weights, or code defaults)."""
    changed = _config_changes(restored.config, mc)
    if changed:
        raise TrainError(
            f"run {run} was started with another model config ({'; '.join(changed)}): resume it with "
            "the settings and code it started with, or start a new run with another --name"
        )


def check_init_from(uri: str, mc: ModelConfig) -> None:
    """init_from must be a checkpoint of the same model config (checked before any work)."""
    try:
        saved = storage.open_checkpoint(uri).config
    except (CheckpointError, storage.StorageError) as e:
        raise TrainError(f"init_from {uri!r} is not an exported checkpoint: {e}") from e
    changed = _config_changes(saved, mc)
    if changed:
        raise TrainError(
            f"init_from {uri!r} has another model config ({'; '.join(changed)}): train with its "
            "preset, image size and loss weights"
        )


def trainer(cfg: TrainConfig, loop_config: dict, datasets: dict) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer of run `cfg.name`: its workers, storage and checkpoint policy."""
    fs, path = storage.filesystem(cfg.storage_path)
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.num_to_keep,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=datasets,
    )
