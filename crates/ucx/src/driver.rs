//! The UCX worker thread: one [`Worker`] driven by a current-thread tokio runtime, event-driven
//! (`ucp_worker_arm` and the worker's event fd in the reactor; after activity it keeps
//! polling for [`UcxOptions::busy_poll`], by default not at all), with the connections, their
//! calls and the TCP side channels that set connections up and watch them.
//!
//! Everything else in pnp talks to it through [`Command`]s on a channel ([`DriverHandle`] is
//! `Send + Sync`); it answers through the per-call channels and semaphores in [`Slot`].
//!
//! **Connections.** A UCX connection between two pnp instances is set up over a small TCP side
//! channel: each side sends a hello (its connection id, its per-call window, its worker
//! address), then each makes a UCX endpoint to the other's worker address. Worker addresses
//! name every transport UCX has (shared memory, TCP, RDMA), so `UCX_TLS=sm` works between two
//! processes on one host, where UCX's socket-address connect path cannot. The side channel
//! stays open as the connection's life line: a peer process that dies closes it at once (the
//! kernel does), TCP keepalive bounds a silent peer host, and the endpoint's error handler
//! reports broken transports. Any of them ends every call on the connection UNAVAILABLE.
//!
//! **Frames** travel as active messages, header `peer connection id (u32 LE) | frame header`.
//! Rendezvous bodies are fetched into their own buffer; frames of one call are handed on in
//! the order they arrived even when a later, eager one completes first, while other calls'
//! frames do not wait for it.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pnp_call::{Call, CallHead, Code, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::frame::{CallId, Frame, HEADER_LEN};
use crate::options::UcxOptions;
use crate::pool::BufferPool;
use crate::stream::{ReplySink, RequestMessages};
use crate::sys::{EpId, Event, OpId, Payload, Worker};
use crate::IncomingCall;

/// Names a connection on one side; the peer puts it in front of every frame it sends.
pub(crate) type ConnId = u32;

const MAGIC: &[u8; 8] = b"PNPUCX\x00\x01";
/// Largest worker address accepted from a peer.
const MAX_ADDRESS: u32 = 1 << 20;
/// The status message of a call whose connection was gone before its open frame was sent.
pub(crate) const NOT_SENT: &str = "UCX call not started: the connection was lost or is draining";
/// Largest body of a frame without payload credit (an open, a response head, a status).
const MAX_CONTROL_BODY: usize = 1 << 20;
/// Credit a call may hold: far above any window, far below the semaphore's maximum.
const MAX_CREDIT: usize = 1 << 40;
/// Safety net: progress at least this often even if no event arrives.
const TICK: Duration = Duration::from_millis(100);
/// Arms refused in a row (UCX busy, nothing to progress) before the driver naps between them.
const SPIN_ARMS: u32 = 1_000;
/// The nap between refused arms after `SPIN_ARMS` of them.
const BUSY_ARM_NAP: Duration = Duration::from_micros(50);
/// While busy, the driver lets its thread's other tasks run every this many turns.
const YIELD_EVERY: u32 = 32;

/// Sent to the driver thread.
pub(crate) enum Command {
    /// Client side: open a connection to a listener's side channel.
    Connect {
        peer: String,
        reply: oneshot::Sender<Result<Attached, String>>,
    },
    /// A side channel finished its hello: make the endpoint and register the connection.
    Attach {
        id: ConnId,
        server: bool,
        peer: SocketAddr,
        peer_conn: ConnId,
        peer_window: u32,
        peer_address: Vec<u8>,
        reply: oneshot::Sender<Result<Attached, String>>,
    },
    /// The side channel closed or failed.
    Lost { conn: ConnId, reason: String },
    /// Register a call and send its open frame.
    Open {
        conn: ConnId,
        call: CallId,
        head: CallHead,
        slot: Slot,
    },
    /// Send a frame of a call (a status or a cancel also ends the call here).
    Send { conn: ConnId, frame: Frame },
    /// The consumer took `bytes` of payload: grant them to the peer again.
    Credit {
        conn: ConnId,
        call: CallId,
        bytes: u32,
    },
    /// Listener side: stop accepting connections and calls, tell every peer (go-away), let the
    /// calls already open finish.
    Drain,
    /// Stop: end every call UNAVAILABLE and close.
    Shutdown,
}

/// A registered connection, as its users see it.
#[derive(Clone, Debug)]
pub(crate) struct Attached {
    pub(crate) conn: ConnId,
    pub(crate) peer_window: u32,
    /// Cancelled when the connection is gone.
    pub(crate) dead: CancellationToken,
    /// Cancelled when the peer said go-away: no new calls on this connection.
    pub(crate) draining: CancellationToken,
}

