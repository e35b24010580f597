//! A `cellpay serve` child process on a free loopback port with a fresh data
//! dir, for commands that need a cluster of their own (`bench http`,
//! `rehearse`, the drills), placed on the CPUs its [`Plan`] gives the server.
//! It is stopped with SIGTERM when dropped.

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Stdio};

use anyhow::Context;

use crate::placement::Plan;

pub struct Started {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Started {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Starts `cellpay serve` with `cells` cells and one admin token, placed as
/// `placement` says; returns once it is ready. Start it before the generator
/// pins itself: a child inherits its parent's CPUs.
pub fn start_server(cells: u32, admin_token: &str, placement: &Plan) -> anyhow::Result<(Started, SocketAddr)> {
    start_server_with(cells, admin_token, placement, &[])
}

/// The same, with more `serve` flags.
pub fn start_server_with(
    cells: u32,
    admin_token: &str,
    placement: &Plan,
    extra: &[&str],
) -> anyhow::Result<(Started, SocketAddr)> {
    let dir = tempfile::tempdir()?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["serve", "--listen", "127.0.0.1:0", "--cells", &cells.to_string(), "--data-dir"])
        .arg(dir.path())
        .args(placement.serve_args())
        .args(extra)
        .env("CELLPAY_TOKENS", format!("admin:{admin_token}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut addr = None;
    for line in lines.by_ref() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("cellpay listening on http://") {
            addr = Some(rest.split(' ').next().unwrap_or_default().parse()?);
        }
        if line.starts_with("cellpay ready") {
            break;
        }
    }
    // Keep draining the child's stdout so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let started = Started { child, _dir: dir };
    let addr = addr.context("serve did not print its address")?;
    Ok((started, addr))
}
