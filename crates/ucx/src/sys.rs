//! The one module of pnp-ucx with `unsafe` code: declarations of the UCP functions pnp uses
//! (UCX 1.13 ABI, hand-written; `abi_matches_the_system_headers` below compiles a C program
//! against the installed headers and checks every size and offset) and [`Worker`], a safe
//! owner of one UCP context, its worker, its endpoints and every request in flight.
//!
//! Invariants that make the safe surface sound:
//! - **One thread.** A [`Worker`] holds raw pointers and is neither `Send` nor `Sync`; UCP is
//!   initialised in `UCS_THREAD_MODE_SINGLE` and every UCP call on it happens on the thread
//!   that made it.
//! - **Handles never escape.** Endpoints, requests and rendezvous descriptors are kept inside
//!   the worker and named outside only by plain ids ([`EpId`], [`OpId`], [`RndvId`]); a stale
//!   id finds nothing, it cannot reach a freed handle.
//! - **Buffers outlive their operations.** A send keeps its header and payload (`Bytes`,
//!   immutable and heap-stable) and a receive its `Vec<u8>` inside the worker until UCP reports
//!   the request complete; only then are they dropped and the request freed. If a request does
//!   not complete while the worker shuts down, its buffers, the worker and the callback inbox
//!   are leaked, never freed under UCP's feet.
//! - **Callbacks only record.** The active-message, send, receive and endpoint-error callbacks
//!   run inside `ucp_worker_progress` (or an operation call) on the worker's thread; they copy
//!   what they are given into the [`Inbox`] (a `RefCell` never borrowed across a UCP call) and
//!   return. They do not call UCP and do not panic. The inbox is boxed, so the pointer UCP
//!   holds stays valid for the worker's whole life.
//! - **Eager data is copied in the callback** (UCP owns it only for the call); rendezvous data
//!   is kept as a descriptor and later received into a buffer of its announced length, or
//!   released.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_int, c_uint, c_void, CStr, CString};
use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::os::fd::RawFd;
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::pool::BufferPool;

/// The raw UCP declarations (UCX 1.13, `ucp/api/ucp.h`).
#[allow(non_camel_case_types, dead_code)]
mod ffi {
    use std::ffi::{c_char, c_int, c_uint, c_ulong, c_void};

    /// `ucs_status_t` is a packed enum: one signed byte.
    pub(super) type ucs_status_t = i8;
    pub(super) const UCS_OK: ucs_status_t = 0;
    pub(super) const UCS_INPROGRESS: ucs_status_t = 1;
    pub(super) const UCS_ERR_UNREACHABLE: ucs_status_t = -6;
    pub(super) const UCS_ERR_BUSY: ucs_status_t = -15;
    pub(super) const UCS_ERR_LAST: isize = -100;

    pub(super) enum ucp_context {}
    pub(super) enum ucp_config {}
    pub(super) enum ucp_worker {}
    pub(super) enum ucp_ep {}
    pub(super) enum ucp_address {}

    pub(super) const UCP_PARAM_FIELD_FEATURES: u64 = 1 << 0;
    pub(super) const UCP_FEATURE_WAKEUP: u64 = 1 << 4;
    pub(super) const UCP_FEATURE_AM: u64 = 1 << 6;
    pub(super) const UCP_WORKER_PARAM_FIELD_THREAD_MODE: u64 = 1 << 0;
    pub(super) const UCS_THREAD_MODE_SINGLE: c_int = 0;
    pub(super) const UCP_EP_PARAM_FIELD_REMOTE_ADDRESS: u64 = 1 << 0;
    pub(super) const UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE: u64 = 1 << 1;
    pub(super) const UCP_EP_PARAM_FIELD_ERR_HANDLER: u64 = 1 << 2;
    pub(super) const UCP_ERR_HANDLING_MODE_NONE: c_int = 0;
    pub(super) const UCP_ERR_HANDLING_MODE_PEER: c_int = 1;
    pub(super) const UCP_EP_CLOSE_FLAG_FORCE: u32 = 1 << 0;
    pub(super) const UCP_OP_ATTR_FIELD_CALLBACK: u32 = 1 << 1;
    pub(super) const UCP_OP_ATTR_FIELD_USER_DATA: u32 = 1 << 2;
    pub(super) const UCP_OP_ATTR_FIELD_FLAGS: u32 = 1 << 4;
    pub(super) const UCP_AM_HANDLER_PARAM_FIELD_ID: u64 = 1 << 0;
    pub(super) const UCP_AM_HANDLER_PARAM_FIELD_CB: u64 = 1 << 2;
    pub(super) const UCP_AM_HANDLER_PARAM_FIELD_ARG: u64 = 1 << 3;
    pub(super) const UCP_AM_RECV_ATTR_FLAG_RNDV: u64 = 1 << 17;

    pub(super) type ucp_am_recv_callback_t = unsafe extern "C" fn(
        arg: *mut c_void,
        header: *const c_void,
        header_length: usize,
        data: *mut c_void,
        length: usize,
        param: *const ucp_am_recv_param_t,
    ) -> ucs_status_t;
    pub(super) type ucp_err_handler_cb_t =
        unsafe extern "C" fn(arg: *mut c_void, ep: *mut ucp_ep, status: ucs_status_t);
    pub(super) type ucp_send_nbx_callback_t =
        unsafe extern "C" fn(request: *mut c_void, status: ucs_status_t, user_data: *mut c_void);
    pub(super) type ucp_am_recv_data_nbx_callback_t = unsafe extern "C" fn(
        request: *mut c_void,
        status: ucs_status_t,
        length: usize,
        user_data: *mut c_void,
    );

