//! Placement: which CPUs the server and the load generator run on.
//!
//! A capacity measured with the server and its generator on the same cores
//! is partly a measurement of the generator: every cycle it spends building
//! and timing requests is a cycle the server did not get. `--cpus LIST` pins a
//! whole process to a CPU set (`sched_setaffinity` on every thread it has, so
//! threads started later inherit it); the drills, `bench http` and `rehearse`
//! split the machine's CPUs between the server they start and themselves by
//! default, and every report says where each side ran and what CPU it used.

use std::fmt;
use std::str::FromStr;

use cellpay_stress::cpu;

/// The most CPUs a set may name (the size of the kernel's `cpu_set_t`).
const CPU_NUMBER_MAX: usize = libc::CPU_SETSIZE as usize - 1;

/// A non-empty set of CPU numbers, ascending, written as the kernel writes
/// them: `0`, `0-1`, `1,3`, `0-2,5`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuSet(Vec<usize>);

impl FromStr for CpuSet {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Self> {
        let number = |s: &str| -> anyhow::Result<usize> {
            let n: usize = s.trim().parse().map_err(|_| anyhow::anyhow!("`{}` is not a CPU number", s.trim()))?;
            anyhow::ensure!(n <= CPU_NUMBER_MAX, "CPU {n} is beyond the largest CPU number ({CPU_NUMBER_MAX})");
            Ok(n)
        };
        let mut cpus = Vec::new();
        for part in text.split(',') {
            match part.split_once('-') {
                Some((from, to)) => {
                    let (from, to) = (number(from)?, number(to)?);
                    anyhow::ensure!(from <= to, "the range {from}-{to} runs backwards");
                    cpus.extend(from..=to);
                }
                None => cpus.push(number(part)?),
            }
        }
        cpus.sort_unstable();
        cpus.dedup();
        Ok(Self(cpus))
    }
}

impl fmt::Display for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&cpu::list(&self.0))
    }
}

/// Parses the value of `flag`: a CPU list, or `none` for no pinning. A
/// refusal names the flag and says what a list looks like.
pub fn parse(flag: &str, text: &str) -> anyhow::Result<Option<CpuSet>> {
    if text.trim() == "none" {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|e| {
        anyhow::anyhow!("{flag} {text:?} is not a CPU list: {e} (a list is like 0, 0-1 or 1,3; none for no pinning)")
    })
}

/// The CPUs this machine has (online or not): `0..n`.
fn machine_cpus() -> usize {
    // SAFETY: sysconf takes a constant and has no other effect.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    usize::try_from(n).unwrap_or(1).max(1)
}

impl CpuSet {
    pub fn cpus(&self) -> &[usize] {
        &self.0
    }

    /// Pins this whole process to the set: every thread it has now, and
    /// through inheritance every thread it starts later. Refuses, naming
    /// `flag`, a CPU the machine does not have or the process may not use.
    pub fn pin_process(&self, flag: &str) -> anyhow::Result<()> {
        let n = machine_cpus();
        if let Some(missing) = self.0.iter().find(|&&c| c >= n) {
            anyhow::bail!(
                "{flag} {self}: this machine has no CPU {missing} (its CPUs are {})",
                cpu::list(&(0..n).collect::<Vec<_>>())
            );
        }
        // SAFETY: a zeroed cpu_set_t is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &c in &self.0 {
            // SAFETY: `parse` keeps every member below CPU_SETSIZE.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
        for tid in threads()? {
            // SAFETY: the set is ours and initialised; the size is its size.
            let done = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
            let err = std::io::Error::last_os_error();
            // A thread that ended since the listing has nothing to pin.
            if done != 0 && err.raw_os_error() != Some(libc::ESRCH) {
                anyhow::bail!("{flag} {self}: the kernel refused the placement: {err}");
            }
        }
        let now = cpu::allowed_cpus();
        anyhow::ensure!(
            now == self.0,
            "{flag} {self}: this process may only run on {} (a cgroup cpuset or an offline CPU)",
            cpu::list(&now)
        );
        Ok(())
    }
}

/// The ids of this process's threads, from `/proc/self/task`.
fn threads() -> anyhow::Result<Vec<libc::pid_t>> {
    let tasks = std::fs::read_dir("/proc/self/task").map_err(|e| anyhow::anyhow!("listing /proc/self/task: {e}"))?;
    Ok(tasks.filter_map(|t| t.ok()?.file_name().to_str()?.parse().ok()).collect())
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The server this command starts and the generator get disjoint CPUs.
    Split,
    /// No default pinning: both share every CPU (unless --cpus/--server-cpus say otherwise).
    Shared,
}

