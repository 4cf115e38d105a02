//! Reading a checkpoint one tensor ahead: a second thread maps, checks and converts the next
//! tensors (`WeightSource::load`) while the loading thread stages and copies the current one to
//! the device, so the two halves of loading overlap instead of alternating. The read-ahead is
//! bounded in bytes; tensors are handed over in whatever order the loader asks for them.

use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};

use anyhow::{Result, anyhow};
use burn::tensor::TensorData;

use crate::model::{WeightKey, WeightSource};

/// Bytes converted ahead of the loader at most (one tensor more when none is waiting, so a tensor
/// larger than this still passes).
const AHEAD_BYTES: usize = 1 << 30;

/// `load` with `source` read ahead in `order` (keys and the shapes `load` will ask for) on a second
/// thread. Keys outside `order`, or asked for with another shape, are read directly. With
/// `DMS_RETROFIT_PREFETCH=0`, `load` reads `source` directly (for comparisons).
pub fn with_prefetch<S: WeightSource + Send, R>(
    source: &mut S,
    order: &[(WeightKey, Vec<usize>)],
    load: impl FnOnce(&mut dyn WeightSource) -> R,
) -> R {
    if !enabled() || order.len() < 2 {
        return load(source);
    }
    read_ahead_of(source, order, AHEAD_BYTES, load)
}

/// [`with_prefetch`] with at most `ahead_bytes` waiting unused (one tensor more when none waits).
fn read_ahead_of<S: WeightSource + Send, R>(
    source: &mut S,
    order: &[(WeightKey, Vec<usize>)],
    ahead_bytes: usize,
    load: impl FnOnce(&mut dyn WeightSource) -> R,
) -> R {
    let shared = Shared {
        source: Mutex::new(source),
        state: Mutex::new(State::default()),
        changed: Condvar::new(),
    };
    std::thread::scope(|scope| {
        // Stops the read-ahead however `load` ends (a panic included), before the scope joins it.
        let _stop = Finish(&shared, |state: &mut State| state.stop = true);
        scope.spawn(|| {
            // Tells a waiting loader that nothing more comes, however the read-ahead ends.
            let _finished = Finish(&shared, |state: &mut State| state.finished = true);
            shared.read_ahead(order, ahead_bytes)
        });
        let mut reader = Reader {
            shared: &shared,
            order: order.iter().cloned().collect(),
        };
        load(&mut reader)
    })
}

/// `DMS_RETROFIT_PREFETCH=0` turns the read-ahead off.
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("DMS_RETROFIT_PREFETCH").map_or(true, |v| v != "0"))
}

struct Shared<'s, S> {
    source: Mutex<&'s mut S>,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// Read ahead and not yet taken.
    ready: HashMap<WeightKey, Result<TensorData>>,
    ready_bytes: usize,
    /// Keys the read-ahead has finished (taken or not).
    done: HashSet<WeightKey>,
    /// The key the loader waits for, if it is not ready yet.
    wanted: Option<WeightKey>,
    /// The loader is done: the read-ahead stops.
    stop: bool,
    /// The read-ahead has ended (its last key read, stopped, or panicked).
    finished: bool,
}

/// Applies `mark` to the shared state and wakes every waiter when dropped (also while unwinding).
struct Finish<'a, 's, S: WeightSource, F: Fn(&mut State)>(&'a Shared<'s, S>, F);

impl<S: WeightSource, F: Fn(&mut State)> Drop for Finish<'_, '_, S, F> {
    fn drop(&mut self) {
        let mut state = self.0.state();
        (self.1)(&mut state);
        drop(state);
        self.0.changed.notify_all();
    }
}

impl<S: WeightSource> Shared<'_, S> {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The second thread: every key of `order` in turn, pausing while `ahead_bytes` wait unused
    /// unless the loader waits for a key still to come.
    fn read_ahead(&self, order: &[(WeightKey, Vec<usize>)], ahead_bytes: usize) {
        for (key, shape) in order {
            {
                let mut state = self.state();
                loop {
                    if state.stop {
                        return;
                    }
                    let loader_waits = state.wanted.is_some_and(|w| !state.done.contains(&w));
                    if state.ready.is_empty() || state.ready_bytes < ahead_bytes || loader_waits {
                        break;
                    }
                    state = self
                        .changed
                        .wait(state)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
            }
            // A panic while reading reaches the loader as this key's error.
            let data =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.read(*key, shape)))
                    .unwrap_or_else(|_| Err(anyhow!("reading {key:?} panicked")));
            let bytes = data.as_ref().map_or(0, |d| d.as_bytes().len());
            let mut state = self.state();
            state.ready.insert(*key, data);
            state.ready_bytes += bytes;
            state.done.insert(*key);
            drop(state);
            self.changed.notify_all();
        }
    }

    fn read(&self, key: WeightKey, shape: &[usize]) -> Result<TensorData> {
        self.source
            .lock()
            .map_err(|_| anyhow!("the checkpoint reader failed on another thread"))?
            .load(key, shape)
    }
}

