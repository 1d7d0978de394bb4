//! `grpc.testing.TestService` with the semantics the gRPC interop test clients expect.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::stream::{self, BoxStream, Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::echo_metadata::EchoMetadata;
use crate::pb::grpc_testing::test_service_server::{TestService, TestServiceServer};
use crate::pb::grpc_testing::{
    EchoStatus, Empty, Payload, PayloadType, ResponseParameters, SimpleRequest, SimpleResponse,
    StreamingInputCallRequest, StreamingInputCallResponse, StreamingOutputCallRequest,
    StreamingOutputCallResponse,
};
use crate::stats::DemoStats;

/// Largest payload a client may ask for in one response. The size comes from the request,
/// so it is checked before allocating; large enough for the training-sized message tests.
pub const MAX_PAYLOAD_BYTES: usize = 512 * 1024 * 1024;

/// Value of `server_id` when a request sets `fill_server_id`.
pub const SERVER_ID: &str = "pnp-demo";

/// The interop `TestService`.
///
/// * `EmptyCall` answers `Empty`; `UnaryCall` and `CacheableUnaryCall` answer a payload of
///   `response_size` zero bytes, or the `response_status` when its code is not 0.
/// * `StreamingOutputCall` sends one response per `ResponseParameters`, sleeping
///   `interval_us` before each, then ends with `response_status` if set.
/// * `StreamingInputCall` answers the sum of the payload sizes it received.
/// * `FullDuplexCall` answers each request as it arrives, as `StreamingOutputCall` does; a
///   request with a `response_status` ends the call with that status.
/// * `HalfDuplexCall` reads every request first, then answers them in order.
/// * `UnimplementedCall` answers UNIMPLEMENTED.
///
/// Metadata echo (`x-grpc-test-echo-initial`, `x-grpc-test-echo-trailing-bin`) happens at the
/// HTTP level, so serve it through [`TestServiceImpl::into_service`]. Not implemented:
/// `response_compressed` / `expect_compressed` (tonic hides the per-message compressed
/// flag) and `fill_username` / `fill_oauth_scope` (the demo has no authentication).
#[derive(Clone, Debug, Default)]
pub struct TestServiceImpl {
    /// Counters for every call this service handles.
    pub stats: DemoStats,
}

impl TestServiceImpl {
    /// A service that counts its calls in `stats`.
    pub fn new(stats: DemoStats) -> Self {
        Self { stats }
    }

    /// The generated server for this service, wrapped so that it echoes metadata; ready for
    /// `tonic::transport::Server::add_service`.
    pub fn into_service(self) -> EchoMetadata<TestServiceServer<Self>> {
        EchoMetadata::new(TestServiceServer::new(self))
    }
}

#[tonic::async_trait]
impl TestService for TestServiceImpl {
    async fn empty_call(&self, _request: Request<Empty>) -> Result<Response<Empty>, Status> {
        self.stats.record_call();
        Ok(Response::new(Empty {}))
    }

    async fn unary_call(
        &self,
        request: Request<SimpleRequest>,
    ) -> Result<Response<SimpleResponse>, Status> {
        self.stats.record_call();
        simple_response(request.get_ref()).map(Response::new)
    }

    async fn cacheable_unary_call(
        &self,
        request: Request<SimpleRequest>,
    ) -> Result<Response<SimpleResponse>, Status> {
        self.stats.record_call();
        simple_response(request.get_ref()).map(Response::new)
    }

    type StreamingOutputCallStream =
        BoxStream<'static, Result<StreamingOutputCallResponse, Status>>;

    async fn streaming_output_call(
        &self,
        request: Request<StreamingOutputCallRequest>,
    ) -> Result<Response<Self::StreamingOutputCallStream>, Status> {
        self.stats.record_call();
        let request = request.into_inner();
        check_sizes(&request.response_parameters)?;
        let ending = stream::iter(echo_status(request.response_status.as_ref()).map(Err));
        let responses = respond_to(request.response_parameters).chain(ending);
        Ok(Response::new(self.stats.track(responses)))
    }

    async fn streaming_input_call(
        &self,
        request: Request<Streaming<StreamingInputCallRequest>>,
    ) -> Result<Response<StreamingInputCallResponse>, Status> {
        self.stats.record_call();
        let mut requests = request.into_inner();
        let mut total: usize = 0;
        while let Some(message) = requests.message().await? {
            let size = message.payload.map_or(0, |p| p.body.len());
            total = total.saturating_add(size);
        }
        let aggregated_payload_size = i32::try_from(total)
            .map_err(|_| Status::out_of_range("aggregated payload size does not fit an int32"))?;
        Ok(Response::new(StreamingInputCallResponse {
            aggregated_payload_size,
        }))
    }

    type FullDuplexCallStream = BoxStream<'static, Result<StreamingOutputCallResponse, Status>>;