    #[repr(C)]
    pub(super) struct ucp_params_t {
        pub(super) field_mask: u64,
        pub(super) features: u64,
        pub(super) request_size: usize,
        pub(super) request_init: *mut c_void,
        pub(super) request_cleanup: *mut c_void,
        pub(super) tag_sender_mask: u64,
        pub(super) mt_workers_shared: c_int,
        pub(super) estimated_num_eps: usize,
        pub(super) estimated_num_ppn: usize,
        pub(super) name: *const c_char,
    }

    #[repr(C)]
    pub(super) struct ucp_worker_params_t {
        pub(super) field_mask: u64,
        pub(super) thread_mode: c_int,
        pub(super) cpu_mask: [c_ulong; 1024 / (8 * std::mem::size_of::<c_ulong>())],
        pub(super) events: c_uint,
        pub(super) user_data: *mut c_void,
        pub(super) event_fd: c_int,
        pub(super) flags: u64,
        pub(super) name: *const c_char,
        pub(super) am_alignment: usize,
        pub(super) client_id: u64,
    }

    #[repr(C)]
    pub(super) struct ucp_err_handler_t {
        pub(super) cb: Option<ucp_err_handler_cb_t>,
        pub(super) arg: *mut c_void,
    }

    #[repr(C)]
    pub(super) struct ucs_sock_addr_t {
        pub(super) addr: *const c_void,
        pub(super) addrlen: u32,
    }

    #[repr(C)]
    pub(super) struct ucp_ep_params_t {
        pub(super) field_mask: u64,
        pub(super) address: *const ucp_address,
        pub(super) err_mode: c_int,
        pub(super) err_handler: ucp_err_handler_t,
        pub(super) user_data: *mut c_void,
        pub(super) flags: c_uint,
        pub(super) sockaddr: ucs_sock_addr_t,
        pub(super) conn_request: *mut c_void,
        pub(super) name: *const c_char,
        pub(super) local_sockaddr: ucs_sock_addr_t,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(super) union ucp_request_cb {
        pub(super) none: *const c_void,
        pub(super) send: ucp_send_nbx_callback_t,
        pub(super) recv_am: ucp_am_recv_data_nbx_callback_t,
    }

    #[repr(C)]
    pub(super) struct ucp_request_param_t {
        pub(super) op_attr_mask: u32,
        pub(super) flags: u32,
        pub(super) request: *mut c_void,
        pub(super) cb: ucp_request_cb,
        pub(super) datatype: u64,
        pub(super) user_data: *mut c_void,
        pub(super) reply_buffer: *mut c_void,
        pub(super) memory_type: c_int,
        pub(super) recv_info: *mut c_void,
        pub(super) memh: *mut c_void,
    }

    #[repr(C)]
    pub(super) struct ucp_am_handler_param_t {
        pub(super) field_mask: u64,
        pub(super) id: c_uint,
        pub(super) flags: u32,
        pub(super) cb: Option<ucp_am_recv_callback_t>,
        pub(super) arg: *mut c_void,
    }

    #[repr(C)]
    pub(super) struct ucp_am_recv_param_t {
        pub(super) recv_attr: u64,
        pub(super) reply_ep: *mut ucp_ep,
    }

