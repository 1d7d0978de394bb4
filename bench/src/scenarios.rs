//! The scenarios S1–S9. Each one drives load at one peer for one protocol and returns its
//! numbers; the runner repeats and aggregates them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{CallSpec, Channel, Protocol, ResponseStream};
use crate::peers::PeerKind;
use crate::procstat::{self, CpuMark};
use crate::service::{Method, Params};
use crate::stall::{StallSpec, StalledReaders};

/// Which scenario.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Scenario {
    /// Unary 100 B: closed loop (throughput), concurrency 1 and open loop (latency).
    S1,
    /// Paced token streams: time to first message and per-message latency.
    S2,
    /// Unpaced server streaming: messages per second.
    S3,
    /// Stream churn: open, first message, cancel.
    S4,
    /// Many concurrent idle streams: memory per stream, connect time.
    S5,
    /// Bulk: one huge message per call, downloaded (up to 4 GiB − 1) or uploaded.
    S6,
    /// A new unary call's latency while S2 runs.
    S7,
    /// Unary closed-loop latency without and with stalled readers holding streams open.
    S8,
    /// Concurrent bulk: many large downloads at once; memory against windows × streams.
    S9,
}

impl Scenario {
    /// Every scenario.
    pub const ALL: [Scenario; 9] = [
        Scenario::S1,
        Scenario::S2,
        Scenario::S3,
        Scenario::S4,
        Scenario::S5,
        Scenario::S6,
        Scenario::S7,
        Scenario::S8,
        Scenario::S9,
    ];

    /// A one-line description for tables.
    pub fn title(self) -> &'static str {
        match self {
            Scenario::S1 => "S1 unary 100 B",
            Scenario::S2 => "S2 paced token streams (64 B every 20 ms)",
            Scenario::S3 => "S3 unpaced server streaming (64 B messages)",
            Scenario::S4 => "S4 stream churn (open, first message, cancel)",
            Scenario::S5 => "S5 concurrent idle streams",
            Scenario::S6 => "S6 bulk (one message per call; `upload`: client to upstream)",
            Scenario::S7 => "S7 unary latency while S2 runs",
            Scenario::S8 => "S8 stalled readers beside unary load",
            Scenario::S9 => "S9 concurrent bulk downloads",
        }
    }

    /// Parse `S1`…`S9` (any case).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|s| format!("{s:?}").eq_ignore_ascii_case(name))
    }
}

/// How big each scenario is. Fields missing from an older `results.json` take
/// [`Scale::full`]'s values.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Scale {
    /// Measured time of a timed point.
    pub duration: Duration,
    /// Unmeasured lead-in of a timed point.
    pub warmup: Duration,
    /// S1 closed-loop concurrency.
    pub s1_concurrency: usize,
    /// S1 open-loop rate, calls per second.
    pub s1_rate: u64,
    /// HTTP/2 connections the load is spread over.
    pub connections: usize,
    /// S2 and S7 concurrent streams.
    pub s2_streams: usize,
    /// S3 concurrent streams.
    pub s3_streams: usize,
    /// S4 concurrency.
    pub s4_concurrency: usize,
    /// S5 streams over HTTP/2.
    pub s5_streams: usize,
    /// S5 HTTP/2 connections (pnp allows 1024 streams per connection).
    pub s5_connections: usize,
    /// S5 HTTP/1.1 connections (one idle call each).
    pub s5_http1_connections: usize,
    /// S6 message sizes in bytes, downloaded (server → client); up to 4 GiB − 1.
    pub s6_sizes: Vec<u64>,
    /// S6 message sizes in bytes, uploaded (client → upstream, one message per call).
    pub s6_upload_sizes: Vec<u64>,
    /// S8 closed-loop unary concurrency (one HTTP/2 connection of its own).
    pub s8_concurrency: usize,
    /// S8 stalled-reader connections.
    pub s8_stall_connections: usize,
    /// S8 stalled streams held open on each of those connections.
    pub s8_stall_streams: usize,
    /// S8 reply each stalled stream asks for, in bytes.
    pub s8_reply_bytes: u64,
    /// S8 `grpc-timeout` of each stalled stream.
    pub s8_deadline: Duration,
    /// S8: a unary call still unanswered after this long is abandoned and counted as failed.
    pub s8_call_timeout: Duration,
    /// S9 concurrent downloads (spread over `connections` HTTP/2 connections).
    pub s9_streams: usize,
    /// S9 size of each download's one message, in bytes.
    pub s9_size: u64,
}

impl Default for Scale {
    fn default() -> Self {
        Self::full()
    }
}

impl Scale {
    /// The full run.
    pub fn full() -> Self {
        Self {
            duration: Duration::from_secs(2),
            warmup: Duration::from_millis(500),
            s1_concurrency: 32,
            s1_rate: 2000,
            connections: 4,
            s2_streams: 500,
            s3_streams: 4,
            s4_concurrency: 16,
            s5_streams: 10_000,
            s5_connections: 10,
            s5_http1_connections: 2000,
            s6_sizes: vec![100 << 20, 1 << 30, crate::service::MAX_MESSAGE],
            s6_upload_sizes: vec![1 << 30],
            s8_concurrency: 8,
            s8_stall_connections: 8,
            s8_stall_streams: 8,
            s8_reply_bytes: 2 << 20,
            s8_deadline: Duration::from_secs(2),
            s8_call_timeout: Duration::from_secs(5),
            s9_streams: 16,
            s9_size: 64 << 20,
        }
    }

