//! A PostgreSQL primary and its synchronous standby, started from the
//! machine's PostgreSQL binaries in a directory of their own, for
//! `cellpay drill failover` and its tests. They run as the `postgres` user
//! when we are root (PostgreSQL refuses to run as root), listen on free
//! loopback ports, and are stopped and removed when the pair is dropped.
//!
//! The settings are the ones a cell's data needs to survive the loss of its
//! primary (RPO 0, invariant I2):
//!
//! ```text
//! primary  wal_level = replica, synchronous_standby_names = 'FIRST 1 (standby)',
//!          synchronous_commit = remote_apply
//! standby  pg_basebackup -R, application_name = standby, hot_standby = on,
//!          synchronous_standby_names = ''  (once promoted it has no standby of its own)
//! ```
//!
//! A commit returns only after the standby has applied it, so a batch a cell
//! acknowledged is on the standby when the primary dies. With asynchronous
//! replication (`synchronous_standby_names = ''` on the primary) it may not be:
//! [`PgPair::replication`] reads the settings and the standby's state from
//! the primary, and the drill refuses to call a failover safe without them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// How long a start, a promotion or the standby's first sync may take.
const PG_WAIT: Duration = Duration::from_secs(60);

/// The replication state of a primary, as it reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    pub synchronous_commit: String,
    pub synchronous_standby_names: String,
    /// `application_name` and `sync_state` of each standby streaming from it.
    pub standbys: Vec<(String, String)>,
}

impl Replication {
    /// Does every commit wait for a standby (RPO 0)? Answers why not.
    pub fn rpo_zero(&self) -> Result<(), String> {
        if self.synchronous_standby_names.trim().is_empty() {
            return Err("synchronous_standby_names is empty: replication is asynchronous, and a commit the \
                        primary acknowledged can be missing on the standby it fails over to (breaks I2)"
                .into());
        }
        if !matches!(self.synchronous_commit.as_str(), "on" | "remote_apply" | "remote_write") {
            return Err(format!(
                "synchronous_commit = {}: a commit does not wait for the standby (breaks I2)",
                self.synchronous_commit
            ));
        }
        if !self.standbys.iter().any(|(_, state)| state == "sync" || state == "quorum") {
            return Err(format!("no standby is in sync (standbys: {:?})", self.standbys));
        }
        Ok(())
    }
}

/// Reads `synchronous_commit`, `synchronous_standby_names` and
/// `pg_stat_replication` from the primary at `url`.
pub async fn replication(url: &str) -> anyhow::Result<Replication> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let show = |name: &'static str| {
        let client = &client;
        async move {
            let row = client.query_one(&format!("SHOW {name}"), &[]).await?;
            anyhow::Ok(row.get::<_, String>(0))
        }
    };
    let synchronous_commit = show("synchronous_commit").await?;
    let synchronous_standby_names = show("synchronous_standby_names").await?;
    let rows = client.query("SELECT application_name, sync_state FROM pg_stat_replication", &[]).await?;
    let standbys = rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, String>(1))).collect();
    Ok(Replication { synchronous_commit, synchronous_standby_names, standbys })
}

/// The directory of the machine's PostgreSQL programs: `CELLPAY_PG_BIN`, or
/// the newest `/usr/lib/postgresql/<version>/bin` (Debian's layout).
pub fn pg_bin() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CELLPAY_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql: set CELLPAY_PG_BIN to the directory of initdb and pg_ctl")?
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).context("no PostgreSQL with initdb under /usr/lib/postgresql")
}