/// What arrives for a call: its frames in order, or the error that ended it.
pub(crate) type Inbound = Result<Frame, Box<Status>>;

/// The driver's end of one call.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) inbound: mpsc::UnboundedSender<Inbound>,
    /// Credit to send payload to the peer, in bytes; closed when the call ends.
    pub(crate) credit: Arc<Semaphore>,
    /// Cancelled when the call ends (status, cancel, lost connection).
    pub(crate) done: CancellationToken,
}

impl Slot {
    pub(crate) fn new(peer_window: u32) -> (Slot, mpsc::UnboundedReceiver<Inbound>) {
        let (inbound, rx) = mpsc::unbounded_channel();
        (
            Slot {
                inbound,
                credit: Arc::new(Semaphore::new(peer_window as usize)),
                done: CancellationToken::new(),
            },
            rx,
        )
    }

    fn end(self, last: Option<Inbound>) {
        if let Some(last) = last {
            let _ = self.inbound.send(last);
        }
        self.done.cancel();
        self.credit.close();
    }
}

/// A `Send + Sync` handle to a driver thread; the thread stops when the owner is dropped.
#[derive(Clone, Debug)]
pub(crate) struct DriverHandle {
    tx: mpsc::UnboundedSender<Command>,
    /// Buffers for rendezvous bodies (received) and gathered fragments (sent).
    pub(crate) pool: Arc<BufferPool>,
}

impl DriverHandle {
    /// A handle whose commands land in the returned receiver (for unit tests of the call ends).
    #[cfg(test)]
    pub(crate) fn detached() -> (DriverHandle, mpsc::UnboundedReceiver<Command>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let pool = BufferPool::new(1 << 20);
        (DriverHandle { tx, pool }, rx)
    }

    pub(crate) fn send(&self, command: Command) {
        // A stopped driver has already ended every call.
        let _ = self.tx.send(command);
    }
}

/// Stops the driver thread when dropped.
#[derive(Debug)]
pub(crate) struct DriverOwner {
    pub(crate) handle: DriverHandle,
    /// Closed (its sender dropped) when the driver thread has finished, UCX torn down.
    finished: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

/// How long dropping a transport or listener waits for its UCX thread to tear UCX down.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

impl Drop for DriverOwner {
    fn drop(&mut self) {
        self.handle.send(Command::Shutdown);
        // Wait (bounded) for the thread to destroy its UCX worker and context: a process that
        // exits while a UCX thread still runs has its UCX libraries torn down under that
        // thread (a crash at exit).
        if let Ok(finished) = self.finished.lock() {
            let _ = finished.recv_timeout(SHUTDOWN_WAIT);
        }
    }
}

/// Start a driver thread. `listen`: also accept side-channel connections there and hand
/// incoming calls to `incoming`. Returns the handle and the side channel's bound address.
pub(crate) fn start(
    options: UcxOptions,
    listen: Option<(SocketAddr, mpsc::UnboundedSender<IncomingCall>)>,
) -> io::Result<(DriverOwner, Option<SocketAddr>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    // Received bodies of a bulk call each way, and as much again for gathered fragments.
    let pool = BufferPool::new(4 * options.call_window as usize);
    let handle = DriverHandle { tx, pool };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<Option<SocketAddr>>>();
    let (finished_tx, finished) = std::sync::mpsc::channel::<()>();
    let thread_handle = handle.clone();
    std::thread::Builder::new()
        .name("pnp-ucx".into())
        .spawn(move || {
            // Dropped last, when everything below (the worker, its UCX context) is gone.
            let _finished = finished_tx;
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                let mut worker = match Worker::new(&options.tuning.entries()) {
                    Ok(w) => w,
                    Err(e) => {
                        let _ = ready_tx.send(Err(io::Error::other(e.to_string())));
                        return;
                    }
                };
                worker.use_pool(thread_handle.pool.clone());
                let address = match worker.address() {
                    Ok(a) => Arc::new(a),
                    Err(e) => {
                        let _ = ready_tx.send(Err(io::Error::other(e.to_string())));
                        return;
                    }
                };
                let mut incoming = None;
                let mut bound = None;
                let stop_accepting = CancellationToken::new();
                if let Some((addr, sink)) = listen {
                    let listener = match TcpListener::bind(addr).await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    bound = listener.local_addr().ok();
                    incoming = Some(sink);
                    tokio::task::spawn_local(accept_loop(
                        listener,
                        thread_handle.clone(),
                        address.clone(),
                        options.clone(),
                        stop_accepting.clone(),
                    ));
                }
                let _ = ready_tx.send(Ok(bound));
                let driver = Driver {
                    worker,
                    handle: thread_handle,
                    options,
                    address,
                    incoming,
                    conns: HashMap::new(),
                    by_ep: HashMap::new(),
                    receiving: HashMap::new(),
                    next_conn: 0,
                    stop_accepting,
                };
                driver.run(rx).await;
            });
        })?;
    let bound = ready_rx
        .recv()
        .map_err(|_| io::Error::other("the UCX thread stopped while starting"))??;
    Ok((
        DriverOwner {
            handle,
            finished: std::sync::Mutex::new(finished),
        },
        bound,
    ))
}

