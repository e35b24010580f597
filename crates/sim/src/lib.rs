//! cellpay-sim: deterministic simulation of a whole cellpay cluster.
//!
//! The real code runs under a seeded scheduler on one thread: the engine's
//! batch cycle ([`cellpay_cell::SteppedCell`]), recovery, the state machine,
//! the relays' rounds ([`cellpay_cell::Relay::round`]) over the real
//! [`cellpay_cell::CellClient`] interface, and the shard map's routing. Only
//! the world around it is simulated: the clock (each batch's time), the disk
//! ([`disk`]) and the network ([`net`]). The same seed gives the same run,
//! bit for bit; a failure prints the command that replays it.

pub mod disk;
pub mod net;
pub mod rng;
mod sim;

pub use sim::{run, Mutation, SimConfig, SimFailure, SimReport};
