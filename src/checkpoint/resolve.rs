//! Finding a checkpoint's files: a local Hugging Face folder, or a hub id `org/name[@revision]`
//! resolved through the standard Hugging Face cache (downloading when online).

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
pub const TOKENIZER: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const GENERATION_CONFIG: &str = "generation_config.json";

/// Where a checkpoint came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Local,
    Hub {
        repo_id: String,
        revision: String,
        commit: Option<String>,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Local => write!(f, "local folder"),
            Origin::Hub {
                repo_id,
                revision,
                commit,
            } => {
                write!(f, "hub {repo_id}@{revision}")?;
                if let Some(commit) = commit {
                    write!(f, " (commit {commit})")?;
                }
                Ok(())
            }
        }
    }
}

/// The files of one checkpoint, all local.
#[derive(Clone, Debug)]
pub struct CheckpointFiles {
    pub dir: PathBuf,
    pub origin: Origin,
    pub config: PathBuf,
    /// One file, or the shards listed by `model.safetensors.index.json` (sorted, unique).
    pub weights: Vec<PathBuf>,
    pub weights_index: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
}

/// A parsed hub id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    pub repo_id: String,
    pub revision: String,
}

impl HubId {
    /// `org/name` or `org/name@revision`; `None` if `spec` does not look like one.
    pub fn parse(spec: &str) -> Option<Self> {
        let (repo_id, revision) = match spec.split_once('@') {
            Some((id, rev)) if !rev.is_empty() => (id, rev),
            Some(_) => return None,
            None => (spec, "main"),
        };
        let parts: Vec<&str> = repo_id.split('/').collect();
        let valid = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        (parts.len() == 2 && parts.iter().all(|p| valid(p))).then(|| HubId {
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
        })
    }
}

/// Resolves a local folder or hub id to local files.
pub fn resolve(spec: &str) -> Result<CheckpointFiles> {
    let path = Path::new(spec);
    if path.exists() {
        if !path.is_dir() {
            bail!(
                "'{spec}' is a file; pass the checkpoint folder that holds config.json and the \
                 safetensors weights"
            );
        }
        return local_folder(path, Origin::Local);
    }
    let looks_like_path = spec.starts_with('.')
        || spec.starts_with('/')
        || spec.starts_with('~')
        || spec.contains('\\');
    match HubId::parse(spec) {
        Some(id) if !looks_like_path => resolve_hub(&id),
        _ => bail!(
            "checkpoint folder '{spec}' does not exist (and it is not a hub id like \
             'org/name' or 'org/name@revision')"
        ),
    }
}

/// Collects the files of an HF-layout folder.
pub fn local_folder(dir: &Path, origin: Origin) -> Result<CheckpointFiles> {
    let config = dir.join(CONFIG);
    if !config.is_file() {
        bail!(
            "'{}' has no {CONFIG}; a Hugging Face checkpoint folder needs config.json, \
             model.safetensors (or model.safetensors.index.json + shards) and tokenizer.json",
            dir.display()
        );
    }
    let index = dir.join(WEIGHTS_INDEX);
    let (weights, weights_index) = if index.is_file() {
        let shards = shard_names(&index)?;
        let paths = shards.into_iter().map(|s| dir.join(s)).collect::<Vec<_>>();
        for p in &paths {
            if !p.is_file() {
                bail!(
                    "shard '{}' listed in '{}' is missing; the download is incomplete",
                    p.display(),
                    index.display()
                );
            }
        }
        (paths, Some(index))
    } else if dir.join(WEIGHTS).is_file() {
        (vec![dir.join(WEIGHTS)], None)
    } else {
        let has_bin = dir.join("pytorch_model.bin").exists()
            || dir.join("pytorch_model.bin.index.json").exists();
        bail!(
            "'{}' has neither {WEIGHTS} nor {WEIGHTS_INDEX}{}",
            dir.display(),
            if has_bin {
                "; it holds PyTorch .bin weights: convert them once with transformers \
                 (`model.save_pretrained(dir, safe_serialization=True)`)"
            } else {
                ""
            }
        );
    };
    let optional = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    Ok(CheckpointFiles {
        dir: dir.to_path_buf(),
        origin,
        config,
        weights,
        weights_index,
        tokenizer: optional(TOKENIZER),
        tokenizer_config: optional(TOKENIZER_CONFIG),
        generation_config: optional(GENERATION_CONFIG),
    })
}

/// The shard file names listed in a `model.safetensors.index.json`.
pub fn shard_names(index: &Path) -> Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read '{}'", index.display()))?;
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("'{}' is not valid JSON", index.display()))?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .with_context(|| format!("'{}' has no 'weight_map' object", index.display()))?;
    map.values()
        .map(|v| {
            let name = v.as_str().with_context(|| {
                format!(
                    "'{}': weight_map values must be file names",
                    index.display()
                )
            })?;
            if name.contains('/') || name.contains("..") {
                bail!(
                    "'{}': shard name '{name}' must be a plain file name",
                    index.display()
                );
            }
            Ok(name.to_string())
        })
        .collect()
}

