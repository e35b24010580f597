//! The control plane, in PostgreSQL: the cluster's shape (its shard map and
//! epoch), its cells (where each listens, which process last reported for
//! it, and when), and its routers.
//!
//! It **assigns**; it does not fence. The authority that stops a stale
//! process from committing is the cell's own store (the embedded store's
//! file lock). Nothing on the critical path reads it: routers and cells keep
//! a copy ([`follow`]), refreshed by LISTEN/NOTIFY and by polling every
//! [`POLL_PERIOD`], and a control plane that is down leaves the last copy in
//! place, so payments go on.
//!
//! Tables live in the schema [`SCHEMA`] of the database the URL names:
//!
//! | table | holds |
//! |---|---|
//! | `cluster` | one row: shard count, epoch, owner of every shard |
//! | `cells` | id, address, zone, state, the process that last reported, when |
//! | `routers` | name, address, when it last reported |
//! | `actions` | the operator action log: when, who, what |
//! | `switches` | degrade switches an operator set: name, mode (`on`, `off`, `auto`) |
//! | `rules` | one row: the flow rules in force, as JSON, cluster-wide |

mod saved;

pub use saved::{load_view, save_text};

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellpay_core::{CellId, ShardMap};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Client, NoTls};

pub const SCHEMA: &str = "cellpay";
/// The channel every change is announced on.
pub const NOTIFY_CHANNEL: &str = "cellpay_control";
/// How often a follower reads the control plane even without a notification.
pub const POLL_PERIOD: Duration = Duration::from_secs(1);
/// Wait before a follower reconnects after the control plane went away.
pub const RECONNECT_BACKOFF: Duration = Duration::from_secs(1);
/// Time to connect to the control plane, and the longest statement.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// A cell or router that has not reported for this long is shown as silent.
pub const SILENT_AFTER: Duration = Duration::from_secs(3);
/// The most cells a cluster may have (I7).
pub const CELLS_MAX: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the control plane is unreachable or failed: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("the control plane did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the control plane connection was lost")]
    Lost,
    #[error("the control plane holds no cluster yet: run `cellpay cluster init` first")]
    NotInitialised,
    #[error("{0}")]
    Mismatch(String),
    #[error("the control plane's records are damaged: {0}")]
    Damaged(String),
}

/// A cell as the control plane records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellEntry {
    pub id: CellId,
    /// Where its process serves the cell protocol, once one has reported.
    pub address: Option<String>,
    pub zone: String,
    /// `active` (serves its shards); later states come with moves and drains.
    pub state: String,
    /// The process that last reported for it (`pid@host`).
    pub process: Option<String>,
    /// Milliseconds since that report, as the database's clock says.
    pub seen_ms_ago: Option<u64>,
}

impl CellEntry {
    /// Has a process reported for this cell within [`SILENT_AFTER`]?
    pub fn reporting(&self) -> bool {
        self.seen_ms_ago.is_some_and(|ms| ms <= SILENT_AFTER.as_millis() as u64)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterEntry {
    pub name: String,
    pub address: Option<String>,
    pub seen_ms_ago: Option<u64>,
}

/// One consistent read of the control plane.
#[derive(Debug, Clone)]
pub struct ControlView {
    pub map: ShardMap,
    pub cells: Vec<CellEntry>,
    pub routers: Vec<RouterEntry>,
    /// Degrade switches an operator set, by name: `on`, `off` or `auto`.
    pub switches: Vec<(String, String)>,
    /// The flow rules an operator set, as JSON (none: each router's own file or defaults).
    pub rules_json: Option<String>,
    /// When this process read it.
    pub read_at: Instant,
}

impl ControlView {
    /// Routers that reported within [`SILENT_AFTER`] (at least 1: the reader itself).
    pub fn live_routers(&self) -> usize {
        self.routers
            .iter()
            .filter(|r| r.seen_ms_ago.is_some_and(|ms| ms <= SILENT_AFTER.as_millis() as u64))
            .count()
            .max(1)
    }

    /// Same cluster, same addresses and map: what a follower compares before publishing.
    fn same_assignment(&self, other: &ControlView) -> bool {
        self.map == other.map
            && self.cells.len() == other.cells.len()
            && self
                .cells
                .iter()
                .zip(&other.cells)
                .all(|(a, b)| a.id == b.id && a.address == b.address && a.state == b.state)
            && self.live_routers() == other.live_routers()
            && self.switches == other.switches
            && self.rules_json == other.rules_json
    }
}

/// A connection to the control plane.
pub struct Control {
    client: Client,
}

async fn timed<T>(f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>) -> Result<T, ControlError> {
    match tokio::time::timeout(STATEMENT_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ControlError::Timeout(STATEMENT_TIMEOUT)),
    }
}

fn config(url: &str) -> Result<tokio_postgres::Config, ControlError> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config.connect_timeout(CONNECT_TIMEOUT);
    config.application_name("cellpay");
    Ok(config)
}

