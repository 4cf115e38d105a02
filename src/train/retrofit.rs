//! `train`: the retrofit loop, read top to bottom like nanoGPT's. [`Retrofit::load`] opens the
//! model, the data and the frozen teacher; [`Retrofit::resume`] continues from the newest
//! checkpoint; each step is [`Retrofit::gradients`], the optimizer, then [`Retrofit::read_metrics`]
//! (the step's scalars are read back only once its update is queued); after it come the metrics
//! line, the held-out evaluation, the cr-K snapshots and the checkpoints, all in the run folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use indicatif::{ProgressBar, ProgressStyle};

use super::collective::{
    Collective, InProcessGroup, ParamOwners, RankAborted, Single, all_reduce_gradients,
};
use super::plot::{self, EvalMetrics, MetricLine, TrainMetrics};
use super::trainer::{
    AdamWRecord, EvalSettings, PendingStats, StepSetup, TrainOptions, TrainSummary, append_metrics,
    apply_trainable, check_graph_layers, clip_global_norm, count_params, distillation_micro_step,
    evaluate, interrupt_flag, last_metrics, make_batch, moments_in_param_dtypes, param_dtypes,
    read_scalar, resolve_source, summarize, truncate_metrics,
};
use crate::atomic;
use crate::checkpoint::Checkpoint;
use crate::data::ChatTemplate;
use crate::data::dataset::{Dataset, Sequence, sample_index};
use crate::dms::noise::NoiseKey;
use crate::dms::{CompressionSchedule, DmsConfig, DmsModel};
use crate::model::{Decoder, FloatFormat, ModelConfig};
use crate::ops::attention::TrainBackend;
use crate::recipe::{Recipe, Trainable};
use crate::run::RunFolder;
use crate::run::snapshot::{self, SnapshotState};

type Adam<B> = OptimizerAdaptor<AdamW, DmsModel<B>, B>;

/// Runs (or resumes) a retrofit described by `recipe` on `device`.
pub fn train<B: TrainBackend>(
    recipe: &Recipe,
    options: &TrainOptions,
    format: FloatFormat,
    device: &B::Device,
) -> Result<TrainSummary> {
    train_ranks::<B>(recipe, options, format, std::slice::from_ref(device))
}

/// Runs (or resumes) a retrofit with one data-parallel rank per device, as threads of this
/// process. The ranks split each step's `train.grad_accum` micro-batches evenly, sum their
/// gradients and metrics, and take the same optimizer step; rank 0 alone writes the run folder.
pub fn train_ranks<B: TrainBackend>(
    recipe: &Recipe,
    options: &TrainOptions,
    format: FloatFormat,
    devices: &[B::Device],
) -> Result<TrainSummary> {
    let world = devices.len();
    if world == 0 || !recipe.train.grad_accum.is_multiple_of(world) {
        bail!(
            "train.grad_accum = {} must be a multiple of the number of ranks ({world})",
            recipe.train.grad_accum
        );
    }
    // Installed before the slow loading, so that an early signal stops the run cleanly too.
    let interrupted = interrupt_flag();
    let run = open_run(recipe, options)?;
    let (step, was_interrupted) = if world == 1 {
        rank_loop::<B>(
            recipe,
            options,
            format,
            &devices[0],
            &run,
            &interrupted,
            &Single,
        )?
    } else {
        let group = InProcessGroup::new(world);
        let results: Vec<Result<(u64, bool)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = devices
                .iter()
                .enumerate()
                .map(|(rank, device)| {
                    let (member, run, interrupted) = (group.member(rank), &run, &interrupted);
                    scope.spawn(move || {
                        // Released on any exit, a panic included, so no rank waits forever.
                        let mut guard = AbortOnFailure(&member, true);
                        let result = rank_loop::<B>(
                            recipe,
                            options,
                            format,
                            device,
                            run,
                            interrupted,
                            &member,
                        );
                        guard.1 = result.is_err();
                        result
                    })
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(rank, h)| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("rank {rank} panicked")))
                })
                .collect()
        });
        first_failure(results)?
    };
    finish(&run, step, was_interrupted)
}

