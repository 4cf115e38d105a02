//! The run folder a training writes, and the one place that knows it: its layout, the lock that
//! makes one process its only writer, the clean-up of what killed processes left behind, the
//! snapshots inside it ([`snapshot`]), and finding a snapshot and its base checkpoint for `export`,
//! `eval` and `generate`.
//!
//! ```text
//! RUN/
//!   .lock                    held (flock) by the training process; holds its pid
//!   recipe.toml  metrics.jsonl  metrics.svg  summary.json
//!   checkpoints/step-N/      trainable.safetensors, optimizer.mpk, state.json, recipe.toml
//!   cr-K/                    the same without the optimizer
//! ```

mod lock;
pub mod snapshot;

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::atomic;
use crate::checkpoint::Checkpoint;
pub use lock::RunLock;
use snapshot::SnapshotState;

pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const PLOT_FILE: &str = "metrics.svg";
pub const SUMMARY_FILE: &str = "summary.json";
pub const RECIPE_FILE: &str = "recipe.toml";
/// The file every snapshot folder (checkpoint or cr-K) is recognised by.
pub const STATE_FILE: &str = "state.json";

/// A run folder opened for writing: created if needed, locked for the life of this value, and
/// cleared of stale temporaries.
pub struct RunFolder {
    root: PathBuf,
    _lock: RunLock,
}

impl RunFolder {
    /// Creates (if needed) and locks `root`; a second process gets an error naming the holder.
    /// Temporaries of dead processes and folders a killed prune left half-deleted are removed.
    pub fn open(root: &Path) -> Result<Self> {
        fs::create_dir_all(root)
            .with_context(|| format!("cannot create run folder '{}'", root.display()))?;
        let lock = RunLock::acquire(root)?;
        let folder = Self {
            root: root.to_path_buf(),
            _lock: lock,
        };
        folder.clean()?;
        Ok(folder)
    }

    fn clean(&self) -> Result<()> {
        let mut removed = atomic::clean_stale(&self.root)?;
        let checkpoints = self.root.join(CHECKPOINTS_DIR);
        removed.extend(atomic::clean_stale(&checkpoints)?);
        // Snapshot folders appear only complete (renamed into place), so one without its state
        // file is what an older version's interrupted prune left: not a checkpoint.
        if let Ok(entries) = fs::read_dir(&checkpoints) {
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if snapshot_step(&name, "step-").is_some() && !path.join(STATE_FILE).is_file() {
                    fs::remove_dir_all(&path)
                        .with_context(|| format!("cannot remove '{}'", path.display()))?;
                    removed.push(path);
                }
            }
        }
        for path in &removed {
            tracing::info!("removed '{}', left by an interrupted run", path.display());
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn metrics(&self) -> PathBuf {
        self.root.join(METRICS_FILE)
    }

    pub fn checkpoint(&self, step: u64) -> PathBuf {
        self.root.join(CHECKPOINTS_DIR).join(format!("step-{step}"))
    }

    pub fn cr_snapshot(&self, k: u64) -> PathBuf {
        self.root.join(format!("cr-{k}"))
    }

    pub fn checkpoints(&self) -> Result<Vec<(u64, PathBuf)>> {
        list_checkpoints(&self.root)
    }

    /// Deletes all but the newest `keep` checkpoints, each renamed away before it is deleted.
    pub fn prune_checkpoints(&self, keep: usize) -> Result<()> {
        let all = self.checkpoints()?;
        for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
            atomic::remove_dir(old)
                .with_context(|| format!("cannot delete old checkpoint '{}'", old.display()))?;
        }
        Ok(())
    }
}

/// The `N` of `PREFIX N` (`step-12`, `cr-4`).
fn snapshot_step(name: &str, prefix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?.parse().ok()
}

/// Complete snapshot folders `dir/PREFIX N` (with a state file), sorted by N.
fn list_snapshots(dir: &Path, prefix: &str) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    if !dir.is_dir() {
        return Ok(found);
    }
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list '{}'", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list '{}'", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = snapshot_step(&name, prefix)
            && entry.path().join(STATE_FILE).is_file()
        {
            found.push((n, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// `RUN/checkpoints/step-N` folders, sorted by step.
pub fn list_checkpoints(run: &Path) -> Result<Vec<(u64, PathBuf)>> {
    list_snapshots(&run.join(CHECKPOINTS_DIR), "step-")
}

/// `RUN/cr-K` folders, sorted by K.
pub fn list_cr_snapshots(run: &Path) -> Result<Vec<(u64, PathBuf)>> {
    list_snapshots(run, "cr-")
}

/// Whether `dir` holds a training run (its metrics, checkpoints, cr-K snapshots or lock).
pub fn holds_run(dir: &Path) -> bool {
    dir.join(METRICS_FILE).is_file()
        || dir.join(lock::LOCK_FILE).is_file()
        || list_checkpoints(dir).is_ok_and(|c| !c.is_empty())
        || list_cr_snapshots(dir).is_ok_and(|c| !c.is_empty())
}

/// The snapshot folder a path names: itself if it holds state.json, else a run's newest checkpoint.
pub fn locate_snapshot(path: &Path) -> Result<PathBuf> {
    if path.join(snapshot::STATE_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.exists() {
        bail!("'{}' does not exist", path.display());
    }
    match list_checkpoints(path)?.pop() {
        Some((_, dir)) => Ok(dir),
        None => bail!(
            "'{}' is neither a snapshot (state.json + trainable.safetensors) nor a run folder with \
             checkpoints/step-N; pass RUN, RUN/cr-K or RUN/checkpoints/step-N",
            path.display()
        ),
    }
}

/// The base checkpoint a snapshot was trained from: its recorded folder (absolute since runs record
/// it so; older runs recorded it relative to their working directory), else its `model.source`.
pub fn open_base(state: &SnapshotState) -> Result<Checkpoint> {
    if state.base_dir.is_dir() {
        Checkpoint::open(&state.base_dir.to_string_lossy())
    } else {
        Checkpoint::open(&state.base_source).with_context(|| {
            format!(
                "the run's base model '{}' (folder '{}') cannot be found{}",
                state.base_source,
                state.base_dir.display(),
                if state.base_dir.is_relative() {
                    "; this run was written by an older version, which recorded the folder \
                     relative to the directory training ran in: run this command from there"
                } else {
                    ""
                }
            )
        })
    }
}

/// The run folder a snapshot belongs to: `RUN` for `RUN/cr-K` and `RUN/checkpoints/step-N`.
pub fn run_of(snapshot: &Path) -> Option<PathBuf> {
    let parent = snapshot.parent()?;
    if parent.file_name()? == CHECKPOINTS_DIR {
        parent.parent().map(Path::to_path_buf)
    } else {
        Some(parent.to_path_buf())
    }
}
