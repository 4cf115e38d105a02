//! `dms-retrofit bench load`: how fast a real checkpoint reaches the device. Opens the checkpoint
//! as training and `eval` do (config, tensor-name check), then loads every base tensor onto the
//! device `--repeats` times in a row: the first load may read from disk, later ones mostly from the
//! page cache. On CUDA, tensors stored in the run's dtype are read from their files straight into
//! the pinned staging buffers (`from_file` counts them; `DMS_RETROFIT_UPLOAD=memory` turns that
//! off). The others report the time spent on the host side of reading (mapping, the finite check
//! and any dtype conversion: `WeightSource::load`), which runs on a read-ahead thread beside the
//! staging and copying to the device (`checkpoint::prefetch`; `DMS_RETROFIT_PREFETCH=0` runs the
//! two in turn, where the rest of `seconds` is the transfer).

use std::cell::RefCell;
use std::collections::HashSet;
use std::time::Instant;

use anyhow::Result;
use burn::tensor::TensorData;
use clap::Args;
use serde::Serialize;

use super::{ComputeArgs, on_backend};
use crate::checkpoint::Checkpoint;
use crate::model::{Decoder, FloatFormat, WeightKey, WeightSource};
use crate::ops::UploadBackend;
use crate::ops::upload::DirectWeight;

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// A checkpoint folder or Hugging Face model id (resolved as for `train` and `eval`).
    pub model: String,
    /// Loads in a row (the first may come from disk, later ones from the page cache).
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Serialize)]
struct LoadReport {
    model: String,
    device: String,
    dtype: String,
    /// Whether the host side ran on a read-ahead thread (`DMS_RETROFIT_PREFETCH` not `0`).
    read_ahead: bool,
    tensors: usize,
    /// Bytes placed on the device (in `dtype`).
    bytes: u64,
    /// Tensors offered for reading from their files straight into the staging buffers (the rest
    /// go through host memory; so would an offered one whose read failed, with a warning).
    from_file: usize,
    /// Resolving the files, reading `config.json` and the safetensors headers.
    open_s: f64,
    loads: Vec<LoadTiming>,
}

#[derive(Serialize)]
struct LoadTiming {
    seconds: f64,
    gb_per_s: f64,
    /// Time in the host side of loading through host memory (reading the mapped files, checks,
    /// conversion), on the read-ahead thread unless `DMS_RETROFIT_PREFETCH=0`; 0 for tensors read
    /// from their files, whose reading is part of the transfer.
    host_s: f64,
}

pub fn run(args: LoadArgs) -> Result<()> {
    super::bench::require_positive("--repeats", args.repeats)?;
    let (spec, format) = args.compute.resolve()?;
    let report = on_backend!(spec, format, load_bench(&args, format))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn load_bench<B: UploadBackend>(
    args: &LoadArgs,
    format: FloatFormat,
    device: &B::Device,
) -> Result<LoadReport> {
    let started = Instant::now();
    let ckpt = Checkpoint::open(&args.model)?;
    let store = ckpt.store(format)?;
    ckpt.verify_tensor_names(&store)?;
    drop(store);
    let open_s = started.elapsed().as_secs_f64();
    let keys = ckpt.config.base_weight_keys();
    let bytes: u64 = keys
        .iter()
        .filter_map(|&key| ckpt.config.weight_shape(key))
        .map(|shape| (shape.iter().product::<usize>() * format.bytes()) as u64)
        .sum();
    let mut loads = Vec::with_capacity(args.repeats);
    let mut from_file = 0;
    for repeat in 0..args.repeats {
        let started = Instant::now();
        let mut source = Timed {
            inner: ckpt.store(format)?,
            host_s: 0.0,
            regions: RefCell::default(),
        };
        let decoder: Decoder<B> = ckpt.load_base(&mut source, device)?;
        B::sync(device)?;
        let seconds = started.elapsed().as_secs_f64();
        crate::backend::check_device_work()?;
        drop(decoder);
        from_file = source.regions.borrow().len();
        tracing::info!(
            repeat,
            seconds,
            host_s = source.host_s,
            from_file,
            "{:.2} GB on the device",
            bytes as f64 / 1e9
        );
        loads.push(LoadTiming {
            seconds,
            gb_per_s: bytes as f64 / seconds / 1e9,
            host_s: source.host_s,
        });
    }
    Ok(LoadReport {
        model: args.model.clone(),
        device: args.compute.device.clone(),
        dtype: format.torch_name().to_string(),
        read_ahead: crate::checkpoint::prefetch::enabled(),
        tensors: keys.len(),
        bytes,
        from_file,
        open_s,
        loads,
    })
}

/// A weight source that adds up the time spent loading from it and the tensors it gave file
/// regions for.
struct Timed<S> {
    inner: S,
    host_s: f64,
    regions: RefCell<HashSet<WeightKey>>,
}

impl<S: WeightSource> WeightSource for Timed<S> {
    fn load(&mut self, key: WeightKey, expected: &[usize]) -> Result<TensorData> {
        let started = Instant::now();
        let data = self.inner.load(key, expected);
        self.host_s += started.elapsed().as_secs_f64();
        data
    }

    fn contains(&self, key: WeightKey) -> bool {
        self.inner.contains(key)
    }

    fn direct(&self, key: WeightKey, expected: &[usize]) -> Option<DirectWeight<'_>> {
        let weight = self.inner.direct(key, expected)?;
        self.regions.borrow_mut().insert(key);
        Some(weight)
    }
}