    /// A few seconds in all: for CI.
    pub fn smoke() -> Self {
        Self {
            duration: Duration::from_millis(150),
            warmup: Duration::from_millis(50),
            s1_concurrency: 4,
            s1_rate: 200,
            connections: 2,
            s2_streams: 20,
            s3_streams: 2,
            s4_concurrency: 4,
            s5_streams: 100,
            s5_connections: 2,
            s5_http1_connections: 20,
            // 5 MiB: over the 4 MiB defaults of pnp's and tonic's message limits, so the smoke
            // test shows the bench raises both.
            s6_sizes: vec![1 << 20, 5 << 20],
            s6_upload_sizes: vec![5 << 20],
            s8_concurrency: 2,
            s8_stall_connections: 2,
            s8_stall_streams: 4,
            s8_reply_bytes: 2 << 20,
            s8_deadline: Duration::from_millis(200),
            s8_call_timeout: Duration::from_millis(500),
            s9_streams: 4,
            s9_size: 1 << 20,
        }
    }
}

/// What to measure, and where.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// The peer's address.
    pub addr: SocketAddr,
    /// How to speak to it.
    pub protocol: Protocol,
    /// The peer's process, when it is not this one (a bridge's edge pnp, raw quinn's client).
    pub peer_pid: Option<u32>,
    /// The second process of a two-process peer (a bridge's cluster pnp, raw quinn's
    /// server): its CPU is added to the peer's, its memory reported beside it.
    pub cluster_pid: Option<u32>,
    /// The upstream's process, when it is separate from the peer.
    pub upstream_pid: Option<u32>,
    /// Which peer it is, when known (the windows it holds bulk data in depend on it).
    pub peer: Option<PeerKind>,
}

impl Target {
    /// Resident memory of the peer: both processes of a two-process peer together.
    fn rss_bytes(&self) -> Option<u64> {
        let edge = self.peer_pid.and_then(procstat::rss_bytes)?;
        match self.cluster_pid {
            Some(cluster) => Some(edge + procstat::rss_bytes(cluster)?),
            None => Some(edge),
        }
    }
}

/// The numbers of one run of one point.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    /// Named values (units in the name: `_us`, `_ms`, `_mb`, `_kb`, `_per_s`…).
    pub metrics: BTreeMap<String, f64>,
    /// A latency distribution: (quantile, microseconds).
    pub cdf: Vec<(f64, f64)>,
}

impl Sample {
    fn set(&mut self, name: &str, value: f64) {
        let _ = self.metrics.insert(name.to_owned(), value);
    }

    /// Set `cpu_us_per_op` (and, for a two-process peer, `edge_cpu_us_per_op` and
    /// `cluster_cpu_us_per_op`) from the CPU seconds recorded, over `ops` operations.
    fn per_op(&mut self, ops: f64) {
        let ops = ops.max(1.0);
        for (total, per_op) in [
            ("cpu_s", "cpu_us_per_op"),
            ("edge_cpu_s", "edge_cpu_us_per_op"),
            ("cluster_cpu_s", "cluster_cpu_us_per_op"),
        ] {
            if let Some(cpu) = self.metrics.get(total).copied() {
                self.set(per_op, cpu * 1e6 / ops);
            }
        }
    }

    fn latency(&mut self, prefix: &str, histogram: &Histogram<u64>, with_cdf: bool) {
        if histogram.is_empty() {
            return;
        }
        for (label, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)] {
            self.set(
                &format!("{prefix}{label}_us"),
                histogram.value_at_quantile(q) as f64 / 1000.0,
            );
        }
        if with_cdf {
            self.cdf = cdf(histogram);
        }
    }
}

/// (quantile, µs) points of a histogram, dense in the tail.
fn cdf(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
    let mut points = Vec::new();
    let mut q = 0.0;
    while q < 0.9999 {
        points.push((q, histogram.value_at_quantile(q) as f64 / 1000.0));
        // Step by 2% of what is left: 0, 0.02, … 0.9, … 0.99, … 0.999.
        q += ((1.0 - q) * 0.05).max(0.00002);
    }
    points.push((1.0, histogram.max() as f64 / 1000.0));
    points
}

fn histogram() -> Histogram<u64> {
    // Nanoseconds, 1 µs to 100 s, 3 significant digits.
    Histogram::new_with_bounds(1000, 100_000_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable_histogram()))
}

fn unreachable_histogram() -> Histogram<u64> {
    // `Histogram::new(3)` only fails for sigfig > 5.
    Histogram::new(2).unwrap_or_else(|_| std::process::abort())
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let _ = h.record((d.as_nanos() as u64).clamp(1000, 100_000_000_000));
}

/// CPU and memory of the peer (both processes of a two-process peer, and the upstream) over
/// a measured window.
struct Meter {
    started: Instant,
    peer: Option<CpuMark>,
    cluster: Option<CpuMark>,
    upstream: Option<CpuMark>,
    udp_rcvbuf_errors: Option<u64>,
}

impl Meter {
    fn start(target: &Target) -> Self {
        Self {
            started: Instant::now(),
            peer: target.peer_pid.and_then(CpuMark::start),
            cluster: target.cluster_pid.and_then(CpuMark::start),
            upstream: target
                .upstream_pid
                .filter(|u| Some(*u) != target.peer_pid)
                .and_then(CpuMark::start),
            udp_rcvbuf_errors: procstat::udp_rcvbuf_errors(),
        }
    }