/// Aborts the group when dropped with `.1` set (a failed or unwinding rank).
struct AbortOnFailure<'c>(&'c dyn Collective, bool);

impl Drop for AbortOnFailure<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.abort();
        }
    }
}

/// Rank 0's result, or the first error that is not a rank being told another failed.
fn first_failure(results: Vec<Result<(u64, bool)>>) -> Result<(u64, bool)> {
    let mut first_abort = None;
    let mut lead = None;
    for result in results {
        match result {
            Err(e) if e.downcast_ref::<RankAborted>().is_some() => {
                first_abort.get_or_insert(e);
            }
            Err(e) => return Err(e),
            Ok(done) => {
                lead.get_or_insert(done);
            }
        }
    }
    match (first_abort, lead) {
        (Some(e), _) => Err(e),
        (None, Some(done)) => Ok(done),
        (None, None) => bail!("no rank ran"),
    }
}

/// One rank's loop; rank 0 writes the metrics, evaluations, snapshots and checkpoints.
fn rank_loop<B: TrainBackend>(
    recipe: &Recipe,
    options: &TrainOptions,
    format: FloatFormat,
    device: &B::Device,
    run: &RunFolder,
    interrupted: &AtomicBool,
    ranks: &dyn Collective,
) -> Result<(u64, bool)> {
    let lead = ranks.rank() == 0;
    let loading = Instant::now();
    let (mut retrofit, mut model) = Retrofit::<B>::load(recipe, options, format, device)?;
    let owners = (recipe.run.shard_optimizer && ranks.world() > 1)
        .then(|| ParamOwners::new(&mut model, ranks.rank(), ranks.world()));
    let mut optimizer = adamw::<B>(recipe);
    let start = retrofit.resume(
        run,
        options.resume,
        lead,
        owners.as_ref(),
        &mut model,
        &mut optimizer,
    )?;
    if lead {
        atomic::write_file(
            &run.root().join(crate::run::RECIPE_FILE),
            retrofit.recipe_toml.as_bytes(),
        )?;
    }

    let startup_s = loading.elapsed().as_secs_f64();
    tracing::info!(
        startup_s,
        "model on the device and data tokenised in {startup_s:.1} s"
    );
    let total = recipe.train.max_steps;
    let bar = progress_bar(total, start, options.quiet || !lead);
    // A signal during loading stops before the first step: nothing new to save.
    let mut was_interrupted = any_rank(ranks, interrupted.load(Ordering::SeqCst))?;
    let mut step = start;
    retrofit.run_start = Instant::now();
    while step < total && !was_interrupted {
        let started = Instant::now();
        let lr = recipe.train.lr_at(step);
        let (mut grads, pending) = retrofit.gradients(&mut model, step, ranks)?;
        if let Some(owners) = &owners {
            owners.keep_own_gradients(&mut model, &mut grads);
        }
        model = optimizer.step(lr, model, grads);
        let mut metrics = retrofit.read_metrics(pending, step, run, &bar, ranks)?;
        if let Some(owners) = &owners {
            owners.share_updates(&mut model, ranks)?;
        }
        step += 1;
        // Every rank stops at the same step, whichever saw the signal.
        let stop_now = any_rank(
            ranks,
            interrupted.load(Ordering::SeqCst)
                || options.stop_after.is_some_and(|n| step - start >= n),
        )?;
        let finished = step == total;
        let every = recipe.run.checkpoint_every;
        let checkpoint_now = finished || stop_now || (every > 0 && step % every == 0);
        let mut last = BTreeMap::new();
        if lead {
            metrics.lr = lr;
            metrics.tokens_per_s = retrofit.tokens_per_step / started.elapsed().as_secs_f64();
            metrics.elapsed_s = retrofit.run_start.elapsed().as_secs_f64();
            last = retrofit.log(&metrics, run, &bar)?;
            if recipe.run.eval_every > 0 && step % recipe.run.eval_every == 0 || finished {
                retrofit.evaluate_heldout(&model, step, run, &bar, &mut last)?;
            }
            retrofit.save_cr_snapshots(run, &mut model, step, &last, &bar)?;
        }
        if checkpoint_now {
            // Nothing computed by failed GPU work may be saved.
            B::sync(device)?;
            crate::backend::check_device_work()?;
            let saving = Saving {
                run,
                step,
                last: &last,
                bar: &bar,
                ranks,
                sharded: owners.is_some(),
            };
            retrofit.checkpoint(&saving, &mut model, &optimizer)?;
        }
        if stop_now && !finished {
            was_interrupted = true;
            bar.abandon_with_message(format!("stopped at step {step}; resume with --resume"));
            break;
        }
    }
    bar.finish();
    Ok((step, was_interrupted))
}

