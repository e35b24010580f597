//! The cell protocol: how routers and relays reach a cell in another process.
//!
//! [`RemoteCell`] implements [`cellpay_cell::CellClient`] over HTTP/2 to a
//! cell process's [`serve`]; the router and the relays cannot tell it from a
//! cell in their own process.

pub mod client;
pub mod codec;
pub mod faults;
pub mod secret;
pub mod server;

pub use client::{RemoteCell, RemoteConfig};
pub use secret::ClusterSecret;
pub use server::{app, serve};
