//! `cellpay serve` configuration: one typed struct with defaults ([`Config`]),
//! read from a TOML file (`--config`), every field overridable by a flag and by
//! an environment variable `CELLPAY_<FIELD>`. Precedence: flag, environment,
//! file, default.
//!
//! Each setting is declared once, in the `settings!` list below: its help text,
//! its flag and environment variable, and the `Config` field it lands in. The
//! macro generates the clap flags ([`ServeArgs`]), the TOML file's keys
//! (`FileConfig`) and the merge; the defaults live only in `Config::default()`
//! (and `FrontLimits::default()` for the front door).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use cellpay_api::listener::AddressRange;
use cellpay_api::FrontLimits;
use serde::Deserialize;

use crate::placement::CpuSet;

/// The longest group-commit linger a cell may be set to: 100 ms, the payment p99 SLO.
pub const BATCH_LINGER_US_MAX: u64 = 100_000;

/// Declares the settings of `cellpay serve`, each once, as
/// `/// help`, `#[arg(..)]`, optionally `#[serde(..)]`, then
/// `name: Type => config.field` with an optional `via convert` (a fallible
/// conversion from the flag's type to the field's; without it, `Into`).
///
/// Generates `ServeArgs` (a flag per setting, `Option<Type>`, after `--config`),
/// `FileConfig` (a TOML key per setting, `Option<Type>`, plus `[auth]`) and
/// `ServeArgs::overlay`, which writes the flag's value, else the file's, over the
/// default in `Config`.
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])*
        #[arg($($arg:tt)*)]
        $(#[serde($($serde:tt)*)])?
        $name:ident: $ty:ty => $($field:ident).+ $(via $convert:path)?;
    )*) => {
        /// Flags (and their environment variables) of `cellpay serve`.
        #[derive(clap::Args, Debug, Default)]
        pub struct ServeArgs {
            /// A TOML file with any of the fields below (and `[[auth.tokens]]` role/secret tables).
            #[arg(long, env = "CELLPAY_CONFIG")]
            pub config: Option<PathBuf>,
            $(
                $(#[doc = $doc])*
                #[arg($($arg)*)]
                pub $name: Option<$ty>,
            )*
        }

        /// The TOML file: any setting, and bearer tokens as `[[auth.tokens]]`.
        #[derive(Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        struct FileConfig {
            $(
                $(#[serde($($serde)*)])?
                $name: Option<$ty>,
            )*
            auth: Option<FileAuth>,
        }

        impl ServeArgs {
            /// Writes each setting given by a flag (or its environment
            /// variable), else by the file, over `config`.
            fn overlay(self, file: &mut FileConfig, config: &mut Config) -> anyhow::Result<()> {
                $(
                    if let Some(value) = self.$name.or(file.$name.take()) {
                        config.$($field).+ = settings!(@convert value $($convert)?);
                    }
                )*
                Ok(())
            }
        }
    };
    (@convert $value:ident) => { $value.into() };
    (@convert $value:ident $convert:path) => { $convert($value)? };
}