    async fn full_duplex_call(
        &self,
        request: Request<Streaming<StreamingOutputCallRequest>>,
    ) -> Result<Response<Self::FullDuplexCallStream>, Status> {
        self.stats.record_call();
        let duplex = Duplex {
            requests: request.into_inner(),
            pending: VecDeque::new(),
            ended: false,
        };
        Ok(Response::new(self.stats.track(duplex.into_stream())))
    }

    type HalfDuplexCallStream = BoxStream<'static, Result<StreamingOutputCallResponse, Status>>;

    async fn half_duplex_call(
        &self,
        request: Request<Streaming<StreamingOutputCallRequest>>,
    ) -> Result<Response<Self::HalfDuplexCallStream>, Status> {
        self.stats.record_call();
        let mut requests = request.into_inner();
        let all_read = async move {
            let mut parameters = Vec::new();
            while let Some(message) = requests.message().await? {
                if let Some(status) = echo_status(message.response_status.as_ref()) {
                    return Err(status);
                }
                check_sizes(&message.response_parameters)?;
                parameters.extend(message.response_parameters);
            }
            Ok(parameters)
        };
        let responses = stream::once(all_read).flat_map(|read| match read {
            Ok(parameters) => respond_to(parameters).left_stream(),
            Err(status) => stream::iter([Err(status)]).right_stream(),
        });
        Ok(Response::new(self.stats.track(responses)))
    }

    async fn unimplemented_call(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Empty>, Status> {
        self.stats.record_call();
        Err(Status::unimplemented(
            "grpc.testing.TestService/UnimplementedCall is not implemented",
        ))
    }
}

/// The reply of `UnaryCall`: the requested status, or a payload of the requested size.
fn simple_response(request: &SimpleRequest) -> Result<SimpleResponse, Status> {
    if let Some(status) = echo_status(request.response_status.as_ref()) {
        return Err(status);
    }
    Ok(SimpleResponse {
        payload: Some(zero_payload(request.response_size)?),
        server_id: if request.fill_server_id {
            SERVER_ID.to_owned()
        } else {
            String::new()
        },
        ..SimpleResponse::default()
    })
}

/// The status a client asked for, unless it asked for OK (code 0) or nothing.
fn echo_status(requested: Option<&EchoStatus>) -> Option<Status> {
    let requested = requested?;
    (requested.code != 0).then(|| Status::new(Code::from_i32(requested.code), &requested.message))
}

fn payload_len(size: i32) -> Result<usize, Status> {
    let len = usize::try_from(size)
        .map_err(|_| Status::invalid_argument(format!("negative payload size {size}")))?;
    if len > MAX_PAYLOAD_BYTES {
        return Err(Status::invalid_argument(format!(
            "payload size {len} exceeds the demo limit of {MAX_PAYLOAD_BYTES} bytes"
        )));
    }
    Ok(len)
}

fn check_sizes(parameters: &[ResponseParameters]) -> Result<(), Status> {
    parameters
        .iter()
        .try_for_each(|p| payload_len(p.size).map(drop))
}

fn zero_payload(size: i32) -> Result<Payload, Status> {
    Ok(Payload {
        r#type: PayloadType::Compressable.into(),
        body: vec![0; payload_len(size)?],
    })
}

/// Sleeps `interval_us` (negative means none), then answers with a payload of `size`.
async fn respond(parameters: ResponseParameters) -> Result<StreamingOutputCallResponse, Status> {
    let micros = u64::try_from(parameters.interval_us).unwrap_or(0);
    if micros > 0 {
        tokio::time::sleep(Duration::from_micros(micros)).await;
    }
    Ok(StreamingOutputCallResponse {
        payload: Some(zero_payload(parameters.size)?),
    })
}

fn respond_to(
    parameters: Vec<ResponseParameters>,
) -> impl Stream<Item = Result<StreamingOutputCallResponse, Status>> + Send + 'static {
    stream::iter(parameters).then(respond)
}

/// `FullDuplexCall`: answers each request's parameters before reading the next request.
struct Duplex {
    requests: Streaming<StreamingOutputCallRequest>,
    pending: VecDeque<ResponseParameters>,
    ended: bool,
}

impl Duplex {
    fn into_stream(
        self,
    ) -> impl Stream<Item = Result<StreamingOutputCallResponse, Status>> + Send + 'static {
        stream::unfold(self, |mut duplex| async move {
            let item = duplex.next_response().await?;
            duplex.ended |= item.is_err();
            Some((item, duplex))
        })
    }

    async fn next_response(&mut self) -> Option<Result<StreamingOutputCallResponse, Status>> {
        loop {
            if self.ended {
                return None;
            }
            if let Some(parameters) = self.pending.pop_front() {
                return Some(respond(parameters).await);
            }
            match self.requests.message().await {
                Ok(Some(request)) => {
                    if let Some(status) = echo_status(request.response_status.as_ref()) {
                        return Some(Err(status));
                    }
                    if let Err(status) = check_sizes(&request.response_parameters) {
                        return Some(Err(status));
                    }
                    self.pending.extend(request.response_parameters);
                }
                Ok(None) => return None,
                Err(status) => return Some(Err(status)),
            }
        }
    }
}
