//! Process checks and CPU selection: the few places that talk to the OS directly.

use std::fmt;

/// glommio refuses to start its reactor under this much locked memory (bytes).
pub const MIN_MEMLOCK: u64 = 512 * 1024;

/// Why the data plane cannot start on this host, with the fix.
#[derive(Debug)]
pub enum HostError {
    MemLock { limit: u64 },
    IoUring(String),
    Cpu(String),
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::MemLock { limit } => write!(
                f,
                "locked-memory limit (RLIMIT_MEMLOCK) is {} KiB, but each io_uring core needs at least {} KiB.\n\
                 Raise it: `ulimit -l unlimited` in the shell that starts weft-proxy, \
                 LimitMEMLOCK=infinity in a systemd unit, or `--ulimit memlock=-1` for a container.\n\
                 See tuning/locked-memory.md.",
                limit / 1024,
                MIN_MEMLOCK / 1024
            ),
            HostError::IoUring(e) => write!(
                f,
                "cannot start an io_uring executor: {e}.\n\
                 weft-proxy needs io_uring (Linux 5.8 or later, not disabled by \
                 `sysctl kernel.io_uring_disabled` or a seccomp profile), and enough locked memory \
                 (`ulimit -l`). See tuning/locked-memory.md."
            ),
            HostError::Cpu(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for HostError {}

/// The soft RLIMIT_MEMLOCK in bytes (u64::MAX when unlimited).
pub fn memlock_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own and has no other effect.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if rc != 0 {
        return u64::MAX;
    }
    if lim.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        lim.rlim_cur
    }
}

/// Checks what can be checked before starting executors.
pub fn preflight() -> Result<(), HostError> {
    let limit = memlock_limit();
    if limit < MIN_MEMLOCK {
        return Err(HostError::MemLock { limit });
    }
    Ok(())
}

/// The CPUs this process may run on, in order.
pub fn online_cpus() -> Vec<usize> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut set = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/sys/devices/system/cpu/online") {
        if let Ok(cpus) = parse_cpu_list(text.trim()) {
            set = cpus;
        }
    }
    if set.is_empty() {
        set = (0..n).collect();
    }
    set
}

/// Parses `0,2-4` into `[0, 2, 3, 4]`.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("`{part}` is not a CPU number or range (e.g. 0,2-3)");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        return Err("empty CPU list".into());
    }
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0,2-4"), Ok(vec![0, 2, 3, 4]));
        assert_eq!(parse_cpu_list("1"), Ok(vec![1]));
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert!(parse_cpu_list("").is_err());
    }
}