/// The generator's own CPUs (`stress`, which always drives a --target).
#[derive(clap::Args, Debug, Clone)]
pub struct GeneratorCpus {
    /// The CPUs this generator process runs on, e.g. 1, 2-3 or 1,3; none: not
    /// pinned [default: with a server of its own on 2 or more CPUs, the CPUs
    /// the server does not get; otherwise none].
    #[arg(long, env = "CELLPAY_GENERATOR_CPUS")]
    pub cpus: Option<String>,
}

/// Where the server a command starts and the command's own generator run.
#[derive(clap::Args, Debug, Clone)]
pub struct PlacementArgs {
    #[command(flatten)]
    pub generator: GeneratorCpus,
    /// The CPUs of the server this command starts (its `serve --cpus`); none:
    /// not pinned [default: with 2 or more CPUs, the first half of them].
    /// Not with --target.
    #[arg(long, env = "CELLPAY_SERVER_CPUS")]
    pub server_cpus: Option<String>,
    /// split: the server this command starts and the generator run on
    /// disjoint CPUs, so neither takes the other's (on a machine with 2 or
    /// more CPUs); shared: neither is pinned unless a flag above says so.
    #[arg(long, value_enum, default_value_t = Mode::Split)]
    pub placement: Mode,
}

/// The placement a command carries out.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The server's set, passed as `serve --cpus` (none: not pinned).
    pub server: Option<CpuSet>,
    /// The generator's set (none: not pinned).
    pub generator: Option<CpuSet>,
    /// Whether this command starts the server (then it knows the server's CPUs).
    own_server: bool,
    /// The CPUs this process could use when it planned: an unpinned server's.
    allowed: Vec<usize>,
}

impl GeneratorCpus {
    /// Against a server started elsewhere: the generator pins itself only if asked.
    pub fn plan(&self) -> anyhow::Result<Plan> {
        let generator = self.cpus.as_deref().map(|t| parse("--cpus", t)).transpose()?.flatten();
        Ok(Plan { server: None, generator, own_server: false, allowed: cpu::allowed_cpus() })
    }
}

impl PlacementArgs {
    /// The plan; `own_server` when this command starts the server itself.
    pub fn plan(&self, own_server: bool) -> anyhow::Result<Plan> {
        if !own_server {
            anyhow::ensure!(
                self.server_cpus.is_none(),
                "--server-cpus places a server this command starts; a --target runs where it was started"
            );
            return self.generator.plan();
        }
        let allowed = cpu::allowed_cpus();
        let given = |flag: &str, text: &Option<String>| text.as_deref().map(|t| parse(flag, t)).transpose();
        let (mut server, mut generator) =
            (given("--server-cpus", &self.server_cpus)?, given("--cpus", &self.generator.cpus)?);
        if self.placement == Mode::Split && allowed.len() >= 2 {
            let rest = |taken: &Option<CpuSet>| {
                let taken = taken.as_ref().map_or(&[][..], CpuSet::cpus);
                let rest: Vec<usize> = allowed.iter().copied().filter(|c| !taken.contains(c)).collect();
                (!rest.is_empty()).then_some(CpuSet(rest))
            };
            match (&server, &generator) {
                (None, None) => {
                    let half = allowed.len() / 2;
                    server = Some(Some(CpuSet(allowed[..half].to_vec())));
                    generator = Some(Some(CpuSet(allowed[half..].to_vec())));
                }
                (Some(s), None) => generator = Some(rest(s)),
                (None, Some(g)) => server = Some(rest(g)),
                (Some(_), Some(_)) => {}
            }
        }
        Ok(Plan { server: server.flatten(), generator: generator.flatten(), own_server: true, allowed })
    }
}

impl Plan {
    /// The `serve` flags that place the server this command starts.
    pub fn serve_args(&self) -> Vec<String> {
        let cpus = self.server.as_ref().map_or("none".to_string(), CpuSet::to_string);
        vec!["--cpus".into(), cpus]
    }

    /// Pins this process (the generator) where the plan says, if anywhere.
    /// Call it after starting the server: a child inherits its parent's CPUs.
    pub fn pin_generator(&self) -> anyhow::Result<()> {
        if let Some(set) = &self.generator {
            set.pin_process("--cpus")?;
        }
        let server = if self.own_server {
            self.server_cpus().map_or("?".into(), |c| cpu::list(&c))
        } else {
            "elsewhere (--target)".into()
        };
        tracing::info!(server = %server, generator = %cpu::list(&cpu::allowed_cpus()), "placement: the server's CPUs and the generator's");
        Ok(())
    }