settings! {
    /// Number of cells; fixed when the cluster is created [default: 4].
    #[arg(long, env = "CELLPAY_CELLS")]
    cells: u32 => cells;
    /// Number of shards; fixed when the cluster is created [default: 1024].
    #[arg(long, env = "CELLPAY_SHARDS")]
    shards: u32 => shards;
    /// Of the cells, how many start owning no shard (a fresh cluster only):
    /// capacity standing by, which `cluster add-cell` or a rebalance fills
    /// while payments flow [default: 0].
    #[arg(long, env = "CELLPAY_SPARE_CELLS")]
    spare_cells: u32 => spare_cells;
    /// The most commands and reads each cell's writer applies a second; past
    /// it the writer sleeps between batches. It sizes a cell as if it had a
    /// machine of its own, so that on one host adding cells adds capacity
    /// (`cellpay drill scale-out`); 0: no limit [default: 0].
    #[arg(long, env = "CELLPAY_CELL_COMMANDS_PER_S_MAX")]
    cell_commands_per_s_max: u32 => cell_commands_per_s_max;
    /// Address of the HTTP API [default: 127.0.0.1:7070]; port 0 picks a free one.
    #[arg(long, env = "CELLPAY_LISTEN")]
    listen: SocketAddr => listen;
    /// Where the cluster keeps its stores, shard map and generated tokens [default: ./cellpay-data].
    #[arg(long, env = "CELLPAY_DATA_DIR")]
    data_dir: PathBuf => data_dir;
    /// Where each cell keeps its log and checkpoints: `embedded` (files under
    /// the data dir) or a PostgreSQL URL (postgres://user@host:port/database;
    /// cell N in the schema `cell_N`, fenced by a token every batch checks)
    /// [default: embedded]. A router ignores it.
    #[arg(long, env = "CELLPAY_STORE", hide_env_values = true)]
    store: String => store;
    /// With the store in PostgreSQL, keep the ledger readable with SQL: a
    /// projector in each cell process fills `cell_N.accounts`,
    /// `cell_N.transfers` and `cell_N.projection` from the log [default: true].
    #[arg(long, env = "CELLPAY_SQL_TABLES")]
    sql_tables: bool => sql_tables;
    /// A bearer token, ROLE:SECRET with ROLE client or admin, or
    /// client@TENANT:SECRET for a client acting for TENANT (repeatable;
    /// CELLPAY_TOKENS takes a comma-separated list). None configured: tokens are
    /// generated into <data-dir>/tokens.toml.
    #[arg(long = "token", env = "CELLPAY_TOKENS", value_delimiter = ',', hide_env_values = true)]
    #[serde(skip)] // the file holds tokens as `[[auth.tokens]]` tables
    tokens: Vec<String> => tokens;
    /// Largest request body in bytes; beyond it 413 [default: 4194304].
    #[arg(long, env = "CELLPAY_BODY_BYTES_MAX")]
    body_bytes_max: usize => body_bytes_max;
    /// Most transfers in one batch request; beyond it 413 [default: 8190].
    #[arg(long, env = "CELLPAY_BATCH_ITEMS_MAX")]
    batch_items_max: usize => batch_items_max;
    /// Most commands in one engine batch (one fsync) [default: 8190].
    #[arg(long, env = "CELLPAY_BATCH_COMMANDS_MAX")]
    batch_commands_max: usize => batch_commands_max;
    /// Group commit: under concurrent load, how long a cell waits for more
    /// commands before its durable append (one fsync for more payments), in µs; 0: never [default: 2000].
    #[arg(long, env = "CELLPAY_BATCH_LINGER_US")]
    batch_linger_us: u64 => batch_linger_us;
    /// Most commands queued per cell; beyond it 503 overloaded [default: 65536].
    #[arg(long, env = "CELLPAY_QUEUE_COMMANDS_MAX")]
    queue_commands_max: usize => queue_commands_max;
    /// Most open client connections; at the cap the longest-idle connection
    /// that never completed an authenticated request is closed [default: 4096].
    #[arg(long, env = "CELLPAY_CONNECTIONS_MAX")]
    connections_max: usize => front.connections_max;
    /// Most open connections from one client address [default: 256].
    #[arg(long, env = "CELLPAY_CONNECTIONS_PER_ADDRESS_MAX")]
    connections_per_address_max: usize => front.connections_per_address_max;
    /// Addresses or CIDR ranges the per-address cap spares (trusted proxies),
    /// comma-separated; `none` for none [default: 127.0.0.0/8,::1].
    #[arg(long, env = "CELLPAY_CONNECTIONS_PER_ADDRESS_EXEMPT", value_delimiter = ',')]
    connections_per_address_exempt: Vec<String> => front.connections_per_address_exempt via address_ranges;
    /// Time a client has to send a request head; also closes a new
    /// connection that sends nothing [default: 10000].
    #[arg(long, env = "CELLPAY_HEADER_READ_TIMEOUT_MS")]
    header_read_timeout_ms: u64 => front.header_read_timeout_ms;
    /// A connection with no request in flight is closed after this long [default: 60000].
    #[arg(long, env = "CELLPAY_KEEP_ALIVE_IDLE_TIMEOUT_MS")]
    keep_alive_idle_timeout_ms: u64 => front.keep_alive_idle_timeout_ms;
    /// Time a client has to send a whole request body; beyond it 408 [default: 30000].
    #[arg(long, env = "CELLPAY_BODY_READ_TIMEOUT_MS")]
    body_read_timeout_ms: u64 => front.body_read_timeout_ms;
    /// After this long a body must keep up body_rate_bytes_per_s_min [default: 2000].
    #[arg(long, env = "CELLPAY_BODY_RATE_GRACE_MS")]
    body_rate_grace_ms: u64 => front.body_rate_grace_ms;
    /// Slowest average pace of a body once the grace is over; slower: 408 [default: 8192].
    #[arg(long, env = "CELLPAY_BODY_RATE_BYTES_PER_S_MIN")]
    body_rate_bytes_per_s_min: u64 => front.body_rate_bytes_per_s_min;
    /// Request body bytes read or held at once across all connections;
    /// beyond it 503 overloaded [default: 268435456].
    #[arg(long, env = "CELLPAY_BODY_BYTES_IN_FLIGHT_MAX")]
    body_bytes_in_flight_max: usize => front.body_bytes_in_flight_max;
    /// Longest request target (path and query); beyond it 414 [default: 8192].
    #[arg(long, env = "CELLPAY_URI_BYTES_MAX")]
    uri_bytes_max: usize => front.uri_bytes_max;
    /// Largest request head (request line and headers); beyond it 431 [default: 32768].
    #[arg(long, env = "CELLPAY_HEADER_BYTES_MAX")]
    header_bytes_max: usize => front.header_bytes_max;
    /// Transfer records kept per ledger per cell for idempotency and status [default: 1048576].
    #[arg(long, env = "CELLPAY_TRANSFERS_RETAINED_MAX")]
    transfers_retained_max: usize => transfers_retained_max;
    /// The idempotency window promised to clients, in seconds: a retry within
    /// it answers the original transfer and pays nothing, while its record is
    /// held (GET /metrics, cellpay_idempotency_window_seconds, says how far back
    /// records reach) [default: 86400].
    #[arg(long, env = "CELLPAY_IDEMPOTENCY_WINDOW_S")]
    idempotency_window_s: u64 => idempotency_window_s;
    /// Keep idempotency records that leave memory in a disk tier
    /// (`<data-dir>/cell-N/idempotency`), so the window held is the promise,
    /// not how far memory reaches [default: true].
    #[arg(long, env = "CELLPAY_IDEMPOTENCY_TIER")]
    idempotency_tier: bool => idempotency_tier;
    /// The most bytes each cell's idempotency tier may hold on disk; past it
    /// the oldest records are dropped and the window held shrinks, loudly
    /// (WARN, /metrics, no-go in readiness reports) [default: 17179869184].
    #[arg(long, env = "CELLPAY_IDEMPOTENCY_DISK_BYTES_MAX")]
    idempotency_disk_bytes_max: u64 => idempotency_disk_bytes_max;
    /// History entries kept per ledger per cell [default: 1048576].
    #[arg(long, env = "CELLPAY_HISTORY_ENTRIES_MAX")]
    history_entries_max: usize => history_entries_max;
    /// Log written between checkpoints, in MiB [default: 32].
    #[arg(long, env = "CELLPAY_CHECKPOINT_LOG_MIB")]
    checkpoint_log_mib: u64 => checkpoint_log_mib;
    /// Cross-cell credits a relay carries per round [default: 4096].
    #[arg(long, env = "CELLPAY_RELAY_MESSAGES_PER_ROUND_MAX")]
    relay_messages_per_round_max: usize => relay_messages_per_round_max;
    /// Queue delay in ms above which a cell sheds its lowest classes first [default: 5].
    #[arg(long, env = "CELLPAY_QUEUE_DELAY_TARGET_MS")]
    queue_delay_target_ms: u64 => queue_delay_target_ms;
    /// A cell whose engine spends longer than this in one batch (a hung disk)
    /// shows as stalled and refuses new work until the batch finishes, in ms [default: 5000].
    #[arg(long, env = "CELLPAY_STALL_AFTER_MS")]
    stall_after_ms: u64 => stall_after_ms;
    /// Flow rules (rate limits, hot-key limits, concurrency, breakers, retry
    /// budget) as TOML; changeable live with PUT /v1/admin/rules [default: built in].
    #[arg(long, env = "CELLPAY_RULES")]
    rules: PathBuf => rules;
    /// The degrade plan: declared switches as TOML [default: the bundled plan].
    #[arg(long, env = "CELLPAY_DEGRADE_PLAN")]
    degrade_plan: PathBuf => degrade_plan;
    /// Allow the drill endpoints (halt and restart a cell) for `cellpay drill kill-cell` [default: false].
    #[arg(long, env = "CELLPAY_DRILLS")]
    drills: bool => drills;
    /// The CPUs the whole process runs on, e.g. 0, 0-1 or 1,3: every thread
    /// (engines, relays, the HTTP front) is pinned there before any starts;
    /// none: wherever the OS puts them [default: none].
    #[arg(long, env = "CELLPAY_CPUS")]
    cpus: String => cpus via cpu_list;
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileAuth {
    #[serde(default)]
    pub tokens: Vec<FileToken>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileToken {
    pub role: String,
    /// The tenant a client token acts for (none: `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub secret: String,
}

impl FileToken {
    /// The `ROLE[@TENANT]:SECRET` form the command line takes.
    pub fn spec(&self) -> String {
        match &self.tenant {
            Some(tenant) => format!("{}@{tenant}:{}", self.role, self.secret),
            None => format!("{}:{}", self.role, self.secret),
        }
    }
}

/// The resolved configuration, and in `Default` the one place for its defaults.
#[derive(Debug, Clone)]
pub struct Config {
    pub cells: u32,
    pub shards: u32,
    /// Cells that own no shard when the cluster is created.
    pub spare_cells: u32,
    /// Commands and reads each cell's writer applies a second at most (0: no limit).
    pub cell_commands_per_s_max: u32,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `embedded`, or the PostgreSQL URL the cells' stores live in.
    pub store: String,
    /// A projector fills SQL tables from the log (PostgreSQL stores only).
    pub sql_tables: bool,
    /// `ROLE:SECRET` specs from flags, environment or file; empty: generate.
    pub tokens: Vec<String>,
    pub body_bytes_max: usize,
    pub batch_items_max: usize,
    pub batch_commands_max: usize,
    pub batch_linger_us: u64,
    pub queue_commands_max: usize,
    /// Connection caps, timeouts and body pace of the HTTP front door.
    pub front: FrontLimits,
    pub transfers_retained_max: usize,
    pub idempotency_window_s: u64,
    pub idempotency_tier: bool,
    pub idempotency_disk_bytes_max: u64,
    pub history_entries_max: usize,
    pub checkpoint_log_mib: u64,
    pub relay_messages_per_round_max: usize,
    pub queue_delay_target_ms: u64,
    pub stall_after_ms: u64,
    /// None: the built-in flow rules.
    pub rules: Option<PathBuf>,
    /// None: the bundled degrade plan.
    pub degrade_plan: Option<PathBuf>,
    pub drills: bool,
    /// None: not pinned.
    pub cpus: Option<CpuSet>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cells: 4,
            shards: cellpay_core::SHARDS_DEFAULT,
            spare_cells: 0,
            cell_commands_per_s_max: 0,
            listen: "127.0.0.1:7070".parse().expect("a valid address"),
            data_dir: PathBuf::from("./cellpay-data"),
            store: "embedded".to_string(),
            sql_tables: true,
            tokens: Vec::new(),
            body_bytes_max: 4 << 20,
            batch_items_max: 8190,
            batch_commands_max: 8190,
            batch_linger_us: 2000,
            queue_commands_max: 65_536,
            front: FrontLimits::default(),
            transfers_retained_max: 1 << 20,
            idempotency_window_s: 86_400,
            idempotency_tier: true,
            idempotency_disk_bytes_max: 16 << 30,
            history_entries_max: 1 << 20,
            checkpoint_log_mib: 32,
            relay_messages_per_round_max: 4096,
            queue_delay_target_ms: 5,
            stall_after_ms: 5000,
            rules: None,
            degrade_plan: None,
            drills: false,
            cpus: None,
        }
    }
}

