//! The cell protocol's bodies (`cellpay_wire::codec`): what a router, relay
//! or cell process reads from another over HTTP/2. The first input byte picks
//! the body kind ([`WIRE_KINDS`], modulo their number), the rest is the body.
//! What decodes must encode to bytes that decode to the same value, and those
//! bytes must encode again unchanged (a decoded value has one encoding).

use cellpay_wire::codec::{
    decode_answer, decode_commands, decode_outcomes, decode_query, decode_status, encode_answer, encode_commands,
    encode_outcomes, encode_query, encode_status,
};

/// The body kinds, by the value of the input's first byte (modulo their number).
pub const WIRE_KINDS: [&str; 5] = ["commands", "outcomes", "query", "answer", "status"];

/// Decodes `body`; if it decodes, checks that its encoding decodes to the
/// same value and is a fixed point of decode-then-encode.
fn round_trip<T: PartialEq + std::fmt::Debug, E: std::fmt::Debug>(
    body: &[u8],
    decode: impl Fn(&[u8]) -> Result<T, E>,
    encode: impl Fn(&T) -> Vec<u8>,
) {
    let Ok(value) = decode(body) else { return };
    let bytes = encode(&value);
    let again = decode(&bytes).expect("an encoded body decodes");
    assert_eq!(again, value, "a body survives a round trip");
    assert_eq!(encode(&again), bytes, "a decoded body encodes to the bytes it was decoded from");
}

/// Target `wire`: one cell protocol body, of the kind the first byte picks.
pub fn wire(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else { return };
    match WIRE_KINDS[usize::from(kind) % WIRE_KINDS.len()] {
        "commands" => round_trip(body, decode_commands, |c| encode_commands(c)),
        "outcomes" => round_trip(body, decode_outcomes, encode_outcomes),
        "query" => round_trip(body, decode_query, encode_query),
        "answer" => round_trip(body, decode_answer, encode_answer),
        "status" => round_trip(body, decode_status, encode_status),
        other => unreachable!("WIRE_KINDS has no {other}"),
    }
}