    extern "C" {
        pub(super) fn ucp_config_read(
            env_prefix: *const c_char,
            filename: *const c_char,
            config_p: *mut *mut ucp_config,
        ) -> ucs_status_t;
        pub(super) fn ucp_config_modify(
            config: *mut ucp_config,
            name: *const c_char,
            value: *const c_char,
        ) -> ucs_status_t;
        pub(super) fn ucp_config_release(config: *mut ucp_config);
        pub(super) fn ucp_init_version(
            api_major_version: c_uint,
            api_minor_version: c_uint,
            params: *const ucp_params_t,
            config: *const ucp_config,
            context_p: *mut *mut ucp_context,
        ) -> ucs_status_t;
        pub(super) fn ucp_cleanup(context: *mut ucp_context);
        pub(super) fn ucp_worker_create(
            context: *mut ucp_context,
            params: *const ucp_worker_params_t,
            worker_p: *mut *mut ucp_worker,
        ) -> ucs_status_t;
        pub(super) fn ucp_worker_destroy(worker: *mut ucp_worker);
        pub(super) fn ucp_worker_get_address(
            worker: *mut ucp_worker,
            address_p: *mut *mut ucp_address,
            address_length_p: *mut usize,
        ) -> ucs_status_t;
        pub(super) fn ucp_worker_release_address(
            worker: *mut ucp_worker,
            address: *mut ucp_address,
        );
        pub(super) fn ucp_worker_progress(worker: *mut ucp_worker) -> c_uint;
        pub(super) fn ucp_worker_get_efd(worker: *mut ucp_worker, fd: *mut c_int) -> ucs_status_t;
        pub(super) fn ucp_worker_arm(worker: *mut ucp_worker) -> ucs_status_t;
        pub(super) fn ucp_worker_set_am_recv_handler(
            worker: *mut ucp_worker,
            param: *const ucp_am_handler_param_t,
        ) -> ucs_status_t;
        pub(super) fn ucp_ep_create(
            worker: *mut ucp_worker,
            params: *const ucp_ep_params_t,
            ep_p: *mut *mut ucp_ep,
        ) -> ucs_status_t;
        pub(super) fn ucp_ep_close_nbx(
            ep: *mut ucp_ep,
            param: *const ucp_request_param_t,
        ) -> *mut c_void;
        pub(super) fn ucp_am_send_nbx(
            ep: *mut ucp_ep,
            id: c_uint,
            header: *const c_void,
            header_length: usize,
            buffer: *const c_void,
            count: usize,
            param: *const ucp_request_param_t,
        ) -> *mut c_void;
        pub(super) fn ucp_am_recv_data_nbx(
            worker: *mut ucp_worker,
            data_desc: *mut c_void,
            buffer: *mut c_void,
            count: usize,
            param: *const ucp_request_param_t,
        ) -> *mut c_void;
        pub(super) fn ucp_am_data_release(worker: *mut ucp_worker, data: *mut c_void);
        pub(super) fn ucp_request_check_status(request: *mut c_void) -> ucs_status_t;
        pub(super) fn ucp_request_cancel(worker: *mut ucp_worker, request: *mut c_void);
        pub(super) fn ucp_request_free(request: *mut c_void);
        pub(super) fn ucs_status_string(status: ucs_status_t) -> *const c_char;
    }
}

use ffi::ucs_status_t;

/// The one active-message id pnp uses: every frame goes to the same handler.
const AM_ID: c_uint = 0;

/// A UCX call that failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {text} ({status})")]
pub(crate) struct UcxError {
    /// What pnp was doing.
    pub(crate) what: &'static str,
    /// UCX's status code.
    pub(crate) status: i8,
    /// UCX's text for it.
    pub(crate) text: String,
}

impl UcxError {
    fn new(what: &'static str, status: ucs_status_t) -> Self {
        Self {
            what,
            status,
            text: status_text(status),
        }
    }
}

fn status_text(status: ucs_status_t) -> String {
    // SAFETY: ucs_status_string returns a pointer to a static NUL-terminated string for any
    // value (unknown ones included), never null.
    unsafe {
        let text = ffi::ucs_status_string(status);
        if text.is_null() {
            return format!("status {status}");
        }
        CStr::from_ptr(text).to_string_lossy().into_owned()
    }
}

fn check(what: &'static str, status: ucs_status_t) -> Result<(), UcxError> {
    if status == ffi::UCS_OK {
        Ok(())
    } else {
        Err(UcxError::new(what, status))
    }
}

/// What a `ucs_status_ptr_t` says.
enum StatusPtr {
    Done,
    Failed(ucs_status_t),
    Pending(*mut c_void),
}

fn status_ptr(p: *mut c_void) -> StatusPtr {
    let value = p as isize;
    if p.is_null() {
        StatusPtr::Done
    } else if (ffi::UCS_ERR_LAST..0).contains(&value) {
        // UCS_PTR_IS_ERR: the pointer is a negative status code.
        StatusPtr::Failed(value as ucs_status_t)
    } else {
        StatusPtr::Pending(p)
    }
}

/// Names an endpoint of a [`Worker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct EpId(u64);
/// Names a receive in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct OpId(u64);
/// Names rendezvous data announced by the peer and not yet received.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct RndvId(u64);

/// The payload of an arrived active message.
#[derive(Debug)]
pub(crate) enum Payload {
    /// Eager data, already copied out of UCP.
    Eager(Bytes),
    /// Rendezvous data of this length, still at the sender: [`Worker::receive`] it or
    /// [`Worker::discard`] it.
    Rndv(RndvId, usize),
}

/// What happened on the worker since the last [`Worker::events`].
#[derive(Debug)]
pub(crate) enum Event {
    /// An active message (a frame) arrived.
    Arrival {
        /// Its header.
        header: Vec<u8>,
        /// Its data.
        payload: Payload,
    },
    /// A receive started by [`Worker::receive`] finished.
    Received {
        /// Which.
        op: OpId,
        /// The data, or why not.
        result: Result<Bytes, UcxError>,
    },
    /// An endpoint failed (the peer died or the link broke); close it.
    EpFailed {
        /// Which.
        ep: EpId,
        /// Why.
        error: UcxError,
    },
}

/// Where the callbacks record what they saw (see the module invariants).
#[derive(Default)]
struct Inbox {
    arrivals: RefCell<Vec<(Vec<u8>, RawPayload)>>,
    /// (request, status, received length) of finished requests.
    completed: RefCell<Vec<(usize, ucs_status_t, usize)>>,
    /// (endpoint handle, status) of failed endpoints.
    failed: RefCell<Vec<(usize, ucs_status_t)>>,
}

enum RawPayload {
    Eager(Bytes),
    Rndv(*mut c_void, usize),
}

/// What a request in flight keeps alive until it completes.
enum Op {
    Send { _header: Box<[u8]>, _data: Bytes },
    Receive { id: OpId, buf: Vec<u8> },
    Close,
}

/// One UCP context and worker on this thread, with its endpoints and requests. See the module
/// documentation for the invariants.
pub(crate) struct Worker {
    context: *mut ffi::ucp_context,
    worker: *mut ffi::ucp_worker,
    inbox: Box<Inbox>,
    eps: HashMap<EpId, *mut ffi::ucp_ep>,
    ep_ids: HashMap<usize, EpId>,
    /// Requests in flight, by request pointer.
    ops: HashMap<usize, Op>,
    rndv: HashMap<RndvId, (*mut c_void, usize)>,
    next_id: u64,
    /// The worker's event fd in the tokio reactor (dropped first in `drop`, while the fd is
    /// still open).
    events_fd: Option<tokio::io::unix::AsyncFd<RawFd>>,
    /// Buffers for rendezvous bodies.
    pool: Arc<BufferPool>,
    /// Raw pointers make this !Send and !Sync already; this says so on purpose.
    _one_thread: PhantomData<*mut ()>,
}

/// Bytes of dropped rendezvous buffers a worker keeps for reuse unless told otherwise.
const DEFAULT_KEEP: usize = 16 << 20;

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("eps", &self.eps.len())
            .field("ops", &self.ops.len())
            .finish_non_exhaustive()
    }
}

