//! Memory-mapped reading of (possibly sharded) safetensors checkpoints.
//!
//! Each tensor is converted to the run's float format straight from the mapping, and its pages are
//! released right after, so peak host memory stays near the size of the converted weights instead
//! of file + weights.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::TensorData;
use half::{bf16, f16};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};

use super::names::{hf_name, is_ignorable_buffer, parse_hf_name};
use crate::model::{FloatFormat, WeightKey, WeightSource};
use crate::parallel::{map_parts, zip_parts};

struct MappedFile {
    path: PathBuf,
    map: Mmap,
    /// Offset of the data section (8-byte length + JSON header).
    data_start: usize,
}

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    file: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The first tensor (in file order) whose data offsets run past the end of the file, described;
/// the safetensors crate reports only that the file is too short, not which tensor.
fn tensor_past_the_end(bytes: &[u8]) -> Option<String> {
    let header_len = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header = bytes.get(8..8usize.checked_add(header_len)?)?;
    let available = bytes.len() - 8 - header_len;
    let parsed: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    let mut tensors: Vec<(u64, u64, &String)> = parsed
        .iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
        .filter_map(|(name, info)| {
            let offsets = info.get("data_offsets")?.as_array()?;
            Some((offsets.first()?.as_u64()?, offsets.get(1)?.as_u64()?, name))
        })
        .collect();
    tensors.sort();
    tensors
        .into_iter()
        .find(|&(start, end, _)| end > available as u64 || start > end)
        .map(|(start, end, name)| {
            format!(
                "tensor '{name}' has data_offsets [{start}, {end}] but the file holds {available} \
                 bytes of data"
            )
        })
}

/// A raw view of one stored tensor, for byte-exact copies.
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

/// All tensors of a checkpoint, by Hugging Face name.
pub struct SafetensorsStore {
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, TensorEntry>,
    /// The float format tensors are converted to when loaded.
    target: FloatFormat,
    loaded: BTreeSet<String>,
}