/// Whether `flag` is set on any rank.
fn any_rank(ranks: &dyn Collective, flag: bool) -> Result<bool> {
    let mut value = [flag as u8 as f64];
    ranks.all_reduce_f64(&mut value)?;
    Ok(value[0] > 0.0)
}

/// Opens and locks the run folder; a folder that already holds a run needs `--resume`.
fn open_run(recipe: &Recipe, options: &TrainOptions) -> Result<RunFolder> {
    let run = RunFolder::open(&recipe.run.output_dir)?;
    if !options.resume && (!run.checkpoints()?.is_empty() || run.metrics().exists()) {
        bail!(
            "run folder '{}' already holds a run; pass --resume to continue it, or set \
             run.output_dir to a new folder",
            run.root().display()
        );
    }
    Ok(run)
}

fn adamw<B: TrainBackend>(recipe: &Recipe) -> Adam<B> {
    let t = &recipe.train;
    AdamWConfig::new()
        .with_beta_1(t.betas[0] as f32)
        .with_beta_2(t.betas[1] as f32)
        .with_epsilon(t.eps as f32)
        .with_weight_decay(t.weight_decay as f32)
        .init::<B, DmsModel<B>>()
}

fn progress_bar(total: u64, start: u64, quiet: bool) -> ProgressBar {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} (ETA {eta}) {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(start);
    bar
}

/// The summary (rebuilt from the folder, so a resumed run reports what an uninterrupted one does)
/// and the metrics plot.
fn finish(run: &RunFolder, step: u64, interrupted: bool) -> Result<TrainSummary> {
    let summary = summarize(run, step, interrupted)?;
    atomic::write_file(
        &run.root().join(crate::run::SUMMARY_FILE),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    let metrics = run.metrics();
    if metrics.is_file()
        && let Err(e) = plot::plot_metrics(
            &metrics,
            &run.root().join(crate::run::PLOT_FILE),
            &format!("dms-retrofit: {}", run.root().display()),
        )
    {
        tracing::warn!("could not draw the metrics plot: {e:#}");
    }
    Ok(summary)
}

/// Everything a run reads but does not update: the recipe, the model's config and DMS settings,
/// the data, the frozen teacher (when training changes base weights) and where the run writes.
struct Retrofit<'a, B: TrainBackend> {
    recipe: &'a Recipe,
    device: &'a B::Device,
    cfg: ModelConfig,
    dms: DmsConfig,
    schedule: CompressionSchedule,
    dataset: Dataset,
    eos: u32,
    /// A frozen copy of the original when the base weights train; else the student with eviction
    /// off is the teacher.
    separate_teacher: Option<Decoder<B::InnerBackend>>,
    /// The base checkpoint's folder, absolute and canonical (the run folder works from anywhere).
    base_dir: PathBuf,
    recipe_toml: String,
    tokens_per_step: f64,
    run_start: Instant,
}

/// Where and what a checkpoint records, and how the ranks take part.
#[derive(Clone, Copy)]
struct Saving<'s> {
    run: &'s RunFolder,
    step: u64,
    last: &'s BTreeMap<String, f64>,
    bar: &'s ProgressBar,
    ranks: &'s dyn Collective,
    sharded: bool,
}

