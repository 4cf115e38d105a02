//! Files and folders that appear complete or not at all, and stay so through a crash or power cut:
//! everything is written under a hidden temporary name beside its destination (`.NAME.KIND-PID`),
//! synced to disk (each file, then the folder that holds it), renamed into place, and the parent
//! folder synced again so the rename itself is durable — the order databases use.
//!
//! A process killed mid-write leaves only a hidden temporary; [`clean_stale`] removes those of
//! processes that no longer run (a run folder calls it when training starts or resumes).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

// In tests, every sync and rename in order, so that the durability order can be checked.
#[cfg(test)]
thread_local! {
    static JOURNAL: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn journal(event: impl FnOnce() -> String) {
    #[cfg(test)]
    JOURNAL.with(|j| j.borrow_mut().push(event()));
    #[cfg(not(test))]
    let _ = event;
}

fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    journal(|| format!("rename {} -> {}", name(from), name(to)));
    fs::rename(from, to)
}

fn sync_file(path: &Path) -> Result<()> {
    journal(|| format!("sync {}", name(path)));
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync '{}'", path.display()))
}

/// The last component of a path, for the test journal.
fn name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// What a temporary beside a destination is for (the middle of `.NAME.KIND-PID`).
const PARTIAL: &str = "partial";
const OLD: &str = "old";
const REMOVING: &str = "removing";
const TMP: &str = "tmp";

/// Writes `bytes` to `path` durably: a synced temporary file, renamed over `path`, then the folder
/// synced. A reader sees the old content or the new, never a mix.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = parent_of(path);
    fs::create_dir_all(&parent).with_context(|| format!("cannot create '{}'", parent.display()))?;
    let tmp = sibling(path, TMP);
    let result = (|| -> Result<()> {
        let mut file =
            File::create(&tmp).with_context(|| format!("cannot create '{}'", tmp.display()))?;
        file.write_all(bytes)
            .with_context(|| format!("cannot write '{}'", tmp.display()))?;
        drop(file);
        sync_file(&tmp)?;
        rename(&tmp, path)
            .with_context(|| format!("cannot move '{}' into place", path.display()))?;
        sync_dir(&parent)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Fills a fresh temporary folder with `fill`, syncs everything in it, then moves it to `dest`. An
/// existing `dest` is replaced only after the new folder is complete (moved aside, then deleted).
/// On error the temporary folder is removed and `dest` is left as it was.
pub fn write_dir<T>(dest: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let parent = parent_of(dest);
    fs::create_dir_all(&parent).with_context(|| format!("cannot create '{}'", parent.display()))?;
    let tmp = sibling(dest, PARTIAL);
    if tmp.exists() {
        fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove the stale '{}'", tmp.display()))?;
    }
    fs::create_dir_all(&tmp).with_context(|| format!("cannot create '{}'", tmp.display()))?;
    let value = match fill(&tmp).and_then(|value| sync_tree(&tmp).map(|()| value)) {
        Ok(value) => value,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if dest.exists() {
        let old = sibling(dest, OLD);
        rename(dest, &old)
            .with_context(|| format!("cannot move the old '{}' aside", dest.display()))?;
        rename(&tmp, dest)
            .with_context(|| format!("cannot move the new folder into '{}'", dest.display()))?;
        sync_dir(&parent)?;
        fs::remove_dir_all(&old)
            .with_context(|| format!("cannot delete the old '{}'", old.display()))?;
    } else {
        rename(&tmp, dest)
            .with_context(|| format!("cannot move the new folder into '{}'", dest.display()))?;
        sync_dir(&parent)?;
    }
    Ok(value)
}

/// Deletes a folder so that it never exists half-deleted under its own name: it is renamed to a
/// hidden temporary first (atomic), then removed.
pub fn remove_dir(dir: &Path) -> Result<()> {
    let doomed = sibling(dir, REMOVING);
    rename(dir, &doomed).with_context(|| format!("cannot delete '{}'", dir.display()))?;
    sync_dir(&parent_of(dir))?;
    fs::remove_dir_all(&doomed).with_context(|| format!("cannot delete '{}'", doomed.display()))
}

/// Flushes a folder's entries (creations, renames) to disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    // Opening a folder read-only and fsyncing it is how POSIX makes its entries durable; other
    // platforms have no such call and rely on the file syncs alone.
    journal(|| format!("sync {}/", name(dir)));
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync folder '{}'", dir.display()))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Syncs every file under `dir`, then every folder, deepest first.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list '{}'", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            sync_file(&path)?;
        }
    }
    sync_dir(dir)
}