struct Conn {
    ep: EpId,
    server: bool,
    peer: SocketAddr,
    peer_conn: ConnId,
    peer_window: u32,
    calls: HashMap<CallId, CallState>,
    /// Frames per call in arrival order, where some still wait for their rendezvous body.
    arrived: HashMap<CallId, VecDeque<(Vec<u8>, Body)>>,
    dead: CancellationToken,
    /// Server: the highest call id opened. Client: the peer said go-away (see `draining`).
    last_call: CallId,
    draining: CancellationToken,
}

struct CallState {
    slot: Slot,
    /// Payload received and not yet handed back as credit.
    unreturned: u64,
}

enum Body {
    Ready(Bytes),
    Waiting(OpId),
}

struct Driver {
    worker: Worker,
    handle: DriverHandle,
    options: UcxOptions,
    address: Arc<Vec<u8>>,
    incoming: Option<mpsc::UnboundedSender<IncomingCall>>,
    conns: HashMap<ConnId, Conn>,
    by_ep: HashMap<EpId, ConnId>,
    receiving: HashMap<OpId, (ConnId, CallId)>,
    next_conn: ConnId,
    /// Stops the side channel's accept loop (drain).
    stop_accepting: CancellationToken,
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        if let Err(e) = self.worker.watch_events() {
            tracing::warn!(error = %e, "UCX worker has no event fd; polling every 100 ms");
        }
        let busy_poll = self.options.busy_poll;
        // Without busy-polling (the default) no clock is read per turn.
        let polling = !busy_poll.is_zero();
        // When something last happened; the worker is polled (not armed) until `busy_poll`
        // after it, so the next frame of a conversation is found without a wakeup.
        let mut active = std::time::Instant::now();
        let mut turns = 0u32;
        // Arms refused in a row with nothing to progress (see below).
        let mut busy_arms = 0u32;
        loop {
            let mut worked = self.worker.progress();
            for event in self.worker.events() {
                worked = true;
                self.on_event(event);
            }
            while let Ok(command) = rx.try_recv() {
                worked = true;
                if !self.on_command(command) {
                    return self.stop();
                }
            }
            turns = turns.wrapping_add(1);
            if worked {
                busy_arms = 0;
                if polling {
                    active = std::time::Instant::now();
                }
            }
            if worked || (polling && active.elapsed() < busy_poll) {
                // Let the side channels' tasks (and the reactor) run now and then.
                if turns.is_multiple_of(YIELD_EVERY) {
                    tokio::task::yield_now().await;
                }
                continue;
            }
            match self.worker.arm() {
                Ok(true) => {}
                Ok(false) => {
                    // UCX has something in flight that progress cannot finish yet: over shared
                    // memory, a message the peer process is still writing. Spinning here
                    // would keep that peer off the CPU when the two share a core (32 callers
                    // went from 47 000 to 3 400 calls/s with both processes on one core), so
                    // give the core away, and after a while sleep briefly.
                    busy_arms += 1;
                    if busy_arms > SPIN_ARMS {
                        std::thread::sleep(BUSY_ARM_NAP);
                    } else {
                        std::thread::yield_now();
                    }
                    tokio::task::yield_now().await;
                    continue;
                }
                Err(e) => tracing::warn!(error = %e, "arming the UCX worker"),
            }
            tokio::select! {
                ready = self.worker.readable() => {
                    if let Err(e) = ready {
                        tracing::warn!(error = %e, "waiting on the UCX event fd");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                command = rx.recv() => match command {
                    Some(command) => {
                        if !self.on_command(command) {
                            return self.stop();
                        }
                    }
                    None => return self.stop(),
                },
                _ = tokio::time::sleep(TICK) => {}
            }
            if polling {
                active = std::time::Instant::now();
            }
        }
    }

    fn stop(mut self) {
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            self.fail(
                conn,
                Code::Unavailable,
                "the UCX transport shut down".into(),
            );
        }
    }

