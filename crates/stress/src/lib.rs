//! cellpay-stress: full-link stress on shadow traffic (DESIGN.md section 7).
//!
//! A [`Profile`] declares the workload; [`Runner`] seeds shadow accounts and
//! drives it open-loop against a cluster, checking routing, the audit and the
//! real ledger's digests while it runs; the [`Report`] says go or no-go and why.

pub mod cpu;
pub mod html;
pub mod http;
pub mod profile;
pub mod report;
pub mod run;

pub use profile::{Operation, Profile, ProfileError};
pub use report::Report;
pub use run::{RunError, RunOptions, Runner};
