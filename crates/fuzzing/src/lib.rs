//! cellpay-fuzzing: the fuzz harnesses of every decoder that reads bytes from
//! outside the process (the log, logged batches, snapshots, the idempotency
//! tier's run files and records, HTTP bodies, the cell protocol's bodies).
//!
//! Each harness takes any bytes and must return: the input decodes or is
//! refused with an error, never a panic, and no single allocation exceeds
//! [`bound::bytes_max_for`] the input's size. The AFL++ targets in `fuzz/`
//! call them, and so does the corpus replay in `tests/replay.rs`, which runs
//! in `cargo test --workspace`; both install [`bound::BoundedAlloc`].
//! `docs/TESTING.md` says how to run them.
//!
//! ```
//! // Any bytes at all: an error, never a panic.
//! cellpay_fuzzing::run("batch", b"\x03\xff\xff\xff\xff");
//! ```

pub mod bound;
mod codec;
mod http;
mod log;
pub mod seeds;
mod tier;
mod wire;

pub use codec::{batch, idempotency_record, snapshot};
pub use http::http_bodies;
pub use log::log_segment;
pub use tier::tier_run;
pub use wire::{wire, WIRE_KINDS};

/// A harness: decodes one input, panics (or aborts) on a bug.
pub type Harness = fn(&[u8]);

/// Every target, by the name its corpus directory and AFL++ binary carry.
pub const TARGETS: &[(&str, Harness)] = &[
    ("log_segment", log_segment),
    ("batch", batch),
    ("snapshot", snapshot),
    ("tier_run", tier_run),
    ("idempotency_record", idempotency_record),
    ("http_bodies", http_bodies),
    ("wire", wire),
];

/// The harness named `target`.
pub fn harness(target: &str) -> Option<Harness> {
    TARGETS.iter().find(|(name, _)| *name == target).map(|(_, h)| *h)
}

/// Runs harness `target` on `data` under the allocation bound for its size.
///
/// # Panics
///
/// On an unknown target, and wherever the harness finds a bug.
pub fn run(target: &str, data: &[u8]) {
    let harness = harness(target).unwrap_or_else(|| panic!("no fuzz target named {target}"));
    let _bound = bound::limit(bound::bytes_max_for(data.len()));
    harness(data);
}

/// A fresh directory for the files a harness writes, in memory when the
/// machine has `/dev/shm` (a fuzzer runs thousands of inputs a second).
pub(crate) fn scratch_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    let made = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() };
    made.expect("a scratch directory")
}