impl<'a, B: TrainBackend> Retrofit<'a, B> {
    /// Opens the checkpoint, builds the data and the student (trainable set applied).
    fn load(
        recipe: &'a Recipe,
        options: &TrainOptions,
        format: FloatFormat,
        device: &'a B::Device,
    ) -> Result<(Self, DmsModel<B>)> {
        let source = resolve_source(&recipe.model.source, &options.recipe_dir);
        let ckpt = Checkpoint::open(&source)?;
        let cfg = ckpt.config.clone();
        if recipe.data.seq_len > cfg.max_position_embeddings {
            bail!(
                "data.seq_len = {} exceeds the model's max_position_embeddings = {} (config.json \
                 of '{}'); use data.seq_len <= {}",
                recipe.data.seq_len,
                cfg.max_position_embeddings,
                ckpt.files.dir.display(),
                cfg.max_position_embeddings
            );
        }
        let (dataset, eos) = load_data(recipe, &options.recipe_dir, &ckpt)?;
        let dms = recipe.dms.config();
        let t = &recipe.train;
        let model = student::<B>(&ckpt, &dms, recipe, format, device)?;
        let separate_teacher = (t.trainable != Trainable::Adapter)
            .then(|| ckpt.load_decoder::<B::InnerBackend>(format, device))
            .transpose()?;
        let base_dir = ckpt
            .files
            .dir
            .canonicalize()
            .unwrap_or_else(|_| ckpt.files.dir.clone());
        let retrofit = Self {
            recipe,
            device,
            schedule: recipe.dms.schedule(),
            tokens_per_step: (t.micro_batch * t.grad_accum * dataset.seq_len) as f64,
            cfg,
            dms,
            dataset,
            eos,
            separate_teacher,
            base_dir,
            recipe_toml: recipe.to_toml(),
            run_start: Instant::now(),
        };
        Ok((retrofit, model))
    }

    /// Continues from the run's newest checkpoint when `resume` (the data and the recipe, but for
    /// `train.max_steps` and `[run]`, must be the same); returns the first step to run.
    fn resume(
        &self,
        run: &RunFolder,
        resume: bool,
        lead: bool,
        owners: Option<&ParamOwners>,
        model: &mut DmsModel<B>,
        optimizer: &mut Adam<B>,
    ) -> Result<u64> {
        let existing = run.checkpoints()?;
        let metrics = run.metrics();
        if !resume {
            return Ok(0);
        }
        let Some((step, dir)) = existing.last().cloned() else {
            // A folder without a checkpoint starts again from step 0, as a fresh run would.
            if lead {
                truncate_metrics(&metrics, 0)?;
            }
            tracing::info!(
                "--resume: '{}' has no checkpoint yet; starting from step 0",
                run.root().display()
            );
            return Ok(0);
        };
        let state = snapshot::read_state(&dir)?;
        if state.data_fingerprint != self.dataset.fingerprint {
            bail!(
                "cannot resume from '{}': the training data changed since it was written",
                dir.display()
            );
        }
        let saved_path = dir.join(snapshot::RECIPE_FILE);
        let saved_text = std::fs::read_to_string(&saved_path)
            .with_context(|| format!("cannot read '{}'", saved_path.display()))?;
        let saved = Recipe::parse(&saved_text, &[])
            .with_context(|| format!("in '{}'", saved_path.display()))?;
        let comparable = |r: &Recipe| {
            let mut r = r.clone();
            r.train.max_steps = 0;
            r.run = Default::default();
            r
        };
        if comparable(&saved) != comparable(self.recipe) {
            bail!(
                "cannot resume from '{}': the recipe differs from the one it was written with \
                 (only train.max_steps and [run] may change); compare with {}",
                dir.display(),
                saved_path.display()
            );
        }
        snapshot::load_trainable(&dir, model)?;
        let record = self.optimizer_state(&dir, owners)?;
        let dtypes = param_dtypes(model);
        *optimizer =
            adamw::<B>(self.recipe).load_record(moments_in_param_dtypes::<B>(record, &dtypes));
        if lead {
            truncate_metrics(&metrics, step)?;
            tracing::info!("resumed from {} (step {step})", dir.display());
        }
        Ok(step)
    }