    /// Record wall time, CPU per `ops` (in µs per op) and peak RSS. For a two-process peer,
    /// `cpu_s` is the sum of both, `peak_rss_mb` the larger of the two, and each process's
    /// own figures are kept as `edge_…` and `cluster_…`.
    fn finish(&self, sample: &mut Sample, ops: f64) {
        let wall = self.started.elapsed().as_secs_f64();
        sample.set("wall_s", wall);
        if let Some(peer) = &self.peer {
            let edge_cpu = peer.elapsed();
            let cluster_cpu = self.cluster.as_ref().and_then(CpuMark::elapsed);
            let edge_peak = procstat::peak_rss_bytes(peer.pid()).map(|b| b as f64 / 1e6);
            let cluster_peak = self
                .cluster
                .as_ref()
                .and_then(|c| procstat::peak_rss_bytes(c.pid()))
                .map(|b| b as f64 / 1e6);
            let cpu = match (edge_cpu, cluster_cpu, &self.cluster) {
                (Some(edge), Some(cluster), Some(_)) => {
                    sample.set("edge_cpu_s", edge);
                    sample.set("cluster_cpu_s", cluster);
                    Some(edge + cluster)
                }
                (_, _, Some(_)) => None,
                (edge, _, None) => edge,
            };
            if let Some(cpu) = cpu {
                sample.set("cpu_s", cpu);
                sample.set("cpu_util", cpu / wall);
                if ops > 0.0 {
                    sample.per_op(ops);
                }
            }
            match (edge_peak, cluster_peak) {
                (Some(edge), Some(cluster)) => {
                    sample.set("edge_peak_rss_mb", edge);
                    sample.set("cluster_peak_rss_mb", cluster);
                    sample.set("peak_rss_mb", edge.max(cluster));
                }
                (Some(edge), None) if self.cluster.is_none() => sample.set("peak_rss_mb", edge),
                _ => {}
            }
        }
        if let (Some(before), Some(after)) = (self.udp_rcvbuf_errors, procstat::udp_rcvbuf_errors())
        {
            sample.set("udp_rcvbuf_errors", after.saturating_sub(before) as f64);
        }
        if let (Some(upstream), true) = (&self.upstream, ops > 0.0) {
            if let Some(cpu) = upstream.elapsed() {
                sample.set("upstream_cpu_us_per_op", cpu * 1e6 / ops);
            }
        }
    }
}

/// Connections for `n` workers: HTTP/2 workers share `connections` connections, HTTP/1.1
/// workers get one each.
async fn channels(
    target: &Target,
    workers: usize,
    connections: usize,
) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(workers);
    if target.protocol.is_http1() {
        for _ in 0..workers {
            out.push(Channel::connect(target.addr, target.protocol).await?);
        }
    } else {
        let mut base = Vec::new();
        for _ in 0..connections.max(1) {
            base.push(Channel::connect(target.addr, target.protocol).await?);
        }
        for i in 0..workers {
            out.push(base[i % base.len()].fork().await?);
        }
    }
    Ok(out)
}

/// One call to check the peer answers before measuring.
pub async fn check(target: &Target) -> anyhow::Result<()> {
    let mut channel = Channel::connect(target.addr, target.protocol).await?;
    channel
        .call(&CallSpec::unary())
        .await
        .with_context(|| format!("a first {} unary call", target.protocol.name()))?;
    Ok(())
}

