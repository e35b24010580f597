//! One file per resource of the contract.

pub mod accounts;
pub mod admin;
pub mod dashboard;
pub mod ops;
pub mod transfers;