    /// One optimizer step's gradients (accumulated over the micro-batches, clipped) and its
    /// metrics, still on the device ([`Self::read_metrics`]; `lr` and `tokens_per_s` are the
    /// caller's).
    ///
    /// With several ranks, rank `r` runs the step's micro-batches `r * k .. (r + 1) * k` (`k` =
    /// grad_accum / ranks), each with the data and the noise one rank would give that micro-batch
    /// (the noise is keyed by the micro-batch's index in the step, not by the rank that runs it),
    /// and the sums over the ranks are what one rank accumulates.
    fn gradients(
        &self,
        model: &mut DmsModel<B>,
        step: u64,
        ranks: &dyn Collective,
    ) -> Result<(GradientsParams, PendingMetrics<B>)> {
        let t = &self.recipe.train;
        let target = self.schedule.target_fraction(step);
        let mut accumulator = GradientsAccumulator::<DmsModel<B>>::new();
        let mut stats = Vec::with_capacity(t.grad_accum);
        let per_rank = t.grad_accum / ranks.world();
        for micro in ranks.rank() * per_rank..(ranks.rank() + 1) * per_rank {
            let n_train = self.dataset.train.len();
            let sequences: Vec<&Sequence> = (0..t.micro_batch)
                .map(|i| {
                    let global = (step * t.grad_accum as u64 + micro as u64) * t.micro_batch as u64
                        + i as u64;
                    &self.dataset.train[sample_index(t.seed, n_train, global)]
                })
                .collect();
            let batch = make_batch::<B>(&sequences, self.device);
            let noise = NoiseKey {
                seed: t.seed,
                step,
                micro_batch: micro as u64,
                rank: 0,
            };
            let setup = StepSetup {
                cfg: &self.cfg,
                target,
                compression_weight: self.recipe.dms.compression_weight,
                compression_loss: self.recipe.dms.compression_loss,
                eos: self.eos,
                kl_chunk: t.kl_chunk,
                loss_scale: 1.0 / t.grad_accum as f64,
                recompute_layers: t.recompute_layers,
                graph_layers: t.graph_layers,
            };
            let (grads, micro_stats) = distillation_micro_step(
                model,
                self.separate_teacher.as_ref(),
                &batch,
                noise,
                &setup,
                &mut |_| {},
            );
            accumulator.accumulate(model, grads);
            stats.push(micro_stats);
        }
        let mut grads = accumulator.grads();
        all_reduce_gradients(model, &mut grads, ranks)?;
        let grad_norm = clip_global_norm(model, &mut grads, t.grad_clip);
        Ok((grads, PendingMetrics { stats, grad_norm }))
    }

    /// The step's metrics, read back once its update is queued (reading waits for the GPU; read
    /// earlier, the update's many small launches would run with the GPU idle). A non-finite loss or
    /// gradient norm stops the run here, before anything of this step is saved.
    fn read_metrics(
        &self,
        pending: PendingMetrics<B>,
        step: u64,
        run: &RunFolder,
        bar: &ProgressBar,
        ranks: &dyn Collective,
    ) -> Result<TrainMetrics> {
        let t = &self.recipe.train;
        // Summed in f64 in micro-batch order, then over the ranks: the same sums for any number
        // of ranks.
        let mut sums = [0f64; 4];
        for micro in PendingStats::read_all(pending.stats) {
            for (sum, v) in
                sums.iter_mut()
                    .zip([micro.loss, micro.kl, micro.compression, micro.frac_closed])
            {
                *sum += v;
            }
        }
        let grad_norm = read_scalar(pending.grad_norm);
        // The values were read back, so the step's work has run: a failure of ours explains a
        // non-finite value better than the advice below.
        crate::backend::check_device_work()?;
        ranks.all_reduce_f64(&mut sums)?;
        let [loss, kl, comp, frac] = sums.map(|s| s / t.grad_accum as f64);
        for (name, value) in [("loss", loss), ("grad_norm", grad_norm)] {
            if !value.is_finite() {
                bar.abandon();
                bail!(
                    "non-finite {name} ({value}) at step {step}; stopped before saving this \
                     step. {}",
                    non_finite_advice(run)?
                );
            }
        }
        Ok(TrainMetrics {
            step,
            loss,
            kl,
            compression_loss: comp,
            frac_closed: frac,
            train_cr: 1.0 / (1.0 - frac).max(1e-9),
            target_cr: self.schedule.compression_ratio(step),
            lr: 0.0,
            grad_norm,
            tokens_per_s: 0.0,
            elapsed_s: 0.0,
        })
    }