    /// False: stop.
    fn on_command(&mut self, command: Command) -> bool {
        match command {
            Command::Connect { peer, reply } => {
                let id = self.new_conn_id();
                tokio::task::spawn_local(connect(
                    peer,
                    id,
                    self.handle.clone(),
                    self.address.clone(),
                    self.options.clone(),
                    reply,
                ));
            }
            Command::Attach {
                id,
                server,
                peer,
                peer_conn,
                peer_window,
                peer_address,
                reply,
            } => {
                let id = if server { self.new_conn_id() } else { id };
                let peer_failure = !self.options.tuning.shared_memory_only();
                let result = self.worker.connect(&peer_address, peer_failure).map(|ep| {
                    let dead = CancellationToken::new();
                    let draining = CancellationToken::new();
                    self.by_ep.insert(ep, id);
                    self.conns.insert(
                        id,
                        Conn {
                            ep,
                            server,
                            peer,
                            peer_conn,
                            peer_window,
                            calls: HashMap::new(),
                            arrived: HashMap::new(),
                            dead: dead.clone(),
                            last_call: 0,
                            draining: draining.clone(),
                        },
                    );
                    tracing::debug!(conn = id, %peer, server, "UCX connection up");
                    Attached {
                        conn: id,
                        peer_window,
                        dead,
                        draining,
                    }
                });
                let _ = reply.send(result.map_err(|e| e.to_string()));
            }
            Command::Lost { conn, reason } => self.fail(conn, Code::Unavailable, reason),
            Command::Open {
                conn,
                call,
                head,
                slot,
            } => {
                // Gone, or the peer said go-away before this open left: not sent, so safe to
                // retry (a go-away that comes later ends it the same way if it was refused).
                let Some(c) = self
                    .conns
                    .get_mut(&conn)
                    .filter(|c| !c.draining.is_cancelled())
                else {
                    slot.end(Some(Err(Box::new(Status::new(
                        Code::Unavailable,
                        NOT_SENT,
                    )))));
                    return true;
                };
                c.calls.insert(
                    call,
                    CallState {
                        slot,
                        unreturned: 0,
                    },
                );
                self.send(conn, &Frame::Open { call, head });
            }
            Command::Send { conn, frame } => {
                let call = frame.call();
                let ends = matches!(frame, Frame::Status { .. } | Frame::Cancel { .. });
                let frame_kind_cancel = matches!(frame, Frame::Cancel { .. });
                let known = self
                    .conns
                    .get(&conn)
                    .is_some_and(|c| c.calls.contains_key(&call));
                if known {
                    self.send(conn, &frame);
                }
                if ends {
                    let last = frame_kind_cancel.then(|| {
                        Err(Box::new(Status::new(
                            Code::Cancelled,
                            "the call was cancelled",
                        )))
                    });
                    self.end_call(conn, call, last);
                }
            }
            Command::Credit { conn, call, bytes } => {
                let Some(state) = self
                    .conns
                    .get_mut(&conn)
                    .and_then(|c| c.calls.get_mut(&call))
                else {
                    return true;
                };
                state.unreturned = state.unreturned.saturating_sub(u64::from(bytes));
                self.send(conn, &Frame::Credit { call, bytes });
            }
            Command::Drain => self.drain(),
            Command::Shutdown => return false,
        }
        true
    }

    /// The largest frame body a peer may send.
    fn max_body(&self) -> usize {
        (self.options.call_window as usize).max(MAX_CONTROL_BODY)
    }

    fn new_conn_id(&mut self) -> ConnId {
        self.next_conn = self.next_conn.wrapping_add(1);
        self.next_conn
    }