/// Parses `ADDRESS` / `ADDRESS/PREFIX` entries; `none` alone means no exemptions.
fn address_ranges(list: Vec<String>) -> anyhow::Result<Vec<AddressRange>> {
    if list.len() == 1 && list[0].trim() == "none" {
        return Ok(Vec::new());
    }
    list.iter().map(|s| s.parse::<AddressRange>().context("connections_per_address_exempt")).collect()
}

/// Parses `--cpus` (or `cpus` in the file): a CPU list, or `none`.
fn cpu_list(text: String) -> anyhow::Result<Option<CpuSet>> {
    crate::placement::parse("--cpus", &text)
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_toml(&text, path)
}

/// Parses a TOML file that may hold secrets (tokens): a refusal names the
/// file, line and column, and the key when the error is about a key, but
/// never quotes the line or a value (toml's own message does both).
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> anyhow::Result<T> {
    toml::from_str(text).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start).min(text.len());
        let line = text[..at].matches('\n').count() + 1;
        let column = at - text[..at].rfind('\n').map_or(0, |i| i + 1) + 1;
        let message = e.message();
        let about_a_key = ["unknown field", "missing field", "duplicate key"].iter().any(|k| message.starts_with(k));
        let what = if about_a_key { message.split(',').next().unwrap_or(message) } else { "a bad value or syntax" };
        anyhow::anyhow!(
            "{} is not valid at line {line}, column {column}: {what} (the line is not shown: it may hold a secret)",
            path.display()
        )
    })
}