    /// Appends the step's line to `metrics.jsonl` and shows it; returns what snapshots record.
    fn log(
        &self,
        metrics: &TrainMetrics,
        run: &RunFolder,
        bar: &ProgressBar,
    ) -> Result<BTreeMap<String, f64>> {
        let last = last_metrics(metrics);
        append_metrics(&run.metrics(), &MetricLine::Train(metrics.clone()))?;
        let m = metrics;
        bar.set_position(m.step + 1);
        bar.set_message(format!(
            "loss {:.4} kl {:.4} CR {:.2}/{:.2} closed {:.3} {:.0} tok/s",
            m.loss, m.kl, m.train_cr, m.target_cr, m.frac_closed, m.tokens_per_s
        ));
        tracing::debug!(
            step = m.step,
            loss = m.loss,
            kl = m.kl,
            comp = m.compression_loss,
            frac = m.frac_closed,
            train_cr = m.train_cr,
            scheduled_cr = m.target_cr,
            lr = m.lr,
            grad_norm = m.grad_norm,
            tokens_per_s = m.tokens_per_s
        );
        Ok(last)
    }

    /// KL and measured CR on the held-out sequences under hard eviction (after `step` steps).
    fn evaluate_heldout(
        &self,
        model: &DmsModel<B>,
        step: u64,
        run: &RunFolder,
        bar: &ProgressBar,
        last: &mut BTreeMap<String, f64>,
    ) -> Result<()> {
        if self.dataset.heldout.is_empty() {
            return Ok(());
        }
        let t = &self.recipe.train;
        let inner = model.valid();
        let teacher = match &self.separate_teacher {
            Some(t) => t.clone(),
            None => inner.base.clone(),
        };
        let count = self
            .recipe
            .run
            .eval_sequences
            .min(self.dataset.heldout.len())
            .max(1);
        let settings = EvalSettings {
            cfg: &self.cfg,
            batch_size: t.micro_batch,
            eos: &[self.eos],
            kl_chunk: t.kl_chunk,
        };
        let report = evaluate(
            &inner,
            &teacher,
            &self.dataset.heldout[..count],
            &settings,
            self.device,
        );
        crate::backend::check_device_work()?;
        append_metrics(
            &run.metrics(),
            &MetricLine::Eval(EvalMetrics {
                step: step - 1,
                eval_kl: report.kl,
                eval_frac_closed: report.frac_closed,
                eval_cr: report.compression_ratio,
            }),
        )?;
        last.insert("eval_kl".into(), report.kl);
        last.insert("eval_cr".into(), report.compression_ratio);
        bar.suspend(|| {
            tracing::info!(
                "step {}: eval KL {:.4}, closed {:.3}, measured CR {:.2} (scheduled {:.2})",
                step - 1,
                report.kl,
                report.frac_closed,
                report.compression_ratio,
                self.schedule.compression_ratio(step - 1)
            )
        });
        Ok(())
    }

    /// A `cr-K` model per integer CR the schedule reached with step `step`.
    fn save_cr_snapshots(
        &self,
        run: &RunFolder,
        model: &mut DmsModel<B>,
        step: u64,
        last: &BTreeMap<String, f64>,
        bar: &ProgressBar,
    ) -> Result<()> {
        let scheduled = self.schedule.compression_ratio(step - 1);
        let previous = match step {
            1 => f64::NEG_INFINITY,
            _ => self.schedule.compression_ratio(step - 2),
        };
        for k in (2..=scheduled.floor() as u64).filter(|&k| (k as f64) > previous) {
            let dir = run.cr_snapshot(k);
            snapshot::write_snapshot(
                &dir,
                model,
                &self.state(step, last),
                &self.recipe_toml,
                |_| Ok(()),
            )?;
            bar.suspend(|| tracing::info!("scheduled CR reached {k}: saved {}", dir.display()));
        }
        Ok(())
    }