/// What the loader reads through: the read-ahead's tensors, or the source directly.
struct Reader<'a, 's, S> {
    shared: &'a Shared<'s, S>,
    order: HashMap<WeightKey, Vec<usize>>,
}

impl<S: WeightSource> WeightSource for Reader<'_, '_, S> {
    fn load(&mut self, key: WeightKey, expected: &[usize]) -> Result<TensorData> {
        if self.order.get(&key).is_none_or(|shape| shape != expected) {
            return self.shared.read(key, expected);
        }
        let mut state = self.shared.state();
        loop {
            if let Some(data) = state.ready.remove(&key) {
                state.ready_bytes -= data.as_ref().map_or(0, |d| d.as_bytes().len());
                state.wanted = None;
                drop(state);
                self.shared.changed.notify_all();
                return data;
            }
            if state.done.contains(&key) || state.finished {
                // Taken before, or the read-ahead has ended: read it directly.
                drop(state);
                return self.shared.read(key, expected);
            }
            state.wanted = Some(key);
            self.shared.changed.notify_all();
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn contains(&self, key: WeightKey) -> bool {
        match self.shared.source.lock() {
            Ok(source) => source.contains(key),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LayerNorm;

    /// A source of norms whose values name their layer, counting reads; `fail` errs on one
    /// layer, `panic_at` panics on one.
    struct Numbered {
        reads: usize,
        fail: Option<usize>,
        panic_at: Option<usize>,
    }

    impl WeightSource for Numbered {
        fn load(&mut self, key: WeightKey, expected: &[usize]) -> Result<TensorData> {
            self.reads += 1;
            let WeightKey::Norm { layer, .. } = key else {
                anyhow::bail!("not a norm");
            };
            if self.fail == Some(layer) {
                anyhow::bail!("layer {layer} is corrupt");
            }
            if self.panic_at == Some(layer) {
                panic!("reader bug at layer {layer}");
            }
            Ok(TensorData::new(
                vec![layer as f32; expected[0]],
                expected.to_vec(),
            ))
        }

        fn contains(&self, key: WeightKey) -> bool {
            matches!(key, WeightKey::Norm { .. })
        }
    }

    fn norm(layer: usize) -> WeightKey {
        WeightKey::Norm {
            layer,
            norm: LayerNorm::Input,
        }
    }

    /// Asked in another order than read ahead, twice for one key, and for a key outside the
    /// order: every answer is the direct read's, and an error reaches the loader.
    #[test]
    fn hands_over_in_any_order_and_passes_errors() {
        let order: Vec<_> = (0..6).map(|l| (norm(l), vec![3])).collect();
        let mut source = Numbered {
            reads: 0,
            fail: Some(4),
            panic_at: None,
        };
        let asked = [2, 0, 1, 1, 5, 3, 9, 4];
        let got: Vec<Result<f32>> = with_prefetch(&mut source, &order, |reader| {
            asked
                .iter()
                .map(|&l| {
                    reader
                        .load(norm(l), &[3])
                        .map(|d| d.to_vec::<f32>().unwrap()[0])
                })
                .collect()
        });
        for (&layer, value) in asked.iter().zip(&got) {
            match value {
                Ok(v) => assert_eq!(*v, layer as f32),
                Err(e) => {
                    assert_eq!(layer, 4);
                    assert!(e.to_string().contains("layer 4"), "{e}");
                }
            }
        }
        assert!(got[7].is_err());
        // Six read ahead, layer 1 again and layer 9 directly.
        assert_eq!(source.reads, 8);
    }

    /// A loader that panics while the read-ahead is paused (a 1-byte budget) ends with its panic
    /// instead of hanging; a reader that panics gives the loader an error, not a hang.
    #[test]
    fn panics_end_the_load_instead_of_hanging() {
        let order: Vec<_> = (0..50).map(|l| (norm(l), vec![3])).collect();
        let mut source = Numbered {
            reads: 0,
            fail: None,
            panic_at: None,
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            read_ahead_of(&mut source, &order, 1, |reader| {
                reader.load(norm(0), &[3]).unwrap();
                panic!("loader fails");
            })
        }));
        assert!(outcome.is_err());
        assert!(source.reads < 50, "the read-ahead stopped early");

        let mut source = Numbered {
            reads: 0,
            fail: None,
            panic_at: Some(2),
        };
        let got: Vec<bool> = read_ahead_of(&mut source, &order[..5], 1, |reader| {
            (0..5).map(|l| reader.load(norm(l), &[3]).is_ok()).collect()
        });
        assert_eq!(&got[..2], &[true, true]);
        assert!(!got[2], "the panicking read is an error");
    }
}
