//! The process's allocator: small blocks from mimalloc, large ones from the system's (glibc).
//!
//! - Small blocks (events, strings, futures, headers) cross threads all the time: an audit
//!   event built on a request worker is dropped by the audit writer. glibc frees such a block
//!   under the lock of the arena it came from; mimalloc frees it without one. With mimalloc for
//!   everything, the audited tiny-file rate rose 14–26 % in the benchmark.
//! - Large blocks (stream buffers of 128 KiB pieces and 512 KiB chunks, actix's write buffer)
//!   are made by a blocking reader thread and freed by a request worker. With mimalloc for
//!   these too, 64 ranged streams peaked at 309 MiB resident instead of about 45 MiB, so they
//!   stay with glibc, tuned for them at start (`tune_malloc` in `main.rs`).
//!
//! mimalloc's eager commit is turned off by its first allocation, so its memory is committed
//! as it is used instead of a segment (or an arena) at a time. With it on, the benchmark's 64
//! ranged streams peaked at 69–77 MiB resident, against the 64 MiB target; with it off, at
//! about 51 MiB (glibc alone: 44–46). Set at the start of `main` instead, it came too late
//! (72 MiB), since allocations before `main` already take memory; so it is set in `alloc`.
//! `MIMALLOC_EAGER_COMMIT` and `MIMALLOC_ARENA_EAGER_COMMIT` are overridden.
//!
//! Which allocator owns a block follows from its size alone, and `dealloc` and `realloc` are
//! given the size the block was made (or last resized) with, so each block goes back where it
//! came from. A `realloc` across the threshold moves the block.

use std::alloc::{GlobalAlloc, Layout, System};

unsafe extern "C" {
    /// From the mimalloc library that `libmimalloc-sys` builds and links (`mi_option_t` is a C
    /// enum, passed as an int).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_eager_commit` and `mi_option_arena_eager_commit` in mimalloc 2's `mi_option_e`.
const EAGER_COMMIT: std::ffi::c_int = 3;
const ARENA_EAGER_COMMIT: std::ffi::c_int = 4;

/// Blocks of at least this many bytes come from the system allocator.
const LARGE: usize = 64 * 1024;

pub struct Hybrid;

/// Whether the options were set (two threads setting them at once is harmless).
static TUNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns mimalloc's eager commit off before its first block (see the module's notes).
fn tune_once() {
    use std::sync::atomic::Ordering::Relaxed;
    if !TUNED.load(Relaxed) {
        TUNED.store(true, Relaxed);
        // SAFETY: sets two of mimalloc's options, which take any value at any time.
        unsafe {
            mi_option_set(EAGER_COMMIT, 0);
            mi_option_set(ARENA_EAGER_COMMIT, 0);
        }
    }
}

fn small(size: usize) -> bool {
    size < LARGE
}

/// mimalloc, for a new block: its options are set before its first one.
fn mi() -> mimalloc::MiMalloc {
    tune_once();
    mimalloc::MiMalloc
}

// SAFETY: every call is forwarded to the allocator that owns the block's size class, with the
// caller's own layout; `realloc` across classes allocates in the new class, copies the bytes
// both sizes share, and frees the old block in its class.
unsafe impl GlobalAlloc for Hybrid {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract (a non-zero-size layout) is passed on unchanged.
        unsafe {
            if small(layout.size()) {
                mi().alloc(layout)
            } else {
                System.alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        unsafe {
            if small(layout.size()) {
                mi().alloc_zeroed(layout)
            } else {
                System.alloc_zeroed(layout)
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was made by this allocator with `layout`, so by the allocator that
        // `layout.size()` selects.
        unsafe {
            if small(layout.size()) {
                mimalloc::MiMalloc.dealloc(ptr, layout)
            } else {
                System.dealloc(ptr, layout)
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (was_small, is_small) = (small(layout.size()), small(new_size));
        // SAFETY: `ptr` belongs to the allocator `layout.size()` selects; within one class the
        // call is forwarded as is. Across classes, the new block is valid for `new_size` bytes,
        // the old one for `layout.size()`, and they do not overlap.
        unsafe {
            match (was_small, is_small) {
                (true, true) => mimalloc::MiMalloc.realloc(ptr, layout, new_size),
                (false, false) => System.realloc(ptr, layout, new_size),
                _ => {
                    let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills a block with a pattern that depends on the offset.
    fn fill(p: *mut u8, n: usize) {
        for i in 0..n {
            // SAFETY: the tests below only call this on blocks of at least `n` bytes.
            unsafe { *p.add(i) = (i % 251) as u8 }
        }
    }

    fn holds_pattern(p: *const u8, n: usize) -> bool {
        // SAFETY: as for `fill`.
        (0..n).all(|i| unsafe { *p.add(i) } == (i % 251) as u8)
    }

    #[test]
    fn blocks_keep_their_bytes_and_alignment_across_the_threshold() {
        let a = Hybrid;
        for align in [1, 8, 16, 64, 4096] {
            for (from, to) in [
                (100, 200),
                (LARGE - 1, LARGE),
                (1000, 3 * LARGE),
                (3 * LARGE, 500),
                (LARGE, LARGE - 1),
                (2 * LARGE, 5 * LARGE),
            ] {
                let layout = Layout::from_size_align(from, align).unwrap();
                // SAFETY: non-zero sizes; every block is freed once with its current layout.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0);
                    fill(p, from);
                    let q = a.realloc(p, layout, to);
                    assert!(!q.is_null());
                    assert_eq!(q as usize % align, 0, "{from} -> {to} at align {align}");
                    assert!(holds_pattern(q, from.min(to)), "{from} -> {to}");
                    a.dealloc(q, Layout::from_size_align(to, align).unwrap());
                }
            }
        }
    }

    #[test]
    fn zeroed_blocks_are_zero_in_both_classes() {
        let a = Hybrid;
        for size in [64, LARGE - 8, LARGE, 4 * LARGE] {
            let layout = Layout::from_size_align(size, 8).unwrap();
            // SAFETY: non-zero size; freed once with the same layout.
            unsafe {
                let p = a.alloc_zeroed(layout);
                assert!(!p.is_null());
                assert!((0..size).all(|i| *p.add(i) == 0), "size {size}");
                a.dealloc(p, layout);
            }
        }
    }
}
