//! AFL++ target `tier_run`: see `cellpay_fuzzing::tier_run`.

#[global_allocator]
static ALLOC: cellpay_fuzzing::bound::BoundedAlloc = cellpay_fuzzing::bound::BoundedAlloc;

fn main() {
    afl::fuzz!(|data: &[u8]| cellpay_fuzzing::run("tier_run", data));
}