    /// A resumable checkpoint (weights, optimizer, state) after `step` steps; old ones pruned.
    /// The optimizer state of checkpoint `dir`: `optimizer.mpk`, or the shards a sharded run wrote
    /// (`optimizer-rank-R.mpk`), merged; with `owners`, only this rank's parameters are kept.
    fn optimizer_state(&self, dir: &Path, owners: Option<&ParamOwners>) -> Result<AdamWRecord<B>> {
        let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
        let whole = dir.join(format!("{}.mpk", snapshot::OPTIMIZER_FILE));
        let files: Vec<PathBuf> = if whole.is_file() {
            vec![dir.join(snapshot::OPTIMIZER_FILE)]
        } else {
            let shards = (0..)
                .map(|r| dir.join(snapshot::optimizer_shard(r)))
                .take_while(|p| p.with_extension("mpk").is_file())
                .collect::<Vec<_>>();
            if shards.is_empty() {
                bail!(
                    "'{}' holds no optimizer state ({}.mpk or {}.mpk); the checkpoint is \
                     incomplete: resume from an earlier one (delete this folder)",
                    dir.display(),
                    snapshot::OPTIMIZER_FILE,
                    snapshot::optimizer_shard(0)
                );
            }
            shards
        };
        let mut merged = AdamWRecord::<B>::new();
        for file in files {
            let record: AdamWRecord<B> =
                recorder.load(file.clone(), self.device).with_context(|| {
                    format!("cannot read the optimizer state '{}.mpk'", file.display())
                })?;
            merged.extend(
                record
                    .into_iter()
                    .filter(|(id, _)| owners.is_none_or(|o| o.owns(id))),
            );
        }
        Ok(merged)
    }

    /// Saves a resumable checkpoint (rank 0 writes it; with a sharded optimizer every rank first
    /// stages its shard in a hidden folder that rank 0 moves into the checkpoint) and prunes old
    /// ones.
    fn checkpoint(
        &self,
        saving: &Saving<'_>,
        model: &mut DmsModel<B>,
        optimizer: &Adam<B>,
    ) -> Result<()> {
        let Saving {
            run,
            step,
            last,
            bar,
            ranks,
            sharded,
        } = *saving;
        let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
        let save = |record, path: PathBuf| {
            recorder.record(record, path.clone()).map_err(|e| {
                anyhow::anyhow!(
                    "cannot save the optimizer state to '{}.mpk': {e}",
                    path.display()
                )
            })
        };
        // A hidden `.NAME.partial-PID` folder: removed by the clean-up if this process dies.
        let staging = run.root().join(format!(
            ".optimizer-shards-{step}.partial-{}",
            std::process::id()
        ));
        if sharded {
            std::fs::create_dir_all(&staging)
                .with_context(|| format!("cannot create '{}'", staging.display()))?;
            save(
                optimizer.to_record(),
                staging.join(snapshot::optimizer_shard(ranks.rank())),
            )?;
            // Every shard is staged before rank 0 moves them.
            any_rank(ranks, false)?;
        }
        if ranks.rank() != 0 {
            return Ok(());
        }
        let dir = run.checkpoint(step);
        snapshot::write_snapshot(
            &dir,
            model,
            &self.state(step, last),
            &self.recipe_toml,
            |tmp| {
                if !sharded {
                    return save(optimizer.to_record(), tmp.join(snapshot::OPTIMIZER_FILE));
                }
                for r in 0..ranks.world() {
                    let name = format!("{}.mpk", snapshot::optimizer_shard(r));
                    std::fs::rename(staging.join(&name), tmp.join(&name)).with_context(|| {
                        format!("cannot move the staged '{}' into the checkpoint", name)
                    })?;
                }
                std::fs::remove_dir(&staging)
                    .with_context(|| format!("cannot remove '{}'", staging.display()))
            },
        )?;
        run.prune_checkpoints(self.recipe.run.keep_last)?;
        bar.suspend(|| tracing::info!("checkpoint {}", dir.display()));
        Ok(())
    }

