//! AFL++ target `idempotency_record`: see `cellpay_fuzzing::idempotency_record`.

#[global_allocator]
static ALLOC: cellpay_fuzzing::bound::BoundedAlloc = cellpay_fuzzing::bound::BoundedAlloc;

fn main() {
    afl::fuzz!(|data: &[u8]| cellpay_fuzzing::run("idempotency_record", data));
}