/// S1 closed loop: `concurrency` workers calling back to back.
pub async fn s1_closed(
    target: &Target,
    scale: &Scale,
    concurrency: usize,
) -> anyhow::Result<Sample> {
    let channels = channels(target, concurrency, scale.connections).await?;
    let start = Instant::now();
    let measure_from = start + scale.warmup;
    let deadline = measure_from + scale.duration;
    let mut workers = JoinSet::new();
    for mut channel in channels {
        workers.spawn(async move {
            let mut h = histogram();
            let (mut ok, mut errors) = (0u64, 0u64);
            let spec = CallSpec::unary();
            loop {
                let t0 = Instant::now();
                if t0 >= deadline {
                    break;
                }
                let result = channel.call(&spec).await;
                let done = Instant::now();
                if t0 >= measure_from && done <= deadline {
                    match result {
                        Ok(_) => {
                            ok += 1;
                            record(&mut h, done - t0);
                        }
                        Err(_) => errors += 1,
                    }
                }
                if result.is_err() || channel.is_broken() {
                    // A dead connection (GOAWAY, reset, closed HTTP/1.1) is replaced, as a
                    // client would.
                    match Channel::connect(channel.addr(), channel.protocol()).await {
                        Ok(c) => channel = c,
                        Err(_) => break,
                    }
                }
            }
            (h, ok, errors)
        });
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let meter = Meter::start(target);
    tokio::time::sleep_until(deadline.into()).await;
    let mut sample = Sample::default();
    let mut total = histogram();
    let (mut ok, mut errors) = (0, 0);
    // Read CPU before joining: the stragglers' last calls are not counted.
    let cpu_sample = {
        let mut s = Sample::default();
        meter.finish(&mut s, 1.0);
        s
    };
    while let Some(joined) = workers.join_next().await {
        let (h, o, e) = joined?;
        let _ = total.add(&h);
        ok += o;
        errors += e;
    }
    let wall = cpu_sample.metrics.get("wall_s").copied().unwrap_or(1.0);
    sample.metrics = cpu_sample.metrics;
    sample.per_op(ok as f64);
    if let Some(up) = sample.metrics.get("upstream_cpu_us_per_op").copied() {
        sample.set("upstream_cpu_us_per_op", up / ok.max(1) as f64);
    }
    sample.set("calls_per_s", ok as f64 / wall);
    sample.set("calls", ok as f64);
    sample.set("errors", errors as f64);
    sample.latency("", &total, concurrency == 1);
    Ok(sample)
}

/// S1 open loop: calls started at a fixed rate whatever the replies do (HTTP/2 only: each call
/// is its own stream). Latency is measured from the moment a call is sent; the timer wheel's
/// 1 ms granularity means calls go out in small bursts.
pub async fn s1_open(target: &Target, scale: &Scale) -> anyhow::Result<Sample> {
    if target.protocol.is_http1() {
        bail!("open loop needs HTTP/2");
    }
    let channels = channels(target, scale.connections, scale.connections).await?;
    let start = Instant::now();
    let measure_from = start + scale.warmup;
    let deadline = measure_from + scale.duration;
    let gap = Duration::from_secs_f64(1.0 / scale.s1_rate as f64);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut meter = None;
    let mut next = start;
    let mut i = 0usize;
    let mut lag = histogram();
    while next < deadline {
        tokio::time::sleep_until(next.into()).await;
        let now = Instant::now();
        if meter.is_none() && now >= measure_from {
            meter = Some(Meter::start(target));
        }
        while next <= now && next < deadline {
            let mut channel = channels[i % channels.len()].fork().await?;
            i += 1;
            let measured = next >= measure_from;
            if measured {
                record(&mut lag, now - next);
            }
            let tx = tx.clone();
            tokio::spawn(async move {
                let t0 = Instant::now();
                let result = channel.call(&CallSpec::unary()).await;
                let _ = tx.send((measured, result.is_ok(), t0.elapsed()));
            });
            next += gap;
        }
    }
    drop(tx);
    let mut sample = Sample::default();
    let meter = meter.unwrap_or_else(|| Meter::start(target));
    let mut h = histogram();
    let (mut ok, mut errors) = (0u64, 0u64);
    while let Some((measured, success, latency)) = rx.recv().await {
        if !measured {
            continue;
        }
        if success {
            ok += 1;
            record(&mut h, latency);
        } else {
            errors += 1;
        }
    }
    meter.finish(&mut sample, ok as f64);
    sample.set("rate_per_s", scale.s1_rate as f64);
    sample.set("calls", ok as f64);
    sample.set("errors", errors as f64);
    sample.set(
        "dispatch_lag_p99_us",
        lag.value_at_quantile(0.99) as f64 / 1000.0,
    );
    sample.latency("", &h, true);
    Ok(sample)
}

/// Open `streams` calls of `spec` over `connections`, at most `opening` at a time, each
/// returned once its first message arrived, with its time to first message.
async fn open_streams(
    target: &Target,
    spec: CallSpec,
    streams: usize,
    connections: usize,
    ramp: Duration,
) -> anyhow::Result<Vec<(ResponseStream, Duration)>> {
    let channels = channels(
        target,
        if target.protocol.is_http1() {
            streams
        } else {
            connections
        },
        connections,
    )
    .await?;
    let channels: Vec<Arc<tokio::sync::Mutex<Channel>>> = channels
        .into_iter()
        .map(|c| Arc::new(tokio::sync::Mutex::new(c)))
        .collect();
    let gate = Arc::new(Semaphore::new(256));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..streams {
        let channel = channels[i % channels.len()].clone();
        let gate = gate.clone();
        let at = start + ramp.mul_f64(i as f64 / streams.max(1) as f64);
        tasks.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let _permit = gate.acquire_owned().await;
            let mut channel = {
                let guard = channel.lock().await;
                guard.fork().await?
            };
            let mut stream = channel.start(&spec).await?;
            let first = stream
                .next()
                .await?
                .context("stream ended before its first message")?;
            let ttfm = first.at - stream.started();
            Ok::<_, anyhow::Error>((i, stream, ttfm))
        });
    }
    let mut out: Vec<Option<(ResponseStream, Duration)>> = (0..streams).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (i, stream, ttfm) = joined??;
        out[i] = Some((stream, ttfm));
    }
    Ok(out.into_iter().flatten().collect())
}

