//! The CPUs a process may run on and the CPU time it has used.
//!
//! Every report states both for the server and for the generator: a capacity
//! measured with the two sharing one core is a different figure from one
//! measured with each on its own CPUs, and a generator that burns the CPU the
//! server needed decides the result instead of measuring it.

/// CPU seconds this process has used so far: every thread (those that ended
/// too), user and kernel time, from `getrusage(RUSAGE_SELF)`.
pub fn process_cpu_s() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct we own; RUSAGE_SELF is always valid.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// The CPUs the calling thread may run on (`sched_getaffinity`), ascending;
/// empty only if the kernel refuses to say.
pub fn allowed_cpus() -> Vec<usize> {
    allowed_cpus_of(0)
}

/// The CPUs thread `tid` may run on (0: the calling thread), ascending.
pub fn allowed_cpus_of(tid: libc::pid_t) -> Vec<usize> {
    let mut set = std::mem::MaybeUninit::<libc::cpu_set_t>::zeroed();
    // SAFETY: the set is ours and zeroed; the size passed is its size.
    let set = unsafe {
        if libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), set.as_mut_ptr()) != 0 {
            return Vec::new();
        }
        set.assume_init()
    };
    // SAFETY: CPU_ISSET reads the set we own, for indices below its size.
    (0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect()
}

/// A CPU list in the kernel's own form (`taskset -c`, `Cpus_allowed_list`):
/// `0`, `0-1`, `1,3`, `0-2,5`. `cpus` is ascending.
pub fn list(cpus: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        while i + 1 < cpus.len() && cpus[i + 1] == cpus[i] + 1 {
            i += 1;
        }
        out.push(if cpus[i] == start { start.to_string() } else { format!("{start}-{}", cpus[i]) });
        i += 1;
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_folds_runs_into_ranges() {
        assert_eq!(list(&[0]), "0");
        assert_eq!(list(&[0, 1]), "0-1");
        assert_eq!(list(&[1, 3]), "1,3");
        assert_eq!(list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(list(&[]), "");
    }

    #[test]
    fn this_process_runs_somewhere_and_has_used_cpu() {
        assert!(!allowed_cpus().is_empty());
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        assert!(process_cpu_s() > 0.0);
    }
}
