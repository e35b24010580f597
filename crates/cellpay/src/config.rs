//! `cellpay serve` configuration: one typed struct with defaults, read from a
//! TOML file (`--config`), every field overridable by a flag and by an
//! environment variable `CELLPAY_<FIELD>`. Precedence: flag, environment,
//! file, default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use cellpay_api::listener::AddressRange;
use cellpay_api::FrontLimits;
use serde::Deserialize;

/// Flags (and their environment variables) of `cellpay serve`.
#[derive(clap::Args, Debug, Default)]
pub struct ServeArgs {
    /// A TOML file with any of the fields below (and `[[auth.tokens]]` role/secret tables).
    #[arg(long, env = "CELLPAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Number of cells; fixed when the cluster is created [default: 4].
    #[arg(long, env = "CELLPAY_CELLS")]
    pub cells: Option<u32>,
    /// Number of shards; fixed when the cluster is created [default: 1024].
    #[arg(long, env = "CELLPAY_SHARDS")]
    pub shards: Option<u32>,
    /// Address of the HTTP API [default: 127.0.0.1:7070]; port 0 picks a free one.
    #[arg(long, env = "CELLPAY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where the cluster keeps its stores, shard map and generated tokens [default: ./cellpay-data].
    #[arg(long, env = "CELLPAY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// A bearer token, ROLE:SECRET with ROLE client or admin, or
    /// client@TENANT:SECRET for a client acting for TENANT (repeatable;
    /// CELLPAY_TOKENS takes a comma-separated list). None configured: tokens are
    /// generated into <data-dir>/tokens.toml.
    #[arg(long = "token", env = "CELLPAY_TOKENS", value_delimiter = ',', hide_env_values = true)]
    pub tokens: Vec<String>,
    /// Largest request body in bytes; beyond it 413 [default: 4194304].
    #[arg(long, env = "CELLPAY_BODY_BYTES_MAX")]
    pub body_bytes_max: Option<usize>,
    /// Most transfers in one batch request; beyond it 413 [default: 8190].
    #[arg(long, env = "CELLPAY_BATCH_ITEMS_MAX")]
    pub batch_items_max: Option<usize>,
    /// Most commands in one engine batch (one fsync) [default: 8190].
    #[arg(long, env = "CELLPAY_BATCH_COMMANDS_MAX")]
    pub batch_commands_max: Option<usize>,
    /// Most commands queued per cell; beyond it 503 overloaded [default: 65536].
    #[arg(long, env = "CELLPAY_QUEUE_COMMANDS_MAX")]
    pub queue_commands_max: Option<usize>,
    /// Most open client connections; at the cap the longest-idle connection
    /// that never completed an authenticated request is closed [default: 4096].
    #[arg(long, env = "CELLPAY_CONNECTIONS_MAX")]
    pub connections_max: Option<usize>,
    /// Most open connections from one client address [default: 256].
    #[arg(long, env = "CELLPAY_CONNECTIONS_PER_ADDRESS_MAX")]
    pub connections_per_address_max: Option<usize>,
    /// Addresses or CIDR ranges the per-address cap spares (trusted proxies),
    /// comma-separated; `none` for none [default: 127.0.0.0/8,::1].
    #[arg(long, env = "CELLPAY_CONNECTIONS_PER_ADDRESS_EXEMPT", value_delimiter = ',')]
    pub connections_per_address_exempt: Option<Vec<String>>,
    /// Time a client has to send a request head; also closes a new
    /// connection that sends nothing [default: 10000].
    #[arg(long, env = "CELLPAY_HEADER_READ_TIMEOUT_MS")]
    pub header_read_timeout_ms: Option<u64>,
    /// A connection with no request in flight is closed after this long [default: 60000].
    #[arg(long, env = "CELLPAY_KEEP_ALIVE_IDLE_TIMEOUT_MS")]
    pub keep_alive_idle_timeout_ms: Option<u64>,
    /// Time a client has to send a whole request body; beyond it 408 [default: 30000].
    #[arg(long, env = "CELLPAY_BODY_READ_TIMEOUT_MS")]
    pub body_read_timeout_ms: Option<u64>,
    /// After this long a body must keep up body_rate_bytes_per_s_min [default: 2000].
    #[arg(long, env = "CELLPAY_BODY_RATE_GRACE_MS")]
    pub body_rate_grace_ms: Option<u64>,
    /// Slowest average pace of a body once the grace is over; slower: 408 [default: 8192].
    #[arg(long, env = "CELLPAY_BODY_RATE_BYTES_PER_S_MIN")]
    pub body_rate_bytes_per_s_min: Option<u64>,
    /// Request body bytes read or held at once across all connections;
    /// beyond it 503 overloaded [default: 268435456].
    #[arg(long, env = "CELLPAY_BODY_BYTES_IN_FLIGHT_MAX")]
    pub body_bytes_in_flight_max: Option<usize>,
    /// Longest request target (path and query); beyond it 414 [default: 8192].
    #[arg(long, env = "CELLPAY_URI_BYTES_MAX")]
    pub uri_bytes_max: Option<usize>,
    /// Largest request head (request line and headers); beyond it 431 [default: 32768].
    #[arg(long, env = "CELLPAY_HEADER_BYTES_MAX")]
    pub header_bytes_max: Option<usize>,
    /// Transfer records kept per ledger per cell for idempotency and status [default: 1048576].
    #[arg(long, env = "CELLPAY_TRANSFERS_RETAINED_MAX")]
    pub transfers_retained_max: Option<usize>,
    /// History entries kept per ledger per cell [default: 1048576].
    #[arg(long, env = "CELLPAY_HISTORY_ENTRIES_MAX")]
    pub history_entries_max: Option<usize>,
    /// Log written between checkpoints, in MiB [default: 32].
    #[arg(long, env = "CELLPAY_CHECKPOINT_LOG_MIB")]
    pub checkpoint_log_mib: Option<u64>,
    /// Cross-cell credits a relay carries per round [default: 4096].
    #[arg(long, env = "CELLPAY_RELAY_MESSAGES_PER_ROUND_MAX")]
    pub relay_messages_per_round_max: Option<usize>,
    /// Queue delay in ms above which a cell sheds its lowest classes first [default: 5].
    #[arg(long, env = "CELLPAY_QUEUE_DELAY_TARGET_MS")]
    pub queue_delay_target_ms: Option<u64>,
    /// A cell whose engine spends longer than this in one batch (a hung disk)
    /// shows as stalled and refuses new work until the batch finishes, in ms [default: 5000].
    #[arg(long, env = "CELLPAY_STALL_AFTER_MS")]
    pub stall_after_ms: Option<u64>,
    /// Flow rules (rate limits, hot-key limits, concurrency, breakers, retry
    /// budget) as TOML; changeable live with PUT /v1/admin/rules [default: built in].
    #[arg(long, env = "CELLPAY_RULES")]
    pub rules: Option<PathBuf>,
    /// The degrade plan: declared switches as TOML [default: the bundled plan].
    #[arg(long, env = "CELLPAY_DEGRADE_PLAN")]
    pub degrade_plan: Option<PathBuf>,
    /// Allow the drill endpoints (halt and restart a cell) for `cellpay drill kill-cell` [default: false].
    #[arg(long, env = "CELLPAY_DRILLS")]
    pub drills: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    cells: Option<u32>,
    shards: Option<u32>,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    body_bytes_max: Option<usize>,
    batch_items_max: Option<usize>,
    batch_commands_max: Option<usize>,
    queue_commands_max: Option<usize>,
    connections_max: Option<usize>,
    connections_per_address_max: Option<usize>,
    connections_per_address_exempt: Option<Vec<String>>,
    header_read_timeout_ms: Option<u64>,
    keep_alive_idle_timeout_ms: Option<u64>,
    body_read_timeout_ms: Option<u64>,
    body_rate_grace_ms: Option<u64>,
    body_rate_bytes_per_s_min: Option<u64>,
    body_bytes_in_flight_max: Option<usize>,
    uri_bytes_max: Option<usize>,
    header_bytes_max: Option<usize>,
    transfers_retained_max: Option<usize>,
    history_entries_max: Option<usize>,
    checkpoint_log_mib: Option<u64>,
    relay_messages_per_round_max: Option<usize>,
    queue_delay_target_ms: Option<u64>,
    stall_after_ms: Option<u64>,
    rules: Option<PathBuf>,
    degrade_plan: Option<PathBuf>,
    drills: Option<bool>,
    auth: Option<FileAuth>,
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

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub cells: u32,
    pub shards: u32,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `ROLE:SECRET` specs from flags, environment or file; empty: generate.
    pub tokens: Vec<String>,
    pub body_bytes_max: usize,
    pub batch_items_max: usize,
    pub batch_commands_max: usize,
    pub queue_commands_max: usize,
    /// Connection caps, timeouts and body pace of the HTTP front door.
    pub front: FrontLimits,
    pub transfers_retained_max: usize,
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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cells: 4,
            shards: cellpay_core::SHARDS_DEFAULT,
            listen: "127.0.0.1:7070".parse().expect("a valid address"),
            data_dir: PathBuf::from("./cellpay-data"),
            tokens: Vec::new(),
            body_bytes_max: 4 << 20,
            batch_items_max: 8190,
            batch_commands_max: 8190,
            queue_commands_max: 65_536,
            front: FrontLimits::default(),
            transfers_retained_max: 1 << 20,
            history_entries_max: 1 << 20,
            checkpoint_log_mib: 32,
            relay_messages_per_round_max: 4096,
            queue_delay_target_ms: 5,
            stall_after_ms: 5000,
            rules: None,
            degrade_plan: None,
            drills: false,
        }
    }
}

