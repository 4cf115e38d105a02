//! Data files named by pattern: local globs (`data/*.parquet`) and Hugging Face dataset files
//! `hf://datasets/ORG/NAME[@REV]/PATH` (PATH may hold `*` / `?` / `**`), resolved offline-first
//! through the standard Hugging Face cache like model ids: a cached snapshot that has matching
//! files is used as is; otherwise the file list is asked of the hub and the matches downloaded
//! into the cache (unless `HF_HUB_OFFLINE` is set).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use glob::{MatchOptions, Pattern};

use crate::checkpoint::resolve::{
    HubId, cached_repo_snapshot, hub_cache_dir, hub_offline, hub_repo,
};

const PREFIX: &str = "hf://datasets/";

/// `*`, `?` and `**` match within and across path segments as in a shell with globstar; a
/// leading dot is not special.
const MATCH: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// Whether a data path is a pattern rather than one file.
pub fn is_glob(spec: &str) -> bool {
    spec.contains(['*', '?', '['])
}

/// The files a local pattern matches, sorted.
pub fn glob_local(pattern: &Path) -> Result<Vec<PathBuf>> {
    let text = pattern.to_string_lossy();
    let paths = glob::glob_with(&text, MATCH)
        .with_context(|| format!("'{text}' is not a valid file pattern"))?;
    let mut out: Vec<PathBuf> = paths
        .filter_map(|p| p.ok())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    Ok(out)
}

/// A pattern over one Hugging Face dataset revision's files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetFiles {
    pub id: HubId,
    /// Path pattern inside the repository.
    pub pattern: String,
}

impl DatasetFiles {
    /// `hf://datasets/ORG/NAME[@REV]/PATH`; `None` for anything else.
    pub fn parse(spec: &str) -> Option<Self> {
        let rest = spec.strip_prefix(PREFIX)?;
        let mut parts = rest.splitn(3, '/');
        let (org, name, pattern) = (parts.next()?, parts.next()?, parts.next()?);
        let id = HubId::parse(&format!("{org}/{name}"))?;
        (!pattern.is_empty()).then(|| DatasetFiles {
            id,
            pattern: pattern.to_string(),
        })
    }

    fn describe(&self) -> String {
        format!("{}@{}", self.id.repo_id, self.id.revision)
    }

    /// The matching files, local and sorted: from the cache when it has any, else downloaded.
    pub fn resolve(&self) -> Result<Vec<PathBuf>> {
        let pattern = Pattern::new(&self.pattern)
            .with_context(|| format!("'{}' is not a valid file pattern", self.pattern))?;
        let cache = hub_cache_dir();
        if let Some((snapshot, _commit)) = cached_repo_snapshot(&cache, "datasets", &self.id) {
            let found = matching_files(&snapshot, &pattern)?;
            if !found.is_empty() {
                return Ok(found);
            }
        }
        if hub_offline() {
            bail!(
                "dataset {} has no cached file matching '{}' in the Hugging Face cache '{}' and \
                 HF_HUB_OFFLINE is set; download it once online (e.g. `huggingface-cli download \
                 --repo-type dataset {} --include '{}'`) or give local files",
                self.describe(),
                self.pattern,
                cache.display(),
                self.id.repo_id,
                self.pattern
            );
        }
        self.download(&cache, &pattern)
    }

    fn download(&self, cache: &Path, pattern: &Pattern) -> Result<Vec<PathBuf>> {
        let repo = hub_repo(cache, &self.id, hf_hub::RepoType::Dataset)?;
        let offline_hint = "set HF_HUB_OFFLINE=1 to use only the local cache, or give local files";
        let info = repo.info().with_context(|| {
            format!(
                "cannot list the files of dataset {} on the Hugging Face hub ({offline_hint})",
                self.describe()
            )
        })?;
        let mut names: Vec<String> = info
            .siblings
            .into_iter()
            .map(|s| s.rfilename)
            .filter(|name| pattern.matches_with(name, MATCH))
            .collect();
        names.sort();
        ensure!(
            !names.is_empty(),
            "no file of dataset {} matches '{}'",
            self.describe(),
            self.pattern
        );
        names
            .iter()
            .map(|name| {
                tracing::info!("downloading {name} of dataset {}", self.describe());
                repo.get(name).with_context(|| {
                    format!(
                        "cannot download '{name}' of dataset {} ({offline_hint})",
                        self.describe()
                    )
                })
            })
            .collect()
    }
}

/// Files under `root` whose path relative to it matches `pattern`, sorted.
fn matching_files(root: &Path, pattern: &Pattern) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("cannot list '{}'", dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            // Snapshot entries are symlinks into blobs/: follow them.
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                let relative = path.strip_prefix(root).expect("under root");
                let relative = relative.to_string_lossy().replace('\\', "/");
                if pattern.matches_with(&relative, MATCH) {
                    out.push(path);
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_specs_parse() {
        let d =
            DatasetFiles::parse("hf://datasets/open-r1/OpenR1-Math-220k@v2/data/train-*.parquet")
                .unwrap();
        assert_eq!(d.id.repo_id, "open-r1/OpenR1-Math-220k");
        assert_eq!(d.id.revision, "v2");
        assert_eq!(d.pattern, "data/train-*.parquet");
        let d = DatasetFiles::parse("hf://datasets/org/name/a.parquet").unwrap();
        assert_eq!(d.id.revision, "main");
        for bad in [
            "hf://datasets/org/name",
            "hf://datasets/org/name/",
            "hf://models/org/name/a.parquet",
            "data/a.parquet",
        ] {
            assert_eq!(DatasetFiles::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn cached_snapshot_files_match_the_pattern() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("datasets--org--name");
        let snapshot = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(snapshot.join("data/sub")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        for f in [
            "data/train-0.parquet",
            "data/train-1.parquet",
            "data/test-0.parquet",
            "data/sub/train-2.parquet",
            "README.md",
        ] {
            std::fs::write(snapshot.join(f), b"x").unwrap();
        }
        let id = HubId::parse("org/name").unwrap();
        let (snap, commit) = cached_repo_snapshot(dir.path(), "datasets", &id).unwrap();
        assert_eq!(commit, "abc123");
        let names = |pattern: &str| -> Vec<String> {
            matching_files(&snap, &Pattern::new(pattern).unwrap())
                .unwrap()
                .iter()
                .map(|p| {
                    p.strip_prefix(&snap)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect()
        };
        assert_eq!(
            names("data/train-*.parquet"),
            ["data/train-0.parquet", "data/train-1.parquet"]
        );
        assert_eq!(
            names("data/**/train-*.parquet"),
            [
                "data/sub/train-2.parquet",
                "data/train-0.parquet",
                "data/train-1.parquet"
            ]
        );
        assert!(names("*.csv").is_empty());
    }
}
