//! The operator log: who did what to money and to the peak's settings.
//!
//! Money-creating and peak-changing actions (transfers out of an overdraft
//! account, which only an admin token may make: each creates money; accounts
//! opened by admin, for any tenant; degrade switches and plans set by hand; flow rules
//! replaced; cells halted or restarted) each append one JSON line to
//! `<data-dir>/operator.log`, fsynced before the answer. The file is
//! append-only; `GET /v1/admin/actions` reads its newest entries. An entry
//! names the token by its number, role and tenant, never by its secret, and
//! carries the action's arguments as the API received them after validation.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use cellpay_core::Authority;
use serde_json::{json, Value};

use crate::auth::Caller;

/// The most entries one read answers (I7).
pub const ACTIONS_PAGE_MAX: usize = 1000;
/// A read looks at most this far back from the end of the file (I7).
const TAIL_BYTES_MAX: u64 = 16 << 20;

/// One actor's action, as it goes into the log.
pub struct Action<'a> {
    pub caller: Caller,
    pub by: &'a Authority,
    /// A short name: `transfer`, `open_account`, `degrade_switch`, `degrade_plan`, `flow_rules`, `cell_halt`, `cell_restart`.
    pub action: &'static str,
    pub args: Value,
}

/// The append-only operator log of one server.
pub struct OperatorLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl OperatorLog {
    /// Opens (or creates) the log at `path` for appending.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { path: path.to_path_buf(), file: Mutex::new(file) })
    }

    /// Appends one entry and makes it durable before returning.
    pub fn record(&self, a: Action<'_>) -> io::Result<()> {
        let at_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let tenant = match a.by {
            Authority::Admin => Value::Null,
            Authority::Tenant(t) => Value::from(t.as_str()),
        };
        let entry = json!({
            "at_unix_ms": at_unix_ms,
            "token": a.caller.token,
            "role": a.caller.role.as_str(),
            "tenant": tenant,
            "action": a.action,
            "args": a.args,
        });
        let mut line = serde_json::to_vec(&entry).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut file = self.file.lock().expect("the operator log lock is never held across a panic");
        file.write_all(&line)?;
        file.sync_data()
    }

    /// The newest `limit` entries, oldest first.
    pub fn newest(&self, limit: usize) -> io::Result<Vec<Value>> {
        let mut file = File::open(&self.path)?;
        let len = file.metadata()?.len();
        let start = len.saturating_sub(TAIL_BYTES_MAX);
        file.seek(SeekFrom::Start(start))?;
        let mut lines: Vec<String> = BufReader::new(file).lines().collect::<io::Result<_>>()?;
        if start > 0 && !lines.is_empty() {
            lines.remove(0); // cut in the middle of a line
        }
        let from = lines.len().saturating_sub(limit);
        Ok(lines[from..].iter().filter_map(|l| serde_json::from_str(l).ok()).collect())
    }
}
