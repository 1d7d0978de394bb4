//! `pnp-bench ucx-hop`: pnp's own UCX hop alone, beside `ucx_perftest`'s figures
//! (`pnp-bench ucx-perftest`), to say what share of raw UCX bandwidth and latency pnp's call
//! framing and UCX driver reach, without the gRPC/HTTP/2 legs of a full bridge.
//!
//! The client is a `pnp_ucx::UcxTransport` in this process (a multi-thread tokio runtime with
//! two workers); the server a `pnp_ucx::UcxListener` in a child process (`pnp-bench
//! ucx-hop-serve`, this program again), fresh for every run. The server's service:
//!
//! - [`SOURCE`]: the one request message is `COUNT SIZE` ([`parse_source_request`]); the reply
//!   is COUNT messages of SIZE bytes (slices of one buffer), then OK;
//! - [`SINK`]: counts the request's payload bytes, replies the count as text, then OK;
//! - [`PING`]: echoes the request message, then OK.
//!
//! Bandwidth points time one call (from sending it to its OK status) after one warm-up call,
//! with `ucx_perftest tag_bw`'s message counts ([`ucxperf::Test::bandwidth`]): download is a
//! Source call, upload a Sink call whose request carries the messages. Latency points are
//! sequential Ping calls (`tag_lat`'s 2 000 warm-up and 20 000 measured): the round trip of a
//! whole unary call, whose half is what `tag_lat` reports.
//!
//! Needs the cargo feature `ucx` (it links the system UCX); without it [`run_all`] and
//! [`serve_main`] fail with "built without --features ucx". The report types and the
//! Markdown are always there.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;

use crate::runner::size_name;
use crate::ucxperf::{self, median, Transport};

/// Server streaming: the one request message `COUNT SIZE` asks for COUNT messages of SIZE
/// bytes.
pub const SOURCE: &str = "/hop.Hop/Source";
/// Client streaming: the server counts the request's payload bytes and replies the count.
pub const SINK: &str = "/hop.Hop/Sink";
/// Unary echo.
pub const PING: &str = "/hop.Hop/Ping";

/// Largest message size (4 GiB − 1, pnp's and gRPC's limit).
const MAX_SIZE: u64 = u32::MAX as u64;

/// The request message of a [`SOURCE`] call.
pub fn source_request(count: u64, size: u64) -> String {
    format!("{count} {size}")
}

/// Parse the request message of a [`SOURCE`] call, `COUNT SIZE` (decimal, one space or more
/// between): COUNT ≥ 1 messages of SIZE bytes, 1 B … 4 GiB − 1, at most 2⁶⁴ − 1 bytes in all.
pub fn parse_source_request(text: &[u8]) -> anyhow::Result<(u64, u64)> {
    let text = std::str::from_utf8(text).context("the Source request is not UTF-8")?;
    let fields: Vec<&str> = text.split_whitespace().collect();
    let [count, size] = fields.as_slice() else {
        anyhow::bail!("the Source request `{text}` is not `COUNT SIZE`");
    };
    let count: u64 = count
        .parse()
        .with_context(|| format!("the Source request's count `{count}`"))?;
    let size: u64 = size
        .parse()
        .with_context(|| format!("the Source request's size `{size}`"))?;
    anyhow::ensure!(count >= 1, "the Source request asks for no message");
    anyhow::ensure!(
        (1..=MAX_SIZE).contains(&size),
        "the Source request's size {size} is not 1 B … 4 GiB − 1"
    );
    anyhow::ensure!(
        count.checked_mul(size).is_some(),
        "the Source request asks for more than 2⁶⁴ − 1 bytes"
    );
    Ok((count, size))
}

/// Which way the bulk data flows: download is a [`SOURCE`] call (server to client), upload a
/// [`SINK`] call (client to server).
pub use crate::quic::Direction;

/// What to run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// UCX transports.
    pub transports: Vec<Transport>,
    /// Bandwidth message sizes.
    pub bw_sizes: Vec<u64>,
    /// Latency message sizes.
    pub lat_sizes: Vec<u64>,
    /// Runs per point (a fresh server process and client transport each).
    pub runs: usize,
    /// `UcxOptions::busy_poll` of both sides, in µs (`None`: its default).
    pub busy_poll_us: Option<u64>,
    /// CPUs the server and the client are pinned to (`taskset`), or `None`.
    pub cpus: Option<(usize, usize)>,
}

/// One bandwidth run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BwRun {
    /// MiB/s (2²⁰ bytes, as `ucx_perftest`'s "MB/s").
    pub mib_s: f64,
    /// Seconds of the measured call, from sending it to its OK status.
    pub seconds: f64,
    /// CPU seconds of the client process over the measured call.
    pub client_cpu_s: f64,
    /// CPU seconds of the server process over the measured call.
    pub server_cpu_s: f64,
    /// GiB moved per CPU-second of both processes.
    pub gib_per_cpu_s: f64,
}

/// One bandwidth point: a transport, a direction and a message size.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BwPoint {
    /// The transport.
    pub transport: Transport,
    /// The direction.
    pub direction: Direction,
    /// Message size in bytes.
    pub size: u64,
    /// Messages in the measured call.
    pub messages: u64,
    /// Messages in the warm-up call.
    pub warmup: u64,
    /// The runs that completed.
    pub runs: Vec<BwRun>,
    /// Runs that failed, with the reason.
    pub errors: Vec<String>,
    /// Median MiB/s.
    pub median_mib_s: f64,
    /// Median bandwidth in Gbit/s (10⁹ bits).
    pub median_gbit_per_s: f64,
    /// Median GiB per CPU-second.
    pub median_gib_per_cpu_s: f64,
}