/// Parses `ADDRESS` / `ADDRESS/PREFIX` entries; `none` alone means no exemptions.
fn address_ranges(list: &[String]) -> anyhow::Result<Vec<AddressRange>> {
    if list.len() == 1 && list[0].trim() == "none" {
        return Ok(Vec::new());
    }
    list.iter().map(|s| s.parse::<AddressRange>().context("connections_per_address_exempt")).collect()
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
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let d = Config::default();
        let mut tokens = args.tokens;
        if tokens.is_empty() {
            let file_tokens = file.auth.map(|a| a.tokens).unwrap_or_default();
            tokens = file_tokens.iter().map(FileToken::spec).collect();
        }
        let c = Config {
            cells: args.cells.or(file.cells).unwrap_or(d.cells),
            shards: args.shards.or(file.shards).unwrap_or(d.shards),
            listen: args.listen.or(file.listen).unwrap_or(d.listen),
            data_dir: args.data_dir.or(file.data_dir).unwrap_or(d.data_dir),
            tokens,
            body_bytes_max: args.body_bytes_max.or(file.body_bytes_max).unwrap_or(d.body_bytes_max),
            batch_items_max: args.batch_items_max.or(file.batch_items_max).unwrap_or(d.batch_items_max),
            batch_commands_max: args.batch_commands_max.or(file.batch_commands_max).unwrap_or(d.batch_commands_max),
            queue_commands_max: args.queue_commands_max.or(file.queue_commands_max).unwrap_or(d.queue_commands_max),
            front: FrontLimits {
                connections_max: args.connections_max.or(file.connections_max).unwrap_or(d.front.connections_max),
                connections_per_address_max: args
                    .connections_per_address_max
                    .or(file.connections_per_address_max)
                    .unwrap_or(d.front.connections_per_address_max),
                connections_per_address_exempt: match args
                    .connections_per_address_exempt
                    .or(file.connections_per_address_exempt)
                {
                    Some(list) => address_ranges(&list)?,
                    None => d.front.connections_per_address_exempt,
                },
                header_read_timeout_ms: args
                    .header_read_timeout_ms
                    .or(file.header_read_timeout_ms)
                    .unwrap_or(d.front.header_read_timeout_ms),
                keep_alive_idle_timeout_ms: args
                    .keep_alive_idle_timeout_ms
                    .or(file.keep_alive_idle_timeout_ms)
                    .unwrap_or(d.front.keep_alive_idle_timeout_ms),
                body_read_timeout_ms: args
                    .body_read_timeout_ms
                    .or(file.body_read_timeout_ms)
                    .unwrap_or(d.front.body_read_timeout_ms),
                body_rate_grace_ms: args
                    .body_rate_grace_ms
                    .or(file.body_rate_grace_ms)
                    .unwrap_or(d.front.body_rate_grace_ms),
                body_rate_bytes_per_s_min: args
                    .body_rate_bytes_per_s_min
                    .or(file.body_rate_bytes_per_s_min)
                    .unwrap_or(d.front.body_rate_bytes_per_s_min),
                body_bytes_in_flight_max: args
                    .body_bytes_in_flight_max
                    .or(file.body_bytes_in_flight_max)
                    .unwrap_or(d.front.body_bytes_in_flight_max),
                uri_bytes_max: args.uri_bytes_max.or(file.uri_bytes_max).unwrap_or(d.front.uri_bytes_max),
                header_bytes_max: args.header_bytes_max.or(file.header_bytes_max).unwrap_or(d.front.header_bytes_max),
            },
            transfers_retained_max: args
                .transfers_retained_max
                .or(file.transfers_retained_max)
                .unwrap_or(d.transfers_retained_max),
            history_entries_max: args.history_entries_max.or(file.history_entries_max).unwrap_or(d.history_entries_max),
            checkpoint_log_mib: args.checkpoint_log_mib.or(file.checkpoint_log_mib).unwrap_or(d.checkpoint_log_mib),
            relay_messages_per_round_max: args
                .relay_messages_per_round_max
                .or(file.relay_messages_per_round_max)
                .unwrap_or(d.relay_messages_per_round_max),
            queue_delay_target_ms: args
                .queue_delay_target_ms
                .or(file.queue_delay_target_ms)
                .unwrap_or(d.queue_delay_target_ms),
            stall_after_ms: args.stall_after_ms.or(file.stall_after_ms).unwrap_or(d.stall_after_ms),
            rules: args.rules.or(file.rules),
            degrade_plan: args.degrade_plan.or(file.degrade_plan),
            drills: args.drills.or(file.drills).unwrap_or(d.drills),
        };
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!((1..=256).contains(&self.cells), "cells must be between 1 and 256");
        anyhow::ensure!(
            self.shards >= self.cells && self.shards <= cellpay_core::SHARDS_MAX,
            "shards must be between the cell count and {}",
            cellpay_core::SHARDS_MAX
        );
        anyhow::ensure!(self.body_bytes_max >= 1024, "body_bytes_max must be at least 1024");
        anyhow::ensure!((1..=65_536).contains(&self.batch_commands_max), "batch_commands_max must be 1..=65536");
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