    fn send(&mut self, conn: ConnId, frame: &Frame) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let (header, body) = frame.encode();
        let mut am_header = [0u8; 4 + HEADER_LEN];
        am_header[..4].copy_from_slice(&c.peer_conn.to_le_bytes());
        am_header[4..].copy_from_slice(&header);
        if let Err(e) = self.worker.send(c.ep, &am_header, body) {
            self.fail(conn, Code::Unavailable, format!("UCX send failed: {e}"));
        }
    }

    fn end_call(&mut self, conn: ConnId, call: CallId, last: Option<Inbound>) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if let Some(state) = c.calls.remove(&call) {
            state.slot.end(last);
        }
        // A client connection the peer is draining closes with its last call.
        if !c.server && c.draining.is_cancelled() && c.calls.is_empty() {
            self.fail(conn, Code::Unavailable, "drained".into());
        }
    }

    /// Stop accepting; tell every peer which calls will still be served.
    fn drain(&mut self) {
        self.stop_accepting.cancel();
        // Closing the channel ends `UcxListener::accept` once the calls already there are taken.
        self.incoming = None;
        let peers: Vec<(ConnId, CallId)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.server)
            .map(|(&id, c)| (id, c.last_call))
            .collect();
        for (conn, last) in peers {
            if let Some(c) = self.conns.get(&conn) {
                c.draining.cancel();
            }
            self.send(conn, &Frame::GoAway { last });
        }
    }

    /// End every call of `conn` with `code` and close it.
    fn fail(&mut self, conn: ConnId, code: Code, reason: String) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        tracing::debug!(conn, peer = %c.peer, %reason, "UCX connection closed");
        // First, so a caller that sees its call end finds the connection dead too.
        c.dead.cancel();
        self.by_ep.remove(&c.ep);
        for (_, state) in c.calls {
            state.slot.end(Some(Err(Box::new(Status::new(
                code,
                format!("UCX peer {}: {reason}", c.peer),
            )))));
        }
        self.worker.close(c.ep);
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Arrival { header, payload } => {
                let Some(conn) = header
                    .get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .filter(|c| self.conns.contains_key(c))
                else {
                    if let Payload::Rndv(id, _) = payload {
                        self.worker.discard(id);
                    }
                    return;
                };
                // The call id, from the frame header behind the connection id.
                let Some(call) = header.get(12..20).map(|b| {
                    let mut id = [0u8; 8];
                    id.copy_from_slice(b);
                    CallId::from_le_bytes(id)
                }) else {
                    if let Payload::Rndv(id, _) = payload {
                        self.worker.discard(id);
                    }
                    let reason = format!("UCX frame header of {} bytes", header.len());
                    return self.fail(conn, Code::Internal, reason);
                };
                let body = match payload {
                    Payload::Eager(bytes) => Body::Ready(bytes),
                    // Checked before a buffer is sized by it: no frame may carry more than a
                    // call's window (data) or MAX_CONTROL_BODY (heads, statuses).
                    Payload::Rndv(id, len) if len > self.max_body() => {
                        self.worker.discard(id);
                        let reason = format!("UCX frame body of {len} bytes over the limit");
                        return self.fail(conn, Code::Internal, reason);
                    }
                    Payload::Rndv(id, _) => match self.worker.receive(id) {
                        Ok(Ok(bytes)) => Body::Ready(bytes),
                        Ok(Err(op)) => {
                            self.receiving.insert(op, (conn, call));
                            Body::Waiting(op)
                        }
                        Err(e) => {
                            self.fail(conn, Code::Unavailable, format!("UCX receive: {e}"));
                            return;
                        }
                    },
                };
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.arrived.entry(call).or_default().push_back((header, body));
                }
                self.deliver(conn, call);
            }
            Event::Received { op, result } => {
                let Some((conn, call)) = self.receiving.remove(&op) else {
                    return;
                };
                match result {
                    Ok(bytes) => {
                        if let Some(queue) = self
                            .conns
                            .get_mut(&conn)
                            .and_then(|c| c.arrived.get_mut(&call))
                        {
                            for (_, body) in queue.iter_mut() {
                                if matches!(body, Body::Waiting(o) if *o == op) {
                                    *body = Body::Ready(bytes);
                                    break;
                                }
                            }
                        }
                        self.deliver(conn, call);
                    }
                    Err(e) => self.fail(conn, Code::Unavailable, format!("UCX receive: {e}")),
                }
            }
            Event::EpFailed { ep, error } => {
                if let Some(conn) = self.by_ep.get(&ep).copied() {
                    self.fail(conn, Code::Unavailable, error.to_string());
                }
            }
        }
    }

    /// Hand on the frames at the front of `call`'s queue whose bodies are complete.
    fn deliver(&mut self, conn: ConnId, call: CallId) {
        loop {
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            let Some(queue) = c.arrived.get_mut(&call) else {
                return;
            };
            if !matches!(queue.front(), Some((_, Body::Ready(_)))) {
                return;
            }
            let Some((header, Body::Ready(body))) = queue.pop_front() else {
                return;
            };
            if queue.is_empty() {
                c.arrived.remove(&call);
            }
            match Frame::decode(&header[4..], body) {
                Ok(frame) => self.on_frame(conn, frame),
                Err(e) => {
                    return self.fail(conn, Code::Internal, format!("bad UCX frame: {e}"));
                }
            }
        }
    }

    fn on_frame(&mut self, conn: ConnId, frame: Frame) {
        let window = u64::from(self.options.call_window);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let call = frame.call();
        match frame {
            Frame::Open { call, head } => {
                if !c.server || c.calls.contains_key(&call) || call <= c.last_call {
                    return self.fail(conn, Code::Internal, "unexpected open frame".into());
                }
                let Some(incoming) = &self.incoming else {
                    // Draining: the go-away told the client this call was not served (it ends
                    // it there, safe to retry); its later frames find no call and are dropped.
                    return;
                };
                c.last_call = call;
                let (slot, rx) = Slot::new(c.peer_window);
                let peer = c.peer;
                let reply = ReplySink::new(
                    self.handle.clone(),
                    conn,
                    call,
                    slot.credit.clone(),
                    slot.done.clone(),
                    self.options.fragment_for(c.peer_window),
                );
                let messages =
                    RequestMessages::new(rx, self.handle.clone(), conn, call, window as u32);
                c.calls.insert(
                    call,
                    CallState {
                        slot,
                        unreturned: 0,
                    },
                );
                let incoming_call = IncomingCall {
                    call: Call {
                        head,
                        messages: Box::pin(messages),
                    },
                    reply,
                    peer,
                };
                if let Err(mpsc::error::SendError(refused)) = incoming.send(incoming_call) {
                    drop(refused);
                }
            }
            Frame::GoAway { last } if !c.server => {
                c.draining.cancel();
                let refused: Vec<CallId> =
                    c.calls.keys().copied().filter(|&id| id > last).collect();
                for call in refused {
                    self.end_call(
                        conn,
                        call,
                        Some(Err(Box::new(Status::new(Code::Unavailable, NOT_SENT)))),
                    );
                }
                // With no call left, the connection closes now.
                if self.conns.get(&conn).is_some_and(|c| c.calls.is_empty()) {
                    self.fail(conn, Code::Unavailable, "drained".into());
                }
            }
            Frame::Credit { bytes, .. } => {
                if let Some(state) = c.calls.get(&call) {
                    // A peer that grants credit beyond any window is broken; the semaphore would
                    // panic past its maximum, so stop long before.
                    if state.slot.credit.available_permits() > MAX_CREDIT {
                        let reason = "the UCX peer granted more credit than any window".into();
                        return self.fail(conn, Code::Internal, reason);
                    }
                    state.slot.credit.add_permits(bytes as usize);
                }
            }
            Frame::Cancel { .. } if c.server => {
                self.end_call(
                    conn,
                    call,
                    Some(Err(Box::new(Status::new(
                        Code::Cancelled,
                        "cancelled by the UCX peer",
                    )))),
                );
            }
            Frame::Status { .. } if !c.server => {
                self.end_call(conn, call, Some(Ok(frame)));
            }
            Frame::Request { .. } | Frame::HalfClose { .. } if c.server => {
                self.pass(conn, call, frame, window)
            }
            Frame::ResponseHead { .. } | Frame::Response { .. } if !c.server => {
                self.pass(conn, call, frame, window)
            }
            other => {
                self.fail(
                    conn,
                    Code::Internal,
                    format!("unexpected UCX frame {other:?}"),
                );
            }
        }
    }

    /// Hand a frame to its call, holding the peer to the call's window.
    fn pass(&mut self, conn: ConnId, call: CallId, frame: Frame, window: u64) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let server = c.server;
        let Some(state) = c.calls.get_mut(&call) else {
            // A call that already ended here: its late frames are dropped.
            return;
        };
        state.unreturned += frame.flow_len() as u64;
        if state.unreturned > window {
            let status = Status::new(
                Code::Internal,
                "the UCX peer sent more than the call's flow-control window",
            );
            let answer = if server {
                Frame::Status {
                    call,
                    status: status.clone(),
                }
            } else {
                Frame::Cancel { call }
            };
            self.send(conn, &answer);
            return self.end_call(conn, call, Some(Err(Box::new(status))));
        }
        let _ = state.slot.inbound.send(Ok(frame));
    }
}

