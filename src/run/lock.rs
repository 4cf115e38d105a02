//! One writer per run folder: an exclusive advisory lock (`flock`) on `RUN/.lock`, held for the
//! life of the training process and released by the kernel when it exits, however it exits.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};

pub const LOCK_FILE: &str = ".lock";

/// The held lock; dropping it releases the folder.
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Takes the lock on `run`, or fails naming the process that holds it.
    pub fn acquire(run: &Path) -> Result<Self> {
        let path = run.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file '{}'", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "another process".to_string(),
                    pid => format!("process {pid}"),
                };
                bail!(
                    "run folder '{}' is in use by {holder} (it holds '{}'); wait for that run to \
                     finish or stop it, or set run.output_dir to another folder",
                    run.display(),
                    path.display()
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock '{}'", path.display()));
            }
        }
        // The holder's pid, for the error above.
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)).map(|_| ()))
            .and_then(|()| write!(file, "{}", std::process::id()))
            .with_context(|| format!("cannot write the lock file '{}'", path.display()))?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        let err = format!("{:#}", RunLock::acquire(dir.path()).err().unwrap());
        assert!(
            err.contains(&format!("process {}", std::process::id())) && err.contains(".lock"),
            "{err}"
        );
        drop(first);
        RunLock::acquire(dir.path()).expect("released with its holder");
    }
}