unsafe extern "C" fn on_am(
    arg: *mut c_void,
    header: *const c_void,
    header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const ffi::ucp_am_recv_param_t,
) -> ucs_status_t {
    // SAFETY: `arg` is the worker's boxed Inbox, alive as long as the worker (invariant); UCP
    // passes `header_length` readable bytes at `header`, and `param` valid for this call.
    let inbox = unsafe { &*(arg as *const Inbox) };
    let header = if header_length == 0 || header.is_null() {
        Vec::new()
    } else {
        // SAFETY: see above.
        unsafe { std::slice::from_raw_parts(header as *const u8, header_length) }.to_vec()
    };
    // SAFETY: see above.
    let rndv =
        !param.is_null() && unsafe { (*param).recv_attr } & ffi::UCP_AM_RECV_ATTR_FLAG_RNDV != 0;
    let (payload, status) = if rndv {
        // The descriptor stays valid until received or released; UCS_INPROGRESS keeps it.
        (RawPayload::Rndv(data, length), ffi::UCS_INPROGRESS)
    } else if length == 0 || data.is_null() {
        (RawPayload::Eager(Bytes::new()), ffi::UCS_OK)
    } else {
        // SAFETY: eager data: `length` readable bytes at `data`, for this call only (copied).
        let bytes = unsafe { std::slice::from_raw_parts(data as *const u8, length) };
        (
            RawPayload::Eager(Bytes::copy_from_slice(bytes)),
            ffi::UCS_OK,
        )
    };
    match inbox.arrivals.try_borrow_mut() {
        Ok(mut arrivals) => {
            arrivals.push((header, payload));
            status
        }
        // Never borrowed across a UCP call, so this does not happen; if it did, UCP keeps
        // nothing (UCS_OK releases a rendezvous descriptor too) and the frame is lost.
        Err(_) => ffi::UCS_OK,
    }
}

unsafe extern "C" fn on_ep_error(arg: *mut c_void, ep: *mut ffi::ucp_ep, status: ucs_status_t) {
    // SAFETY: `arg` is the worker's boxed Inbox (invariant).
    let inbox = unsafe { &*(arg as *const Inbox) };
    if let Ok(mut failed) = inbox.failed.try_borrow_mut() {
        failed.push((ep as usize, status));
    }
}

unsafe extern "C" fn on_sent(request: *mut c_void, status: ucs_status_t, user_data: *mut c_void) {
    // SAFETY: `user_data` is the worker's boxed Inbox (set in `send`).
    let inbox = unsafe { &*(user_data as *const Inbox) };
    if let Ok(mut completed) = inbox.completed.try_borrow_mut() {
        completed.push((request as usize, status, 0));
    }
}

unsafe extern "C" fn on_received(
    request: *mut c_void,
    status: ucs_status_t,
    length: usize,
    user_data: *mut c_void,
) {
    // SAFETY: `user_data` is the worker's boxed Inbox (set in `receive`).
    let inbox = unsafe { &*(user_data as *const Inbox) };
    if let Ok(mut completed) = inbox.completed.try_borrow_mut() {
        completed.push((request as usize, status, length));
    }
}

fn request_param(op_attr_mask: u32) -> ffi::ucp_request_param_t {
    ffi::ucp_request_param_t {
        op_attr_mask,
        flags: 0,
        request: ptr::null_mut(),
        cb: ffi::ucp_request_cb { none: ptr::null() },
        datatype: 0,
        user_data: ptr::null_mut(),
        reply_buffer: ptr::null_mut(),
        memory_type: 0,
        recv_info: ptr::null_mut(),
        memh: ptr::null_mut(),
    }
}