/// One latency run: round trips of sequential unary calls.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LatRun {
    /// Median round trip, µs.
    pub p50_rtt_us: f64,
    /// 99th percentile round trip, µs.
    pub p99_rtt_us: f64,
    /// Mean round trip, µs.
    pub mean_rtt_us: f64,
    /// Longest round trip, µs.
    pub max_rtt_us: f64,
}

/// One latency point: a transport and a message size.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LatPoint {
    /// The transport.
    pub transport: Transport,
    /// Message size in bytes (each way).
    pub size: u64,
    /// Measured calls per run.
    pub calls: u64,
    /// Warm-up calls per run.
    pub warmup: u64,
    /// The runs that completed.
    pub runs: Vec<LatRun>,
    /// Runs that failed, with the reason.
    pub errors: Vec<String>,
    /// Median over runs of the p50 round trip, µs.
    pub median_p50_rtt_us: f64,
    /// Median over runs of the p99 round trip, µs.
    pub median_p99_rtt_us: f64,
    /// Half of [`median_p50_rtt_us`](Self::median_p50_rtt_us): what `tag_lat` reports.
    pub median_p50_half_rtt_us: f64,
}

/// All of a `ucx-hop` run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// CPUs the server and the client were pinned to, or `None`.
    pub cpus: Option<(usize, usize)>,
    /// Runs per point.
    pub runs: usize,
    /// Busy-poll time of both sides, µs.
    pub busy_poll_us: f64,
    /// Per-call window of both sides, bytes.
    pub call_window: u32,
    /// Largest frame payload, bytes.
    pub max_fragment: u32,
    /// Bandwidth points.
    pub bandwidth: Vec<BwPoint>,
    /// Latency points.
    pub latency: Vec<LatPoint>,
}

impl BwPoint {
    /// A point with no runs yet.
    pub fn new(transport: Transport, direction: Direction, size: u64) -> Self {
        let test = ucxperf::Test::bandwidth(size);
        Self {
            transport,
            direction,
            size,
            messages: test.iterations,
            warmup: test.warmup,
            runs: Vec::new(),
            errors: Vec::new(),
            median_mib_s: f64::NAN,
            median_gbit_per_s: f64::NAN,
            median_gib_per_cpu_s: f64::NAN,
        }
    }

    /// Fill in the medians from the runs.
    pub fn summarize(&mut self) {
        self.median_mib_s = median(&self.runs.iter().map(|r| r.mib_s).collect::<Vec<_>>());
        self.median_gbit_per_s = self.median_mib_s * 1_048_576.0 * 8.0 / 1e9;
        self.median_gib_per_cpu_s = median(
            &self
                .runs
                .iter()
                .map(|r| r.gib_per_cpu_s)
                .collect::<Vec<_>>(),
        );
    }
}

impl LatPoint {
    /// A point with no runs yet.
    pub fn new(transport: Transport, size: u64) -> Self {
        let test = ucxperf::Test::latency(size);
        Self {
            transport,
            size,
            calls: test.iterations,
            warmup: test.warmup,
            runs: Vec::new(),
            errors: Vec::new(),
            median_p50_rtt_us: f64::NAN,
            median_p99_rtt_us: f64::NAN,
            median_p50_half_rtt_us: f64::NAN,
        }
    }

    /// Fill in the medians from the runs.
    pub fn summarize(&mut self) {
        self.median_p50_rtt_us =
            median(&self.runs.iter().map(|r| r.p50_rtt_us).collect::<Vec<_>>());
        self.median_p99_rtt_us =
            median(&self.runs.iter().map(|r| r.p99_rtt_us).collect::<Vec<_>>());
        self.median_p50_half_rtt_us = self.median_p50_rtt_us / 2.0;
    }
}

/// The `q` quantile (0 … 1) of sorted `values`, nearest rank; NaN when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Round trips (µs) of one latency run, summarized.
pub fn lat_run(mut rtts_us: Vec<f64>) -> LatRun {
    rtts_us.sort_by(f64::total_cmp);
    let mean = if rtts_us.is_empty() {
        f64::NAN
    } else {
        rtts_us.iter().sum::<f64>() / rtts_us.len() as f64
    };
    LatRun {
        p50_rtt_us: percentile(&rtts_us, 0.50),
        p99_rtt_us: percentile(&rtts_us, 0.99),
        mean_rtt_us: mean,
        max_rtt_us: rtts_us.last().copied().unwrap_or(f64::NAN),
    }
}

/// `ucx_perftest`'s figures to compare with (`pnp-bench ucx-perftest`'s JSON).
#[derive(Clone, Debug)]
pub struct Reference {
    /// The file they came from.
    pub file: String,
    /// Its report.
    pub report: ucxperf::Report,
}

impl Reference {
    fn point(&self, transport: Transport, test: &str, size: u64) -> Option<&ucxperf::Point> {
        self.report
            .points
            .iter()
            .find(|p| p.transport == transport && p.test.test == test && p.test.size == size)
    }

    /// Median `tag_bw` MiB/s of `transport` at `size`.
    pub fn tag_bw_mib_s(&self, transport: Transport, size: u64) -> Option<f64> {
        self.point(transport, "tag_bw", size)
            .map(|p| p.median_bw_mib_s)
            .filter(|v| v.is_finite())
    }