impl SafetensorsStore {
    /// Maps every file and indexes its tensors. A name found in two files is an error.
    pub fn open(paths: &[PathBuf], target: FloatFormat) -> Result<Self> {
        let mut files = Vec::new();
        let mut tensors = BTreeMap::new();
        for path in paths {
            let file = File::open(path)
                .with_context(|| format!("cannot open weights file '{}'", path.display()))?;
            // SAFETY: the mapping is read-only; a checkpoint modified while we read it is a user
            // error we cannot guard against on any platform.
            let map = unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot memory-map '{}'", path.display()))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
                let culprit = tensor_past_the_end(&map)
                    .map(|detail| format!(" ({detail})"))
                    .unwrap_or_default();
                anyhow::anyhow!(
                    "'{}' is not a valid safetensors file: {e}{culprit}; re-download or \
                     re-export it",
                    path.display()
                )
            })?;
            let index = files.len();
            for (name, info) in metadata.tensors() {
                let entry = TensorEntry {
                    file: index,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: info.data_offsets.0,
                    end: info.data_offsets.1,
                };
                if let Some(previous) = tensors.insert(name.clone(), entry) {
                    bail!(
                        "tensor '{name}' appears in both '{}' and '{}'",
                        files_path(&files, previous.file, path),
                        path.display()
                    );
                }
            }
            files.push(MappedFile {
                path: path.clone(),
                map,
                data_start: 8 + header_len,
            });
        }
        Ok(Self {
            files,
            tensors,
            target,
            loaded: BTreeSet::new(),
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// The file a tensor is stored in.
    pub fn path_of(&self, name: &str) -> Option<&Path> {
        self.tensors
            .get(name)
            .map(|e| self.files[e.file].path.as_path())
    }

    /// The stored bytes of a tensor, untouched.
    pub fn raw(&self, name: &str) -> Option<RawTensor<'_>> {
        let entry = self.tensors.get(name)?;
        let file = &self.files[entry.file];
        Some(RawTensor {
            dtype: entry.dtype,
            shape: &entry.shape,
            bytes: &file.map[file.data_start + entry.start..file.data_start + entry.end],
        })
    }

    /// Tensors in the files that `expected` does not account for (ignorable buffers excluded).
    pub fn unexpected(&self, expected: &BTreeSet<String>) -> Vec<String> {
        self.tensors
            .keys()
            .filter(|name| !expected.contains(*name) && !is_ignorable_buffer(name))
            .cloned()
            .collect()
    }

    /// Reads a tensor by name, converting it to the target float format.
    pub fn load_named(&mut self, name: &str, expected: &[usize]) -> Result<TensorData> {
        let entry = self.tensors.get(name).cloned().with_context(|| {
            format!(
                "tensor '{name}' is missing from the checkpoint ({}); the files do not match \
                 config.json",
                self.describe_files()
            )
        })?;
        let file = &self.files[entry.file];
        if entry.shape != expected {
            bail!(
                "tensor '{name}' in '{}' has shape {:?}, expected {:?} from config.json",
                file.path.display(),
                entry.shape,
                expected
            );
        }
        let offset = file.data_start + entry.start;
        let bytes = &file.map[offset..file.data_start + entry.end];
        let data = convert(bytes, entry.dtype, &entry.shape, self.target)
            .with_context(|| format!("tensor '{name}' in '{}'", file.path.display()))?;
        // SAFETY: `bytes` is no longer borrowed; DONTNEED on a read-only file mapping only drops
        // our resident pages, which would be re-read from the file if touched again.
        unsafe {
            let _ = file
                .map
                .unchecked_advise_range(UncheckedAdvice::DontNeed, offset, bytes.len());
        }
        self.loaded.insert(name.to_string());
        Ok(data)
    }

    fn describe_files(&self) -> String {
        self.files
            .iter()
            .map(|f| format!("'{}'", f.path.display()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn files_path(files: &[MappedFile], index: usize, fallback: &Path) -> String {
    files
        .get(index)
        .map(|f| f.path.display().to_string())
        .unwrap_or_else(|| fallback.display().to_string())
}

impl WeightSource for SafetensorsStore {
    fn load(&mut self, key: WeightKey, expected: &[usize]) -> Result<TensorData> {
        self.load_named(&hf_name(key), expected)
    }

    fn contains(&self, key: WeightKey) -> bool {
        self.tensors.contains_key(&hf_name(key))
    }
}

/// Decodes little-endian stored values into `target`.
fn convert(bytes: &[u8], dtype: Dtype, shape: &[usize], target: FloatFormat) -> Result<TensorData> {
    let count: usize = shape.iter().product();
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::BF16 | Dtype::F16 => 2,
        other => bail!("stored as {other:?}; only F32, BF16 and F16 weights are supported"),
    };
    if bytes.len() != count * width {
        bail!(
            "holds {} bytes but shape {shape:?} of {dtype:?} needs {}; the file is truncated or corrupt",
            bytes.len(),
            count * width
        );
    }
    let chunks2 = || bytes.chunks_exact(2).map(|c| [c[0], c[1]]);
    let as_f32 = || -> Vec<f32> {
        match dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => chunks2().map(|c| bf16::from_le_bytes(c).to_f32()).collect(),
            _ => chunks2().map(|c| f16::from_le_bytes(c).to_f32()).collect(),
        }
    };
    // Split over the CPU's threads: one thread scans ~2 GB/s, an 8B checkpoint is 16 GB.
    let non_finite = map_parts(bytes, width, SMALLEST_PART, |part| match dtype {
        Dtype::F32 => part
            .chunks_exact(4)
            .any(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
        Dtype::BF16 => part
            .chunks_exact(2)
            .any(|c| !bf16::from_le_bytes([c[0], c[1]]).is_finite()),
        _ => part
            .chunks_exact(2)
            .any(|c| !f16::from_le_bytes([c[0], c[1]]).is_finite()),
    })
    .into_iter()
    .any(|bad| bad);
    if non_finite {
        bail!("contains NaN or infinite values; the checkpoint is corrupt");
    }
    let shape = shape.to_vec();
    Ok(match (target, dtype) {
        (FloatFormat::F32, _) => TensorData::new(as_f32(), shape),
        (FloatFormat::Bf16, Dtype::BF16) => {
            // Filled in place on the CPU's threads: one output buffer, no per-part copies.
            let mut values = vec![bf16::ZERO; count];
            zip_parts(&mut values, bytes, width, SMALLEST_PART, |out, part| {
                for (v, c) in out.iter_mut().zip(part.chunks_exact(2)) {
                    *v = bf16::from_le_bytes([c[0], c[1]]);
                }
            });
            TensorData::new(values, shape)
        }
        (FloatFormat::Bf16, _) => TensorData::new(
            as_f32().into_iter().map(bf16::from_f32).collect::<Vec<_>>(),
            shape,
        ),
        (FloatFormat::F16, Dtype::F16) => {
            TensorData::new(chunks2().map(f16::from_le_bytes).collect::<Vec<_>>(), shape)
        }
        (FloatFormat::F16, _) => TensorData::new(
            as_f32().into_iter().map(f16::from_f32).collect::<Vec<_>>(),
            shape,
        ),
    })
}

/// Smallest part of a tensor converted on its own thread.
const SMALLEST_PART: usize = 8 << 20;

/// The set of names `keys` map to.
pub fn names_of(keys: impl IntoIterator<Item = WeightKey>) -> BTreeSet<String> {
    keys.into_iter().map(hf_name).collect()
}

/// Whether a name is a DMS tensor (present in exports, absent from base checkpoints).
pub fn is_dms_name(name: &str) -> bool {
    parse_hf_name(name).is_some_and(WeightKey::is_adapter)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bf16 tensor large enough to be split over threads (> 2 parts of 8 MiB): the parallel
    /// conversion equals the value-by-value one, and a NaN in the last part is still found.
    #[test]
    fn parallel_conversion_matches_sequential_and_finds_late_nan() {
        let count = 9 << 20; // 18 MiB of bf16
        let values: Vec<bf16> = (0..count)
            .map(|i| bf16::from_f32(((i % 2003) as f32 - 1000.0) / 7.0))
            .collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert!(
            crate::parallel::part_bytes(bytes.len(), 2, SMALLEST_PART) < bytes.len()
                || crate::parallel::threads() == 1
        );
        let data = convert(&bytes, Dtype::BF16, &[count], FloatFormat::Bf16).unwrap();
        assert_eq!(data.as_slice::<bf16>().unwrap(), values.as_slice());
        let as_f32 = convert(&bytes, Dtype::BF16, &[count], FloatFormat::F32).unwrap();
        let want: Vec<f32> = values.iter().map(|v| v.to_f32()).collect();
        assert_eq!(as_f32.as_slice::<f32>().unwrap(), want.as_slice());

        let mut bad = bytes.clone();
        let last = bad.len() - 2;
        bad[last..].copy_from_slice(&bf16::NAN.to_le_bytes());
        let err = convert(&bad, Dtype::BF16, &[count], FloatFormat::Bf16).unwrap_err();
        assert!(err.to_string().contains("NaN"), "{err}");
    }
}
