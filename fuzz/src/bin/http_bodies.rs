//! AFL++ target `http_bodies`: see `cellpay_fuzzing::http_bodies`.

#[global_allocator]
static ALLOC: cellpay_fuzzing::bound::BoundedAlloc = cellpay_fuzzing::bound::BoundedAlloc;

fn main() {
    afl::fuzz!(|data: &[u8]| cellpay_fuzzing::run("http_bodies", data));
}