    /// Median `tag_lat` p50 (half a round trip), µs, of `transport` at `size`.
    pub fn tag_lat_us(&self, transport: Transport, size: u64) -> Option<f64> {
        self.point(transport, "tag_lat", size)
            .map(|p| p.median_p50_lat_us)
            .filter(|v| v.is_finite())
    }
}

/// The `ucx_perftest` reference in `dir`: `ucx_perftest{suffix}.json`, else
/// `ucx_perftest.json`; `None` if neither exists, an error if the one found does not parse.
pub fn load_reference(dir: &Path, suffix: &str) -> anyhow::Result<Option<Reference>> {
    let mut names = vec![format!("ucx_perftest{suffix}.json")];
    if !suffix.is_empty() {
        names.push("ucx_perftest.json".to_owned());
    }
    for name in names {
        let path = dir.join(&name);
        if !path.exists() {
            continue;
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        let report: ucxperf::Report =
            serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
        return Ok(Some(Reference { file: name, report }));
    }
    Ok(None)
}

/// `a / b` when both are finite and `b` is positive.
pub fn ratio(a: f64, b: Option<f64>) -> Option<f64> {
    let b = b?;
    (a.is_finite() && b.is_finite() && b > 0.0).then(|| a / b)
}

fn num(value: f64, decimals: usize) -> String {
    if value.is_finite() {
        format!("{value:.decimals$}")
    } else {
        "–".to_owned()
    }
}

fn opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "–".to_owned(), |v| num(v, decimals))
}

fn range(values: impl Iterator<Item = f64>, decimals: usize) -> String {
    let v: Vec<f64> = values.filter(|v| v.is_finite()).collect();
    if v.is_empty() {
        return "–".to_owned();
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.decimals$}–{max:.decimals$}")
}

/// The report as Markdown: a bandwidth table and a latency table, medians over runs, beside
/// `ucx_perftest`'s medians for the same transport and size when a `reference` is given.
pub fn markdown(report: &Report, reference: Option<&Reference>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## pnp UCX hop (pnp-ucx client → listener, two processes; busy-poll {} µs, call \
         window {}, fragments ≤ {}; {}; {} runs per point, medians)\n",
        num(report.busy_poll_us, 0),
        size_name(u64::from(report.call_window)),
        size_name(u64::from(report.max_fragment)),
        match report.cpus {
            Some((s, c)) => format!("server on CPU {s}, client on CPU {c}"),
            None => "not pinned".to_owned(),
        },
        report.runs
    );
    match reference {
        Some(r) => {
            let _ = writeln!(
                out,
                "Reference: `{}` ({}{} runs per point, medians).\n",
                r.file,
                if r.report.ucx_version.is_empty() {
                    String::new()
                } else {
                    format!("{}; ", r.report.ucx_version)
                },
                r.report.runs
            );
        }
        None => {
            let _ = writeln!(
                out,
                "No `ucx_perftest` reference (run `pnp-bench ucx-perftest` with the same --out).\n"
            );
        }
    }
    let _ = writeln!(
        out,
        "### Bandwidth (one call of N messages after a warm-up call; from sending the call to \
         its OK status)\n"
    );
    let _ = writeln!(
        out,
        "| transport | direction | size | messages (warm-up) | median MiB/s | MiB/s min–max | \
         median Gbit/s | GiB per CPU-s | CPU s client + server | perftest tag_bw MiB/s | \
         hop / perftest | failed runs |"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for p in &report.bandwidth {
        let perftest = reference.and_then(|r| r.tag_bw_mib_s(p.transport, p.size));
        let cpu = |f: fn(&BwRun) -> f64| median(&p.runs.iter().map(f).collect::<Vec<_>>());
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} + {} | {} | {} | {} |",
            p.transport.name(),
            p.direction.name(),
            size_name(p.size),
            p.messages,
            p.warmup,
            num(p.median_mib_s, 0),
            range(p.runs.iter().map(|r| r.mib_s), 0),
            num(p.median_gbit_per_s, 2),
            num(p.median_gib_per_cpu_s, 2),
            num(cpu(|r| r.client_cpu_s), 2),
            num(cpu(|r| r.server_cpu_s), 2),
            opt(perftest, 0),
            opt(ratio(p.median_mib_s, perftest), 2),
            p.errors.len(),
        );
    }
    let _ = writeln!(
        out,
        "\n### Latency (sequential unary Ping calls; a round trip is one call, from sending it \
         to its OK status; `tag_lat` reports half a round trip)\n"
    );
    let _ = writeln!(
        out,
        "| transport | size | calls (warm-up) | p50 RTT µs | p99 RTT µs | p50 half-RTT µs | \
         perftest tag_lat p50 µs | half-RTT / tag_lat = RTT / (2 × tag_lat) | failed runs |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for p in &report.latency {
        let perftest = reference.and_then(|r| r.tag_lat_us(p.transport, p.size));
        let _ = writeln!(
            out,
            "| {} | {} | {} ({}) | {} | {} | {} | {} | {} | {} |",
            p.transport.name(),
            size_name(p.size),
            p.calls,
            p.warmup,
            num(p.median_p50_rtt_us, 1),
            num(p.median_p99_rtt_us, 1),
            num(p.median_p50_half_rtt_us, 1),
            opt(perftest, 2),
            opt(ratio(p.median_p50_half_rtt_us, perftest), 1),
            p.errors.len(),
        );
    }
    out
}

