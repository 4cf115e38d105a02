//! Byte-sized work split over the CPU's threads in consecutive parts (weight conversion on load,
//! filling the GPU's staging buffers): one thread moves ~2-10 GB/s, below what disks and PCIe do.

/// Bytes per part when `len` bytes of `width`-byte values go to the CPU's threads: a whole number
/// of values, at least `smallest` bytes (smaller parts cost more to spawn than to process).
pub fn part_bytes(len: usize, width: usize, smallest: usize) -> usize {
    len.div_ceil(threads()).max(smallest).div_ceil(width) * width
}

/// The threads the CPU offers (1 where that is unknown).
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `f(out part, bytes part)` for consecutive parts: `out` holds one element per `width` bytes.
pub fn zip_parts<T: Send>(
    out: &mut [T],
    bytes: &[u8],
    width: usize,
    smallest: usize,
    f: impl Fn(&mut [T], &[u8]) + Sync,
) {
    let per_part = part_bytes(bytes.len(), width, smallest);
    if per_part >= bytes.len() {
        return f(out, bytes);
    }
    std::thread::scope(|scope| {
        let f = &f;
        for (out, part) in out.chunks_mut(per_part / width).zip(bytes.chunks(per_part)) {
            scope.spawn(move || f(out, part));
        }
    });
}

/// `fill(part, offset of the part in out)` for consecutive parts of `out` (whole `width`-byte
/// values), on the CPU's threads; the first error in part order, if any.
pub fn fill_parts<E: Send>(
    out: &mut [u8],
    width: usize,
    smallest: usize,
    fill: impl Fn(&mut [u8], usize) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let per_part = part_bytes(out.len(), width, smallest);
    if per_part >= out.len() {
        return fill(out, 0);
    }
    std::thread::scope(|scope| {
        let fill = &fill;
        let parts: Vec<_> = out
            .chunks_mut(per_part)
            .enumerate()
            .map(|(i, part)| scope.spawn(move || fill(part, i * per_part)))
            .collect();
        // Every part joined before the first error is returned: a later part's panic surfaces
        // here, not as the scope ends.
        let results: Vec<_> = parts
            .into_iter()
            .map(|part| part.join().expect("a worker thread panicked"))
            .collect();
        results.into_iter().collect()
    })
}

/// `f` of each consecutive part of `bytes` (whole `width`-byte values), results in order.
pub fn map_parts<R: Send>(
    bytes: &[u8],
    width: usize,
    smallest: usize,
    f: impl Fn(&[u8]) -> R + Sync,
) -> Vec<R> {
    let per_part = part_bytes(bytes.len(), width, smallest);
    if per_part >= bytes.len() {
        return vec![f(bytes)];
    }
    std::thread::scope(|scope| {
        let f = &f;
        let parts: Vec<_> = bytes
            .chunks(per_part)
            .map(|part| scope.spawn(move || f(part)))
            .collect();
        parts
            .into_iter()
            .map(|part| part.join().expect("a worker thread panicked"))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte is filled once, by the part whose offset is given; the first error in part
    /// order comes back.
    #[test]
    fn fill_parts_covers_each_byte_once_with_its_offset() {
        let mut out = vec![0u8; (1 << 20) + 6];
        fill_parts(&mut out, 2, 1 << 12, |part, at| {
            for (i, b) in part.iter_mut().enumerate() {
                *b = b.wrapping_add(((at + i) % 251) as u8 + 1);
            }
            Ok::<(), ()>(())
        })
        .unwrap();
        assert!(
            out.iter()
                .enumerate()
                .all(|(i, &b)| b == (i % 251) as u8 + 1)
        );
        let first_bad = fill_parts(&mut out, 2, 1 << 12, |part, at| {
            if at + part.len() > 1 << 19 {
                Err(at)
            } else {
                Ok(())
            }
        });
        let parts = part_bytes(out.len(), 2, 1 << 12);
        assert_eq!(first_bad, Err((1 << 19) / parts * parts));
    }
}
