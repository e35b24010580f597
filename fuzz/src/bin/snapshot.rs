//! AFL++ target `snapshot`: see `cellpay_fuzzing::snapshot`.

#[global_allocator]
static ALLOC: cellpay_fuzzing::bound::BoundedAlloc = cellpay_fuzzing::bound::BoundedAlloc;

fn main() {
    afl::fuzz!(|data: &[u8]| cellpay_fuzzing::run("snapshot", data));
}
