//! Memory-mapped reading of (possibly sharded) safetensors checkpoints.
//!
//! Each tensor is converted to the run's float format straight from the mapping, and its pages are
//! released right after, so peak host memory stays near the size of the converted weights instead
//! of file + weights. A tensor already stored in the run's format can instead be read by the
//! backend from its file straight into device staging ([`WeightSource::direct`]), checked there,
//! never copied in host memory.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::TensorData;
use half::{bf16, f16};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};

use super::names::{hf_name, is_ignorable_buffer, parse_hf_name};
use crate::model::{FloatFormat, WeightKey, WeightSource};
use crate::ops::upload::{DirectWeight, FillError};
use crate::parallel::{map_parts, zip_parts};

struct MappedFile {
    path: PathBuf,
    /// Kept for reads of whole tensors ([`SafetensorsStore::direct_named`]).
    file: File,
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
                file,
                map,
                data_start: 8 + header_len,
            });
        }
        Ok(Self {
            files,
            tensors,
            target,
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
        Ok(data)
    }

    /// Tensor `name` read from its file part by part and checked (finite), when it is stored in
    /// the target format with shape `expected` (anything else goes through [`Self::load_named`],
    /// which converts or reports).
    pub fn direct_named(&self, name: &str, expected: &[usize]) -> Option<DirectWeight<'_>> {
        let entry = self.tensors.get(name)?;
        let (dtype, valid): (_, fn(&[u8]) -> bool) = match (entry.dtype, self.target) {
            (Dtype::BF16, FloatFormat::Bf16) => (burn::tensor::DType::BF16, all_finite_bf16),
            (Dtype::F16, FloatFormat::F16) => (burn::tensor::DType::F16, all_finite_f16),
            (Dtype::F32, FloatFormat::F32) => (burn::tensor::DType::F32, all_finite_f32),
            _ => return None,
        };
        if entry.shape != expected {
            return None;
        }
        let file = &self.files[entry.file].file;
        let start = (self.files[entry.file].data_start + entry.start) as u64;
        Some(DirectWeight {
            dtype,
            shape: entry.shape.clone(),
            fill: Box::new(move |part, at| read_checked(file, start + at as u64, part, valid)),
        })
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

    fn direct(&self, key: WeightKey, expected: &[usize]) -> Option<DirectWeight<'_>> {
        self.direct_named(&hf_name(key), expected)
    }
}

/// Fills `part` from `file` at `offset`, checking each block with `valid` while it is still in the
/// core's cache.
fn read_checked(
    file: &File,
    offset: u64,
    part: &mut [u8],
    valid: fn(&[u8]) -> bool,
) -> Result<(), FillError> {
    for (index, block) in part.chunks_mut(CHECKED_BLOCK).enumerate() {
        file.read_exact_at(block, offset + (index * CHECKED_BLOCK) as u64)
            .map_err(FillError::Read)?;
        if !valid(block) {
            return Err(FillError::Invalid);
        }
    }
    Ok(())
}

/// Bytes read and checked at a time (a whole number of values of any dtype).
const CHECKED_BLOCK: usize = 1 << 20;

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
    let all_finite = match dtype {
        Dtype::F32 => all_finite_f32,
        Dtype::BF16 => all_finite_bf16,
        _ => all_finite_f16,
    };
    // Split over the CPU's threads: an 8B checkpoint is 16 GB.
    let non_finite = map_parts(bytes, width, SMALLEST_PART, |part| !all_finite(part))
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

/// Whether no stored bf16 value is NaN or infinite (all exponent bits set).
pub fn all_finite_bf16(bytes: &[u8]) -> bool {
    no_exponent_all_ones::<2>(bytes, 0x7f80)
}

/// Whether no stored f16 value is NaN or infinite.
pub fn all_finite_f16(bytes: &[u8]) -> bool {
    no_exponent_all_ones::<2>(bytes, 0x7c00)
}

/// Whether no stored f32 value is NaN or infinite.
pub fn all_finite_f32(bytes: &[u8]) -> bool {
    no_exponent_all_ones::<4>(bytes, 0x7f80_0000)
}

