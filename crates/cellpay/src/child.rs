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
    /// A many-process cluster's control plane database, dropped after it stops.
    database: Option<(String, String)>,
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
        if let Some((url, db)) = self.database.take() {
            if let Err(e) = drop_database(&url, &db) {
                tracing::warn!("could not drop the drill's control plane database {db}: {e}");
            }
        }
    }
}

/// Drops database `db` of the PostgreSQL at `url` (connecting to its `postgres` database).
fn drop_database(url: &str, db: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut config: tokio_postgres::Config = url.parse()?;
        config.dbname("postgres");
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client.batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)")).await?;
        anyhow::Ok(())
    })
}

/// What `cellpay up` printed: members started (with their pids) and restarted.
#[derive(Clone, Default)]
pub struct UpLines(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl UpLines {
    /// The pid `up` last started `member` ("cell 1") with.
    pub fn pid_of(&self, member: &str) -> Option<u32> {
        let prefix = format!("cellpay up: started {member} (pid ");
        let lines = self.0.lock().expect("lines lock");
        let line = lines.iter().rev().find(|l| l.starts_with(&prefix))?;
        line[prefix.len()..].trim_end_matches(')').parse().ok()
    }

    pub fn printed(&self, text: &str) -> bool {
        self.0.lock().expect("lines lock").iter().any(|l| l.contains(text))
    }
}

/// Starts `cellpay up` (cells and one router as processes, the control plane
/// in a fresh database of the PostgreSQL at `postgres`, dropped when it
/// stops), placed as `placement` says, with more `up` flags; returns once
/// the router is ready.
pub fn start_up(
    cells: u32,
    admin_token: &str,
    placement: &Plan,
    postgres: &str,
    extra: &[&str],
) -> anyhow::Result<(Started, SocketAddr, UpLines)> {
    let dir = tempfile::tempdir()?;
    let db = format!("cellpay_drill_{}_{}", std::process::id(), rand::random::<u32>());
    let control = format!("{}/{db}", postgres.trim_end_matches('/'));
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["up", "--listen", "127.0.0.1:0", "--routers", "1", "--cells", &cells.to_string(), "--data-dir"])
        .arg(dir.path())
        .args(["--control", &control])
        .args(placement.serve_args())
        .args(extra)
        .env("CELLPAY_TOKENS", format!("admin:{admin_token}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let started = Started { child, _dir: dir, database: Some((postgres.to_string(), db)) };
    let lines = UpLines::default();
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                lines.0.lock().expect("lines lock").push(line.clone());
                let _ = tx.send(line);
            }
        });
    }
    loop {
        let line = rx.recv_timeout(std::time::Duration::from_secs(120)).context("cellpay up did not get ready")?;
        if let Some(rest) = line.strip_prefix("cellpay up ready: routers at http://") {
            let addr = rest.split(' ').next().unwrap_or_default().parse()?;
            return Ok((started, addr, lines));
        }
        anyhow::ensure!(!line.starts_with("cellpay up: not every router"), "{line}");
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
    let started = Started { child, _dir: dir, database: None };
    let addr = addr.context("serve did not print its address")?;
    Ok((started, addr))
}