    /// The server's CPUs for the report: those it was pinned to, or every CPU
    /// it could use; none for a server started elsewhere.
    pub fn server_cpus(&self) -> Option<Vec<usize>> {
        self.own_server.then(|| self.server.as_ref().map_or_else(|| self.allowed.clone(), |s| s.0.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_as_the_kernel_writes_them() {
        let p = |t: &str| parse("--cpus", t).unwrap().map(|s| s.0);
        assert_eq!(p("0"), Some(vec![0]));
        assert_eq!(p("0-1"), Some(vec![0, 1]));
        assert_eq!(p("1,3"), Some(vec![1, 3]));
        assert_eq!(p("3,0-2,2"), Some(vec![0, 1, 2, 3]), "sorted, without repeats");
        assert_eq!(p("none"), None);
        assert_eq!(parse("--cpus", "0-2,5").unwrap().unwrap().to_string(), "0-2,5");
    }

    #[test]
    fn a_bad_list_is_refused_naming_the_flag() {
        for (text, why) in [
            ("", "is not a CPU number"),
            ("x", "`x` is not a CPU number"),
            ("1-", "is not a CPU number"),
            ("3-1", "runs backwards"),
            ("-1", "is not a CPU number"),
            ("1,,2", "is not a CPU number"),
            ("5000", "beyond the largest CPU number"),
        ] {
            let e = parse("--server-cpus", text).unwrap_err().to_string();
            assert!(e.starts_with("--server-cpus ") && e.contains(why), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_cpu_the_machine_does_not_have_is_refused_naming_the_flag() {
        let beyond = machine_cpus();
        let set = CpuSet(vec![beyond]);
        let e = set.pin_process("--cpus").unwrap_err().to_string();
        assert!(e.starts_with("--cpus ") && e.contains("has no CPU"), "{e}");
    }

    /// Pins a thread of its own (the test harness's other threads keep
    /// theirs) and reads the placement back.
    #[test]
    fn a_pinned_thread_reads_its_set_back() {
        let allowed = cpu::allowed_cpus();
        let last = *allowed.last().expect("this process runs on some CPU");
        std::thread::spawn(move || {
            // SAFETY: a zeroed set is empty; `last` is below CPU_SETSIZE.
            let set = unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(last, &mut set);
                set
            };
            // SAFETY: the set is ours; the size is its size; 0 is this thread.
            let done = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
            assert_eq!(done, 0);
            assert_eq!(cpu::allowed_cpus(), vec![last]);
            // A thread started now inherits the set.
            let child = std::thread::spawn(cpu::allowed_cpus).join().unwrap();
            assert_eq!(child, vec![last]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn split_gives_the_server_the_first_half_and_the_generator_the_rest() {
        let allowed = cpu::allowed_cpus();
        let args = |cpus: Option<&str>, server: Option<&str>, placement| PlacementArgs {
            generator: GeneratorCpus { cpus: cpus.map(str::to_string) },
            server_cpus: server.map(str::to_string),
            placement,
        };
        let plan = args(None, None, Mode::Split).plan(true).unwrap();
        if allowed.len() >= 2 {
            let (s, g) = (plan.server.unwrap().0, plan.generator.unwrap().0);
            assert_eq!(s, allowed[..allowed.len() / 2]);
            assert_eq!(g, allowed[allowed.len() / 2..]);
        } else {
            assert!(plan.server.is_none() && plan.generator.is_none(), "one CPU: nothing to split");
        }
        let shared = args(None, None, Mode::Shared).plan(true).unwrap();
        assert!(shared.server.is_none() && shared.generator.is_none());
        assert_eq!(shared.serve_args(), ["--cpus", "none"]);
        assert_eq!(shared.server_cpus(), Some(allowed.clone()), "an unpinned server may use every CPU");
        let target = args(Some("0"), None, Mode::Split).plan(false).unwrap();
        assert_eq!((target.server_cpus(), target.generator.map(|g| g.0)), (None, Some(vec![0])));
        let e = args(None, Some("0"), Mode::Split).plan(false).unwrap_err().to_string();
        assert!(e.contains("--server-cpus"), "{e}");
    }
}