impl Control {
    /// Connects; the connection is driven by a task of the current runtime.
    pub async fn connect(url: &str) -> Result<Self, ControlError> {
        let (client, connection) = timed(config(url)?.connect(NoTls)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("control plane connection ended: {e}");
            }
        });
        Ok(Self { client })
    }

    /// Creates the tables and the cluster: `cells` cells, `shards` shards
    /// dealt round-robin over all but the last `spare` (which stand by, owning
    /// nothing, until `cluster add-cell` fills them), epoch 1. Run again on
    /// the same shape it changes nothing and answers the map; on another
    /// shape it refuses.
    pub async fn init(&self, cells: u32, shards: u32, spare: u32) -> Result<ShardMap, ControlError> {
        if cells == 0 || cells > CELLS_MAX {
            return Err(ControlError::Mismatch(format!("a cluster has 1 to {CELLS_MAX} cells, not {cells}")));
        }
        if spare >= cells {
            return Err(ControlError::Mismatch(format!(
                "{spare} spare cells of {cells}: one cell at least owns the shards"
            )));
        }
        let wanted = ShardMap::round_robin(shards, cells - spare).map_err(|e| ControlError::Mismatch(e.to_string()))?;
        timed(self.client.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {SCHEMA};
             CREATE TABLE IF NOT EXISTS {SCHEMA}.cluster (
                 one boolean PRIMARY KEY DEFAULT true CHECK (one),
                 shards integer NOT NULL,
                 epoch bigint NOT NULL,
                 owners integer[] NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS {SCHEMA}.cells (
                 id integer PRIMARY KEY,
                 address text,
                 zone text NOT NULL DEFAULT 'local',
                 state text NOT NULL DEFAULT 'active',
                 process text,
                 seen_at timestamptz);
             CREATE TABLE IF NOT EXISTS {SCHEMA}.routers (
                 name text PRIMARY KEY,
                 address text,
                 seen_at timestamptz);
             CREATE TABLE IF NOT EXISTS {SCHEMA}.actions (
                 at timestamptz NOT NULL DEFAULT now(),
                 who text NOT NULL,
                 what text NOT NULL);
             CREATE TABLE IF NOT EXISTS {SCHEMA}.switches (
                 name text PRIMARY KEY,
                 mode text NOT NULL,
                 at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS {SCHEMA}.rules (
                 one boolean PRIMARY KEY DEFAULT true CHECK (one),
                 json text NOT NULL,
                 at timestamptz NOT NULL DEFAULT now());"
        )))
        .await?;
        let owners: Vec<i32> = wanted.owners().iter().map(|c| c.0 as i32).collect();
        let inserted = timed(self.client.execute(
            &format!("INSERT INTO {SCHEMA}.cluster (shards, epoch, owners) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"),
            &[&(shards as i32), &(wanted.epoch() as i64), &owners],
        ))
        .await?;
        if inserted == 1 {
            for c in 0..cells {
                timed(self.client.execute(
                    &format!("INSERT INTO {SCHEMA}.cells (id) VALUES ($1) ON CONFLICT DO NOTHING"),
                    &[&(c as i32)],
                ))
                .await?;
            }
            let what = format!("{cells} cells ({spare} standing by), {shards} shards, epoch {}", wanted.epoch());
            self.record("cluster init", &what).await?;
            return Ok(wanted);
        }
        let view = self.view().await?;
        if view.map.shards() != shards || view.cells.len() as u32 != cells {
            return Err(ControlError::Mismatch(format!(
                "the control plane holds a cluster of {} cells and {} shards, not {cells} and {shards}",
                view.cells.len(),
                view.map.shards()
            )));
        }
        Ok(view.map)
    }

    /// Reads the whole control plane in one transaction.
    pub async fn view(&self) -> Result<ControlView, ControlError> {
        let read = async {
            let tx_rows = self.client.query_opt(&format!("SELECT epoch, owners FROM {SCHEMA}.cluster"), &[]).await;
            let cluster = match tx_rows {
                Ok(row) => row,
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => None,
                Err(e) => return Err(ControlError::Db(e)),
            };
            let Some(cluster) = cluster else { return Err(ControlError::NotInitialised) };
            let epoch: i64 = cluster.get(0);
            let owners: Vec<i32> = cluster.get(1);
            let owners = owners.into_iter().map(|o| u32::try_from(o).map(CellId)).collect::<Result<Vec<_>, _>>();
            let owners = owners.map_err(|_| ControlError::Damaged("a negative cell id in the shard map".into()))?;
            let map = ShardMap::new(epoch as u64, owners).map_err(|e| ControlError::Damaged(e.to_string()))?;
            let ago = "(extract(epoch from (now() - seen_at)) * 1000)::bigint";
            let cells = self
                .client
                .query(&format!("SELECT id, address, zone, state, process, {ago} FROM {SCHEMA}.cells ORDER BY id"), &[])
                .await?
                .into_iter()
                .map(|r| CellEntry {
                    id: CellId(r.get::<_, i32>(0) as u32),
                    address: r.get(1),
                    zone: r.get(2),
                    state: r.get(3),
                    process: r.get(4),
                    seen_ms_ago: r.get::<_, Option<i64>>(5).map(|ms| ms.max(0) as u64),
                })
                .collect::<Vec<_>>();
            if cells.iter().enumerate().any(|(i, c)| c.id.0 as usize != i) {
                return Err(ControlError::Damaged("cell ids are not 0..n".into()));
            }
            if map.owners().iter().any(|o| o.0 as usize >= cells.len()) {
                return Err(ControlError::Damaged("the shard map names a cell that is not recorded".into()));
            }
            let routers = self
                .client
                .query(&format!("SELECT name, address, {ago} FROM {SCHEMA}.routers ORDER BY name"), &[])
                .await?
                .into_iter()
                .map(|r| RouterEntry {
                    name: r.get(0),
                    address: r.get(1),
                    seen_ms_ago: r.get::<_, Option<i64>>(2).map(|ms| ms.max(0) as u64),
                })
                .collect();
            let switches = self
                .client
                .query(&format!("SELECT name, mode FROM {SCHEMA}.switches ORDER BY name"), &[])
                .await?
                .into_iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let rules_json =
                self.client.query_opt(&format!("SELECT json FROM {SCHEMA}.rules"), &[]).await?.map(|r| r.get(0));
            Ok(ControlView { map, cells, routers, switches, rules_json, read_at: Instant::now() })
        };
        match tokio::time::timeout(STATEMENT_TIMEOUT, read).await {
            Ok(r) => r,
            Err(_) => Err(ControlError::Timeout(STATEMENT_TIMEOUT)),
        }
    }

    /// A cell process reports: where it serves, and who it is. Announced
    /// when the address changed.
    pub async fn report_cell(&self, cell: CellId, address: &str, process: &str) -> Result<(), ControlError> {
        let changed = timed(self.client.execute(
            &format!(
                "UPDATE {SCHEMA}.cells SET address = $2, process = $3, seen_at = now()
                 WHERE id = $1 AND address IS DISTINCT FROM $2"
            ),
            &[&(cell.0 as i32), &address, &process],
        ))
        .await?;
        if changed == 0 {
            let seen = timed(self.client.execute(
                &format!("UPDATE {SCHEMA}.cells SET process = $2, seen_at = now() WHERE id = $1"),
                &[&(cell.0 as i32), &process],
            ))
            .await?;
            if seen == 0 {
                return Err(ControlError::Mismatch(format!("the control plane records no cell {cell}")));
            }
        } else {
            self.notify().await?;
        }
        Ok(())
    }

    /// A router reports.
    pub async fn report_router(&self, name: &str, address: &str) -> Result<(), ControlError> {
        let fresh = timed(self.client.query_opt(
            &format!(
                "INSERT INTO {SCHEMA}.routers (name, address, seen_at) VALUES ($1, $2, now())
                 ON CONFLICT (name) DO UPDATE SET address = $2, seen_at = now()
                 RETURNING (xmax = 0)"
            ),
            &[&name, &address],
        ))
        .await?;
        if fresh.is_some_and(|r| r.get::<_, bool>(0)) {
            self.notify().await?;
        }
        Ok(())
    }

    /// Forgets a router that stopped.
    pub async fn forget_router(&self, name: &str) -> Result<(), ControlError> {
        timed(self.client.execute(&format!("DELETE FROM {SCHEMA}.routers WHERE name = $1"), &[&name])).await?;
        self.notify().await
    }

    /// Replaces the shard map with `next`, which must succeed the recorded one
    /// (a higher epoch, the same shards, only known cells). Cells and routers
    /// follow it; a cell that owned a shard it loses refuses its payers from
    /// then on (`wrong_cell`). Moving a shard that holds accounts also moves
    /// its data, which is the move's job, not this call's.
    pub async fn set_map(&self, next: &ShardMap, who: &str) -> Result<(), ControlError> {
        // One statement, one commit: the compare-and-set on the epoch (a
        // concurrent one waits for the row and then finds the epoch moved),
        // its line in the action log and the notification. It is on a shard
        // move's write pause.
        let Ok(owners) = next.owners().iter().map(|c| i32::try_from(c.0)).collect::<Result<Vec<i32>, _>>() else {
            return Err(ControlError::Mismatch("the map names a cell id beyond any cluster's".into()));
        };
        let what = format!("shard map epoch {} installed", next.epoch());
        let swapped = timed(self.client.query_one(
            &format!(
                "WITH up AS (
                     UPDATE {SCHEMA}.cluster SET epoch = $1, owners = $2
                      WHERE epoch < $1 AND cardinality(owners) = cardinality($2::integer[])
                        AND (SELECT coalesce(max(o), -1) FROM unnest($2::integer[]) AS o)
                            < (SELECT count(*) FROM {SCHEMA}.cells)
                        AND (SELECT coalesce(min(o), 0) FROM unnest($2::integer[]) AS o) >= 0
                     RETURNING epoch),
                 logged AS (INSERT INTO {SCHEMA}.actions (who, what) SELECT $3, $4 FROM up)
                 SELECT count(*) FROM (SELECT pg_notify('{NOTIFY_CHANNEL}', '') FROM up) AS notified"
            ),
            &[&(next.epoch() as i64), &owners, &who, &what],
        ))
        .await;
        match swapped {
            Ok(row) if row.get::<_, i64>(0) == 1 => return Ok(()),
            Ok(_) => {}
            Err(ControlError::Db(e)) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                return Err(ControlError::NotInitialised)
            }
            Err(e) => return Err(e),
        }
        // Refused: say why.
        let view = self.view().await?;
        view.map.check_successor(next).map_err(|e| ControlError::Mismatch(e.to_string()))?;
        if let Some(unknown) = next.owners().iter().find(|o| o.0 as usize >= view.cells.len()) {
            return Err(ControlError::Mismatch(format!("the map names cell {unknown}, which the cluster lacks")));
        }
        Err(ControlError::Mismatch(format!("the map changed under this call (it is at epoch {})", view.map.epoch())))
    }

    /// Whether the connection has ended (a new one is needed).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// An operator's degrade switch, for every router.
    pub async fn set_switch(&self, name: &str, mode: &str, who: &str) -> Result<(), ControlError> {
        timed(self.client.execute(
            &format!(
                "INSERT INTO {SCHEMA}.switches (name, mode) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET mode = $2, at = now()"
            ),
            &[&name, &mode],
        ))
        .await?;
        self.record(who, &format!("degrade switch {name} set to {mode}")).await?;
        self.notify().await
    }

    /// An operator's flow rules (JSON), for every router.
    pub async fn set_rules(&self, json: &str, who: &str) -> Result<(), ControlError> {
        timed(self.client.execute(
            &format!(
                "INSERT INTO {SCHEMA}.rules (json) VALUES ($1)
                 ON CONFLICT (one) DO UPDATE SET json = $1, at = now()"
            ),
            &[&json],
        ))
        .await?;
        self.record(who, "flow rules replaced").await?;
        self.notify().await
    }

    /// Appends to the operator action log.
    pub async fn record(&self, who: &str, what: &str) -> Result<(), ControlError> {
        timed(
            self.client.execute(&format!("INSERT INTO {SCHEMA}.actions (who, what) VALUES ($1, $2)"), &[&who, &what]),
        )
        .await?;
        Ok(())
    }

    /// The newest `limit` actions, newest first: (seconds ago, who, what).
    pub async fn actions(&self, limit: i64) -> Result<Vec<(f64, String, String)>, ControlError> {
        let rows = timed(self.client.query(
            &format!(
                "SELECT extract(epoch from (now() - at))::float8, who, what FROM {SCHEMA}.actions ORDER BY at DESC LIMIT $1"
            ),
            &[&limit],
        ))
        .await?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
    }

    async fn notify(&self) -> Result<(), ControlError> {
        timed(self.client.batch_execute(&format!("NOTIFY {NOTIFY_CHANNEL}"))).await
    }
}