fn hello(conn: ConnId, window: u32, address: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(20 + address.len());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&conn.to_le_bytes());
    buf.extend_from_slice(&window.to_le_bytes());
    buf.extend_from_slice(&(address.len() as u32).to_le_bytes());
    buf.extend_from_slice(address);
    buf
}

/// The peer's hello: (its connection id, its window, its worker address).
async fn read_hello(stream: &mut TcpStream) -> io::Result<(ConnId, u32, Vec<u8>)> {
    let mut fixed = [0u8; 20];
    stream.read_exact(&mut fixed).await?;
    if &fixed[..8] != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a pnp UCX peer (bad hello)",
        ));
    }
    let word = |i: usize| u32::from_le_bytes([fixed[i], fixed[i + 1], fixed[i + 2], fixed[i + 3]]);
    let (conn, window, len) = (word(8), word(12), word(16));
    if len > MAX_ADDRESS || window < 2 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad hello from the UCX peer",
        ));
    }
    let mut address = vec![0u8; len as usize];
    stream.read_exact(&mut address).await?;
    Ok((conn, window, address))
}

fn keepalive(stream: &TcpStream, options: &UcxOptions) {
    let third = (options.keepalive / 3).max(Duration::from_secs(1));
    let params = socket2::TcpKeepalive::new()
        .with_time(third)
        .with_interval(third)
        .with_retries(2);
    let socket = socket2::SockRef::from(stream);
    let _ = socket.set_tcp_keepalive(&params);
    let _ = socket.set_tcp_nodelay(true);
}

