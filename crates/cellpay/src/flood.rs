//! The flood phase of `cellpay drill overload`: ten times capacity (or the
//! most the generator can send from its CPUs, whichever is lower) for 30 s.
//! The server must not crash, must keep its memory within what its declared
//! limits allow, and must serve payments again within
//! [`RECOVERY_S_MAX`] once the flood stops.
//!
//! Memory is the server's resident set, read from `/proc/PID/status` every
//! [`RSS_SAMPLE`] through the flood. What a flood may add is bounded by the
//! limits the server declares for what clients hold: request bodies in flight
//! (`body_bytes_in_flight_max`) and the generator's connections at
//! [`CONNECTION_BYTES_MAX`] each (hyper's read and write buffers); the cells'
//! queues are bounded too, and small beside those.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellpay_stress::http::Http;
use cellpay_stress::{Report, Runner};
use serde_json::{json, Value};

use crate::drill::{answered, check, goodput, Check, PAYMENT_P99_SLO_MS};

/// The flood's offered load, as a multiple of the capacity found.
pub const FLOOD_TIMES_CAPACITY: f64 = 10.0;
/// The share of the generator's measured ceiling a flood offers at most, so
/// that it lasts its time instead of falling behind.
pub const CEILING_SHARE: f64 = 0.9;
/// After the flood, payments must be served again within this long.
pub const RECOVERY_S_MAX: f64 = 5.0;
/// How often the server's resident set is read during the flood.
pub const RSS_SAMPLE: Duration = Duration::from_millis(250);
/// What one client connection may hold in the server: hyper's HTTP/1 read
/// buffer (grows to 400 KiB at most, but a drill's requests are small) and
/// its write buffer; 64 KiB is generous for requests of a few hundred bytes.
pub const CONNECTION_BYTES_MAX: u64 = 64 << 10;
/// Payments recovered means this many in a row answered 201 within the SLO.
const RECOVERED_IN_A_ROW: usize = 5;

/// The server's resident set in bytes, from `/proc/PID/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib << 10)
}

/// Whether the process is still alive (not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(|r| !r.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// Runs the prepared flood while sampling the server's memory, then probes
/// for recovery. `connections` is the most connections the generator opens.
pub async fn flood(
    runner: Runner,
    http: &Http,
    pid: u32,
    connections: u64,
    offered_per_s: f64,
    capacity: f64,
) -> anyhow::Result<(Vec<Check>, Value, Report)> {
    let before = rss_bytes(pid).unwrap_or(0);
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            while let Some(rss) = rss_bytes(pid) {
                peak.fetch_max(rss, Relaxed);
                tokio::time::sleep(RSS_SAMPLE).await;
            }
        })
    };
    let report = Arc::new(runner).run().await?;
    let recovered_after = recovery(http).await;
    sampler.abort();
    let peak = peak.load(Relaxed).max(rss_bytes(pid).unwrap_or(0));
    // The drills start their server with the default front limits.
    let body_bytes = cellpay_api::FrontLimits::default().body_bytes_in_flight_max as u64;
    let allowed = body_bytes + connections * CONNECTION_BYTES_MAX;
    let grew = peak.saturating_sub(before);
    let up = alive(pid);
    let (answered, good) = (answered(&report), goodput(&report));
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    // The probe starts as the flood's last request is answered.
    let recovered_s = recovered_after.map(|d| d.as_secs_f64());
    let sent_per_s = report.generator.sent_requests as f64 / report.duration_s;
    let by_capacity = offered_per_s >= FLOOD_TIMES_CAPACITY * capacity * 0.999;
    let decided_by = match (by_capacity, report.generator.saturated) {
        (true, false) => format!("{FLOOD_TIMES_CAPACITY}x capacity, {offered_per_s:.0}/s"),
        (false, false) => format!(
            "{offered_per_s:.0}/s = {:.1}x capacity, the generator's measured ceiling on its CPUs (less than {FLOOD_TIMES_CAPACITY}x)",
            offered_per_s / capacity
        ),
        (_, true) => format!("{offered_per_s:.0}/s, of which the generator could send only {sent_per_s:.0}/s"),
    };
    let checks = vec![
        check(
            "flood_alive",
            up,
            format!(
                "the server {} {:.0} s of flood, offered {decided_by}; answered {answered:.0}/s",
                if up { "survived" } else { "did not survive" },
                report.duration_s
            ),
        ),
        check(
            "flood_memory",
            grew <= allowed,
            format!(
                "resident set {:.0} MiB before, {:.0} MiB at its peak (+{:.0} MiB; declared limits allow +{:.0} MiB)",
                mib(before),
                mib(peak),
                mib(grew),
                mib(allowed)
            ),
        ),
        check(
            "flood_recovery",
            recovered_s.is_some_and(|s| s <= RECOVERY_S_MAX),
            match recovered_s {
                Some(s) => format!(
                    "payments served within the SLO {s:.2} s after the flood stopped (at most {RECOVERY_S_MAX} s)"
                ),
                None => format!("payments not served within the SLO {RECOVERY_S_MAX} s after the flood"),
            },
        ),
    ];
    let figures = json!({
        "offered_per_s": offered_per_s,
        "sent_per_s": sent_per_s,
        "decided_by": if by_capacity && !report.generator.saturated { "capacity" } else { "generator" },
        "times_capacity": offered_per_s / capacity,
        "generator_saturated": report.generator.saturated,
        "answered_per_s": answered,
        "goodput_per_s": good,
        "rss_before_bytes": before,
        "rss_peak_bytes": peak,
        "rss_allowed_growth_bytes": allowed,
        "recovered_after_s": recovered_s,
    });
    Ok((checks, figures, report))
}