    fn state(&self, step: u64, last: &BTreeMap<String, f64>) -> SnapshotState {
        SnapshotState {
            step,
            scheduled_cr: self.schedule.compression_ratio(step.saturating_sub(1)),
            base_source: self.recipe.model.source.clone(),
            base_dir: self.base_dir.clone(),
            dms: self.dms.clone(),
            data_fingerprint: self.dataset.fingerprint,
            seed: self.recipe.train.seed,
            tensors: Vec::new(),
            last_metrics: last.clone(),
        }
    }
}

/// The tokenizer, chat template and packed data of a recipe, and the EOS id packing uses.
fn load_data(recipe: &Recipe, recipe_dir: &Path, ckpt: &Checkpoint) -> Result<(Dataset, u32)> {
    let tokenizer = ckpt.tokenizer()?;
    let template = if recipe.data.chat_template {
        let path = ckpt.files.tokenizer_config.clone().with_context(|| {
            format!(
                "data.chat_template = true but '{}' has no tokenizer_config.json",
                ckpt.files.dir.display()
            )
        })?;
        Some(ChatTemplate::from_tokenizer_config(&path)?)
    } else {
        None
    };
    let cfg = &ckpt.config;
    let eos = *cfg.eos_token_ids.first().with_context(|| {
        format!(
            "config.json of '{}' names no eos_token_id; packing needs one",
            ckpt.files.dir.display()
        )
    })?;
    let dataset = Dataset::build(
        &recipe.data,
        recipe_dir,
        &tokenizer,
        template.as_ref(),
        cfg.bos_token_id,
        eos,
        eos,
    )?;
    tracing::info!(
        "data: {} training and {} held-out sequences of {} tokens",
        dataset.train.len(),
        dataset.heldout.len(),
        dataset.seq_len
    );
    Ok((dataset, eos))
}

/// The student: the base decoder with the DMS parameters, the recipe's trainable set applied.
fn student<B: TrainBackend>(
    ckpt: &Checkpoint,
    dms: &DmsConfig,
    recipe: &Recipe,
    format: FloatFormat,
    device: &B::Device,
) -> Result<DmsModel<B>> {
    let t = &recipe.train;
    check_graph_layers(
        t.graph_layers,
        ckpt.config.num_layers,
        "train.graph_layers =",
    )?;
    let base = ckpt.load_decoder::<B>(format, device)?;
    let mut store = ckpt.store(format)?;
    let model = DmsModel::new(base, dms, Some(&mut store), device)?;
    let mut model = apply_trainable(model, t.trainable);
    model
        .base
        .recompute_mlp(t.recompute_mlp && !t.recompute_layers);
    let (trainable, frozen) = count_params(&mut model);
    tracing::info!(
        "{trainable} parameters trainable ({:?}), {frozen} frozen",
        t.trainable
    );
    if trainable == 0 {
        bail!(
            "train.trainable = {:?} selects no parameters for this model",
            t.trainable
        );
    }
    Ok(model)
}

/// A step's metrics still on the device ([`Retrofit::read_metrics`] reads them).
struct PendingMetrics<B: TrainBackend> {
    /// This rank's micro-batches, in order.
    stats: Vec<PendingStats<B::InnerBackend>>,
    grad_norm: burn::tensor::Tensor<B::InnerBackend, 1>,
}

/// A --resume repeats the same steps (the recipe may not change), so the advice is a new run,
/// except before the first checkpoint, where --resume starts afresh.
fn non_finite_advice(run: &RunFolder) -> Result<String> {
    Ok(match run.checkpoints()?.last() {
        Some((s, _)) => format!(
            "The last checkpoint (step-{s}) is intact, but --resume with this recipe would repeat \
             the same steps: lower train.lr or check the data and start a new run (another \
             run.output_dir)"
        ),
        None => "No checkpoint was written yet: lower train.lr or check the data, then start \
                 again (--resume in this folder starts from step 0)"
            .to_string(),
    })
}