/// Watch the side channel until the peer closes it or this connection ends.
async fn watch(mut stream: TcpStream, conn: ConnId, dead: CancellationToken, handle: DriverHandle) {
    let mut byte = [0u8; 1];
    let reason = tokio::select! {
        read = stream.read(&mut byte) => match read {
            Ok(0) => "the peer closed the connection".to_owned(),
            Ok(_) => "unexpected bytes on the side channel".to_owned(),
            Err(e) => format!("side channel failed: {e}"),
        },
        () = dead.cancelled() => return,
    };
    handle.send(Command::Lost { conn, reason });
}

async fn accept_loop(
    listener: TcpListener,
    handle: DriverHandle,
    address: Arc<Vec<u8>>,
    options: UcxOptions,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // Drain: the listening socket closes, so new peers are refused at once.
            () = stop.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "UCX side channel accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (handle, address, options) = (handle.clone(), address.clone(), options.clone());
        tokio::task::spawn_local(async move {
            let timeout = options.connect_timeout;
            match tokio::time::timeout(
                timeout,
                serve_hello(stream, peer, &handle, &address, &options),
            )
            .await
            {
                Ok(Ok((stream, attached))) => {
                    watch(stream, attached.conn, attached.dead, handle).await
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "UCX handshake failed"),
                Err(_) => tracing::debug!(%peer, "UCX handshake timed out"),
            }
        });
    }
}

async fn serve_hello(
    mut stream: TcpStream,
    peer: SocketAddr,
    handle: &DriverHandle,
    address: &[u8],
    options: &UcxOptions,
) -> io::Result<(TcpStream, Attached)> {
    keepalive(&stream, options);
    let (peer_conn, peer_window, peer_address) = read_hello(&mut stream).await?;
    let (reply, attached) = oneshot::channel();
    handle.send(Command::Attach {
        id: 0,
        server: true,
        peer,
        peer_conn,
        peer_window,
        peer_address,
        reply,
    });
    let attached = attached
        .await
        .map_err(|_| io::Error::other("the UCX driver stopped"))?
        .map_err(io::Error::other)?;
    stream
        .write_all(&hello(attached.conn, options.call_window, address))
        .await?;
    Ok((stream, attached))
}