/// Time from now until [`RECOVERED_IN_A_ROW`] payments in a row are answered
/// 201 within the payment SLO; `None` if not within twice [`RECOVERY_S_MAX`].
async fn recovery(http: &Http) -> Option<Duration> {
    let started = Instant::now();
    let open = |id: &str, overdraft: bool| json!({"id": id, "currency": "CNY", "overdraft": overdraft}).to_string();
    let (bank, shop) = ("drill-flood-bank", "drill-flood-shop");
    let mut in_a_row = 0;
    let mut first_ok: Option<Duration> = None;
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs_f64(2.0 * RECOVERY_S_MAX) {
        n += 1;
        let sent = Instant::now();
        // Opening is idempotent: the probe's accounts exist after the first answer.
        let ok = if in_a_row == 0 {
            let a = http.send("POST", "/v1/accounts", Some(open(bank, true))).await;
            let b = http.send("POST", "/v1/accounts", Some(open(shop, false))).await;
            matches!((a, b), (Ok(a), Ok(b)) if a.status < 300 && b.status < 300)
        } else {
            true
        };
        let pay = json!({"id": format!("drill-flood-probe-{n}-{}", started.elapsed().as_nanos()), "from": bank, "to": shop, "amount": 1});
        let paid = ok
            && matches!(http.send("POST", "/v1/transfers", Some(pay.to_string())).await, Ok(a) if a.status == 201)
            && sent.elapsed().as_secs_f64() * 1e3 <= PAYMENT_P99_SLO_MS;
        if paid {
            first_ok.get_or_insert(started.elapsed());
            in_a_row += 1;
            if in_a_row >= RECOVERED_IN_A_ROW {
                return first_ok;
            }
        } else {
            in_a_row = 0;
            first_ok = None;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resident_set_and_liveness_of_a_process_are_read_from_proc() {
        let me = std::process::id();
        assert!(rss_bytes(me).is_some_and(|b| b > 1 << 20), "this test process holds more than 1 MiB");
        assert!(alive(me));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!alive(pid), "a reaped child is gone");
        assert_eq!(rss_bytes(pid), None);
    }
}
