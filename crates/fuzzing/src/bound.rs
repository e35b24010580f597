//! A global allocator that refuses any single allocation above a bound (I7).
//!
//! A decoder that trusts a length field and calls `Vec::with_capacity(huge)`
//! does not crash on a small input: it asks the allocator for gigabytes, and
//! on a machine with overcommit it may even get them. So the fuzz targets and
//! the corpus replay install [`BoundedAlloc`], and each harness sets a bound
//! derived from its input's size ([`bytes_max_for`]) on its own thread while it
//! runs. An allocation above the bound prints what was asked and the input
//! being decoded, then aborts: AFL++ records a crash, the replay test fails.
//! It aborts rather than panics because an allocator must never unwind.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::io::Write;

/// Every harness may allocate this much at once, whatever its input: the
/// fixed buffers of the code under test (a shard map's digests, a tier
/// block, a serde scratch buffer) stay below it.
pub const FLOOR_BYTES: usize = 1 << 20;

/// And this much more per byte of input: a decoded value is larger than its
/// encoding (an `Account` of ~100 bytes from ~24 encoded), and a growing
/// `Vec` doubles, but nothing legitimate comes near 64 times.
pub const BYTES_PER_INPUT_BYTE: usize = 64;

/// The largest single allocation a harness may make on an input of `input_bytes`.
pub fn bytes_max_for(input_bytes: usize) -> usize {
    FLOOR_BYTES.saturating_add(input_bytes.saturating_mul(BYTES_PER_INPUT_BYTE))
}

thread_local! {
    /// The bound on this thread; `usize::MAX` outside a harness.
    static LIMIT: Cell<usize> = const { Cell::new(usize::MAX) };
    /// What the harness on this thread is decoding, for the abort message.
    static LABEL: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The bound in force on this thread until it is dropped.
#[must_use = "the bound holds while the guard lives"]
pub struct Bound {
    before: usize,
}

/// Bounds each allocation on this thread to `bytes_max` while the guard lives.
pub fn limit(bytes_max: usize) -> Bound {
    Bound { before: LIMIT.with(|l| l.replace(bytes_max)) }
}

impl Drop for Bound {
    fn drop(&mut self) {
        LIMIT.with(|l| l.set(self.before));
    }
}

/// Names the input the harness on this thread decodes next (the replay sets
/// the file's path), so an abort says which input asked for too much.
pub fn set_label(label: &str) {
    let new = label.to_owned();
    LABEL.with(|l| *l.borrow_mut() = new);
}

/// The global allocator of the fuzz targets and the replay test: the system
/// allocator, with the bound of [`limit`] checked first.
pub struct BoundedAlloc;

impl BoundedAlloc {
    fn check(size: usize) {
        let limit = LIMIT.try_with(Cell::get).unwrap_or(usize::MAX);
        if size > limit {
            // Lift the bound so that writing the message cannot recurse here.
            let _ = LIMIT.try_with(|l| l.set(usize::MAX));
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "fuzzing: one allocation of {size} bytes exceeds the bound of {limit} bytes");
            let _ = LABEL.try_with(|l| match l.try_borrow() {
                Ok(label) if !label.is_empty() => writeln!(err, "fuzzing: while decoding {label}"),
                _ => Ok(()),
            });
            let _ = writeln!(err, "{}", std::backtrace::Backtrace::force_capture());
            std::process::abort();
        }
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged; `check` only reads thread-locals and may abort, never unwind.
unsafe impl GlobalAlloc for BoundedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::check(layout.size());
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::check(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::check(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