/// S2: paced token streams. Each message carries the upstream's send time, so the client
/// measures how long it took to arrive; a proxy's added latency is its number minus direct's.
pub async fn s2_paced(target: &Target, scale: &Scale, streams: usize) -> anyhow::Result<Sample> {
    let spec = CallSpec::stream(
        Method::Tokens,
        Params {
            count: 0,
            size: crate::service::TOKEN_SIZE as u64,
            interval_us: 20_000,
        },
    );
    let ramp = Duration::from_millis(20).max(scale.warmup / 2);
    let opened = open_streams(
        target,
        spec,
        streams,
        scale.connections.max(streams / 100),
        ramp,
    )
    .await?;
    let mut ttfm = histogram();
    for (_, t) in &opened {
        record(&mut ttfm, *t);
    }
    let start = Instant::now();
    let measure_from = start + scale.warmup / 2;
    let deadline = measure_from + scale.duration;
    let mut tasks = JoinSet::new();
    for (mut stream, _) in opened {
        tasks.spawn(async move {
            let mut delay = histogram();
            let mut messages = 0u64;
            loop {
                let next = tokio::time::timeout_at(deadline.into(), stream.next()).await;
                match next {
                    Err(_) => break,
                    Ok(Ok(Some(message))) => {
                        if message.at >= measure_from {
                            messages += 1;
                            if let Some(stamp) = message.stamp {
                                record(
                                    &mut delay,
                                    Duration::from_nanos(message.wall_nanos.saturating_sub(stamp)),
                                );
                            }
                        }
                    }
                    Ok(Ok(None)) | Ok(Err(_)) => return (delay, messages, true),
                }
            }
            (delay, messages, false)
        });
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let meter = Meter::start(target);
    tokio::time::sleep_until(deadline.into()).await;
    let mut sample = Sample::default();
    let mut cpu = Sample::default();
    meter.finish(&mut cpu, 1.0);
    let mut delay = histogram();
    let (mut messages, mut broken) = (0u64, 0u64);
    while let Some(joined) = tasks.join_next().await {
        let (h, m, b) = joined?;
        let _ = delay.add(&h);
        messages += m;
        broken += u64::from(b);
    }
    let wall = cpu.metrics.get("wall_s").copied().unwrap_or(1.0);
    sample.metrics = cpu.metrics;
    sample.per_op(messages as f64);
    if let Some(up) = sample.metrics.get("upstream_cpu_us_per_op").copied() {
        sample.set("upstream_cpu_us_per_op", up / messages.max(1) as f64);
    }
    sample.set("streams", streams as f64);
    sample.set("msgs_per_s", messages as f64 / wall);
    sample.set("broken_streams", broken as f64);
    sample.set("ttfm_p50_us", ttfm.value_at_quantile(0.5) as f64 / 1000.0);
    sample.set("ttfm_p99_us", ttfm.value_at_quantile(0.99) as f64 / 1000.0);
    sample.latency("delay_", &delay, true);
    Ok(sample)
}

/// S3: `streams` unpaced server streams, counted for the measured window, then cancelled.
pub async fn s3_unpaced(target: &Target, scale: &Scale) -> anyhow::Result<Sample> {
    let spec = CallSpec::stream(
        Method::Tokens,
        Params {
            count: 0,
            size: crate::service::TOKEN_SIZE as u64,
            interval_us: 0,
        },
    );
    let opened = open_streams(
        target,
        spec,
        scale.s3_streams,
        scale.s3_streams,
        Duration::ZERO,
    )
    .await?;
    let start = Instant::now();
    let measure_from = start + scale.warmup;
    let deadline = measure_from + scale.duration;
    let mut tasks = JoinSet::new();
    for (mut stream, _) in opened {
        tasks.spawn(async move {
            let mut messages = 0u64;
            let mut before = None;
            let mut failed = false;
            loop {
                let now = Instant::now();
                if before.is_none() && now >= measure_from {
                    before = Some(stream.messages());
                }
                match tokio::time::timeout_at(deadline.into(), stream.next()).await {
                    Err(_) => break,
                    Ok(Ok(Some(_))) => {}
                    Ok(Ok(None)) => break,
                    Ok(Err(_)) => {
                        failed = true;
                        break;
                    }
                }
            }
            messages += stream.messages() - before.unwrap_or(0);
            (messages, failed)
        });
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let meter = Meter::start(target);
    tokio::time::sleep_until(deadline.into()).await;
    let mut cpu = Sample::default();
    meter.finish(&mut cpu, 1.0);
    let (mut messages, mut broken) = (0u64, 0u64);
    while let Some(joined) = tasks.join_next().await {
        let (m, failed) = joined?;
        messages += m;
        broken += u64::from(failed);
    }
    let mut sample = Sample::default();
    let wall = cpu.metrics.get("wall_s").copied().unwrap_or(1.0);
    sample.metrics = cpu.metrics;
    sample.per_op(messages as f64);
    if let Some(up) = sample.metrics.get("upstream_cpu_us_per_op").copied() {
        sample.set("upstream_cpu_us_per_op", up / messages.max(1) as f64);
    }
    sample.set("msgs_per_s", messages as f64 / wall);
    sample.set("broken_streams", broken as f64);
    Ok(sample)
}

/// S4: workers open a stream, wait for its first message and cancel it, back to back.
pub async fn s4_churn(target: &Target, scale: &Scale) -> anyhow::Result<Sample> {
    if target.protocol.is_http1() {
        bail!("stream churn needs HTTP/2 (cancelling an HTTP/1.1 call closes its connection)");
    }
    let channels = channels(target, scale.s4_concurrency, scale.connections).await?;
    let start = Instant::now();
    let measure_from = start + scale.warmup;
    let deadline = measure_from + scale.duration;
    let spec = CallSpec::stream(Method::Idle, Params::default());
    let mut workers = JoinSet::new();
    for mut channel in channels {
        workers.spawn(async move {
            let (mut ok, mut errors) = (0u64, 0u64);
            let mut h = histogram();
            loop {
                let t0 = Instant::now();
                if t0 >= deadline {
                    break;
                }
                let result = async {
                    let mut stream = channel.start(&spec).await?;
                    stream.next().await?.context("no first message")
                }
                .await;
                let failed = result.is_err();
                if t0 >= measure_from {
                    match result {
                        Ok(_) => {
                            ok += 1;
                            record(&mut h, t0.elapsed());
                        }
                        Err(_) => errors += 1,
                    }
                }
                if failed {
                    match Channel::connect(channel.addr(), channel.protocol()).await {
                        Ok(c) => channel = c,
                        Err(_) => break,
                    }
                }
            }
            (ok, errors, h)
        });
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let meter = Meter::start(target);
    tokio::time::sleep_until(deadline.into()).await;
    let mut cpu = Sample::default();
    meter.finish(&mut cpu, 1.0);
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut h = histogram();
    while let Some(joined) = workers.join_next().await {
        let (o, e, hist) = joined?;
        ok += o;
        errors += e;
        let _ = h.add(&hist);
    }
    let mut sample = Sample::default();
    let wall = cpu.metrics.get("wall_s").copied().unwrap_or(1.0);
    sample.metrics = cpu.metrics;
    sample.per_op(ok as f64);
    if let Some(up) = sample.metrics.get("upstream_cpu_us_per_op").copied() {
        sample.set("upstream_cpu_us_per_op", up / ok.max(1) as f64);
    }
    sample.set("streams_per_s", ok as f64 / wall);
    sample.set("errors", errors as f64);
    sample.latency("open_", &h, false);
    Ok(sample)
}

/// S5: open `streams` idle streams (HTTP/2: over `s5_connections`; HTTP/1.1: one connection
/// each), hold them, and read the peer's memory.
pub async fn s5_idle(target: &Target, scale: &Scale) -> anyhow::Result<Sample> {
    let (streams, connections) = if target.protocol.is_http1() {
        (scale.s5_http1_connections, scale.s5_http1_connections)
    } else {
        (scale.s5_streams, scale.s5_connections)
    };
    // Settle, then the baseline.
    tokio::time::sleep(scale.warmup.min(Duration::from_millis(300))).await;
    let rss_before = target.rss_bytes();
    let meter = Meter::start(target);
    let t0 = Instant::now();
    let spec = CallSpec::stream(Method::Idle, Params::default());
    let opened = open_streams(target, spec, streams, connections, Duration::ZERO).await?;
    let open_s = t0.elapsed().as_secs_f64();
    let mut ttfm = histogram();
    for (_, t) in &opened {
        record(&mut ttfm, *t);
    }
    tokio::time::sleep((scale.warmup / 2).min(Duration::from_millis(500))).await;
    let rss_after = target.rss_bytes();
    let mut sample = Sample::default();
    meter.finish(&mut sample, opened.len() as f64);
    sample.set("streams", opened.len() as f64);
    sample.set("connections", connections as f64);
    sample.set("open_all_s", open_s);
    sample.set(
        "first_message_p50_us",
        ttfm.value_at_quantile(0.5) as f64 / 1000.0,
    );
    sample.set(
        "first_message_p99_us",
        ttfm.value_at_quantile(0.99) as f64 / 1000.0,
    );
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        sample.set("rss_mb", after as f64 / 1e6);
        sample.set(
            "rss_per_stream_kb",
            after.saturating_sub(before) as f64 / 1024.0 / opened.len().max(1) as f64,
        );
    }
    if opened.len() != streams {
        bail!("only {} of {streams} idle streams opened", opened.len());
    }
    drop(opened);
    Ok(sample)
}

/// S6: one call whose reply is one `size`-byte message (up to 4 GiB − 1). The upstream writes
/// it from a shared chunk and the client scans it as it arrives, so neither holds it whole.
pub async fn s6_bulk(target: &Target, size: u64) -> anyhow::Result<Sample> {
    let mut channel = Channel::connect(target.addr, target.protocol).await?;
    let spec = bulk_spec(size);
    let meter = Meter::start(target);
    let t0 = Instant::now();
    let mut stream = channel.start(&spec).await?;
    let mut received = 0;
    while let Some(message) = stream.next().await? {
        received += message.len;
    }
    let wall = t0.elapsed().as_secs_f64();
    if stream.status() != Some(0) || received != size {
        bail!(
            "bulk call of {size} bytes ended with status {:?} after {received} bytes",
            stream.status()
        );
    }
    let mut sample = Sample::default();
    bulk_figures(&mut sample, &meter, target, size, 1, wall);
    Ok(sample)
}

/// S6 upload: one client-streaming call whose request is one `size`-byte message, streamed by
/// the client from a shared chunk as the windows allow and scanned by the upstream as it
/// arrives; the upstream answers with the length it received.
pub async fn s6_upload(target: &Target, size: u64) -> anyhow::Result<Sample> {
    let mut channel = Channel::connect(target.addr, target.protocol).await?;
    let meter = Meter::start(target);
    let t0 = Instant::now();
    let acknowledged = channel.upload(size).await?;
    let wall = t0.elapsed().as_secs_f64();
    if acknowledged != size {
        bail!("upload of {size} bytes: the upstream received {acknowledged}");
    }
    let mut sample = Sample::default();
    bulk_figures(&mut sample, &meter, target, size, 1, wall);
    Ok(sample)
}

/// S6 for raw quinn ([`crate::quic`]): one transfer of `size` bytes on a new stream of the
/// raw client's connection, downloaded (server → client) or uploaded. The wall time is the
/// client's (stream opened → last byte read, or the server's count received); CPU and memory
/// are both processes', as for a bridge.
pub async fn s6_quinn(target: &Target, size: u64, upload: bool) -> anyhow::Result<Sample> {
    let direction = if upload {
        crate::quic::Direction::Upload
    } else {
        crate::quic::Direction::Download
    };
    let meter = Meter::start(target);
    let timeout = Duration::from_secs(120 + size / (16 << 20));
    let transfer = crate::quic::request(target.addr, direction, size, timeout).await?;
    let mut sample = Sample::default();
    bulk_figures(&mut sample, &meter, target, size, 1, transfer.wall_s);
    sample.set("client_lost_packets", transfer.client_lost_packets as f64);
    sample.set("path_mtu", f64::from(transfer.mtu));
    sample.set("rtt_us", transfer.rtt_us);
    Ok(sample)
}

/// S9: `s9_streams` downloads of one `s9_size`-byte message each, all at once, spread over
/// `connections` HTTP/2 connections (HTTP/1.1: one connection each). Reports aggregate GiB/s
/// (all bytes over the wall time until the last one ends), GiB per peer CPU-second, peak RSS,
/// RSS added over the RSS before, and pnp's flow-control bound for that many streams.
pub async fn s9_concurrent(target: &Target, scale: &Scale) -> anyhow::Result<Sample> {
    let streams = scale.s9_streams.max(1);
    let size = scale.s9_size;
    let channels = channels(target, streams, scale.connections).await?;
    // Let the connections settle, then the baseline.
    tokio::time::sleep(scale.warmup.min(Duration::from_millis(200))).await;
    let rss_before = target.peer_pid.and_then(procstat::rss_bytes);
    let spec = bulk_spec(size);
    let meter = Meter::start(target);
    let t0 = Instant::now();
    let mut calls = JoinSet::new();
    for mut channel in channels {
        calls.spawn(async move {
            let mut stream = channel.start(&spec).await?;
            let mut received = 0;
            while let Some(message) = stream.next().await? {
                received += message.len;
            }
            if stream.status() != Some(0) || received != size {
                bail!(
                    "bulk call of {size} bytes ended with status {:?} after {received} bytes",
                    stream.status()
                );
            }
            Ok::<_, anyhow::Error>(t0.elapsed())
        });
    }
    let mut took = Vec::with_capacity(streams);
    let mut failure = None;
    while let Some(joined) = calls.join_next().await {
        match joined? {
            Ok(t) => took.push(t),
            Err(e) => failure = Some(e),
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    if let Some(e) = failure {
        return Err(e.context(format!(
            "{} of {streams} concurrent downloads failed",
            streams - took.len()
        )));
    }
    took.sort();
    let mut sample = Sample::default();
    bulk_figures(&mut sample, &meter, target, size, streams, wall);
    if let (Some(first), Some(last)) = (took.first(), took.last()) {
        sample.set("first_done_s", first.as_secs_f64());
        sample.set("last_done_s", last.as_secs_f64());
    }
    // For a two-process peer, the edge's own (`rss_before` is the edge's).
    let peak = ["edge_peak_rss_mb", "peak_rss_mb"]
        .into_iter()
        .find_map(|k| sample.metrics.get(k).copied());
    if let (Some(before), Some(peak)) = (rss_before, peak) {
        sample.set("rss_before_mb", before as f64 / 1e6);
        sample.set("added_rss_mb", peak - before as f64 / 1e6);
    }
    Ok(sample)
}

/// A [`Method::Bulk`] call of one `size`-byte message.
fn bulk_spec(size: u64) -> CallSpec {
    CallSpec::stream(
        Method::Bulk,
        Params {
            count: 1,
            size,
            interval_us: 0,
        },
    )
}

/// The figures of S6 and S9: `streams` messages of `size` bytes moved in `wall` seconds.
fn bulk_figures(
    sample: &mut Sample,
    meter: &Meter,
    target: &Target,
    size: u64,
    streams: usize,
    wall: f64,
) {
    let gib = (size as f64 * streams as f64) / (1u64 << 30) as f64;
    meter.finish(sample, gib);
    sample.set("size_mb", size as f64 / 1e6);
    sample.set("streams", streams as f64);
    sample.set("gib_per_s", gib / wall);
    sample.set(
        "gbit_per_s",
        size as f64 * streams as f64 * 8.0 / wall / 1e9,
    );
    if let Some(cpu) = sample.metrics.get("cpu_s").copied() {
        if cpu > 0.0 {
            sample.set("gib_per_cpu_s", gib / cpu);
        }
    }
    if let Some(bound) = target.peer.and_then(|p| p.window_bound(streams)) {
        sample.set("window_bound_mb", bound as f64 / 1e6);
    }
}

/// S7: while `s2_streams` paced streams run, new unary calls one at a time on a fresh
/// connection; their latency against S1's concurrency-1 number shows head-of-line effects.
pub async fn s7_busy(target: &Target, scale: &Scale) -> anyhow::Result<Sample> {
    let background = {
        let target = *target;
        let mut scale = scale.clone();
        // Keep the streams alive past the foreground measurement.
        scale.duration += scale.warmup * 2;
        tokio::spawn(async move { s2_paced(&target, &scale, scale.s2_streams).await })
    };
    // Let the streams open before measuring.
    tokio::time::sleep(scale.warmup + Duration::from_millis(200)).await;
    let unary_target = *target;
    let mut fg_scale = scale.clone();
    fg_scale.warmup = Duration::from_millis(100);
    let mut sample = s1_closed(&unary_target, &fg_scale, 1).await?;
    let bg = background.await??;
    if let Some(v) = bg.metrics.get("broken_streams") {
        sample.set("background_broken_streams", *v);
    }
    if let Some(v) = bg.metrics.get("msgs_per_s") {
        sample.set("background_msgs_per_s", *v);
    }
    Ok(sample)
}

/// What the closed-loop unary workers of one S8 phase saw. A call counts when it was in flight
/// during the measured window (started before its end, ended after its start), so a call that
/// started in the warm-up and is still held up when the window opens is not lost.
struct UnaryWindow {
    /// Latency of every call counted, failed ones included (a call abandoned at the timeout
    /// counts at the timeout).
    latency: Histogram<u64>,
    /// Calls counted that ended with status OK.
    ok: u64,
    /// Calls counted that failed or were abandoned.
    failed: u64,
    /// Of those, abandoned at the timeout.
    timed_out: u64,
    /// The workers' channels, for the next phase.
    channels: Vec<Channel>,
}

/// Closed-loop unary calls on `channels`: warm-up, then `scale.duration` measured. Unlike S1,
/// every call in flight during the window counts however early it started or late it ends
/// (waiting up to `call_timeout`), so a call held up by someone else's stall shows in the
/// percentiles or as a failure instead of falling out of the window.
async fn unary_window(
    channels: Vec<Channel>,
    scale: &Scale,
    call_timeout: Duration,
) -> anyhow::Result<UnaryWindow> {
    let measure_from = Instant::now() + scale.warmup;
    let deadline = measure_from + scale.duration;
    let mut workers = JoinSet::new();
    for mut channel in channels {
        workers.spawn(async move {
            let mut h = histogram();
            let (mut ok, mut failed, mut timed_out) = (0u64, 0u64, 0u64);
            let spec = CallSpec::unary();
            loop {
                let t0 = Instant::now();
                if t0 >= deadline {
                    break;
                }
                let result = tokio::time::timeout(call_timeout, channel.call(&spec)).await;
                let took = t0.elapsed();
                let good = matches!(result, Ok(Ok(_)));
                if t0 + took >= measure_from {
                    record(&mut h, took);
                    match result {
                        Ok(Ok(_)) => ok += 1,
                        Ok(Err(_)) => failed += 1,
                        Err(_) => {
                            failed += 1;
                            timed_out += 1;
                        }
                    }
                }
                if !good || channel.is_broken() {
                    match Channel::connect(channel.addr(), channel.protocol()).await {
                        Ok(c) => channel = c,
                        Err(_) => break,
                    }
                }
            }
            (h, ok, failed, timed_out, channel)
        });
    }
    let mut window = UnaryWindow {
        latency: histogram(),
        ok: 0,
        failed: 0,
        timed_out: 0,
        channels: Vec::new(),
    };
    while let Some(joined) = workers.join_next().await {
        let (h, ok, failed, timed_out, channel) = joined?;
        let _ = window.latency.add(&h);
        window.ok += ok;
        window.failed += failed;
        window.timed_out += timed_out;
        window.channels.push(channel);
    }
    Ok(window)
}

/// S8: `s8_concurrency` closed-loop unary calls on a connection of their own, first alone
/// ("calm"), then while stalled readers (see [`crate::stall`]) hold
/// `s8_stall_connections × s8_stall_streams` server streams of `s8_reply_bytes` open without
/// reading them. Reports both phases' latency and throughput and their ratio, the failed calls,
/// the peer's peak RSS while stalled, and how long the stalled streams stayed open.
pub async fn s8_stalled(target: &Target, scale: &Scale) -> anyhow::Result<Sample> {
    let call_timeout = scale.s8_call_timeout;
    let channels = channels(target, scale.s8_concurrency, 1).await?;
    let mut sample = Sample::default();
    let seconds = scale.duration.as_secs_f64().max(1e-9);

    let calm_meter = Meter::start(target);
    let calm = unary_window(channels, scale, call_timeout).await?;
    let mut calm_usage = Sample::default();
    calm_meter.finish(&mut calm_usage, 0.0);
    if let Some(peak) = calm_usage.metrics.get("peak_rss_mb") {
        sample.set("calm_peak_rss_mb", *peak);
    }
    sample.set("calm_calls", calm.ok as f64);
    sample.set("calm_calls_per_s", calm.ok as f64 / seconds);
    sample.set("calm_errors", calm.failed as f64);
    sample.latency("calm_", &calm.latency, false);

    let spec = StallSpec {
        connections: scale.s8_stall_connections,
        streams_per_connection: scale.s8_stall_streams,
        reply_bytes: scale.s8_reply_bytes,
        message_bytes: (scale.s8_reply_bytes / 32).clamp(1, crate::service::BULK_CHUNK as u64),
        deadline: scale.s8_deadline,
    };
    let rss_before = target.peer_pid.and_then(procstat::rss_bytes);
    let meter = Meter::start(target);
    let stall = StalledReaders::start(target.addr, spec).await?;
    let stalled = unary_window(calm.channels, scale, call_timeout).await;
    let open_at_end = stall.open_now();
    let mut usage = Sample::default();
    meter.finish(&mut usage, 0.0);
    let report = stall.stop().await;
    let stalled = stalled?;

    sample.set("stalled_calls", stalled.ok as f64);
    sample.set("stalled_calls_per_s", stalled.ok as f64 / seconds);
    sample.set("stalled_errors", stalled.failed as f64);
    sample.set("stalled_timeouts", stalled.timed_out as f64);
    sample.latency("stalled_", &stalled.latency, true);
    let ratio = |sample: &mut Sample, name: &str, over: &str, under: &str| {
        let value = sample.metrics.get(over).copied();
        let base = sample.metrics.get(under).copied();
        if let (Some(value), Some(base)) = (value, base) {
            if base > 0.0 {
                sample.set(name, value / base);
            }
        }
    };
    ratio(&mut sample, "p50_ratio", "stalled_p50_us", "calm_p50_us");
    ratio(&mut sample, "p99_ratio", "stalled_p99_us", "calm_p99_us");
    ratio(
        &mut sample,
        "calls_ratio",
        "stalled_calls_per_s",
        "calm_calls_per_s",
    );
    if let Some(peak) = usage.metrics.get("peak_rss_mb").copied() {
        sample.set("peak_rss_mb", peak);
    }
    // For a two-process peer, the edge's own (`rss_before` is the edge's).
    let edge_peak = ["edge_peak_rss_mb", "peak_rss_mb"]
        .into_iter()
        .find_map(|k| usage.metrics.get(k).copied());
    if let Some(peak) = edge_peak {
        if let Some(before) = rss_before {
            sample.set("stall_added_rss_mb", peak - before as f64 / 1e6);
        }
    }
    sample.set("stall_streams", spec.streams() as f64);
    sample.set("stall_open_at_end", open_at_end as f64);
    sample.set("stall_opened", report.opened as f64);
    sample.set("stall_resets", report.resets as f64);
    sample.set("stall_statuses", report.statuses as f64);
    for (code, n) in &report.status_codes {
        sample.set(&format!("stall_status_{code}"), *n as f64);
    }
    sample.set("stall_reconnects", report.reconnects as f64);
    sample.set(
        "stall_longest_open_ms",
        report.longest_open.as_secs_f64() * 1e3,
    );
    if let Some(p50) = report.lifetime_quantile(0.5) {
        sample.set("stall_life_p50_ms", p50.as_secs_f64() * 1e3);
    }
    Ok(sample)
}
