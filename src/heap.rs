//! Heap bytes in use, counted by [`Counting`] where the binary installs it as its global
//! allocator (`src/main.rs`): the CPU's counterpart of the GPU pools' statistics, so `bench step
//! --profile --device cpu` shows what a step keeps between its phases (the autodiff graph's
//! saved activations) on a machine without a GPU.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

/// The system allocator, counting the bytes it has handed out and not yet been given back.
pub struct Counting;

static IN_USE: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only a counter is updated beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            IN_USE.fetch_add(layout.size() as u64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            IN_USE.fetch_add(layout.size() as u64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            IN_USE.fetch_add(new_size as u64, Ordering::Relaxed);
            IN_USE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        }
        p
    }
}

/// Heap bytes in use now, or `None` where [`Counting`] is not the global allocator (nothing
/// has been counted: a running program always holds some heap).
pub fn in_use() -> Option<u64> {
    match IN_USE.load(Ordering::Relaxed) {
        0 => None,
        bytes => Some(bytes),
    }
}