/// The Hugging Face hub cache folder, as the Python library finds it:
/// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = env("HF_HUB_CACHE") {
        return dir;
    }
    if let Some(home) = env("HF_HOME") {
        return home.join("hub");
    }
    let cache = env("XDG_CACHE_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface").join("hub")
}

/// Whether `HF_HUB_OFFLINE` forbids network access.
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// The snapshot folder of a cached model revision, if the cache has it.
pub fn cached_snapshot(cache: &Path, id: &HubId) -> Option<(PathBuf, String)> {
    cached_repo_snapshot(cache, "models", id)
}

/// The snapshot folder of a cached repo revision of a kind (`models`, `datasets`), if the cache
/// has it.
pub fn cached_repo_snapshot(cache: &Path, kind: &str, id: &HubId) -> Option<(PathBuf, String)> {
    let repo = cache.join(format!("{kind}--{}", id.repo_id.replace('/', "--")));
    let commit = match std::fs::read_to_string(repo.join("refs").join(&id.revision)) {
        Ok(commit) => commit.trim().to_string(),
        // A revision given as a commit hash has no ref file.
        Err(_) => id.revision.clone(),
    };
    let snapshot = repo.join("snapshots").join(&commit);
    snapshot.is_dir().then_some((snapshot, commit))
}

fn resolve_hub(id: &HubId) -> Result<CheckpointFiles> {
    let cache = hub_cache_dir();
    let origin = |commit| Origin::Hub {
        repo_id: id.repo_id.clone(),
        revision: id.revision.clone(),
        commit,
    };
    if let Some((snapshot, commit)) = cached_snapshot(&cache, id) {
        match local_folder(&snapshot, origin(Some(commit))) {
            Ok(files) => return Ok(files),
            Err(e) if hub_offline() => {
                return Err(e.context(format!(
                    "the cached snapshot of {}@{} is incomplete and HF_HUB_OFFLINE is set; \
                     unset it to download the missing files",
                    id.repo_id, id.revision
                )));
            }
            Err(_) => {}
        }
    } else if hub_offline() {
        bail!(
            "{}@{} is not in the Hugging Face cache '{}' and HF_HUB_OFFLINE is set; download it \
             once online (e.g. `huggingface-cli download {}`) or pass a local folder",
            id.repo_id,
            id.revision,
            cache.display(),
            id.repo_id
        );
    }
    download(id, &cache).map(|dir| local_folder(&dir, origin(None)))?
}

/// A hub client for one repo revision (model or dataset) that downloads into `cache`, with the
/// environment's endpoint and token.
pub fn hub_repo(
    cache: &Path,
    id: &HubId,
    kind: hf_hub::RepoType,
) -> Result<hf_hub::api::sync::ApiRepo> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_cache_dir(cache.to_path_buf())
        .build()
        .context("cannot set up the Hugging Face hub client")?;
    Ok(api.repo(hf_hub::Repo::with_revision(
        id.repo_id.clone(),
        kind,
        id.revision.clone(),
    )))
}

/// Downloads the files of a checkpoint into the cache and returns the snapshot folder.
fn download(id: &HubId, cache: &Path) -> Result<PathBuf> {
    let repo = hub_repo(cache, id, hf_hub::RepoType::Model)?;
    let fetch = |name: &str| {
        repo.get(name).with_context(|| {
            format!(
                "cannot download '{name}' of {}@{} from the Hugging Face hub (set HF_HUB_OFFLINE=1 \
                 to use only the local cache, or pass a local folder)",
                id.repo_id, id.revision
            )
        })
    };
    let config = fetch(CONFIG)?;
    match fetch(WEIGHTS_INDEX) {
        Ok(index) => {
            for shard in shard_names(&index)? {
                fetch(&shard)?;
            }
        }
        Err(_) => {
            fetch(WEIGHTS)?;
        }
    }
    for optional in [TOKENIZER, TOKENIZER_CONFIG, GENERATION_CONFIG] {
        if let Err(e) = fetch(optional) {
            tracing::warn!("{e:#}");
        }
    }
    Ok(config
        .parent()
        .expect("a downloaded file lives in a snapshot folder")
        .to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_parse() {
        assert_eq!(
            HubId::parse("Qwen/Qwen3-8B@v1.0"),
            Some(HubId {
                repo_id: "Qwen/Qwen3-8B".into(),
                revision: "v1.0".into()
            })
        );
        assert_eq!(
            HubId::parse("meta-llama/Llama-3.2-1B").unwrap().revision,
            "main"
        );
        assert_eq!(HubId::parse("just-a-name"), None);
        assert_eq!(HubId::parse("a/b/c"), None);
        assert_eq!(HubId::parse("org/name@"), None);
    }
}
