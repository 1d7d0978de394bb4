//! Graded load shedding at the door: admit, degrade a stream to one buffered reply, or reject
//! with a gRPC status (RESOURCE_EXHAUSTED, or UNAVAILABLE with `grpc-retry-pushback-ms` when
//! another instance can take the call) — never a bare HTTP 429.
//!
//! Each client also has a share of the concurrency limit (`resilience.max_streams_per_client`,
//! by default a quarter of it), so one client cannot take every slot: over its share a call is
//! refused with RESOURCE_EXHAUSTED naming the per-client limit. A client is an IPv4 address, or
//! an IPv6 /64 (the block one host is given and picks its addresses from); IPv4-mapped IPv6
//! addresses count as their IPv4 address.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderValue;
use pnp_call::{Code, Status};
use pnp_config::Resilience;
use pnp_policy::latency::LatencyWindow;
use pnp_policy::shed::{ShedAction, ShedConfig, ShedInput, ShedPolicy};
use pnp_telemetry::{Gauge, Metrics};

/// Calls remembered for the p95 estimate.
const LATENCY_WINDOW: usize = 1024;
/// At most one scale-out log line per this period.
const SCALE_OUT_LOG_EVERY: Duration = Duration::from_secs(10);
/// Locks the per-client counts are spread over, so admissions of different clients rarely
/// wait for each other.
const CLIENT_SHARDS: usize = 16;

/// The door of the data plane.
#[derive(Debug)]
pub(crate) struct Admission {
    in_flight: AtomicUsize,
    waiting: AtomicUsize,
    latency: Mutex<LatencyWindow>,
    policy: ShedPolicy,
    limit: usize,
    queue_threshold: usize,
    slo: Duration,
    peer_available: bool,
    metrics: Metrics,
    queue_gauge: Gauge,
    scale_out_logged: Mutex<Option<Instant>>,
    clients: ClientShares,
}

/// Calls in flight per client, each client limited to `share`. Only clients with calls in
/// flight have an entry, so the maps are bounded by the live calls.
#[derive(Debug)]
struct ClientShares {
    share: usize,
    shards: Box<[Mutex<HashMap<IpAddr, usize>>]>,
    hasher: RandomState,
}

/// A call inside the door. Dropping it lets the next one in.
#[derive(Debug)]
pub(crate) struct Permit {
    admission: Arc<Admission>,
    /// The client whose share this call holds a slot of.
    client: Option<IpAddr>,
}

/// A call waiting for upstream response headers (the queue whose depth signals scale-out).
#[derive(Debug)]
pub(crate) struct Waiting {
    admission: Arc<Admission>,
}

/// What the door decided.
pub(crate) enum Admitted {
    /// Serve the call; `degrade` asks for one buffered reply instead of a stream.
    Yes { permit: Permit, degrade: bool },
    /// Refuse it with this status.
    No(Status),
}

impl Admission {
    pub(crate) fn new(config: &Resilience, metrics: Metrics) -> Result<Self, String> {
        let policy = ShedPolicy::new(ShedConfig {
            pushback: config.pushback,
            ..ShedConfig::default()
        })
        .map_err(|e| e.to_string())?;
        let latency = LatencyWindow::new(LATENCY_WINDOW).map_err(|e| e.to_string())?;
        let share = match config.max_streams_per_client {
            Some(0) => return Err("resilience.max_streams_per_client: must be at least 1".into()),
            Some(share) => share,
            None => (config.max_concurrent_streams / 4).max(1),
        };
        Ok(Self {
            in_flight: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            latency: Mutex::new(latency),
            policy,
            limit: config.max_concurrent_streams,
            queue_threshold: config.queue_threshold,
            slo: config.stream_p95_slo,
            peer_available: config.peer_available,
            queue_gauge: metrics.queue_depth(),
            metrics,
            scale_out_logged: Mutex::new(None),
            clients: ClientShares {
                share,
                shards: (0..CLIENT_SHARDS)
                    .map(|_| Mutex::new(HashMap::new()))
                    .collect(),
                hasher: RandomState::new(),
            },
        })
    }