/// Keeps a copy of the control plane: read at start, again on every
/// notification and every [`POLL_PERIOD`]; through an outage the last copy
/// stays. The receiver holds `None` until the first read succeeds. The task
/// ends when every receiver is dropped.
pub fn follow(url: String) -> watch::Receiver<Option<Arc<ControlView>>> {
    follow_kicked(url, Arc::new(tokio::sync::Notify::new()))
}

/// The least time between two reads that `kick` asked for.
const KICKED_READ_GAP: Duration = Duration::from_millis(100);

/// As [`follow`], and read again soon after `kick` is notified (a cell that
/// learns it is behind its callers' map catches up at once), at most every
/// [`KICKED_READ_GAP`].
pub fn follow_kicked(url: String, kick: Arc<tokio::sync::Notify>) -> watch::Receiver<Option<Arc<ControlView>>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut failures = 0u64;
        while !tx.is_closed() {
            if let Err(e) = follow_once(&url, &tx, &kick).await {
                failures += 1;
                // The first failure of an outage is a warning; the rest are repeats.
                if failures == 1 {
                    tracing::warn!("control plane unreachable, keeping the last copy: {e}");
                } else {
                    tracing::debug!(failures, "control plane still unreachable: {e}");
                }
            }
            tokio::time::sleep(RECONNECT_BACKOFF).await;
        }
    });
    rx
}