/// Whether no little-endian `WIDTH`-byte value has all the bits of `exponent` set. Blocks are
/// scanned without early exit so the loop vectorises (several times the speed of a per-value
/// `any`); the scan stops after the first bad block.
fn no_exponent_all_ones<const WIDTH: usize>(bytes: &[u8], exponent: u32) -> bool {
    bytes.chunks(4096).all(|block| {
        !block.chunks_exact(WIDTH).fold(false, |bad, value| {
            let mut word = [0u8; 4];
            word[..WIDTH].copy_from_slice(value);
            bad | (u32::from_le_bytes(word) & exponent == exponent)
        })
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
    use safetensors::tensor::TensorView;

    /// The vectorised scans agree with `is_finite` value by value, for NaN / infinity anywhere
    /// (first, inside, last value of a block, the last value of all) and for the largest finite
    /// values, subnormals and signed zeros, in every stored float type.
    #[test]
    fn finite_scans_match_is_finite() {
        let specials = [
            0.0f32, -0.0, 1.0, -2.5, 1e-40, -1e-40, 65504.0, -65504.0, 3.0e38,
        ];
        let bad = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN];
        let mut values: Vec<f32> = (0..5000).map(|i| ((i % 97) as f32 - 48.0) * 0.37).collect();
        values.extend(specials);
        let encode = |values: &[f32], dtype: Dtype| -> Vec<u8> {
            values
                .iter()
                .flat_map(|&v| match dtype {
                    Dtype::F32 => v.to_le_bytes().to_vec(),
                    Dtype::BF16 => bf16::from_f32(v).to_le_bytes().to_vec(),
                    // Finite values beyond f16's range would round to infinity.
                    _ => f16::from_f32(if v.is_finite() {
                        v.clamp(-65504.0, 65504.0)
                    } else {
                        v
                    })
                    .to_le_bytes()
                    .to_vec(),
                })
                .collect()
        };
        for (dtype, scan) in [
            (Dtype::F32, all_finite_f32 as fn(&[u8]) -> bool),
            (Dtype::BF16, all_finite_bf16),
            (Dtype::F16, all_finite_f16),
        ] {
            assert!(scan(&encode(&values, dtype)), "{dtype:?}");
            let width = if dtype == Dtype::F32 { 4 } else { 2 };
            for at in [0, 1, 4096 / width - 1, 4096 / width, 2047, values.len() - 1] {
                for b in bad {
                    let mut with_bad = values.clone();
                    with_bad[at] = b;
                    assert!(!scan(&encode(&with_bad, dtype)), "{dtype:?} {b} at {at}");
                }
            }
        }
    }

    /// A tensor stored in the target format is offered for direct upload, its bytes, read in
    /// parts on several threads, the stored bytes; a NaN among them is refused; another dtype or
    /// shape is not offered (it goes through `load_named`).
    #[test]
    fn direct_reads_give_the_stored_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let count = (3 << 20) / 2 + 7; // three 1 MiB blocks and a tail, odd length
        let values: Vec<u8> = (0..count)
            .flat_map(|i| bf16::from_f32((i % 1013) as f32 / 64.0 - 7.0).to_le_bytes())
            .collect();
        let small: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let path = dir.path().join("model.safetensors");
        let views = [
            (
                "w",
                TensorView::new(Dtype::BF16, vec![count], &values).unwrap(),
            ),
            ("n", TensorView::new(Dtype::F32, vec![2], &small).unwrap()),
        ];
        safetensors::serialize_to_file(views, None, &path).unwrap();
        let store = SafetensorsStore::open(std::slice::from_ref(&path), FloatFormat::Bf16).unwrap();
        assert!(
            store.direct_named("n", &[2]).is_none(),
            "f32 stored, bf16 wanted"
        );
        assert!(
            store.direct_named("w", &[count, 1]).is_none(),
            "other shape"
        );
        let weight = store.direct_named("w", &[count]).unwrap();
        assert_eq!(weight.len(), values.len());
        let mut read = vec![0u8; weight.len()];
        crate::parallel::fill_parts(&mut read, 2, 1 << 10, &weight.fill).unwrap();
        assert!(read == values);

        let mut bad = values.clone();
        let at = bad.len() - 2;
        bad[at..].copy_from_slice(&bf16::NAN.to_le_bytes());
        let views = [(
            "w",
            TensorView::new(Dtype::BF16, vec![count], &bad).unwrap(),
        )];
        safetensors::serialize_to_file(views, None, &path).unwrap();
        let store = SafetensorsStore::open(std::slice::from_ref(&path), FloatFormat::Bf16).unwrap();
        let weight = store.direct_named("w", &[count]).unwrap();
        let result = crate::parallel::fill_parts(&mut read, 2, 1 << 10, &weight.fill);
        assert!(matches!(result, Err(FillError::Invalid)));
    }

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
