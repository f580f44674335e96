"""inkseed's Ray side, one folder per stage; the module map (docs/architecture.md has the APIs).

Shared by every stage:
    storage.py         local paths and s3:// behind one API (read, atomic write, list, checkpoints)
    contact_sheet.py   the one contact-sheet renderer (PNG and HTML), and `python -m pipeline.contact_sheet OUT`

data/          datasets in: the embedded procedural engravings, and any user's image folder or Parquet
    grammar.py     the caption grammar: scenes, captions, the parser back
    plate.py       the engraving plate: supersampled canvas, hatching textures, drawing primitives
    scenes.py      subjects, settings, sky and birds drawn on a plate: `render(attrs, size, rng)`
    engrave.py     the procedural dataset: `make_sample`, `render_dataset` (imagefolder + contact sheet)
    openmoji.py    the real line-art development set: OpenMoji's black SVGs rasterized, captions by one rule
    sources.py     the input formats read on the driver: image folders, Parquet; captions cleaned
    paths.py       where a row may point (inside the dataset) and bounded, retried image reads
    decode.py      image decoding inside Ray Data tasks (bad rows marked, never raised)
    ingest.py      `read_dataset` / `load_dataset`: a Ray Dataset of model-ready rows, skip counts printed

training/      Ray Train: DDP training of the joint model, the latent prior, decoder sharpening
    config.py      `TrainConfig` (every field a flag of jobs.train), YAML loading, the run's model config
    driver.py      `run_training`: checks, tokenizer, datasets, TorchTrainer, export
    worker.py      `train_loop_per_worker`: the three phases in order; phase 1 epochs, validation, reports
    prior_phase.py phase 2: the latent prior fitted data parallel on posterior means
    sharpen_phase.py phase 3: decoder-only PatchGAN fine-tuning, the discriminator its own DDP module
    faults.py      injected worker failures for the resume tests (INKSEED_TRAIN_FAIL_AFTER)
    state.py       what a training checkpoint holds; write, report, restore (pickle-free)
    resume.py      which checkpoint a run resumes (falling back past corrupt ones), the setup check
    export.py      the exported checkpoint, replaced whole (written beside, then swapped)
    distributed.py all-reduce / all-gather helpers that also work with one worker
    metrics_log.py rank 0's metrics: W&B (offline without a key) and metrics.jsonl

generation/    Ray Data: mass generation with exactly-once resume
    config.py      `GenerateConfig` (every field a flag of jobs.generate)
    sampler.py     seeds from row numbers, the `SampleBatch` actor, the actor pool
    manifest.py    output layout, Parquet schema and part metadata, run.json, shards
    formats.py     a shard's images written and read per --format: files, webdataset tars, parquet
    stats.py       OUT/stats.json: counts, speed, per-stage time, caption and alignment statistics
    lease.py       one writer per output: the lease (run_id, heartbeat), refusal, stale takeover
    verify.py      which parts are done (resume), complete (end of run), sound (`--verify`, on Ray)
    errors.py      the one-line `error: ...` of the jobs, errors of Ray tasks rebuilt on the driver
    run.py         `run_generation`: checks, lease, run identity, the driver loop writing parts, repair
    chaos.py       fault injection: drivers and actors killed at random, then `--verify` (`python -m`)

evaluation/    quality, measured (jobs.evaluate)
    config.py      `EvaluateConfig` (every field a flag of jobs.evaluate)
    real.py        held-out real images of a split (uint8, captions, grammar attributes)
    probe.py       the attribute probe of the grammar datasets (network, training)
    freeform.py    the contrastive probe and the metrics of free-form-caption datasets
    probe_cache.py both probes' cache by dataset fingerprint
    metrics.py     pure metric functions (coherence, coverage, Fréchet, AUC, ...)
    batched.py     the sampling API over many inputs in fixed-size batches
    sections.py    report sections: grammar (coherence, fidelity, coverage, conditional), free-form
                   (retrieval, realism, captions), determinism, alignment
    targets.py     the quality targets and the printed table
    run.py         `run_evaluation`: report.json and the contact sheet
"""
