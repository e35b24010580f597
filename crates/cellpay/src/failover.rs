//! `cellpay drill failover`: every cell's data in a PostgreSQL primary with a
//! synchronous standby ([`PgPair`]); under load the primary is killed with
//! SIGKILL (every one of its processes, as when its machine dies), the
//! standby is promoted, the old primary is fenced, and the cells find the new
//! primary themselves (their store URL names both servers and asks for the
//! one that accepts writes). The verdict: nothing acknowledged was lost (RPO
//! 0), the cluster served again within [`FAILOVER_TARGET_S`], the old primary
//! cannot take writes, and the audit is exact.
//!
//! What the drill checks of the settings before it kills anything: the
//! primary's `synchronous_standby_names` names a standby, its
//! `synchronous_commit` waits for it (`on`, `remote_write` or
//! `remote_apply`), and that standby streams in state `sync`. Asynchronous
//! replication breaks I2: a batch the primary acknowledged can be missing on
//! the standby that replaces it.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use cellpay_stress::{Report, Runner};
use serde_json::{json, Value};

use crate::drill::{
    answers, check, errors_by_code, nothing_lost_check, profile, run_prepared, share_ok, stage, Check, Cluster,
};
use crate::pg_pair::{replication, PgPair};

/// From the primary's death to the first write served on the promoted
/// standby (issue 17's target).
pub const FAILOVER_TARGET_S: f64 = 10.0;
/// How long after the primary's death the drill promotes the standby: the
/// time a failover manager (Patroni, pg_auto_failover) takes to decide the
/// primary is gone. Declared, so the figure can be compared with yours.
pub const PROMOTE_AFTER: Duration = Duration::from_secs(1);
/// With `--asynchronous`, how long before the kill the WAL sender is stalled.
const STALL_BEFORE_KILL: Duration = Duration::from_secs(1);
/// The witness writes one account every this often, one at a time.
const WITNESS_GAP: Duration = Duration::from_millis(10);

/// What the witness wrote: each account opened, when it was sent (from the
/// start of the drill) and whether it was acknowledged (201).
#[derive(Default)]
struct Witness {
    writes: Mutex<Vec<(String, Duration, bool)>>,
}

impl Witness {
    /// Opens accounts `failover-witness-<n>` one after another until `stop`.
    async fn run(self: Arc<Self>, http: cellpay_stress::http::Http, start: Instant, stop: Arc<AtomicBool>) {
        let prefix = format!("failover-witness-{}-", rand::random::<u32>());
        let mut n = 0u64;
        while !stop.load(SeqCst) {
            let id = format!("{prefix}{n}");
            n += 1;
            let sent = start.elapsed();
            let body = json!({"id": id, "currency": "CNY"}).to_string();
            let acked = http.send("POST", "/v1/accounts", Some(body)).await.is_ok_and(|r| r.status == 201);
            self.writes.lock().expect("witness lock").push((id, sent, acked));
            tokio::time::sleep(WITNESS_GAP).await;
        }
    }

    /// The first acknowledged write sent at or after `t`: when it was sent.
    fn first_acked_after(&self, t: Duration) -> Option<Duration> {
        let writes = self.writes.lock().expect("witness lock");
        writes.iter().filter(|(_, sent, acked)| *acked && *sent >= t).map(|(_, sent, _)| *sent).min()
    }

    /// (acknowledged, acknowledged within `window` before `t`).
    fn acked(&self, t: Duration, window: Duration) -> (Vec<String>, u64) {
        let writes = self.writes.lock().expect("witness lock");
        let acked: Vec<String> = writes.iter().filter(|w| w.2).map(|w| w.0.clone()).collect();
        let near = writes.iter().filter(|(_, sent, a)| *a && *sent < t && *sent + window >= t).count() as u64;
        (acked, near)
    }
}

