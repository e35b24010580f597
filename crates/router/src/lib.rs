//! cellpay-router: the stateless front of a cluster.
//!
//! It routes each request by the payer's shard to the cell that owns it
//! (DESIGN.md section 2), splits a batch by payer cell and puts the answers
//! back in order, sends a transfer-status read to the payer's cell (a transfer
//! id is unique per payer) or, without the payer, to every cell, reconciles
//! the audit over every pair of cells, and starts the relays between every pair of cells. Cells
//! are reached through [`CellClient`], so a cell in another process fits the
//! same slot as one in this process. Every request and every call to a cell
//! passes the protection stack of [`protect`], and the declared degrade plan
//! of [`degrade`] decides what is switched off first.

mod audit;
mod cluster;
pub mod degrade;
pub mod moves;
pub mod protect;

pub use audit::{AuditReport, ClusterAudit, AUDIT_ATTEMPTS_MAX};
pub use cluster::{Cluster, RelayHandle, Routed};
pub use degrade::{Action, Degrade, Mode, Plan, Signals, UnknownSwitch};
pub use moves::{
    move_shard, resume_moves, MapAuthority, MoveError, MoveLimits, MoveReport, Mover, MoverFigures, PlanProgress,
    Resumed, SwapError,
};
pub use protect::rules::{FlowRules, Route, RulesError};
pub use protect::{Admission, Layer, Protection, RouteError};
