//! Waiting for an idle machine before each measurement, so that other people's builds and tests
//! do not end up in the numbers.

use std::time::{Duration, Instant};

/// Busy and total jiffies of all CPUs, from the first line of `/proc/stat`.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    // idle + iowait
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// The share of all CPUs that was busy over `window` (0.0 to 1.0).
pub async fn busy_fraction(window: Duration) -> f64 {
    let Some((busy0, total0)) = cpu_jiffies() else {
        return 0.0;
    };
    tokio::time::sleep(window).await;
    let Some((busy1, total1)) = cpu_jiffies() else {
        return 0.0;
    };
    let total = total1.saturating_sub(total0);
    if total == 0 {
        return 0.0;
    }
    busy1.saturating_sub(busy0) as f64 / total as f64
}

/// When to call the machine idle.
#[derive(Clone, Copy, Debug)]
pub struct IdleGate {
    /// Largest busy share of all CPUs that counts as idle.
    pub threshold: f64,
    /// How many consecutive 500 ms samples must be under the threshold.
    pub samples: u32,
    /// Give up waiting (and measure anyway, noting the load) after this long.
    pub max_wait: Duration,
}

impl Default for IdleGate {
    fn default() -> Self {
        Self {
            threshold: 0.10,
            samples: 2,
            max_wait: Duration::from_secs(90),
        }
    }
}

/// What the wait found.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct IdleReport {
    /// Seconds spent waiting.
    pub waited_s: f64,
    /// Busy share of the last sample before measuring.
    pub busy: f64,
    /// The machine never became idle within `max_wait`.
    pub gave_up: bool,
}

impl IdleGate {
    /// A gate that does not wait (smoke runs).
    pub fn never() -> Self {
        Self {
            threshold: 1.0,
            samples: 0,
            max_wait: Duration::ZERO,
        }
    }

    /// Wait until the machine is idle or `max_wait` passed.
    pub async fn wait(&self) -> IdleReport {
        let start = Instant::now();
        if self.samples == 0 {
            return IdleReport::default();
        }
        let mut calm = 0;
        loop {
            let busy = busy_fraction(Duration::from_millis(500)).await;
            calm = if busy <= self.threshold { calm + 1 } else { 0 };
            let waited = start.elapsed();
            if calm >= self.samples || waited >= self.max_wait {
                return IdleReport {
                    waited_s: waited.as_secs_f64(),
                    busy,
                    gave_up: calm < self.samples,
                };
            }
        }
    }
}
