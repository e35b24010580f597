//! The cell protocol's bodies: commands (with the authority they act for),
//! outcomes, queries, answers and a cell's status, in the binary codec of the
//! log (`cellpay_core::codec`). Every body starts with the protocol version it
//! is written in. Decoding never panics and allocates no more than its input
//! backs (I7).
//!
//! STUB: filled in by the codec work.

use cellpay_cell::{CellFigures, CellStatus, EngineError};
use cellpay_core::codec::DecodeError;
use cellpay_core::{Command, Outcome, Query, QueryAnswer};

/// The protocol version this build writes.
pub const PROTOCOL_VERSION: u8 = 1;
/// The oldest protocol version this build still reads.
pub const PROTOCOL_VERSION_MIN: u8 = 1;
/// The most commands one submit call may carry (I7).
pub const SUBMIT_COMMANDS_MAX: usize = 1 << 16;

/// A cell's status as the status call answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub status: CellStatus,
    pub figures: CellFigures,
    /// Bumped whenever the cell's outbox may have grown.
    pub outbox_generation: u64,
}

pub fn encode_commands(_commands: &[Command]) -> Vec<u8> {
    unimplemented!()
}
pub fn decode_commands(_bytes: &[u8]) -> Result<Vec<Command>, DecodeError> {
    unimplemented!()
}
pub fn encode_outcomes(_result: &Result<Vec<Outcome>, EngineError>) -> Vec<u8> {
    unimplemented!()
}
pub fn decode_outcomes(_bytes: &[u8]) -> Result<Result<Vec<Outcome>, EngineError>, DecodeError> {
    unimplemented!()
}
pub fn encode_query(_query: &Query) -> Vec<u8> {
    unimplemented!()
}
pub fn decode_query(_bytes: &[u8]) -> Result<Query, DecodeError> {
    unimplemented!()
}
pub fn encode_answer(_result: &Result<QueryAnswer, EngineError>) -> Vec<u8> {
    unimplemented!()
}
pub fn decode_answer(_bytes: &[u8]) -> Result<Result<QueryAnswer, EngineError>, DecodeError> {
    unimplemented!()
}
pub fn encode_status(_report: &StatusReport) -> Vec<u8> {
    unimplemented!()
}
pub fn decode_status(_bytes: &[u8]) -> Result<StatusReport, DecodeError> {
    unimplemented!()
}
