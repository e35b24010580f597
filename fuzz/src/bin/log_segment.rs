//! AFL++ target `log_segment`: see `cellpay_fuzzing::log_segment`.

#[global_allocator]
static ALLOC: cellpay_fuzzing::bound::BoundedAlloc = cellpay_fuzzing::bound::BoundedAlloc;

fn main() {
    afl::fuzz!(|data: &[u8]| cellpay_fuzzing::run("log_segment", data));
}