/// One connection's life: LISTEN, then read on every notification and poll.
async fn follow_once(
    url: &str,
    tx: &watch::Sender<Option<Arc<ControlView>>>,
    kick: &tokio::sync::Notify,
) -> Result<(), ControlError> {
    let (client, mut connection) = timed(config(url)?.connect(NoTls)).await?;
    let (notes_tx, mut notes) = mpsc::channel::<()>(16);
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    let _ = notes_tx.try_send(());
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("control plane connection ended: {e}");
                    break;
                }
            }
        }
    });
    let control = Control { client };
    let run = async {
        timed(control.client.batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))).await?;
        loop {
            let view = control.view().await?;
            let changed = tx.borrow().as_ref().is_none_or(|old| !old.same_assignment(&view));
            if changed {
                tracing::debug!(
                    epoch = view.map.epoch(),
                    cells = view.cells.len(),
                    "control plane read: the assignment changed"
                );
            }
            // Always published: the copy's age is part of what it says.
            tx.send_replace(Some(Arc::new(view)));
            let read_at = tokio::time::Instant::now();
            tokio::select! {
                _ = tokio::time::sleep(POLL_PERIOD) => {}
                note = notes.recv() => if note.is_none() { return Err(ControlError::Lost) },
                _ = kick.notified() => tokio::time::sleep_until(read_at + KICKED_READ_GAP).await,
                _ = tx.closed() => return Ok(()),
            }
        }
    };
    let result = run.await;
    driver.abort();
    result
}
