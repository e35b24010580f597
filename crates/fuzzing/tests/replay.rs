//! Replays the saved fuzz corpora as an ordinary test: every file under
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` runs through its
//! harness, with the allocation bound in force. A regression (a crash the
//! fuzzer once found) is a file in `fuzz/regressions/<target>/`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use cellpay_fuzzing::bound::{self, BoundedAlloc};

#[global_allocator]
static ALLOC: BoundedAlloc = BoundedAlloc;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<PathBuf> =
        entries.map(|e| e.expect("a readable corpus dir").path()).filter(|p| p.is_file()).collect();
    out.sort();
    out
}

/// Runs every file of `target`'s corpus and regressions; answers how many ran.
fn replay(target: &str) -> usize {
    let mut failures = Vec::new();
    let mut ran = 0;
    for sub in ["corpus", "regressions"] {
        for file in files(&fuzz_dir().join(sub).join(target)) {
            let data = std::fs::read(&file).expect("a readable corpus file");
            bound::set_label(&file.display().to_string());
            if catch_unwind(AssertUnwindSafe(|| cellpay_fuzzing::run(target, &data))).is_err() {
                failures.push(file.display().to_string());
            }
            ran += 1;
        }
    }
    assert!(failures.is_empty(), "{target}: these inputs panicked (the message is above):\n{}", failures.join("\n"));
    ran
}

#[test]
fn every_target_has_a_corpus_and_every_input_passes() {
    for (target, _) in cellpay_fuzzing::TARGETS {
        let ran = replay(target);
        assert!(ran > 0, "fuzz/corpus/{target} is empty: run cellpay-fuzz-seeds");
    }
}

#[test]
fn the_seeds_made_now_pass_too() {
    for seed in cellpay_fuzzing::seeds::seeds() {
        bound::set_label(&format!("seed {}/{}", seed.target, seed.name));
        cellpay_fuzzing::run(seed.target, &seed.bytes);
    }
}