/// Two different free loopback TCP ports (free when asked; PostgreSQL binds
/// them right after): both listeners are held until both ports are chosen.
fn free_ports() -> anyhow::Result<(u16, u16)> {
    let a = std::net::TcpListener::bind("127.0.0.1:0")?;
    let b = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

/// One PostgreSQL instance of the pair.
#[derive(Debug)]
pub struct Instance {
    pub data: PathBuf,
    pub port: u16,
}

impl Instance {
    /// The postmaster's pid, from `postmaster.pid`.
    fn postmaster(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

/// A primary and its synchronous standby (see the module's comment).
pub struct PgPair {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub primary: Instance,
    pub standby: Instance,
}

impl PgPair {
    /// initdb's the primary, starts it, clones the standby from it with
    /// `pg_basebackup`, starts that, and waits until the standby is in sync
    /// (`asynchronous`: streaming; the drill's own test of its checks).
    pub fn start(asynchronous: bool) -> anyhow::Result<Self> {
        let bin = pg_bin()?;
        let dir = tempfile::Builder::new().prefix("cellpay-pg-pair-").tempdir()?;
        chown_to_postgres(dir.path())?;
        let (primary_port, standby_port) = free_ports()?;
        let primary = Instance { data: dir.path().join("primary"), port: primary_port };
        let standby = Instance { data: dir.path().join("standby"), port: standby_port };
        let pair = Self { bin, dir, primary, standby };
        let mut initdb = pair.tool("initdb");
        initdb.arg("-D").arg(&pair.primary.data);
        initdb.args(["--auth=trust", "--username=postgres", "--encoding=UTF8", "--locale=C", "--no-sync"]);
        run_as_postgres(&mut initdb, "initdb")?;
        append(
            &pair.primary.data.join("postgresql.conf"),
            &format!(
                "\n# cellpay drill: a primary with one synchronous standby\n{}\
                 wal_level = replica\nmax_wal_senders = 4\nwal_keep_size = '512MB'\n\
                 synchronous_standby_names = '{}'\nsynchronous_commit = remote_apply\n",
                pair.common_settings(&pair.primary),
                if asynchronous { "" } else { "FIRST 1 (standby)" }
            ),
        )?;
        pair.pg_ctl(&pair.primary, "start")?;
        let mut basebackup = pair.tool("pg_basebackup");
        basebackup
            .args(["-h", "127.0.0.1", "-p", &pair.primary.port.to_string(), "-U", "postgres", "-D"])
            .arg(&pair.standby.data)
            .args(["-X", "stream", "-R", "--no-sync"]);
        run_as_postgres(&mut basebackup, "pg_basebackup")?;
        append(
            &pair.standby.data.join("postgresql.auto.conf"),
            &format!(
                "\n# cellpay drill: the standby\n{}hot_standby = on\nsynchronous_standby_names = ''\nwal_retrieve_retry_interval = '200ms'\n\
                 primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name=standby'\n",
                pair.common_settings(&pair.standby),
                pair.primary.port
            ),
        )?;
        pair.pg_ctl(&pair.standby, "start")?;
        pair.wait_streaming(asynchronous)?;
        Ok(pair)
    }

    /// The settings both instances take: their port, loopback only, their
    /// socket in their own directory, a small footprint.
    fn common_settings(&self, instance: &Instance) -> String {
        format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nmax_connections = 60\n\
             shared_buffers = '128MB'\nfsync = on\n",
            instance.port,
            self.dir.path().display()
        )
    }

    fn tool(&self, name: &str) -> Command {
        // SAFETY: geteuid(2) takes no arguments and cannot fail.
        let mut command = if unsafe { libc::geteuid() } == 0 {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(name));
            c
        } else {
            Command::new(self.bin.join(name))
        };
        command.stdin(Stdio::null());
        command
    }

    fn pg_ctl(&self, instance: &Instance, action: &str) -> anyhow::Result<()> {
        let log =
            self.dir.path().join(format!("{}.log", instance.data.file_name().unwrap_or_default().to_string_lossy()));
        let mut command = self.tool("pg_ctl");
        command.arg("-D").arg(&instance.data).arg("-l").arg(&log).args([
            "-w",
            "-t",
            &PG_WAIT.as_secs().to_string(),
            action,
        ]);
        run_as_postgres(&mut command, &format!("pg_ctl {action}")).with_context(|| {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(10).collect();
            format!("pg_ctl {action} of {}; the log ends: {:?}", instance.data.display(), tail)
        })
    }

    /// A libpq URL that reaches whichever of the two accepts writes: a cell
    /// pointed at it reconnects to the promoted standby without being told.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write&connect_timeout=2",
            self.primary.port, self.standby.port
        )
    }

    /// The primary alone.
    pub fn primary_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.primary.port)
    }

    /// The standby alone.
    pub fn standby_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.standby.port)
    }

    /// Waits until the standby streams from the primary, in sync unless `asynchronous`.
    fn wait_streaming(&self, asynchronous: bool) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let deadline = Instant::now() + PG_WAIT;
        loop {
            let state = runtime.block_on(replication(&self.primary_url()));
            if let Ok(r) = &state {
                if r.rpo_zero().is_ok() || (asynchronous && !r.standbys.is_empty()) {
                    return Ok(());
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "the standby did not get in sync within {PG_WAIT:?}: {state:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills every process of the primary with SIGKILL at once (the loss of
    /// its machine): the postmaster is stopped first so it forks nothing
    /// more, then it and all its children are killed. Answers the pids killed.
    pub fn kill_primary(&self) -> anyhow::Result<Vec<i32>> {
        let pm = self.primary.postmaster().context("the primary has no postmaster.pid")?;
        // SAFETY: kill(2) on the postmaster this pair started.
        unsafe { libc::kill(pm, libc::SIGSTOP) };
        // SIGSTOP is delivered asynchronously: only once it is stopped can it fork nothing more.
        let deadline = Instant::now() + Duration::from_secs(5);
        while state(pm).is_some_and(|s| s != "T") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut pids = children_of(pm);
        pids.push(pm);
        for &pid in &pids {
            // SAFETY: kill(2) on processes of the instance this pair started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Dead, or a zombie nobody reaped yet (the postmaster was pg_ctl's
        // orphan): either way it runs no more. Its pid file stays, and a
        // zombie's pid still answers kill(0), which a later start would take
        // for a running server; the machine's loss takes the pid file's
        // meaning with it, so it goes, with the socket's lock file.
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|&pid| runs(pid)) {
            anyhow::ensure!(Instant::now() < deadline, "the primary's processes {pids:?} outlived SIGKILL for 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_file(self.primary.data.join("postmaster.pid"));
        let socket = self.dir.path().join(format!(".s.PGSQL.{}", self.primary.port));
        let _ = std::fs::remove_file(socket.with_extension(format!("{}.lock", self.primary.port)));
        let _ = std::fs::remove_file(socket);
        Ok(pids)
    }

    /// Stops (SIGSTOP) the primary's WAL sender to the standby: the standby
    /// falls behind from now on. With synchronous replication commits then
    /// wait (nothing more is acknowledged); with asynchronous replication
    /// they are acknowledged and exist on the primary alone. Answers the
    /// pids stopped (the kill of the primary ends them).
    pub fn stall_replication(&self) -> anyhow::Result<Vec<i32>> {
        let pm = self.primary.postmaster().context("the primary has no postmaster.pid")?;
        let senders: Vec<i32> = children_of(pm)
            .into_iter()
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|line| String::from_utf8_lossy(&line).contains("walsender"))
            })
            .collect();
        anyhow::ensure!(!senders.is_empty(), "the primary has no WAL sender");
        for &pid in &senders {
            // SAFETY: kill(2) on a process of the instance this pair started.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        Ok(senders)
    }

    /// Promotes the standby to primary and waits until it accepts writes.
    pub fn promote_standby(&self) -> anyhow::Result<()> {
        self.pg_ctl(&self.standby, "promote")
    }

    /// Fences the old primary: a `standby.signal` in its directory makes any
    /// later start of it come up read-only (in recovery, following nobody),
    /// so clients that ask for `target_session_attrs=read-write` skip it.
    pub fn fence_old_primary(&self) -> anyhow::Result<()> {
        let signal = self.primary.data.join("standby.signal");
        std::fs::write(&signal, b"").with_context(|| format!("writing {}", signal.display()))?;
        chown_to_postgres(&signal)
    }

    /// Starts the old primary again (its pid file went with the kill): after [`Self::fence_old_primary`]
    /// read-only; without, as the primary (crash recovery, then the standby
    /// reconnects and commits wait for it again).
    pub fn restart_old_primary(&self) -> anyhow::Result<()> {
        self.pg_ctl(&self.primary, "start")
    }

    /// Does the server at `port` accept writes? (`transaction_read_only` off.)
    pub async fn accepts_writes(port: u16) -> anyhow::Result<bool> {
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres?connect_timeout=2");
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let row = client.query_one("SHOW transaction_read_only", &[]).await?;
        Ok(row.get::<_, String>(0) == "off")
    }
}

impl Drop for PgPair {
    fn drop(&mut self) {
        for instance in [&self.standby, &self.primary] {
            if let Some(pm) = instance.postmaster() {
                // SAFETY: kill(2) on a postmaster this pair started; SIGQUIT is
                // PostgreSQL's immediate shutdown (no checkpoint: the pair is thrown away).
                unsafe { libc::kill(pm, libc::SIGQUIT) };
                let deadline = Instant::now() + Duration::from_secs(10);
                while runs(pm) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                // Still there (stopped, or stuck): it goes before its directory does.
                if runs(pm) {
                    for pid in children_of(pm).into_iter().chain([pm]) {
                        // SAFETY: kill(2) on processes of an instance this pair started.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
    }
}

/// The state letter of `pid` (R, S, T, Z, …), if it exists.
fn state(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(')')?.1.split_whitespace().next()?.to_string())
}

/// Does `pid` exist and run (not a zombie)?
fn runs(pid: i32) -> bool {
    state(pid).is_some_and(|s| s != "Z")
}

/// The pids whose parent is `parent`, from /proc.
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().is_some_and(|stat| {
                // The fields after the command name (which may hold spaces): state, ppid, …
                stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

fn run_as_postgres(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = command.output().with_context(|| format!("running {what}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn append(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file =
        std::fs::OpenOptions::new().append(true).open(path).with_context(|| format!("opening {}", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// Hands `path` to the `postgres` user when we are root (its servers run as that user).
fn chown_to_postgres(path: &Path) -> anyhow::Result<()> {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let out = Command::new("chown").arg("postgres:postgres").arg(path).output().context("running chown")?;
    anyhow::ensure!(
        out.status.success(),
        "chown postgres {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Replication;

    fn state(names: &str, commit: &str, standbys: &[(&str, &str)]) -> Replication {
        Replication {
            synchronous_commit: commit.into(),
            synchronous_standby_names: names.into(),
            standbys: standbys.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
        }
    }

    #[test]
    fn only_a_commit_that_waits_for_a_standby_in_sync_is_rpo_zero() {
        assert!(state("FIRST 1 (standby)", "remote_apply", &[("standby", "sync")]).rpo_zero().is_ok());
        assert!(state("*", "on", &[("s", "quorum")]).rpo_zero().is_ok());
        let asynchronous = state("", "remote_apply", &[("standby", "async")]).rpo_zero().unwrap_err();
        assert!(asynchronous.contains("asynchronous"), "{asynchronous}");
        let local = state("standby", "local", &[("standby", "sync")]).rpo_zero().unwrap_err();
        assert!(local.contains("synchronous_commit = local"), "{local}");
        let none = state("standby", "on", &[]).rpo_zero().unwrap_err();
        assert!(none.contains("no standby is in sync"), "{none}");
    }
}
