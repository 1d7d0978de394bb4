//! What a UCX transport or listener is told: UCX tuning (per profile) and pnp's own windows.
#![forbid(unsafe_code)]

use std::time::Duration;

/// UCX settings, applied to the UCX context with `ucp_config_modify` (the names are UCX's
/// environment variables without the `UCX_` prefix). Anything not set here keeps UCX's default
/// or what the process environment says (`UCX_*` variables are read first, then these win).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UcxTuning {
    /// `TLS`: transports UCX may use, e.g. `tcp`, `sm`, `rc_x,ud_x,sm` or `dc_x` (RoCEv2).
    pub tls: Option<String>,
    /// `NET_DEVICES`: devices, e.g. `lo` for loopback TCP tests or `mlx5_0:1` for a RoCE port.
    pub net_devices: Option<String>,
    /// `RNDV_THRESH`: message size from which UCX uses its rendezvous protocol (zero-copy
    /// where the transport can), e.g. `8192`, `64K` or `auto`.
    pub rndv_thresh: Option<String>,
    /// Any other UCX setting, e.g. `("IB_GID_INDEX", "3")` for RoCEv2.
    pub extra: Vec<(String, String)>,
}

impl UcxTuning {
    /// The settings in the order they are applied.
    pub fn entries(&self) -> Vec<(String, String)> {
        let mut entries = Vec::new();
        for (name, value) in [
            ("TLS", &self.tls),
            ("NET_DEVICES", &self.net_devices),
            ("RNDV_THRESH", &self.rndv_thresh),
        ] {
            if let Some(value) = value {
                entries.push((name.to_owned(), value.clone()));
            }
        }
        entries.extend(self.extra.iter().cloned());
        entries
    }

    /// Whether `tls` names only shared-memory transports (`sm`, `posix`, `sysv`, `cma`, …).
    /// UCX 1.13 cannot report a failed peer over those, so pnp does not ask it to (asking
    /// would exclude them); peer death is then seen on pnp's side channel alone.
    pub fn shared_memory_only(&self) -> bool {
        const SHARED_MEMORY: [&str; 8] =
            ["sm", "shm", "posix", "sysv", "cma", "knem", "xpmem", "self"];
        self.tls.as_deref().is_some_and(|tls| {
            tls.split(',')
                .map(|t| t.trim().trim_start_matches('^'))
                .all(|t| SHARED_MEMORY.contains(&t))
        })
    }

    /// Loopback TCP, as the tests and a laptop use it.
    pub fn loopback_tcp() -> Self {
        Self {
            tls: Some("tcp".into()),
            net_devices: Some("lo".into()),
            ..Self::default()
        }
    }

    /// Shared memory between processes on one host.
    pub fn shared_memory() -> Self {
        Self {
            tls: Some("sm".into()),
            ..Self::default()
        }
    }
}

/// Options of a [`UcxTransport`](crate::UcxTransport) or [`UcxListener`](crate::UcxListener).
#[derive(Clone, Debug)]
pub struct UcxOptions {
    /// UCX settings.
    pub tuning: UcxTuning,
    /// Payload bytes each call may have unread in this process, per direction: the peer sends
    /// no more until pnp has passed some of them on (per-call credit), so memory is bounded by
    /// windows and one bulk call cannot take the connection from the others.
    pub call_window: u32,
    /// Largest message payload sent in one frame; longer messages go as a head and fragments
    /// of at most this size (at most half the peer's window).
    pub max_fragment: u32,
    /// Time allowed to set up a connection (TCP side channel and UCX endpoint).
    pub connect_timeout: Duration,
    /// A peer silent for this long is gone (TCP keepalive on the side channel; a peer process
    /// that dies closes it at once): every call on the connection ends UNAVAILABLE.
    pub keepalive: Duration,
    /// After any activity, the UCX thread keeps polling the worker this long before it arms
    /// the worker's event fd and sleeps: a reply or the next fragment that comes within it is
    /// found without a wakeup (tens of microseconds each), at the price of a busy core while
    /// traffic flows. Zero: sleep as soon as nothing is left to do.
    pub busy_poll: Duration,
}

/// Default per-call window: 8 MiB.
pub const DEFAULT_CALL_WINDOW: u32 = 8 << 20;
/// Default busy-poll time after activity: none (the UCX thread sleeps as soon as it is idle,
/// so idle and lightly loaded connections cost no CPU).
pub const DEFAULT_BUSY_POLL: Duration = Duration::ZERO;
/// Default largest frame payload: 2 MiB.
pub const DEFAULT_MAX_FRAGMENT: u32 = 2 << 20;

impl Default for UcxOptions {
    fn default() -> Self {
        Self {
            tuning: UcxTuning::default(),
            call_window: DEFAULT_CALL_WINDOW,
            max_fragment: DEFAULT_MAX_FRAGMENT,
            connect_timeout: Duration::from_secs(5),
            keepalive: Duration::from_secs(10),
            busy_poll: DEFAULT_BUSY_POLL,
        }
    }
}

impl UcxOptions {
    /// Default options with these UCX settings.
    pub fn with_tuning(tuning: UcxTuning) -> Self {
        Self {
            tuning,
            ..Self::default()
        }
    }

    /// Largest fragment to send to a peer whose window is `peer_window`.
    pub fn fragment_for(&self, peer_window: u32) -> u32 {
        self.max_fragment.min(peer_window / 2).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_entries_keep_their_order_and_skip_unset_ones() {
        let tuning = UcxTuning {
            tls: Some("rc_x,ud_x,sm".into()),
            rndv_thresh: Some("64K".into()),
            extra: vec![("IB_GID_INDEX".into(), "3".into())],
            ..UcxTuning::default()
        };
        assert_eq!(
            tuning.entries(),
            vec![
                ("TLS".to_owned(), "rc_x,ud_x,sm".to_owned()),
                ("RNDV_THRESH".to_owned(), "64K".to_owned()),
                ("IB_GID_INDEX".to_owned(), "3".to_owned()),
            ]
        );
    }

    #[test]
    fn shared_memory_only_means_every_listed_transport() {
        assert!(UcxTuning::shared_memory().shared_memory_only());
        assert!(UcxTuning {
            tls: Some("posix, cma".into()),
            ..UcxTuning::default()
        }
        .shared_memory_only());
        assert!(!UcxTuning::loopback_tcp().shared_memory_only());
        assert!(!UcxTuning {
            tls: Some("sm,tcp".into()),
            ..UcxTuning::default()
        }
        .shared_memory_only());
        assert!(!UcxTuning::default().shared_memory_only());
    }

    #[test]
    fn fragments_fit_in_half_the_peer_window() {
        let options = UcxOptions::default();
        assert_eq!(options.fragment_for(1 << 30), DEFAULT_MAX_FRAGMENT);
        assert_eq!(options.fragment_for(1 << 20), 1 << 19);
        assert_eq!(options.fragment_for(0), 1);
    }
}
