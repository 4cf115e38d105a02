//! Folders that appear complete or not at all: written under a temporary name beside the
//! destination, then renamed into place. A user never finds a half-written export or snapshot.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Fills a fresh temporary folder with `fill`, then moves it to `dest`. An existing `dest` is
/// replaced only after the new folder is complete (moved aside, then deleted). On error the
/// temporary folder is removed and `dest` is left as it was.
pub fn write_dir_atomically<T>(dest: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create '{}'", parent.display()))?;
    let tmp = sibling(dest, parent, "partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove the stale '{}'", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create '{}'", tmp.display()))?;
    let value = match fill(&tmp) {
        Ok(value) => value,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if dest.exists() {
        let old = sibling(dest, parent, "old");
        std::fs::rename(dest, &old)
            .with_context(|| format!("cannot move the old '{}' aside", dest.display()))?;
        std::fs::rename(&tmp, dest)
            .with_context(|| format!("cannot move the new folder into '{}'", dest.display()))?;
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("cannot delete the old '{}'", old.display()))?;
    } else {
        std::fs::rename(&tmp, dest)
            .with_context(|| format!("cannot move the new folder into '{}'", dest.display()))?;
    }
    Ok(value)
}

/// `.NAME.KIND-PID` beside `dest`: hidden, and unique to this process.
fn sibling(dest: &Path, parent: &Path, kind: &str) -> PathBuf {
    parent.join(format!(
        ".{}.{kind}-{}",
        dest.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_fill_leaves_the_old_folder_and_no_temporary() {
        let root = std::env::temp_dir().join(format!("atomic-dir-{}", std::process::id()));
        let dest = root.join("out");
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::write(dest.join("old.txt"), "old").unwrap();
        let err = write_dir_atomically(&dest, |tmp| -> Result<()> {
            std::fs::write(tmp.join("new.txt"), "new")?;
            anyhow::bail!("disk full")
        });
        assert!(err.is_err());
        assert_eq!(
            std::fs::read_to_string(dest.join("old.txt")).unwrap(),
            "old"
        );
        write_dir_atomically(&dest, |tmp| Ok(std::fs::write(tmp.join("new.txt"), "new")?)).unwrap();
        assert!(!dest.join("old.txt").exists() && dest.join("new.txt").exists());
        let leftovers: Vec<_> = std::fs::read_dir(&root).unwrap().flatten().collect();
        assert_eq!(leftovers.len(), 1, "only the destination remains");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