    /// Decide on a new call from `client` (`None`: not limited per client).
    ///
    /// The global limit is asked first (shedding under overload stays one atomic add), then
    /// the client's share.
    pub(crate) fn admit(self: &Arc<Self>, degradable: bool, client: Option<IpAddr>) -> Admitted {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let mut permit = Permit {
            admission: self.clone(),
            client: None,
        };
        let p95 = self.latency.lock().ok().and_then(|w| w.quantile(0.95));
        let decision = self.policy.decide(&ShedInput {
            in_flight: before,
            limit: self.limit,
            queue_depth: self.waiting.load(Ordering::Acquire),
            queue_threshold: self.queue_threshold,
            p95,
            slo: self.slo,
            degradable,
            peer_available: self.peer_available,
        });
        if decision.scale_out {
            self.signal_scale_out();
        }
        if let (ShedAction::Admit | ShedAction::Degrade, Some(ip)) = (&decision.action, client) {
            let key = client_key(ip);
            if let Err(in_flight) = self.clients.acquire(key) {
                drop(permit);
                self.metrics.shed("client_share");
                return Admitted::No(Status::new(
                    Code::ResourceExhausted,
                    format!(
                        "pnp: too many calls from this client ({in_flight} in flight, per-client limit {}); retry later",
                        self.clients.share
                    ),
                ));
            }
            permit.client = Some(key);
        }
        match decision.action {
            ShedAction::Admit => Admitted::Yes {
                permit,
                degrade: false,
            },
            ShedAction::Degrade => {
                self.metrics.shed("slo_degrade");
                Admitted::Yes {
                    permit,
                    degrade: true,
                }
            }
            ShedAction::Reject { code, pushback_ms } => {
                drop(permit);
                self.metrics.shed("concurrency");
                let mut status = Status::new(
                    code,
                    format!(
                        "pnp: overloaded ({before} calls in flight, limit {}); {}",
                        self.limit,
                        if pushback_ms.is_some() {
                            "retry on another instance"
                        } else {
                            "retry later"
                        }
                    ),
                );
                if let Some(ms) = pushback_ms {
                    status
                        .metadata
                        .insert("grpc-retry-pushback-ms", HeaderValue::from(ms));
                }
                Admitted::No(status)
            }
        }
    }

    /// The call now waits for upstream response headers.
    pub(crate) fn waiting(self: &Arc<Self>) -> Waiting {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        self.queue_gauge.inc();
        Waiting {
            admission: self.clone(),
        }
    }

    fn signal_scale_out(&self) {
        let now = Instant::now();
        if let Ok(mut last) = self.scale_out_logged.lock() {
            if last.is_some_and(|at| now.duration_since(at) < SCALE_OUT_LOG_EVERY) {
                return;
            }
            *last = Some(now);
        }
        tracing::warn!(
            queue_depth = self.waiting.load(Ordering::Acquire),
            threshold = self.queue_threshold,
            "scale-out signal: calls are queueing for upstream response headers"
        );
    }
}

impl Permit {
    /// The call finished after `duration`: feed the p95 estimate.
    pub(crate) fn record(&self, duration: Duration) {
        if let Ok(mut window) = self.admission.latency.lock() {
            window.record(duration);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            self.admission.clients.release(client);
        }
        self.admission.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ClientShares {
    fn shard(&self, client: IpAddr) -> &Mutex<HashMap<IpAddr, usize>> {
        let index = self.hasher.hash_one(client) as usize % self.shards.len();
        &self.shards[index]
    }

    /// Take one of `client`'s slots, or `Err(calls in flight)` when its share is used up.
    fn acquire(&self, client: IpAddr) -> Result<(), usize> {
        // A poisoned shard (a panic while it was held; the counts are still whole) must not
        // shut the door on every client hashed to it.
        let mut counts = self
            .shard(client)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = counts.entry(client).or_insert(0);
        if *count >= self.share {
            return Err(*count);
        }
        *count += 1;
        Ok(())
    }

    fn release(&self, client: IpAddr) {
        let mut counts = self
            .shard(client)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&client) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&client);
            }
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |m| m.len()))
            .sum()
    }
}