/// Reads every acknowledged witness account back: answers the ids missing.
async fn missing(http: &cellpay_stress::http::Http, ids: &[String]) -> Vec<String> {
    let mut lost = Vec::new();
    for id in ids {
        let mut found = false;
        for _ in 0..50 {
            match http.send("GET", &format!("/v1/accounts/{id}"), None).await {
                Ok(r) if r.status == 200 => {
                    found = true;
                    break;
                }
                Ok(r) if r.status == 404 => break,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        if !found {
            lost.push(id.clone());
        }
    }
    lost
}

/// What the drill does to the primary.
#[derive(Clone, Copy)]
pub(crate) struct How {
    /// Stall the WAL sender for the last second before the kill (the test of
    /// the checks, with asynchronous replication).
    pub stall: bool,
    /// Restart the killed primary in place instead of promoting the standby.
    pub in_place: bool,
}

pub(crate) async fn failover(
    c: &Cluster,
    pair: Arc<PgPair>,
    short: bool,
    how: How,
    progress: bool,
) -> anyhow::Result<(Vec<Check>, Value, Vec<Report>)> {
    let (seconds, rate) = if short { (14.0, 300.0) } else { (40.0, 1_500.0) };
    let kill_at = Duration::from_secs_f64(if short { 4.0 } else { 12.0 });
    let settings = replication(&pair.primary_url()).await.context("reading the primary's replication state")?;
    let synchronous = settings.rpo_zero();
    let p = profile(&format!(
        "name = \"drill-failover\"\naccounts = 4000\nseed = 7\n{}[mix]\ntransfer = 70\nbalance = 20\nstatus = 10\n\
         [keys]\ncross_cell_share = 0.2\n",
        stage("steady", seconds, rate, rate)
    ))?;
    let runner = Runner::prepare(p, c.options(false, progress)).await?;
    let http = cellpay_stress::http::Http::new(&c.target, &c.token, false);
    let start = Instant::now();
    let (witness, stop) = (Arc::new(Witness::default()), Arc::new(AtomicBool::new(false)));
    let witnessing = tokio::spawn(witness.clone().run(http.clone(), start, stop.clone()));
    // The failure and the failover manager's steps, timed from the drill's start.
    let failing = {
        let pair = pair.clone();
        tokio::spawn(async move {
            if how.stall {
                tokio::time::sleep(kill_at - STALL_BEFORE_KILL).await;
                pair.stall_replication()?;
                tokio::time::sleep(STALL_BEFORE_KILL).await;
            } else {
                tokio::time::sleep(kill_at).await;
            }
            let killing = pair.clone();
            let killed = tokio::task::spawn_blocking(move || killing.kill_primary()).await??;
            let killed_at = start.elapsed();
            tokio::time::sleep(PROMOTE_AFTER).await;
            let acting = pair.clone();
            if how.in_place {
                tokio::task::spawn_blocking(move || acting.restart_old_primary()).await??;
            } else {
                tokio::task::spawn_blocking(move || acting.promote_standby()).await??;
                pair.fence_old_primary()?;
            }
            anyhow::Ok((killed, killed_at, start.elapsed()))
        })
    };
    let runs = run_prepared(vec![runner]).await?;
    stop.store(true, SeqCst);
    witnessing.await.context("the witness task")?;
    let (killed, killed_at, promoted_at) = failing.await.context("the failover task")??;
    // The old primary, started again by someone who did not get the news,
    // must come up read-only: the cells' URL asks for the one that accepts writes.
    let (old_writes, after) = if how.in_place {
        (None, replication(&pair.primary_url()).await.ok())
    } else {
        let restarting = pair.clone();
        tokio::task::spawn_blocking(move || restarting.restart_old_primary()).await??;
        (Some(PgPair::accepts_writes(pair.primary.port).await), replication(&pair.standby_url()).await.ok())
    };

    let back = witness.first_acked_after(killed_at).map(|t| t.saturating_sub(killed_at).as_secs_f64());
    let (acked, near_kill) = witness.acked(killed_at, Duration::from_secs(1));
    let lost = missing(&http, &acked).await;
    let (report, checked, missing_sampled) = &runs[0];
    let back_at = killed_at.as_secs_f64() + back.unwrap_or(seconds) + 1.0;
    let served = answers(report, back_at.ceil(), f64::INFINITY, |_| true);
    let mut checks = vec![
        check(
            "failover",
            back.is_some_and(|s| s < FAILOVER_TARGET_S),
            match back {
                Some(s) => format!(
                    "primary killed ({} processes) at {:.1} s, {} {:.2} s later (declared detection {:.1} s), first \
                     write served {s:.2} s after the kill (target < {FAILOVER_TARGET_S} s)",
                    killed.len(),
                    killed_at.as_secs_f64(),
                    if how.in_place { "restarted in place" } else { "standby promoted" },
                    (promoted_at - killed_at).as_secs_f64(),
                    PROMOTE_AFTER.as_secs_f64()
                ),
                None => "no write was served after the primary was killed".into(),
            },
        ),
        check(
            "synchronous",
            synchronous.is_ok(),
            match &synchronous {
                Ok(()) => format!(
                    "before the kill: synchronous_commit = {}, synchronous_standby_names = '{}', standbys {:?}",
                    settings.synchronous_commit, settings.synchronous_standby_names, settings.standbys
                ),
                Err(why) => why.clone(),
            },
        ),
        check(
            "rpo_zero",
            lost.is_empty() && !acked.is_empty(),
            format!(
                "{} of {} acknowledged witness writes missing after the failover ({near_kill} of them acknowledged in \
                 the last second before the kill){}",
                lost.len(),
                acked.len(),
                lost.first().map(|id| format!("; first missing {id}")).unwrap_or_default()
            ),
        ),
        nothing_lost_check(*checked, *missing_sampled),
        check(
            "recovered",
            served.0 > 0 && share_ok(served) >= 0.99,
            format!(
                "from one second after the first write served on: {:.2} % of {} requests succeeded; errors of the \
                 run by operation and code: {:?}",
                share_ok(served) * 100.0,
                served.0 + served.1,
                errors_by_code(report)
            ),
        ),
    ];
    if let Some(old_writes) = old_writes {
        checks.push(check(
            "fenced",
            matches!(old_writes, Ok(false)),
            match &old_writes {
                Ok(false) => "the old primary, started again, is read-only: the cells' URL skips it".into(),
                Ok(true) => "the old primary, started again, accepts writes: two primaries".into(),
                Err(e) => format!("the old primary did not answer after its restart: {e}"),
            },
        ));
    }
    let figures = json!({
        "in_place": how.in_place,
        "killed_at_s": killed_at.as_secs_f64(),
        "promote_after_s": PROMOTE_AFTER.as_secs_f64(),
        "promoted_or_restarted_at_s": promoted_at.as_secs_f64(),
        "failover_s": back,
        "witness_acked": acked.len(),
        "witness_acked_last_second_before_kill": near_kill,
        "witness_lost": lost.len(),
        "before": {
            "synchronous_commit": settings.synchronous_commit,
            "synchronous_standby_names": settings.synchronous_standby_names,
            "standbys": settings.standbys,
        },
        "after": after.map(|a| json!({
            "synchronous_standby_names": a.synchronous_standby_names,
            "standbys": a.standbys,
            "note": if how.in_place { "the restarted primary and its standby, as before" } else {
                "the promoted primary has no standby: attach one (pg_basebackup) before the peak, or a second failure loses data"
            },
        })),
    });
    Ok((checks, figures, runs.into_iter().map(|r| r.0).collect()))
}