/// Write `ucx_hop{suffix}.json` and `ucx_hop{suffix}.md` into `dir`.
pub fn write(
    report: &Report,
    reference: Option<&Reference>,
    dir: &Path,
    suffix: &str,
) -> anyhow::Result<()> {
    ucxperf::write_pair(dir, "ucx_hop", suffix, report, &markdown(report, reference))
}

#[cfg(not(feature = "ucx"))]
const NO_UCX: &str = "pnp-bench built without --features ucx (the UCX hop needs pnp-ucx with \
                      the system UCX: cargo build --release -p pnp-bench --features ucx)";

/// Serve [`SOURCE`], [`SINK`] and [`PING`] on a `UcxListener` (127.0.0.1, a free port) over
/// `transport`: print the listener's side-channel address as the first line of stdout, serve
/// until stdin reaches its end. The body of `pnp-bench ucx-hop-serve`; builds its own runtime
/// (call it outside one).
#[cfg(feature = "ucx")]
pub fn serve_main(transport: Transport, busy_poll_us: Option<u64>) -> anyhow::Result<()> {
    live::serve_main(transport, busy_poll_us)
}

/// Serve [`SOURCE`], [`SINK`] and [`PING`] (this build has no UCX: fails).
#[cfg(not(feature = "ucx"))]
pub fn serve_main(transport: Transport, busy_poll_us: Option<u64>) -> anyhow::Result<()> {
    let _ = (transport, busy_poll_us);
    anyhow::bail!(NO_UCX)
}

/// Run every point: transport × (bandwidth sizes × directions, then latency sizes) × run,
/// each run with a fresh server process and client transport. Pins this process to the
/// client CPU when `settings.cpus` says so. Builds its own runtime (call it outside one).
#[cfg(feature = "ucx")]
pub fn run_all(settings: &Settings, progress: impl FnMut(&str)) -> anyhow::Result<Report> {
    live::run_all(settings, progress)
}

/// Run every point (this build has no UCX: fails).
#[cfg(not(feature = "ucx"))]
pub fn run_all(settings: &Settings, progress: impl FnMut(&str)) -> anyhow::Result<Report> {
    let _ = (settings, progress);
    anyhow::bail!(NO_UCX)
}

#[cfg(feature = "ucx")]
mod live {
    //! The server and the client, over pnp-ucx.

    use std::io::{BufRead as _, BufReader, Write as _};
    use std::net::SocketAddr;
    use std::process::{Child, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use anyhow::{bail, ensure, Context as _};
    use bytes::Bytes;
    use futures_util::{stream, StreamExt as _};
    use http::uri::PathAndQuery;
    use pnp_call::{
        BoxMessageStream, Call, CallHead, Code, Message, Part, Reply, ReplyItem, ResponseHead,
        Status,
    };
    use pnp_transport::Transport as _;
    use pnp_ucx::{IncomingCall, ReplySink, UcxListener, UcxOptions, UcxTransport, UcxTuning};

    use super::{
        lat_run, parse_source_request, source_request, BwPoint, BwRun, Direction, LatPoint, LatRun,
        Report, Settings, PING, SINK, SOURCE,
    };
    use crate::procstat::CpuMark;
    use crate::runner::size_name;
    use crate::ucxperf::{self, Transport};

    /// The byte every payload is filled with (touched pages, not the zero page).
    const FILL: u8 = 0xA5;

    /// A spot check that `data` is payload as sent: its first, middle and last bytes are
    /// [`FILL`] (a full comparison would cost as much as the copy being measured).
    fn filled(data: &[u8]) -> bool {
        [0, data.len() / 2, data.len().saturating_sub(1)]
            .into_iter()
            .all(|i| data.get(i).is_none_or(|&b| b == FILL))
    }

    fn options(transport: Transport, busy_poll_us: Option<u64>) -> UcxOptions {
        let mut options = UcxOptions::with_tuning(match transport {
            Transport::Tcp => UcxTuning::loopback_tcp(),
            Transport::Sm => UcxTuning::shared_memory(),
        });
        if let Some(us) = busy_poll_us {
            options.busy_poll = Duration::from_micros(us);
        }
        options
    }

    fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
        Ok(tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?)
    }

    // ---- Server ----------------------------------------------------------------------------

    pub(super) fn serve_main(
        transport: Transport,
        busy_poll_us: Option<u64>,
    ) -> anyhow::Result<()> {
        runtime()?.block_on(serve(transport, busy_poll_us))
    }