impl Worker {
    /// A context and worker with active messages and event-driven wakeup, configured with
    /// UCX's defaults, then the process's `UCX_*` variables, then `settings` (names without
    /// the `UCX_` prefix).
    pub(crate) fn new(settings: &[(String, String)]) -> Result<Worker, UcxError> {
        let mut config: *mut ffi::ucp_config = ptr::null_mut();
        // SAFETY: null prefix and file mean "UCX_" and none; `config` receives a handle that
        // is released below on every path.
        check("reading the UCX configuration", unsafe {
            ffi::ucp_config_read(ptr::null(), ptr::null(), &mut config)
        })?;
        let context = (|| {
            for (name, value) in settings {
                let (Ok(name), Ok(value)) =
                    (CString::new(name.as_str()), CString::new(value.as_str()))
                else {
                    return Err(UcxError {
                        what: "a UCX setting",
                        status: -3,
                        text: format!("`{name}` or its value holds a NUL byte"),
                    });
                };
                // SAFETY: `config` is live; both strings are NUL-terminated and UCP copies them.
                let status =
                    unsafe { ffi::ucp_config_modify(config, name.as_ptr(), value.as_ptr()) };
                if status != ffi::UCS_OK {
                    return Err(UcxError {
                        what: "a UCX setting",
                        status,
                        text: format!(
                            "UCX_{}={}: {}",
                            name.to_string_lossy(),
                            value.to_string_lossy(),
                            status_text(status)
                        ),
                    });
                }
            }
            let params = ffi::ucp_params_t {
                field_mask: ffi::UCP_PARAM_FIELD_FEATURES,
                features: ffi::UCP_FEATURE_AM | ffi::UCP_FEATURE_WAKEUP,
                request_size: 0,
                request_init: ptr::null_mut(),
                request_cleanup: ptr::null_mut(),
                tag_sender_mask: 0,
                mt_workers_shared: 0,
                estimated_num_eps: 0,
                estimated_num_ppn: 0,
                name: ptr::null(),
            };
            let mut context: *mut ffi::ucp_context = ptr::null_mut();
            // SAFETY: params and config are valid for the call; API 1.13 is what the
            // declarations above describe.
            check("initialising UCX", unsafe {
                ffi::ucp_init_version(1, 13, &params, config, &mut context)
            })?;
            Ok(context)
        })();
        // SAFETY: `config` came from ucp_config_read and is released once.
        unsafe { ffi::ucp_config_release(config) };
        let context = context?;

        let params = ffi::ucp_worker_params_t {
            field_mask: ffi::UCP_WORKER_PARAM_FIELD_THREAD_MODE,
            thread_mode: ffi::UCS_THREAD_MODE_SINGLE,
            cpu_mask: [0; 1024 / (8 * std::mem::size_of::<std::ffi::c_ulong>())],
            events: 0,
            user_data: ptr::null_mut(),
            event_fd: 0,
            flags: 0,
            name: ptr::null(),
            am_alignment: 0,
            client_id: 0,
        };
        let mut worker: *mut ffi::ucp_worker = ptr::null_mut();
        // SAFETY: `context` is live; params valid for the call.
        if let Err(e) = check("creating the UCX worker", unsafe {
            ffi::ucp_worker_create(context, &params, &mut worker)
        }) {
            // SAFETY: the context has no worker; cleaned up once.
            unsafe { ffi::ucp_cleanup(context) };
            return Err(e);
        }
        let this = Worker {
            context,
            worker,
            inbox: Box::default(),
            eps: HashMap::new(),
            ep_ids: HashMap::new(),
            ops: HashMap::new(),
            rndv: HashMap::new(),
            next_id: 0,
            events_fd: None,
            pool: BufferPool::new(DEFAULT_KEEP),
            _one_thread: PhantomData,
        };
        let handler = ffi::ucp_am_handler_param_t {
            field_mask: ffi::UCP_AM_HANDLER_PARAM_FIELD_ID
                | ffi::UCP_AM_HANDLER_PARAM_FIELD_CB
                | ffi::UCP_AM_HANDLER_PARAM_FIELD_ARG,
            id: AM_ID,
            flags: 0,
            cb: Some(on_am),
            arg: &*this.inbox as *const Inbox as *mut c_void,
        };
        // SAFETY: the worker is live; the inbox outlives it (invariant); on_am only records.
        check("setting the active-message handler", unsafe {
            ffi::ucp_worker_set_am_recv_handler(this.worker, &handler)
        })?;
        Ok(this)
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn inbox_ptr(&self) -> *mut c_void {
        &*self.inbox as *const Inbox as *mut c_void
    }

    /// This worker's address, for a peer to connect to (it names every transport the worker
    /// has: shared memory, TCP, RDMA).
    pub(crate) fn address(&self) -> Result<Vec<u8>, UcxError> {
        let mut address: *mut ffi::ucp_address = ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: the worker is live; the address is copied and released at once.
        unsafe {
            check(
                "getting the worker address",
                ffi::ucp_worker_get_address(self.worker, &mut address, &mut len),
            )?;
            let bytes = std::slice::from_raw_parts(address as *const u8, len).to_vec();
            ffi::ucp_worker_release_address(self.worker, address);
            Ok(bytes)
        }
    }

    /// Take rendezvous buffers from `pool` (see [`BufferPool`]).
    pub(crate) fn use_pool(&mut self, pool: Arc<BufferPool>) {
        self.pool = pool;
    }

    /// Put the worker's event fd (readable when the armed worker has events) into the current
    /// tokio runtime's reactor, for [`Worker::readable`]. Call inside a runtime.
    pub(crate) fn watch_events(&mut self) -> io::Result<()> {
        let mut fd: c_int = -1;
        // SAFETY: the worker is live and was made with UCP_FEATURE_WAKEUP.
        check("getting the worker's event fd", unsafe {
            ffi::ucp_worker_get_efd(self.worker, &mut fd)
        })
        .map_err(io::Error::other)?;
        // SAFETY: the fd belongs to the worker and stays open until ucp_worker_destroy; the
        // AsyncFd is kept in `events_fd` and dropped at the start of `drop`, before that.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)?;
        self.events_fd = Some(registered);
        Ok(())
    }

    /// Wait until the armed worker has events (at once without [`Worker::watch_events`]
    /// having succeeded: the caller then polls on a timer).
    pub(crate) async fn readable(&self) -> io::Result<()> {
        match &self.events_fd {
            Some(fd) => fd.readable().await.map(|mut guard| guard.clear_ready()),
            None => std::future::pending().await,
        }
    }

    /// Progress communication until there is nothing left to do now; true if anything
    /// happened. Callbacks run in here.
    pub(crate) fn progress(&mut self) -> bool {
        let mut any = false;
        for _ in 0..10_000 {
            // SAFETY: the worker is live; no inbox borrow is held (invariant).
            if unsafe { ffi::ucp_worker_progress(self.worker) } == 0 {
                break;
            }
            any = true;
        }
        any
    }

    /// Arm the event fd. `Ok(false)`: events are pending, progress again before waiting.
    pub(crate) fn arm(&mut self) -> Result<bool, UcxError> {
        // SAFETY: the worker is live.
        match unsafe { ffi::ucp_worker_arm(self.worker) } {
            ffi::UCS_OK => Ok(true),
            ffi::UCS_ERR_BUSY => Ok(false),
            status => Err(UcxError::new("arming the worker", status)),
        }
    }

    /// An endpoint to the worker at `address` (from the peer's [`Worker::address`]). With
    /// `peer_failure`, UCX reports a failed peer as [`Event::EpFailed`]; UCX 1.13's
    /// shared-memory transports (posix, sysv) cannot, so asking for it excludes them, and when
    /// that leaves no usable transport the endpoint is made without it (the caller then learns
    /// of peer death another way: pnp's side channel).
    pub(crate) fn connect(&mut self, address: &[u8], peer_failure: bool) -> Result<EpId, UcxError> {
        match self.connect_with(address, peer_failure) {
            Err(e) if peer_failure && e.status == ffi::UCS_ERR_UNREACHABLE => {
                self.connect_with(address, false)
            }
            other => other,
        }
    }

    fn connect_with(&mut self, address: &[u8], peer_failure: bool) -> Result<EpId, UcxError> {
        let params = ffi::ucp_ep_params_t {
            field_mask: ffi::UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
                | ffi::UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
                | ffi::UCP_EP_PARAM_FIELD_ERR_HANDLER,
            address: address.as_ptr() as *const ffi::ucp_address,
            err_mode: if peer_failure {
                ffi::UCP_ERR_HANDLING_MODE_PEER
            } else {
                ffi::UCP_ERR_HANDLING_MODE_NONE
            },
            err_handler: ffi::ucp_err_handler_t {
                cb: Some(on_ep_error),
                arg: self.inbox_ptr(),
            },
            user_data: ptr::null_mut(),
            flags: 0,
            sockaddr: ffi::ucs_sock_addr_t {
                addr: ptr::null(),
                addrlen: 0,
            },
            conn_request: ptr::null_mut(),
            name: ptr::null(),
            local_sockaddr: ffi::ucs_sock_addr_t {
                addr: ptr::null(),
                addrlen: 0,
            },
        };
        let mut ep: *mut ffi::ucp_ep = ptr::null_mut();
        // SAFETY: the worker is live; UCP unpacks the address during the call (it does not
        // keep the pointer); an address that is not a worker address fails the call.
        check("connecting to the peer worker", unsafe {
            ffi::ucp_ep_create(self.worker, &params, &mut ep)
        })?;
        let id = EpId(self.next_id());
        self.eps.insert(id, ep);
        self.ep_ids.insert(ep as usize, id);
        Ok(id)
    }

    /// Send one active message: `header` (copied here) and `data` (kept, not copied, until UCP
    /// is done with it: eager or rendezvous as UCP decides from its size).
    pub(crate) fn send(&mut self, ep: EpId, header: &[u8], data: Bytes) -> Result<(), UcxError> {
        let Some(&handle) = self.eps.get(&ep) else {
            return Err(UcxError {
                what: "sending",
                status: -6,
                text: "the endpoint is closed".into(),
            });
        };
        let header: Box<[u8]> = header.into();
        let mut param =
            request_param(ffi::UCP_OP_ATTR_FIELD_CALLBACK | ffi::UCP_OP_ATTR_FIELD_USER_DATA);
        param.cb = ffi::ucp_request_cb { send: on_sent };
        param.user_data = self.inbox_ptr();
        // SAFETY: the endpoint is live (it is in `eps`); header and data stay allocated and
        // unmodified until the request completes (kept in `ops` below, or done now).
        let p = unsafe {
            ffi::ucp_am_send_nbx(
                handle,
                AM_ID,
                header.as_ptr() as *const c_void,
                header.len(),
                data.as_ptr() as *const c_void,
                data.len(),
                &param,
            )
        };
        match status_ptr(p) {
            StatusPtr::Done => Ok(()),
            StatusPtr::Failed(status) => Err(UcxError::new("sending", status)),
            StatusPtr::Pending(request) => {
                self.ops.insert(
                    request as usize,
                    Op::Send {
                        _header: header,
                        _data: data,
                    },
                );
                Ok(())
            }
        }
    }

    /// Fetch rendezvous data into a buffer of its length. `Ok(Ok(bytes))`: it was there at
    /// once; `Ok(Err(op))`: [`Event::Received`] with `op` follows.
    pub(crate) fn receive(&mut self, rndv: RndvId) -> Result<Result<Bytes, OpId>, UcxError> {
        let Some((desc, len)) = self.rndv.remove(&rndv) else {
            return Err(UcxError {
                what: "receiving",
                status: -3,
                text: "no such rendezvous data".into(),
            });
        };
        let mut buf = self.pool.take(len);
        let mut param =
            request_param(ffi::UCP_OP_ATTR_FIELD_CALLBACK | ffi::UCP_OP_ATTR_FIELD_USER_DATA);
        param.cb = ffi::ucp_request_cb {
            recv_am: on_received,
        };
        param.user_data = self.inbox_ptr();
        // SAFETY: `desc` is a rendezvous descriptor UCP handed to on_am and nobody has used
        // yet (removed from `rndv` above, so used once); `buf` has `len` writable bytes and
        // its heap block stays put until the request completes (kept in `ops`).
        let p = unsafe {
            ffi::ucp_am_recv_data_nbx(
                self.worker,
                desc,
                buf.as_mut_ptr() as *mut c_void,
                len,
                &param,
            )
        };
        match status_ptr(p) {
            StatusPtr::Done => Ok(Ok(self.pool.freeze(buf))),
            StatusPtr::Failed(status) => Err(UcxError::new("receiving", status)),
            StatusPtr::Pending(request) => {
                let id = OpId(self.next_id());
                self.ops.insert(request as usize, Op::Receive { id, buf });
                Ok(Err(id))
            }
        }
    }

    /// Drop rendezvous data without fetching it.
    pub(crate) fn discard(&mut self, rndv: RndvId) {
        if let Some((desc, _)) = self.rndv.remove(&rndv) {
            // SAFETY: an unused descriptor from on_am, released once.
            unsafe { ffi::ucp_am_data_release(self.worker, desc) };
        }
    }

    /// Close an endpoint at once (`UCP_EP_CLOSE_FLAG_FORCE`): its sends in flight fail.
    pub(crate) fn close(&mut self, ep: EpId) {
        let Some(handle) = self.eps.remove(&ep) else {
            return;
        };
        self.ep_ids.remove(&(handle as usize));
        let mut param = request_param(ffi::UCP_OP_ATTR_FIELD_FLAGS);
        param.flags = ffi::UCP_EP_CLOSE_FLAG_FORCE;
        // SAFETY: the endpoint is live and removed from `eps`, so it is closed once.
        let p = unsafe { ffi::ucp_ep_close_nbx(handle, &param) };
        if let StatusPtr::Pending(request) = status_ptr(p) {
            self.ops.insert(request as usize, Op::Close);
        }
    }

    /// What happened since the last call: arrivals in order, finished receives, failed
    /// endpoints. Also retires finished sends and closes.
    pub(crate) fn events(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        let arrivals = std::mem::take(&mut *self.inbox.arrivals.borrow_mut());
        for (header, payload) in arrivals {
            let payload = match payload {
                RawPayload::Eager(bytes) => Payload::Eager(bytes),
                RawPayload::Rndv(desc, len) => {
                    let id = RndvId(self.next_id());
                    self.rndv.insert(id, (desc, len));
                    Payload::Rndv(id, len)
                }
            };
            events.push(Event::Arrival { header, payload });
        }
        let completed = std::mem::take(&mut *self.inbox.completed.borrow_mut());
        for (request, status, length) in completed {
            let Some(op) = self.ops.remove(&request) else {
                continue;
            };
            // SAFETY: the request completed (its callback ran) and is freed once; its buffers
            // are dropped only now.
            unsafe { ffi::ucp_request_free(request as *mut c_void) };
            if let Op::Receive { id, mut buf } = op {
                let result = if status == ffi::UCS_OK {
                    buf.truncate(length);
                    Ok(self.pool.freeze(buf))
                } else {
                    Err(UcxError::new("receiving", status))
                };
                events.push(Event::Received { op: id, result });
            }
        }
        // Closes have no callback: ask.
        let closes: Vec<usize> = self
            .ops
            .iter()
            .filter(|(_, op)| matches!(op, Op::Close))
            .map(|(request, _)| *request)
            .collect();
        for request in closes {
            // SAFETY: a live close request in `ops`.
            let status = unsafe { ffi::ucp_request_check_status(request as *mut c_void) };
            if status != ffi::UCS_INPROGRESS {
                self.ops.remove(&request);
                // SAFETY: complete, freed once.
                unsafe { ffi::ucp_request_free(request as *mut c_void) };
            }
        }
        let failed = std::mem::take(&mut *self.inbox.failed.borrow_mut());
        for (handle, status) in failed {
            if let Some(&ep) = self.ep_ids.get(&handle) {
                events.push(Event::EpFailed {
                    ep,
                    error: UcxError::new("the peer endpoint failed", status),
                });
            }
        }
        events
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.events_fd.take());
        let eps: Vec<EpId> = self.eps.keys().copied().collect();
        for ep in eps {
            self.close(ep);
        }
        let rndv: Vec<RndvId> = self.rndv.keys().copied().collect();
        for id in rndv {
            self.discard(id);
        }
        for (&request, op) in &self.ops {
            if !matches!(op, Op::Close) {
                // SAFETY: a live request of this worker; it completes (cancelled) in progress.
                unsafe { ffi::ucp_request_cancel(self.worker, request as *mut c_void) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.ops.is_empty() && Instant::now() < deadline {
            self.progress();
            drop(self.events());
            // Late arrivals hold rendezvous descriptors: release them too.
            let rndv: Vec<RndvId> = self.rndv.keys().copied().collect();
            for id in rndv {
                self.discard(id);
            }
            if !self.ops.is_empty() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if !self.ops.is_empty() {
            // Some request never finished: UCP may still use its buffers, so leak them, the
            // inbox its callbacks write to, and the worker itself (invariant).
            tracing::warn!(
                requests = self.ops.len(),
                "UCX requests did not finish at shutdown; leaking the worker"
            );
            std::mem::forget(std::mem::take(&mut self.ops));
            std::mem::forget(std::mem::take(&mut self.inbox));
            return;
        }
        // SAFETY: no endpoint, request or descriptor is left; the worker and then its
        // context are destroyed once, on their thread.
        unsafe {
            ffi::ucp_worker_destroy(self.worker);
            ffi::ucp_cleanup(self.context);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ffi::*;
    use std::mem::{offset_of, size_of};
    use std::process::Command;

    /// Compiles a C program against the installed UCX headers that prints the size and the
    /// field offsets of every struct declared here, and compares.
    #[test]
    fn abi_matches_the_system_headers() {
        let dir = std::env::temp_dir().join(format!("pnp-ucx-abi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let source = dir.join("abi.c");
        let mut c = String::from(
            "#include <stdio.h>\n#include <stddef.h>\n#include <ucp/api/ucp.h>\nint main(void){\n",
        );
        let mut want = String::new();
        macro_rules! layout {
            ($c:literal, $rust:ty, [$($cf:literal => $rf:ident),*]) => {
                c.push_str(&format!("printf(\"{} %zu\\n\", sizeof({}));\n", $c, $c));
                want.push_str(&format!("{} {}\n", $c, size_of::<$rust>()));
                $(
                    c.push_str(&format!(
                        "printf(\"{}.{} %zu\\n\", offsetof({}, {}));\n", $c, $cf, $c, $cf));
                    want.push_str(&format!("{}.{} {}\n", $c, $cf, offset_of!($rust, $rf)));
                )*
            };
        }
        layout!("ucs_status_t", ucs_status_t, []);
        layout!("ucp_params_t", ucp_params_t, [
            "features" => features, "request_size" => request_size,
            "tag_sender_mask" => tag_sender_mask, "mt_workers_shared" => mt_workers_shared,
            "estimated_num_eps" => estimated_num_eps, "name" => name]);
        layout!("ucp_worker_params_t", ucp_worker_params_t, [
            "thread_mode" => thread_mode, "cpu_mask" => cpu_mask, "events" => events,
            "user_data" => user_data, "event_fd" => event_fd, "flags" => flags,
            "name" => name, "am_alignment" => am_alignment, "client_id" => client_id]);
        layout!("ucp_ep_params_t", ucp_ep_params_t, [
            "address" => address, "err_mode" => err_mode, "err_handler" => err_handler,
            "user_data" => user_data, "flags" => flags, "sockaddr" => sockaddr,
            "conn_request" => conn_request, "name" => name, "local_sockaddr" => local_sockaddr]);
        layout!("ucp_err_handler_t", ucp_err_handler_t, ["cb" => cb, "arg" => arg]);
        layout!("ucs_sock_addr_t", ucs_sock_addr_t, ["addr" => addr, "addrlen" => addrlen]);
        layout!("ucp_request_param_t", ucp_request_param_t, [
            "flags" => flags, "request" => request, "cb" => cb, "datatype" => datatype,
            "user_data" => user_data, "reply_buffer" => reply_buffer,
            "memory_type" => memory_type, "recv_info" => recv_info, "memh" => memh]);
        layout!("ucp_am_handler_param_t", ucp_am_handler_param_t, [
            "id" => id, "flags" => flags, "cb" => cb, "arg" => arg]);
        layout!("ucp_am_recv_param_t", ucp_am_recv_param_t, [
            "recv_attr" => recv_attr, "reply_ep" => reply_ep]);
        // The constants used, from the headers.
        for (name, value) in [
            ("UCP_FEATURE_AM", UCP_FEATURE_AM),
            ("UCP_FEATURE_WAKEUP", UCP_FEATURE_WAKEUP),
            (
                "UCP_EP_PARAM_FIELD_ERR_HANDLER",
                UCP_EP_PARAM_FIELD_ERR_HANDLER,
            ),
            ("UCP_AM_RECV_ATTR_FLAG_RNDV", UCP_AM_RECV_ATTR_FLAG_RNDV),
            (
                "UCP_AM_HANDLER_PARAM_FIELD_ARG",
                UCP_AM_HANDLER_PARAM_FIELD_ARG,
            ),
        ] {
            c.push_str(&format!(
                "printf(\"{name} %llu\\n\", (unsigned long long){name});\n"
            ));
            want.push_str(&format!("{name} {value}\n"));
        }
        for (name, value) in [
            ("UCP_OP_ATTR_FIELD_CALLBACK", UCP_OP_ATTR_FIELD_CALLBACK),
            ("UCP_OP_ATTR_FIELD_USER_DATA", UCP_OP_ATTR_FIELD_USER_DATA),
            ("UCP_OP_ATTR_FIELD_FLAGS", UCP_OP_ATTR_FIELD_FLAGS),
            ("UCP_EP_CLOSE_FLAG_FORCE", UCP_EP_CLOSE_FLAG_FORCE),
        ] {
            c.push_str(&format!(
                "printf(\"{name} %llu\\n\", (unsigned long long){name});\n"
            ));
            want.push_str(&format!("{name} {value}\n"));
        }
        for (name, value) in [
            ("UCS_ERR_BUSY", i64::from(UCS_ERR_BUSY)),
            (
                "UCP_ERR_HANDLING_MODE_PEER",
                i64::from(UCP_ERR_HANDLING_MODE_PEER),
            ),
            ("UCS_THREAD_MODE_SINGLE", i64::from(UCS_THREAD_MODE_SINGLE)),
            ("UCS_ERR_LAST", UCS_ERR_LAST as i64),
            ("UCP_API_MAJOR", 1),
            ("UCP_API_MINOR", 13),
        ] {
            c.push_str(&format!("printf(\"{name} %lld\\n\", (long long){name});\n"));
            want.push_str(&format!("{name} {value}\n"));
        }
        c.push_str("return 0;}\n");
        std::fs::write(&source, c).expect("write abi.c");
        let binary = dir.join("abi");
        let cflags = Command::new("pkg-config")
            .args(["--cflags", "ucx"])
            .output()
            .expect("pkg-config");
        let mut cc = Command::new("cc");
        cc.arg(&source).arg("-o").arg(&binary);
        for flag in String::from_utf8_lossy(&cflags.stdout).split_whitespace() {
            cc.arg(flag);
        }
        let built = cc.status().expect("run cc");
        assert!(built.success(), "cc failed");
        let out = Command::new(&binary).output().expect("run abi");
        let got = String::from_utf8_lossy(&out.stdout).into_owned();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(got, want);
    }
}

#[cfg(test)]
mod smoke {
    use super::*;

    fn exchange(settings: &[(String, String)], size: usize) {
        let mut a = Worker::new(settings).expect("worker a");
        let mut b = Worker::new(settings).expect("worker b");
        let peer_failure = settings.iter().all(|(_, v)| v != "sm");
        let ep = a
            .connect(&b.address().expect("address"), peer_failure)
            .expect("connect");
        let data = Bytes::from(vec![7u8; size]);
        a.send(ep, b"head", data).expect("send");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = None;
        while got.is_none() && Instant::now() < deadline {
            a.progress();
            b.progress();
            drop(a.events());
            for event in b.events() {
                match event {
                    Event::Arrival { header, payload } => {
                        assert_eq!(header, b"head");
                        match payload {
                            Payload::Eager(bytes) => got = Some(bytes),
                            Payload::Rndv(id, len) => {
                                assert_eq!(len, size);
                                if let Ok(bytes) = b.receive(id).expect("receive") {
                                    got = Some(bytes);
                                }
                            }
                        }
                    }
                    Event::Received { result, .. } => got = Some(result.expect("received")),
                    Event::EpFailed { error, .. } => panic!("{error}"),
                }
            }
        }
        let got = got.expect("the message arrived");
        assert_eq!(got.len(), size);
        assert!(got.iter().all(|&b| b == 7));
    }

    fn settings(tls: &str) -> Vec<(String, String)> {
        let mut s = vec![("TLS".to_owned(), tls.to_owned())];
        if tls == "tcp" {
            s.push(("NET_DEVICES".to_owned(), "lo".to_owned()));
        }
        s
    }

    #[test]
    fn two_workers_exchange_small_and_rendezvous_messages_over_tcp_and_sm() {
        for tls in ["tcp", "sm"] {
            exchange(&settings(tls), 10);
            exchange(&settings(tls), 4 << 20);
        }
    }

    #[test]
    fn a_bad_setting_is_an_error_naming_it() {
        let err = Worker::new(&[("RNDV_THRESH".into(), "lots".into())]).expect_err("bad value");
        assert!(err.text.contains("UCX_RNDV_THRESH=lots"), "{err}");
    }
}