fn parent_of(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// `.NAME.KIND-PID` beside `dest`: hidden, and unique to this process.
fn sibling(dest: &Path, kind: &str) -> PathBuf {
    parent_of(dest).join(format!(
        ".{}.{kind}-{}",
        dest.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ))
}

/// A temporary left in a folder: the destination's name, what it was for, and its writer's pid.
#[derive(Debug, PartialEq, Eq)]
struct Temporary<'a> {
    name: &'a str,
    kind: &'a str,
    pid: u32,
}

/// Parses `.NAME.KIND-PID` (and `.NAME.tmpPID`, the plot's older spelling).
fn parse_temporary(file_name: &str) -> Option<Temporary<'_>> {
    let rest = file_name.strip_prefix('.')?;
    let (head, tail) = rest.rsplit_once('.')?;
    let (kind, pid) = match tail.rsplit_once('-') {
        Some((kind, pid)) => (kind, pid),
        None => (TMP, tail.strip_prefix(TMP)?),
    };
    if ![PARTIAL, OLD, REMOVING, TMP].contains(&kind) || head.is_empty() {
        return None;
    }
    Some(Temporary {
        name: head,
        kind,
        pid: pid.parse().ok()?,
    })
}

/// Whether a process with this pid runs (or may run: when in doubt, it does).
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists and may be signalled.
        let status = unsafe { libc::kill(pid, 0) };
        status == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    true
}