    async fn serve(transport: Transport, busy_poll_us: Option<u64>) -> anyhow::Result<()> {
        let mut listener = UcxListener::bind(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            options(transport, busy_poll_us),
        )
        .await
        .context("binding the UCX listener")?;
        {
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{}", listener.local_addr())?;
            stdout.flush()?;
        }
        let (eof_tx, mut eof) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            let _ = eof_tx.send(());
        });
        // One buffer for every Source reply, grown to the largest size asked for: the warm-up
        // call makes it, the measured call only slices it.
        let buffer = Arc::new(Mutex::new(Bytes::new()));
        loop {
            tokio::select! {
                incoming = listener.accept() => match incoming {
                    Some(incoming) => {
                        tokio::spawn(handle(incoming, buffer.clone()));
                    }
                    None => return Ok(()),
                },
                _ = &mut eof => return Ok(()),
            }
        }
    }

    /// `size` bytes of the shared buffer (grown first if it is shorter).
    fn payload(buffer: &Mutex<Bytes>, size: usize) -> Bytes {
        let mut buffer = buffer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buffer.len() < size {
            *buffer = Bytes::from(vec![FILL; size]);
        }
        buffer.slice(..size)
    }

    async fn fail(reply: ReplySink, status: Status) {
        reply.send(Ok(Reply::TrailersOnly(status))).await;
    }

    async fn handle(incoming: IncomingCall, buffer: Arc<Mutex<Bytes>>) {
        let IncomingCall { call, reply, .. } = incoming;
        let mut messages = call.messages;
        let head = ResponseHead::default();
        match call.head.path.path() {
            SOURCE => {
                let request = match messages.next().await {
                    Some(Ok(Part::Message(m))) => m.data,
                    Some(Err(status)) => return fail(reply, status).await,
                    _ => {
                        let status = Status::new(
                            Code::InvalidArgument,
                            "Source takes one message, `COUNT SIZE`",
                        );
                        return fail(reply, status).await;
                    }
                };
                let (count, size) = match parse_source_request(&request) {
                    Ok(asked) => asked,
                    Err(e) => {
                        let status = Status::new(Code::InvalidArgument, format!("{e:#}"));
                        return fail(reply, status).await;
                    }
                };
                let data = payload(&buffer, size as usize);
                let items = stream::iter(
                    (0..count)
                        .map(move |_| ReplyItem::Message(Message::new(data.clone())))
                        .chain([ReplyItem::Status(Status::ok())]),
                );
                reply
                    .send(Ok(Reply::Stream {
                        head,
                        items: Box::pin(items),
                    }))
                    .await;
            }
            SINK => {
                let mut bytes = 0u64;
                while let Some(part) = messages.next().await {
                    match part {
                        Ok(Part::Message(Message { data, .. }) | Part::Fragment { data, .. })
                            if !filled(&data) =>
                        {
                            let status = Status::new(Code::DataLoss, "a payload byte is not 0xA5");
                            return fail(reply, status).await;
                        }
                        Ok(part) => bytes += part.payload_len() as u64,
                        Err(status) => return fail(reply, status).await,
                    }
                }
                let items = stream::iter([
                    ReplyItem::Message(Message::new(bytes.to_string())),
                    ReplyItem::Status(Status::ok()),
                ]);
                reply
                    .send(Ok(Reply::Stream {
                        head,
                        items: Box::pin(items),
                    }))
                    .await;
            }
            PING => {
                // Each request part back as it comes (the message goes back before the
                // half-close is read), then OK.
                let items = stream::unfold(Some(messages), |state| async move {
                    let mut messages = state?;
                    match messages.next().await {
                        Some(Ok(part)) => Some((ReplyItem::from(part), Some(messages))),
                        Some(Err(status)) => Some((ReplyItem::Status(status), None)),
                        None => Some((ReplyItem::Status(Status::ok()), None)),
                    }
                });
                reply
                    .send(Ok(Reply::Stream {
                        head,
                        items: Box::pin(items),
                    }))
                    .await;
            }
            other => {
                let status = Status::new(Code::Unimplemented, format!("no method `{other}`"));
                fail(reply, status).await;
            }
        }
    }

    // ---- Client ----------------------------------------------------------------------------

    /// A server child process; closing its stdin (on drop) ends it.
    struct Server {
        child: Child,
        addr: SocketAddr,
    }

    impl Server {
        fn start(
            transport: Transport,
            busy_poll_us: Option<u64>,
            cpu: Option<usize>,
        ) -> anyhow::Result<Server> {
            let exe = std::env::current_exe().context("this program's path")?;
            let mut command = ucxperf::command(&exe, cpu);
            command
                .args(["ucx-hop-serve", "--tls", transport.name()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            if let Some(us) = busy_poll_us {
                command.args(["--busy-poll-us", &us.to_string()]);
            }
            let mut child = command
                .spawn()
                .context("starting `pnp-bench ucx-hop-serve`")?;
            let stdout = child.stdout.take().context("the server's stdout")?;
            let mut server = Server {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            };
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                let _ = tx.send(lines.next());
                // Keep draining, so the server never blocks on a full pipe.
                for _ in lines {}
            });
            let line = match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(Some(Ok(line))) => line,
                Ok(Some(Err(e))) => bail!("reading the server's address: {e}"),
                Ok(None) => bail!(
                    "the server ended before printing its address ({})",
                    server
                        .child
                        .try_wait()?
                        .map_or("still running".to_owned(), |s| s.to_string())
                ),
                Err(_) => bail!("the server printed no address within 20 s"),
            };
            server.addr = line
                .trim()
                .parse()
                .with_context(|| format!("the server's address `{line}`"))?;
            Ok(server)
        }

        fn pid(&self) -> u32 {
            self.child.id()
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            drop(self.child.stdin.take());
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match self.child.try_wait() {
                    Ok(Some(_)) | Err(_) => return,
                    Ok(None) if Instant::now() > deadline => break,
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// A fresh server and a client transport connected to it.
    async fn pair(
        transport: Transport,
        settings: &Settings,
    ) -> anyhow::Result<(Server, UcxTransport)> {
        let busy_poll_us = settings.busy_poll_us;
        let cpu = settings.cpus.map(|c| c.0);
        let server =
            tokio::task::spawn_blocking(move || Server::start(transport, busy_poll_us, cpu))
                .await??;
        let peer = server.addr.to_string();
        let options = options(transport, busy_poll_us);
        // UCX's initialisation blocks: not on a worker.
        let client = tokio::task::spawn_blocking(move || UcxTransport::new(peer, options))
            .await?
            .context("starting the UCX client")?;
        client.ready().await.context("connecting to the server")?;
        Ok((server, client))
    }

    /// Stop the server off the runtime's workers (its drop waits for the process).
    async fn stop(server: Server) {
        let _ = tokio::task::spawn_blocking(move || drop(server)).await;
    }

    fn call(path: &'static str, messages: BoxMessageStream) -> Call {
        Call {
            head: CallHead {
                path: PathAndQuery::from_static(path),
                subtype: Some("proto".into()),
                metadata: http::HeaderMap::new(),
                timeout: None,
                max_message_size: usize::MAX,
            },
            messages,
        }
    }

    fn one(data: Bytes) -> BoxMessageStream {
        Box::pin(stream::iter([Ok(Part::Message(Message::new(data)))]))
    }

    /// What a reply carried.
    struct Drained {
        /// Messages (whole ones and heads).
        messages: u64,
        /// Payload bytes.
        bytes: u64,
        /// The first whole message.
        first: Option<Bytes>,
        /// Messages and fragments that failed [`filled`].
        unfilled: u64,
    }

    /// Read `reply` to its status, counting; an error unless the status is OK.
    async fn drain(reply: Reply) -> anyhow::Result<Drained> {
        let mut items = match reply {
            Reply::Stream { items, .. } => items,
            Reply::TrailersOnly(status) => bail!("trailers-only reply: {status}"),
        };
        let mut drained = Drained {
            messages: 0,
            bytes: 0,
            first: None,
            unfilled: 0,
        };
        while let Some(item) = items.next().await {
            match item {
                ReplyItem::Message(m) => {
                    drained.unfilled += u64::from(!filled(&m.data));
                    drained.messages += 1;
                    drained.bytes += m.data.len() as u64;
                    if drained.first.is_none() {
                        drained.first = Some(m.data);
                    }
                }
                ReplyItem::Head { .. } => drained.messages += 1,
                ReplyItem::Fragment { data, .. } => {
                    drained.unfilled += u64::from(!filled(&data));
                    drained.bytes += data.len() as u64;
                }
                ReplyItem::Status(status) if status.code == Code::Ok => return Ok(drained),
                ReplyItem::Status(status) => bail!("the call ended {status}"),
            }
        }
        bail!("the reply ended without a status")
    }

    /// One Source call of `count` messages of `size` bytes, checked.
    async fn download(client: &UcxTransport, count: u64, size: u64) -> anyhow::Result<()> {
        let request = Bytes::from(source_request(count, size));
        let reply = client.call(call(SOURCE, one(request))).await?;
        let got = drain(reply).await?;
        ensure!(
            got.messages == count && got.bytes == count * size,
            "short download: {} messages, {} bytes of {count} × {size}",
            got.messages,
            got.bytes
        );
        ensure!(
            got.unfilled == 0,
            "{} messages or fragments were not the payload sent",
            got.unfilled
        );
        Ok(())
    }

    /// One Sink call carrying `count` messages of `data`, checked.
    async fn upload(client: &UcxTransport, count: u64, data: &Bytes) -> anyhow::Result<()> {
        let size = data.len() as u64;
        // The same message `count` times: each a clone of `data` (a reference count).
        let message = Part::Message(Message::new(data.clone()));
        let parts = stream::iter(std::iter::repeat_n(message, count as usize).map(Ok));
        let reply = client.call(call(SINK, Box::pin(parts))).await?;
        let got = drain(reply).await?;
        let counted: u64 = got
            .first
            .as_deref()
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.trim().parse().ok())
            .context("the Sink reply is not a byte count")?;
        ensure!(
            counted == count * size,
            "short upload: the server counted {counted} bytes of {count} × {size}"
        );
        Ok(())
    }

    /// One Ping of `data`, checked.
    async fn ping(client: &UcxTransport, data: &Bytes) -> anyhow::Result<()> {
        let reply = client.call(call(PING, one(data.clone()))).await?;
        let got = drain(reply).await?;
        ensure!(
            got.messages == 1 && got.bytes == data.len() as u64 && got.unfilled == 0,
            "bad echo: {} messages, {} bytes of one of {}",
            got.messages,
            got.bytes,
            data.len()
        );
        Ok(())
    }

    async fn bandwidth_run(
        transport: Transport,
        point: &BwPoint,
        settings: &Settings,
    ) -> anyhow::Result<BwRun> {
        let (server, client) = pair(transport, settings).await?;
        let data = match point.direction {
            Direction::Upload => Bytes::from(vec![FILL; point.size as usize]),
            Direction::Download => Bytes::new(),
        };
        let once = |count: u64| {
            let (client, data) = (&client, &data);
            async move {
                match point.direction {
                    Direction::Download => download(client, count, point.size).await,
                    Direction::Upload => upload(client, count, data).await,
                }
            }
        };
        once(point.warmup).await.context("the warm-up call")?;
        let own = CpuMark::start(std::process::id());
        let peer = CpuMark::start(server.pid());
        let started = Instant::now();
        once(point.messages).await?;
        let seconds = started.elapsed().as_secs_f64();
        let cpu = |mark: Option<CpuMark>| mark.and_then(|m| m.elapsed()).unwrap_or(f64::NAN);
        let (client_cpu_s, server_cpu_s) = (cpu(own), cpu(peer));
        drop(client);
        stop(server).await;
        let bytes = (point.messages * point.size) as f64;
        Ok(BwRun {
            mib_s: bytes / 1_048_576.0 / seconds,
            seconds,
            client_cpu_s,
            server_cpu_s,
            gib_per_cpu_s: bytes / f64::from(1u32 << 30) / (client_cpu_s + server_cpu_s),
        })
    }

    async fn latency_run(
        transport: Transport,
        point: &LatPoint,
        settings: &Settings,
    ) -> anyhow::Result<LatRun> {
        let (server, client) = pair(transport, settings).await?;
        let data = Bytes::from(vec![FILL; point.size as usize]);
        for _ in 0..point.warmup {
            ping(&client, &data).await.context("a warm-up call")?;
        }
        let mut rtts_us = Vec::with_capacity(point.calls as usize);
        for _ in 0..point.calls {
            let started = Instant::now();
            ping(&client, &data).await?;
            rtts_us.push(started.elapsed().as_secs_f64() * 1e6);
        }
        drop(client);
        stop(server).await;
        Ok(lat_run(rtts_us))
    }

    /// Pin this process (every thread, and the ones it starts later) to `cpu`.
    fn pin_self(cpu: usize) -> anyhow::Result<()> {
        let status = std::process::Command::new("taskset")
            .args([
                "-a",
                "-p",
                "-c",
                &cpu.to_string(),
                &std::process::id().to_string(),
            ])
            .stdout(Stdio::null())
            .status()
            .context("running taskset")?;
        ensure!(
            status.success(),
            "taskset could not pin the client to CPU {cpu}"
        );
        Ok(())
    }

    pub(super) fn run_all(
        settings: &Settings,
        mut progress: impl FnMut(&str),
    ) -> anyhow::Result<Report> {
        if let Some((_, client_cpu)) = settings.cpus {
            pin_self(client_cpu)?;
        }
        let runtime = runtime()?;
        let runs = settings.runs.max(1);
        let mut bandwidth = Vec::new();
        let mut latency = Vec::new();
        for &transport in &settings.transports {
            for &size in &settings.bw_sizes {
                for direction in [Direction::Download, Direction::Upload] {
                    let mut point = BwPoint::new(transport, direction, size);
                    for i in 0..runs {
                        let what = format!(
                            "{} {} {} run {}",
                            transport.name(),
                            direction.name(),
                            size_name(size),
                            i + 1
                        );
                        match runtime.block_on(bandwidth_run(transport, &point, settings)) {
                            Ok(run) => {
                                progress(&format!(
                                    "{what}: {:.0} MiB/s in {:.2} s, CPU s client {:.2} + \
                                     server {:.2}",
                                    run.mib_s, run.seconds, run.client_cpu_s, run.server_cpu_s
                                ));
                                point.runs.push(run);
                            }
                            Err(e) => {
                                progress(&format!("{what}: failed: {e:#}"));
                                point.errors.push(format!("{e:#}"));
                            }
                        }
                    }
                    point.summarize();
                    bandwidth.push(point);
                }
            }
            for &size in &settings.lat_sizes {
                let mut point = LatPoint::new(transport, size);
                for i in 0..runs {
                    let what = format!(
                        "{} ping {} run {}",
                        transport.name(),
                        size_name(size),
                        i + 1
                    );
                    match runtime.block_on(latency_run(transport, &point, settings)) {
                        Ok(run) => {
                            progress(&format!(
                                "{what}: RTT p50 {:.1} µs, p99 {:.1} µs, max {:.0} µs",
                                run.p50_rtt_us, run.p99_rtt_us, run.max_rtt_us
                            ));
                            point.runs.push(run);
                        }
                        Err(e) => {
                            progress(&format!("{what}: failed: {e:#}"));
                            point.errors.push(format!("{e:#}"));
                        }
                    }
                }
                point.summarize();
                latency.push(point);
            }
        }
        let defaults = UcxOptions::default();
        Ok(Report {
            cpus: settings.cpus,
            runs,
            busy_poll_us: settings
                .busy_poll_us
                .map_or(defaults.busy_poll.as_secs_f64() * 1e6, |us| us as f64),
            call_window: defaults.call_window,
            max_fragment: defaults.max_fragment,
            bandwidth,
            latency,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bw_run(mib_s: f64, gib_per_cpu_s: f64) -> BwRun {
        BwRun {
            mib_s,
            seconds: 1.0,
            client_cpu_s: 0.5,
            server_cpu_s: 0.25,
            gib_per_cpu_s,
        }
    }

    fn synthetic() -> Report {
        let mut down = BwPoint::new(Transport::Tcp, Direction::Download, 1 << 20);
        down.runs = vec![
            bw_run(3000.0, 2.0),
            bw_run(1000.0, 1.0),
            bw_run(2000.0, 1.5),
        ];
        down.summarize();
        let mut up = BwPoint::new(Transport::Sm, Direction::Upload, 16 << 20);
        up.errors.push("the call ended UNAVAILABLE".into());
        up.summarize();
        let mut lat = LatPoint::new(Transport::Tcp, 100);
        lat.runs = vec![
            lat_run(vec![90.0, 100.0, 110.0, 400.0]),
            lat_run(vec![100.0; 10]),
        ];
        lat.summarize();
        Report {
            cpus: None,
            runs: 3,
            busy_poll_us: 50.0,
            call_window: 8 << 20,
            max_fragment: 2 << 20,
            bandwidth: vec![down, up],
            latency: vec![lat],
        }
    }

    fn reference() -> Reference {
        let point = |test: ucxperf::Test, bw: f64, lat: f64| ucxperf::Point {
            transport: Transport::Tcp,
            test,
            runs: Vec::new(),
            errors: Vec::new(),
            median_p50_lat_us: lat,
            median_bw_mib_s: bw,
            median_gbit_per_s: f64::NAN,
        };
        Reference {
            file: "ucx_perftest.json".into(),
            report: ucxperf::Report {
                ucx_version: "Version 1.13.1".into(),
                cpus: None,
                runs: 5,
                points: vec![
                    point(ucxperf::Test::bandwidth(1 << 20), 5000.0, 4.5),
                    point(ucxperf::Test::latency(100), 3.0, 5.0),
                ],
            },
        }
    }

    #[test]
    fn medians_and_percentiles() {
        let report = synthetic();
        let down = &report.bandwidth[0];
        assert_eq!(down.median_mib_s, 2000.0);
        assert_eq!(down.median_gib_per_cpu_s, 1.5);
        assert!((down.median_gbit_per_s - 16.777).abs() < 0.001);
        assert_eq!((down.messages, down.warmup), (2048, 204));
        assert!(report.bandwidth[1].median_mib_s.is_nan());
        let lat = &report.latency[0];
        // Nearest rank: the p50 of four is the second, the p99 the fourth.
        assert_eq!(lat.runs[0].p50_rtt_us, 100.0);
        assert_eq!(lat.runs[0].p99_rtt_us, 400.0);
        assert_eq!(lat.runs[0].mean_rtt_us, 175.0);
        assert_eq!(lat.median_p50_rtt_us, 100.0);
        assert_eq!(lat.median_p99_rtt_us, 250.0);
        assert_eq!(lat.median_p50_half_rtt_us, 50.0);
        assert!(percentile(&[], 0.5).is_nan());
        assert_eq!(percentile(&[1.0], 0.99), 1.0);
    }

    #[test]
    fn markdown_has_the_ratios_to_ucx_perftest() {
        let report = synthetic();
        let text = markdown(&report, Some(&reference()));
        assert!(text.contains("Reference: `ucx_perftest.json` (Version 1.13.1; 5 runs"));
        // 2000 MiB/s of 5000: 0.40; 1 GiB per CPU-s … 2, CPU s 0.50 + 0.25.
        assert!(
            text.contains(
                "| tcp | download | 1 MiB | 2048 (204) | 2000 | 1000–3000 | 16.78 | 1.50 | \
                 0.50 + 0.25 | 5000 | 0.40 | 0 |"
            ),
            "{text}"
        );
        // No runs and no reference point: dashes, one failed run.
        assert!(
            text.contains(
                "| sm | upload | 16 MiB | 128 (12) | – | – | – | – | – + – | – | – | 1 |"
            ),
            "{text}"
        );
        // Half of a 100 µs round trip over tag_lat's 5 µs: 10.
        assert!(
            text.contains(
                "| tcp | 100 B | 20000 (2000) | 100.0 | 250.0 | 50.0 | 5.00 | 10.0 | 0 |"
            ),
            "{text}"
        );
        let bare = markdown(&report, None);
        assert!(bare.contains("No `ucx_perftest` reference"));
        assert!(
            bare.contains("| 16.78 | 1.50 | 0.50 + 0.25 | – | – | 0 |"),
            "{bare}"
        );
        assert_eq!(ratio(1.0, Some(0.0)), None);
        assert_eq!(ratio(f64::NAN, Some(2.0)), None);
        assert_eq!(ratio(1.0, Some(4.0)), Some(0.25));
    }

    #[test]
    fn the_reference_is_read_from_the_output_directory() {
        let dir = std::env::temp_dir().join(format!("pnp-ucxhop-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        assert!(load_reference(&dir, "").expect("none").is_none());
        let r = reference();
        std::fs::write(
            dir.join("ucx_perftest.json"),
            serde_json::to_string(&r.report).expect("json"),
        )
        .expect("write");
        // A suffixed run falls back to the unsuffixed reference.
        let back = load_reference(&dir, "-cpu1").expect("read").expect("found");
        assert_eq!(back.file, "ucx_perftest.json");
        assert_eq!(back.tag_bw_mib_s(Transport::Tcp, 1 << 20), Some(5000.0));
        assert_eq!(back.tag_lat_us(Transport::Tcp, 100), Some(5.0));
        assert_eq!(back.tag_lat_us(Transport::Sm, 100), None);
        std::fs::write(dir.join("ucx_perftest.json"), "{").expect("write");
        assert!(load_reference(&dir, "").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn source_requests_parse_or_say_why_not() {
        assert_eq!(
            parse_source_request(b"2048 1048576").expect("ok"),
            (2048, 1 << 20)
        );
        assert_eq!(
            parse_source_request(source_request(4, 1 << 30).as_bytes()).expect("ok"),
            (4, 1 << 30)
        );
        assert_eq!(parse_source_request(b" 1\t8 ").expect("ok"), (1, 8));
        for (bad, why) in [
            ("", "not `COUNT SIZE`"),
            ("12", "not `COUNT SIZE`"),
            ("1 2 3", "not `COUNT SIZE`"),
            ("x 8", "count `x`"),
            ("1 8B", "size `8B`"),
            ("-1 8", "count `-1`"),
            ("0 8", "no message"),
            ("1 0", "not 1 B"),
            ("1 4294967296", "not 1 B"),
            ("18446744073709551615 2", "more than"),
        ] {
            let err = format!("{:#}", parse_source_request(bad.as_bytes()).expect_err(bad));
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        let err = parse_source_request(b"\xff 8").expect_err("not UTF-8");
        assert!(format!("{err:#}").contains("UTF-8"), "{err:#}");
    }
}
