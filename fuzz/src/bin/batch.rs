//! AFL++ target `batch`: see `cellpay_fuzzing::batch`.

#[global_allocator]
static ALLOC: cellpay_fuzzing::bound::BoundedAlloc = cellpay_fuzzing::bound::BoundedAlloc;

fn main() {
    afl::fuzz!(|data: &[u8]| cellpay_fuzzing::run("batch", data));
}