/// Who a client is for its share: an IPv4 address (also when it arrives IPv4-mapped), or the
/// /64 an IPv6 address is in.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.admission.waiting.fetch_sub(1, Ordering::AcqRel);
        self.admission.queue_gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn door(limit: usize, share: Option<usize>) -> Arc<Admission> {
        let config = Resilience {
            max_concurrent_streams: limit,
            max_streams_per_client: share,
            ..Resilience::default()
        };
        Arc::new(Admission::new(&config, Metrics::new()).expect("valid"))
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().expect("an address"))
    }

    fn admitted(door: &Arc<Admission>, client: Option<IpAddr>) -> Result<Permit, Box<Status>> {
        match door.admit(false, client) {
            Admitted::Yes { permit, .. } => Ok(permit),
            Admitted::No(status) => Err(Box::new(status)),
        }
    }

    #[test]
    fn a_client_over_its_share_is_refused_while_others_are_served() {
        let door = door(100, Some(2));
        let a1 = admitted(&door, ip("10.0.0.1")).expect("first");
        let _a2 = admitted(&door, ip("10.0.0.1")).expect("second");
        let refused = admitted(&door, ip("10.0.0.1")).expect_err("over the share");
        assert_eq!(refused.code, Code::ResourceExhausted);
        assert!(
            refused.message.contains("per-client limit 2"),
            "{}",
            refused.message
        );
        assert!(refused.metadata.get("grpc-retry-pushback-ms").is_none());
        let _b = admitted(&door, ip("10.0.0.2")).expect("another client");
        let _unknown = admitted(&door, None).expect("no address: not limited per client");
        // A refused call holds nothing; a finished one gives its slot back.
        assert_eq!(door.in_flight.load(Ordering::Acquire), 4);
        drop(a1);
        let _a3 = admitted(&door, ip("10.0.0.1")).expect("a slot came back");
        let text = door.metrics.encode();
        assert!(
            text.contains(r#"pnp_shed_total{reason="client_share"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn the_default_share_is_a_quarter_of_the_limit_and_at_least_one() {
        let door4 = door(8, None);
        let held: Vec<_> = (0..2)
            .map(|_| admitted(&door4, ip("10.0.0.1")).expect("within 8/4"))
            .collect();
        assert!(admitted(&door4, ip("10.0.0.1")).is_err());
        drop(held);
        let door1 = door(3, None);
        let _one = admitted(&door1, ip("10.0.0.1")).expect("share of at least 1");
        assert!(admitted(&door1, ip("10.0.0.1")).is_err());
        let zero = Resilience {
            max_streams_per_client: Some(0),
            ..Resilience::default()
        };
        assert!(Admission::new(&zero, Metrics::new()).is_err());
    }

    #[test]
    fn entries_go_when_their_last_call_does() {
        let door = door(10_000, Some(10));
        let permits: Vec<_> = (0..200u32)
            .map(|i| {
                let client = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
                admitted(&door, Some(client)).expect("admitted")
            })
            .collect();
        assert_eq!(door.clients.tracked(), 200);
        drop(permits);
        assert_eq!(door.clients.tracked(), 0);
        assert_eq!(door.in_flight.load(Ordering::Acquire), 0);
    }

    #[test]
    fn ipv6_clients_are_their_64_and_mapped_ipv4_is_ipv4() {
        let door = door(100, Some(1));
        let _v6 = admitted(&door, ip("2001:db8:1:2::1")).expect("first");
        assert!(
            admitted(&door, ip("2001:db8:1:2:ffff::9")).is_err(),
            "same /64"
        );
        let _other64 = admitted(&door, ip("2001:db8:1:3::1")).expect("another /64");
        let _v4 = admitted(&door, ip("192.0.2.7")).expect("first");
        assert!(
            admitted(&door, ip("::ffff:192.0.2.7")).is_err(),
            "the same client over a dual-stack socket"
        );
    }

    #[test]
    fn global_overload_is_answered_before_the_share() {
        let config = Resilience {
            max_concurrent_streams: 1,
            max_streams_per_client: Some(1),
            peer_available: true,
            ..Resilience::default()
        };
        let door = Arc::new(Admission::new(&config, Metrics::new()).expect("valid"));
        let _held = admitted(&door, ip("10.0.0.1")).expect("first");
        let refused = admitted(&door, ip("10.0.0.1")).expect_err("full");
        assert_eq!(refused.code, Code::Unavailable, "{}", refused.message);
        assert!(refused.metadata.get("grpc-retry-pushback-ms").is_some());
    }
}
