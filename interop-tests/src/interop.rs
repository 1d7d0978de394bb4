//! The requests and expected values of the gRPC interop test cases
//! (grpc/doc/interop-test-descriptions.md), shared by the raw and the tonic clients.

use pnp_demo::pb::grpc_testing::{
    EchoStatus, Payload, PayloadType, ResponseParameters, SimpleRequest, StreamingOutputCallRequest,
};

/// `grpc.testing.TestService/EmptyCall`.
pub const EMPTY_CALL: &str = "/grpc.testing.TestService/EmptyCall";
/// `grpc.testing.TestService/UnaryCall`.
pub const UNARY_CALL: &str = "/grpc.testing.TestService/UnaryCall";
/// `grpc.testing.TestService/StreamingOutputCall`.
pub const STREAMING_OUTPUT_CALL: &str = "/grpc.testing.TestService/StreamingOutputCall";
/// `grpc.testing.TestService/FullDuplexCall`.
pub const FULL_DUPLEX_CALL: &str = "/grpc.testing.TestService/FullDuplexCall";
/// `grpc.testing.TestService/UnimplementedCall`.
pub const UNIMPLEMENTED_CALL: &str = "/grpc.testing.TestService/UnimplementedCall";
/// `grpc.testing.UnimplementedService/UnimplementedCall`.
pub const UNIMPLEMENTED_SERVICE_CALL: &str = "/grpc.testing.UnimplementedService/UnimplementedCall";
/// `demo.llm.v1.Generator/Generate`.
pub const GENERATE: &str = "/demo.llm.v1.Generator/Generate";

/// large_unary: request payload size.
pub const LARGE_REQUEST_SIZE: usize = 271_828;
/// large_unary: response payload size.
pub const LARGE_RESPONSE_SIZE: i32 = 314_159;
/// server_streaming: the response sizes, in order.
pub const STREAMING_RESPONSE_SIZES: [i32; 4] = [31_415, 9, 2_653, 58_979];
/// cancel_after_first_response / timeout_on_sleeping_server: request payload size.
pub const PING_REQUEST_SIZE: usize = 27_182;
/// cancel_after_first_response: size of the first response.
pub const PING_RESPONSE_SIZE: i32 = 31_415;

/// custom_metadata: header echoed back as a response header.
pub const ECHO_INITIAL: &str = "x-grpc-test-echo-initial";
/// custom_metadata: its value.
pub const ECHO_INITIAL_VALUE: &str = "test_initial_metadata_value";
/// custom_metadata: binary header echoed back as a trailer.
pub const ECHO_TRAILING: &str = "x-grpc-test-echo-trailing-bin";
/// custom_metadata: its value.
pub const ECHO_TRAILING_VALUE: [u8; 3] = [0xab, 0xab, 0xab];

/// status_code_and_message: the code (UNKNOWN).
pub const STATUS_CODE: i32 = 2;
/// status_code_and_message: the message.
pub const STATUS_MESSAGE: &str = "test status message";
/// special_status_message: a message that needs percent-encoding (whitespace, BMP and
/// non-BMP characters).
pub const SPECIAL_STATUS_MESSAGE: &str =
    "\t\ntest with whitespace\r\nand Unicode BMP \u{263A} and non-BMP \u{1F608}\t\n";

/// gRPC status codes used here.
pub mod code {
    /// OK.
    pub const OK: i32 = 0;
    /// CANCELLED.
    pub const CANCELLED: i32 = 1;
    /// UNKNOWN.
    pub const UNKNOWN: i32 = 2;
    /// DEADLINE_EXCEEDED.
    pub const DEADLINE_EXCEEDED: i32 = 4;
    /// UNIMPLEMENTED.
    pub const UNIMPLEMENTED: i32 = 12;
    /// UNAVAILABLE.
    pub const UNAVAILABLE: i32 = 14;
}

/// The protobuf encoding of `message`.
pub fn encode<M: prost::Message>(message: &M) -> Vec<u8> {
    message.encode_to_vec()
}

/// Decodes a protobuf message; panics (failing the test) if the bytes are not one.
pub fn decode<M: prost::Message + Default>(bytes: &[u8]) -> M {
    M::decode(bytes).unwrap_or_else(|e| {
        panic!(
            "not a valid {}: {e} ({} bytes)",
            std::any::type_name::<M>(),
            bytes.len()
        )
    })
}

/// A payload of `size` zero bytes.
pub fn zero_payload(size: usize) -> Payload {
    Payload {
        r#type: PayloadType::Compressable.into(),
        body: vec![0; size],
    }
}

/// large_unary (also used by custom_metadata): 271828 bytes in, 314159 out.
pub fn large_unary_request() -> SimpleRequest {
    SimpleRequest {
        response_type: PayloadType::Compressable.into(),
        response_size: LARGE_RESPONSE_SIZE,
        payload: Some(zero_payload(LARGE_REQUEST_SIZE)),
        ..SimpleRequest::default()
    }
}

/// A unary request that asks for the status `code` with `message`.
pub fn status_request(code: i32, message: &str) -> SimpleRequest {
    SimpleRequest {
        response_status: Some(EchoStatus {
            code,
            message: message.to_owned(),
        }),
        ..SimpleRequest::default()
    }
}

/// One response of `size` bytes after `interval_us` microseconds.
pub fn response(size: i32, interval_us: i32) -> ResponseParameters {
    ResponseParameters {
        size,
        interval_us,
        ..ResponseParameters::default()
    }
}

/// A streaming request with `responses` and a `payload_size`-byte payload.
pub fn streaming_request(
    responses: Vec<ResponseParameters>,
    payload_size: usize,
) -> StreamingOutputCallRequest {
    StreamingOutputCallRequest {
        response_type: PayloadType::Compressable.into(),
        response_parameters: responses,
        payload: (payload_size > 0).then(|| zero_payload(payload_size)),
        ..StreamingOutputCallRequest::default()
    }
}

/// server_streaming: four responses of the interop sizes.
pub fn server_streaming_request() -> StreamingOutputCallRequest {
    streaming_request(
        STREAMING_RESPONSE_SIZES
            .iter()
            .map(|&size| response(size, 0))
            .collect(),
        0,
    )
}

/// A full-duplex request that asks for the status `code` with `message`.
pub fn streaming_status_request(code: i32, message: &str) -> StreamingOutputCallRequest {
    StreamingOutputCallRequest {
        response_parameters: vec![response(1, 0)],
        response_status: Some(EchoStatus {
            code,
            message: message.to_owned(),
        }),
        ..StreamingOutputCallRequest::default()
    }
}

/// timeout_on_sleeping_server: the server sleeps a second before its first response, far
/// beyond the 1 ms deadline.
pub fn sleeping_request() -> StreamingOutputCallRequest {
    streaming_request(
        vec![response(PING_RESPONSE_SIZE, 1_000_000)],
        PING_REQUEST_SIZE,
    )
}

/// cancel_after_first_response: one response at once, then a long sleep, so the call is still
/// running upstream when the client cancels.
pub fn ping_then_sleep_request() -> StreamingOutputCallRequest {
    streaming_request(
        vec![response(PING_RESPONSE_SIZE, 0), response(9, 10_000_000)],
        PING_REQUEST_SIZE,
    )
}

/// The size of the payload in a response message, asserting it is all zero bytes.
pub fn zero_payload_len(payload: Option<&Payload>) -> usize {
    let Some(payload) = payload else {
        return 0;
    };
    assert!(
        payload.body.iter().all(|&b| b == 0),
        "payload of {} bytes is not all zero",
        payload.body.len()
    );
    payload.body.len()
}