impl Config {
    pub fn resolve(args: ServeArgs) -> anyhow::Result<Self> {
        let mut file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let mut config = Config::default();
        args.overlay(&mut file, &mut config)?;
        if config.tokens.is_empty() {
            let file_tokens = file.auth.map(|a| a.tokens).unwrap_or_default();
            config.tokens = file_tokens.iter().map(FileToken::spec).collect();
        }
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!((1..=256).contains(&self.cells), "cells must be between 1 and 256");
        anyhow::ensure!(
            self.shards >= self.cells && self.shards <= cellpay_core::SHARDS_MAX,
            "shards must be between the cell count and {}",
            cellpay_core::SHARDS_MAX
        );
        anyhow::ensure!(
            self.spare_cells < self.cells,
            "spare_cells must be fewer than the cells: one cell at least owns the shards"
        );
        anyhow::ensure!(self.body_bytes_max >= 1024, "body_bytes_max must be at least 1024");
        anyhow::ensure!((1..=65_536).contains(&self.batch_commands_max), "batch_commands_max must be 1..=65536");
        anyhow::ensure!(
            self.batch_linger_us <= BATCH_LINGER_US_MAX,
            "batch_linger_us must be at most {BATCH_LINGER_US_MAX}"
        );
        anyhow::ensure!(
            (1..=self.batch_commands_max).contains(&self.batch_items_max),
            "batch_items_max must be between 1 and batch_commands_max"
        );
        anyhow::ensure!(
            self.queue_commands_max >= self.batch_commands_max,
            "queue_commands_max must be at least batch_commands_max"
        );
        self.front.check().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            self.front.body_bytes_in_flight_max >= self.body_bytes_max,
            "body_bytes_in_flight_max must be at least body_bytes_max"
        );
        anyhow::ensure!(self.transfers_retained_max >= 1, "transfers_retained_max must be at least 1");
        anyhow::ensure!(
            self.idempotency_disk_bytes_max >= 1 << 16,
            "idempotency_disk_bytes_max must be at least 65536"
        );
        anyhow::ensure!(
            (1..=366 * 86_400).contains(&self.idempotency_window_s),
            "idempotency_window_s must be 1..=31622400 (a year)"
        );
        anyhow::ensure!(self.history_entries_max >= 1, "history_entries_max must be at least 1");
        anyhow::ensure!((1..=10_000).contains(&self.queue_delay_target_ms), "queue_delay_target_ms must be 1..=10000");
        anyhow::ensure!((100..=3_600_000).contains(&self.stall_after_ms), "stall_after_ms must be 100..=3600000");
        anyhow::ensure!(self.checkpoint_log_mib >= 1, "checkpoint_log_mib must be at least 1");
        anyhow::ensure!(
            (1..=self.batch_commands_max.min(cellpay_core::INBOX_TAIL_RETAINED / 2))
                .contains(&self.relay_messages_per_round_max),
            "relay_messages_per_round_max must be between 1 and batch_commands_max (and at most half the inbox tail)"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    /// The `[default: X]` in a flag's help is documentation; this keeps it
    /// true to `Config::default()`: giving X as the flag changes nothing.
    #[test]
    fn every_default_in_the_help_is_the_default() {
        let resolved = |flags: &[&str]| {
            let cli = Serve::try_parse_from(std::iter::once("serve").chain(flags.iter().copied())).unwrap();
            format!("{:?}", Config::resolve(cli.args).unwrap())
        };
        let plain = resolved(&[]);
        let mut checked = 0;
        for arg in Serve::command().get_arguments() {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let Some(default) = help.split("[default: ").nth(1).and_then(|rest| rest.split(']').next()) else {
                continue;
            };
            if ["built in", "the bundled plan"].contains(&default) {
                continue; // no value: the built-in rules and plan
            }
            let flag = format!("--{}", arg.get_long().unwrap());
            assert_eq!(resolved(&[&flag, default]), plain, "{flag} {default}");
            checked += 1;
        }
        assert_eq!(checked, 35, "every setting but --config, --token, --rules and --degrade-plan");
    }

    #[test]
    fn a_file_setting_yields_to_a_flag_and_fills_in_for_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cellpay.toml");
        std::fs::write(&path, "cells = 3\nshards = 64\n[[auth.tokens]]\nrole = \"client\"\nsecret = \"s\"\n").unwrap();
        let args = ServeArgs { config: Some(path), cells: Some(2), ..ServeArgs::default() };
        let config = Config::resolve(args).unwrap();
        assert_eq!((config.cells, config.shards, config.tokens), (2, 64, vec!["client:s".to_string()]));
        assert_eq!(config.batch_items_max, Config::default().batch_items_max);
    }
}