/// Removes the temporaries in `dir` whose writer no longer runs, and returns what it removed. A
/// destination moved aside (`.NAME.old-PID`) whose replacement never arrived is moved back: it is
/// the last complete version.
pub fn clean_stale(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(removed);
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list '{}'", dir.display()))?;
        let file_name = entry.file_name();
        let Some(temp) = file_name.to_str().and_then(parse_temporary) else {
            continue;
        };
        if process_alive(temp.pid) {
            continue;
        }
        let path = entry.path();
        let dest = dir.join(temp.name);
        if temp.kind == OLD && !dest.exists() {
            fs::rename(&path, &dest).with_context(|| {
                format!(
                    "cannot restore '{}' from '{}'",
                    dest.display(),
                    path.display()
                )
            })?;
            tracing::warn!(
                "restored '{}' (its replacement was never written)",
                dest.display()
            );
            continue;
        }
        let result = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        result.with_context(|| format!("cannot remove the stale '{}'", path.display()))?;
        removed.push(path);
    }
    if !removed.is_empty() {
        sync_dir(dir)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_fill_leaves_the_old_folder_and_no_temporary() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        fs::create_dir_all(&dest).unwrap();
        fs::write(dest.join("old.txt"), "old").unwrap();
        let err = write_dir(&dest, |tmp| -> Result<()> {
            fs::write(tmp.join("new.txt"), "new")?;
            anyhow::bail!("disk full")
        });
        assert!(err.is_err());
        assert_eq!(fs::read_to_string(dest.join("old.txt")).unwrap(), "old");
        write_dir(&dest, |tmp| {
            fs::create_dir(tmp.join("sub"))?;
            Ok(fs::write(tmp.join("sub/new.txt"), "new")?)
        })
        .unwrap();
        assert!(!dest.join("old.txt").exists() && dest.join("sub/new.txt").exists());
        let leftovers: Vec<_> = fs::read_dir(root.path()).unwrap().flatten().collect();
        assert_eq!(leftovers.len(), 1, "only the destination remains");
    }

    fn journal_of(f: impl FnOnce()) -> Vec<String> {
        JOURNAL.with(|j| j.borrow_mut().clear());
        f();
        JOURNAL.with(|j| j.borrow_mut().drain(..).collect())
    }

    #[test]
    fn everything_is_synced_before_the_rename_that_publishes_it() {
        let root = tempfile::tempdir().unwrap();
        let pid = std::process::id();
        let dest = root.path().join("step-8");
        let events = journal_of(|| {
            write_dir(&dest, |tmp| {
                fs::write(tmp.join("state.json"), "{}")?;
                Ok(fs::write(tmp.join("trainable.safetensors"), "t")?)
            })
            .unwrap()
        });
        let parent = name(root.path());
        let mut synced_files = events[..2].to_vec();
        synced_files.sort();
        assert_eq!(
            synced_files,
            ["sync state.json", "sync trainable.safetensors"]
        );
        assert_eq!(
            events[2..],
            [
                format!("sync .step-8.partial-{pid}/"),
                format!("rename .step-8.partial-{pid} -> step-8"),
                format!("sync {parent}/"),
            ]
        );
        let path = root.path().join("summary.json");
        let events = journal_of(|| write_file(&path, b"{}").unwrap());
        assert_eq!(
            events,
            [
                format!("sync .summary.json.tmp-{pid}"),
                format!("rename .summary.json.tmp-{pid} -> summary.json"),
                format!("sync {parent}/"),
            ]
        );
    }

    #[test]
    fn files_are_replaced_whole() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("a/summary.json");
        write_file(&path, b"first").unwrap();
        write_file(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(fs::read_dir(root.path().join("a")).unwrap().count(), 1);
    }

    #[test]
    fn removed_folders_never_stay_half_deleted_under_their_name() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("step-4");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("optimizer.mpk"), "x").unwrap();
        remove_dir(&dir).unwrap();
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn temporaries_parse() {
        let t = |name, kind, pid| Some(Temporary { name, kind, pid });
        assert_eq!(
            parse_temporary(".step-8.partial-123"),
            t("step-8", PARTIAL, 123)
        );
        assert_eq!(parse_temporary(".cr-4.old-9"), t("cr-4", OLD, 9));
        assert_eq!(
            parse_temporary(".metrics.svg.tmp77"),
            t("metrics.svg", TMP, 77)
        );
        assert_eq!(
            parse_temporary(".metrics.svg.tmp-77"),
            t("metrics.svg", TMP, 77)
        );
        assert_eq!(parse_temporary(".lock"), None);
        assert_eq!(parse_temporary("step-8"), None);
        assert_eq!(parse_temporary(".step-8.partial-x"), None);
        assert_eq!(parse_temporary(".a.weird-1"), None);
    }

    /// A pid no process has: above the kernel's maximum.
    const DEAD_PID: u32 = 4_194_304 + 17;

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        let dead = |name: &str| dir.join(name.replace("PID", &DEAD_PID.to_string()));
        let ours = |name: &str| dir.join(name.replace("PID", &std::process::id().to_string()));
        fs::create_dir(dead(".step-8.partial-PID")).unwrap();
        fs::write(dead(".step-8.partial-PID").join("state.json"), "{}").unwrap();
        fs::create_dir(dead(".cr-4.partial-PID")).unwrap();
        fs::write(dead(".metrics.svg.tmpPID"), "<svg").unwrap();
        fs::create_dir(dead(".step-4.removing-PID")).unwrap();
        // A destination moved aside whose replacement never came is the last complete copy.
        fs::create_dir(dead(".cr-3.old-PID")).unwrap();
        fs::write(dead(".cr-3.old-PID").join("state.json"), "{\"k\": 3}").unwrap();
        // Another export's temporary, still being written by a live process.
        fs::create_dir(ours(".export.partial-PID")).unwrap();
        fs::write(dir.join(".lock"), "1").unwrap();

        let removed = clean_stale(dir).unwrap();
        assert_eq!(removed.len(), 4, "{removed:?}");
        let mut left: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let export = format!(".export.partial-{}", std::process::id());
        assert_eq!(left, [export.as_str(), ".lock", "cr-3"]);
        assert_eq!(
            fs::read_to_string(dir.join("cr-3/state.json")).unwrap(),
            "{\"k\": 3}"
        );
    }
}