async fn connect(
    peer: String,
    id: ConnId,
    handle: DriverHandle,
    address: Arc<Vec<u8>>,
    options: UcxOptions,
    reply: oneshot::Sender<Result<Attached, String>>,
) {
    let attempt = async {
        let mut stream = TcpStream::connect(peer.as_str())
            .await
            .map_err(|e| format!("connecting to {peer}: {e}"))?;
        let peer_addr = stream
            .peer_addr()
            .map_err(|e| format!("connecting to {peer}: {e}"))?;
        keepalive(&stream, &options);
        stream
            .write_all(&hello(id, options.call_window, &address))
            .await
            .map_err(|e| format!("hello to {peer}: {e}"))?;
        let (peer_conn, peer_window, peer_address) = read_hello(&mut stream)
            .await
            .map_err(|e| format!("hello from {peer}: {e}"))?;
        let (attach_reply, attached) = oneshot::channel();
        handle.send(Command::Attach {
            id,
            server: false,
            peer: peer_addr,
            peer_conn,
            peer_window,
            peer_address,
            reply: attach_reply,
        });
        let attached = attached
            .await
            .map_err(|_| "the UCX driver stopped".to_owned())??;
        Ok::<_, String>((stream, attached))
    };
    let result = match tokio::time::timeout(options.connect_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no UCX connection to {peer} within {:?}",
            options.connect_timeout
        )),
    };
    match result {
        Ok((stream, attached)) => {
            let (conn, dead) = (attached.conn, attached.dead.clone());
            let _ = reply.send(Ok(attached));
            watch(stream, conn, dead, handle).await;
        }
        Err(e) => {
            let _ = reply.send(Err(e));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Instant;

    use futures_util::StreamExt;
    use pnp_call::{Message, Part};

    use super::*;
    use crate::options::UcxTuning;
    use crate::sys::Payload;
    use crate::UcxListener;

    /// A peer that speaks the side channel and the frames by hand, with its own worker.
    struct RawPeer {
        worker: Worker,
        ep: EpId,
        peer_conn: ConnId,
        _side: std::net::TcpStream,
    }

    impl RawPeer {
        fn connect(addr: SocketAddr) -> RawPeer {
            let mut worker = Worker::new(&UcxTuning::loopback_tcp().entries()).expect("worker");
            let mut side = std::net::TcpStream::connect(addr).expect("side channel");
            side.write_all(&hello(1, 1 << 20, &worker.address().expect("address")))
                .expect("hello");
            let mut fixed = [0u8; 20];
            side.read_exact(&mut fixed).expect("hello back");
            assert_eq!(&fixed[..8], MAGIC);
            let word =
                |i: usize| u32::from_le_bytes([fixed[i], fixed[i + 1], fixed[i + 2], fixed[i + 3]]);
            let mut address = vec![0u8; word(16) as usize];
            side.read_exact(&mut address).expect("address");
            let ep = worker.connect(&address, true).expect("endpoint");
            RawPeer {
                worker,
                ep,
                peer_conn: word(8),
                _side: side,
            }
        }

        fn send(&mut self, frame: &Frame) {
            let (header, body) = frame.encode();
            let mut am = self.peer_conn.to_le_bytes().to_vec();
            am.extend_from_slice(&header);
            self.worker.send(self.ep, &am, body).expect("send");
        }

        /// The frames that arrive within `limit`, until `stop` says enough.
        fn receive_until(&mut self, limit: Duration, stop: impl Fn(&Frame) -> bool) -> Vec<Frame> {
            let deadline = Instant::now() + limit;
            let mut frames = Vec::new();
            while Instant::now() < deadline {
                self.worker.progress();
                for event in self.worker.events() {
                    if let Event::Arrival {
                        header,
                        payload: Payload::Eager(body),
                    } = event
                    {
                        let frame = Frame::decode(&header[4..], body).expect("a frame");
                        let done = stop(&frame);
                        frames.push(frame);
                        if done {
                            return frames;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            frames
        }
    }

    fn head() -> CallHead {
        CallHead {
            path: "/test.Echo/Hold".parse().expect("path"),
            subtype: None,
            metadata: http::HeaderMap::new(),
            timeout: None,
            max_message_size: usize::MAX,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_ignores_its_credit_has_the_call_ended() {
        let mut options = UcxOptions::with_tuning(UcxTuning::loopback_tcp());
        options.call_window = 64 << 10;
        let mut listener = UcxListener::bind("127.0.0.1:0".parse().expect("addr"), options)
            .await
            .expect("listener");
        let addr = listener.local_addr();
        // The handler never reads the request, so no credit ever comes back.
        let handler = tokio::spawn(async move {
            let incoming = listener.accept().await.expect("a call");
            incoming.reply.cancelled().await;
            let mut messages = incoming.call.messages;
            let mut last = None;
            while let Some(item) = messages.next().await {
                last = Some(item);
            }
            last
        });
        let frames = tokio::task::spawn_blocking(move || {
            let mut peer = RawPeer::connect(addr);
            peer.send(&Frame::Open {
                call: 1,
                head: head(),
            });
            for _ in 0..4 {
                let part = Part::Message(Message::new(vec![1u8; 32 << 10]));
                peer.send(&Frame::Request { call: 1, part });
            }
            peer.receive_until(Duration::from_secs(5), |f| {
                matches!(f, Frame::Status { .. })
            })
        })
        .await
        .expect("raw peer");
        let Some(Frame::Status { status, .. }) = frames.last() else {
            panic!("a status, got {frames:?}")
        };
        assert_eq!(status.code, Code::Internal);
        assert!(status.message.contains("flow-control window"), "{status:?}");
        let last = handler.await.expect("handler");
        let Some(Err(status)) = last else {
            panic!("the handler's request stream ends in an error, got {last:?}")
        };
        assert_eq!(status.code, Code::Internal);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_frame_ends_the_connection() {
        let mut listener = UcxListener::bind(
            "127.0.0.1:0".parse().expect("addr"),
            UcxOptions::with_tuning(UcxTuning::loopback_tcp()),
        )
        .await
        .expect("listener");
        let addr = listener.local_addr();
        let handler = tokio::spawn(async move {
            let incoming = listener.accept().await.expect("a call");
            let mut messages = incoming.call.messages;
            messages.next().await
        });
        tokio::task::spawn_blocking(move || {
            let mut peer = RawPeer::connect(addr);
            peer.send(&Frame::Open {
                call: 1,
                head: head(),
            });
            // A frame kind that does not exist.
            let mut am = peer.peer_conn.to_le_bytes().to_vec();
            am.extend_from_slice(&[99u8; 16]);
            peer.worker.send(peer.ep, &am, Bytes::new()).expect("send");
            // Keep progressing so the frames leave.
            peer.receive_until(Duration::from_millis(500), |_| false);
        })
        .await
        .expect("raw peer");
        let item = tokio::time::timeout(Duration::from_secs(5), handler)
            .await
            .expect("the call ends")
            .expect("handler");
        let Some(Err(status)) = item else {
            panic!("an error, got {item:?}")
        };
        assert_eq!(status.code, Code::Internal);
        assert!(status.message.contains("bad UCX frame"), "{status:?}");
    }
}
