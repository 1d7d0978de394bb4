//! What a process costs, read from `/proc`: CPU time from `/proc/PID/stat`, resident memory and
//! its peak from `/proc/PID/status`; and the machine's available memory from `/proc/meminfo`.

use std::sync::OnceLock;

/// Clock ticks per second of `/proc/PID/stat` (`getconf CLK_TCK`, 100 on Linux).
fn ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User plus system CPU seconds `pid` has used so far (all its threads).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields resume after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5) (utime, stime) are 11 and 12 after the state field.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second())
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix(':')?;
        value.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// Resident set size in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS").map(|k| k * 1024)
}

/// Peak resident set size in bytes since start or the last [`reset_peak`].
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM").map(|k| k * 1024)
}

/// Memory the kernel estimates is available for new work without swapping (`MemAvailable` in
/// `/proc/meminfo`), in bytes.
pub fn mem_available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo.lines().find_map(|line| {
        let value = line.strip_prefix("MemAvailable:")?;
        let kib: u64 = value.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    })
}

/// UDP datagrams the kernel dropped because a socket's receive buffer was full, since boot, in
/// this network namespace (`RcvbufErrors` of the `Udp:` lines in `/proc/net/snmp`).
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names = lines.next()?;
    let values = lines.next()?;
    let column = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(column)?.parse().ok()
}

/// Reset the peak RSS to the current RSS (`echo 5 > /proc/PID/clear_refs`, Linux ≥ 4.0).
pub fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// A process's CPU time at one moment, to subtract from a later one.
#[derive(Clone, Copy, Debug)]
pub struct CpuMark {
    pid: u32,
    cpu: f64,
}

impl CpuMark {
    /// Mark `pid` now (and reset its peak RSS).
    pub fn start(pid: u32) -> Option<Self> {
        reset_peak(pid);
        Some(Self {
            pid,
            cpu: cpu_seconds(pid)?,
        })
    }

    /// CPU seconds used since the mark.
    pub fn elapsed(&self) -> Option<f64> {
        Some(cpu_seconds(self.pid)? - self.cpu)
    }

    /// The process marked.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).is_some());
        assert!(rss_bytes(pid).unwrap_or(0) > 0);
        assert!(peak_rss_bytes(pid).unwrap_or(0) >= rss_bytes(pid).unwrap_or(0) / 2);
        assert!(mem_available_bytes().unwrap_or(0) > 0);
        assert!(udp_rcvbuf_errors().is_some());
    }
}
