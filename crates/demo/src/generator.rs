//! `demo.llm.v1.Generator`: a token-streaming model stand-in.

use std::time::Duration;

use futures_util::stream::{self, BoxStream, Stream};
use tonic::{Request, Response, Status};

use crate::latency::{latency_plan, LatencyPlan};
use crate::pb::llm::generator_server::Generator;
use crate::pb::llm::{GenerateRequest, GenerateResponse};
use crate::stats::DemoStats;
use crate::tokens::Words;

/// Tokens generated when a request leaves `max_tokens` at 0.
pub const DEFAULT_MAX_TOKENS: u32 = 64;

/// Most tokens one request may ask for.
pub const MAX_TOKENS: u32 = 4096;

/// Longest single wait after `time_scale`, so a huge scale cannot park a stream forever.
const MAX_SCALED_DELAY: Duration = Duration::from_secs(3600);

/// Model class used when a request leaves `model_class` empty.
const DEFAULT_MODEL_CLASS: &str = "llm";

/// `finish_reason` of a stream that produced all the tokens it was asked for.
const FINISH_LENGTH: &str = "length";

/// The `Generator` service: streams words with the latency of a real model.
///
/// Pacing comes from [`latency_plan`] (see `latency.rs` for the model), seeded with the
/// request's seed; `first_token_delay_ms` / `token_interval_ms` replace the drawn delays and
/// `time_scale` multiplies every delay. With `fail_after_tokens = n` the stream ends with
/// UNAVAILABLE "model crashed" at the moment token `n` would have been produced.
#[derive(Clone, Debug)]
pub struct GeneratorImpl {
    /// Counters for every call this service handles.
    pub stats: DemoStats,
    default_model_class: &'static str,
}

impl GeneratorImpl {
    /// A generator that counts its calls in `stats`.
    pub fn new(stats: DemoStats) -> Self {
        Self {
            stats,
            default_model_class: DEFAULT_MODEL_CLASS,
        }
    }
}

#[tonic::async_trait]
impl Generator for GeneratorImpl {
    type GenerateStream = BoxStream<'static, Result<GenerateResponse, Status>>;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        self.stats.record_call();
        let generation = Generation::from_request(request.get_ref(), self.default_model_class)?;
        tracing::debug!(
            tokens = generation.tokens,
            first_token = ?generation.plan.first_token,
            total = ?generation.plan.total(),
            "demo generation started"
        );
        Ok(Response::new(self.stats.track(generation.into_stream())))
    }
}

/// One stream being generated.
struct Generation {
    tokens: u32,
    plan: LatencyPlan,
    words: Words,
    fail_after: Option<u32>,
    next_index: u32,
    ended: bool,
}

impl Generation {
    fn from_request(request: &GenerateRequest, default_class: &str) -> Result<Self, Status> {
        let tokens = match request.max_tokens {
            0 => DEFAULT_MAX_TOKENS,
            n if n > MAX_TOKENS => {
                return Err(Status::invalid_argument(format!(
                    "max_tokens {n} exceeds the limit of {MAX_TOKENS}"
                )))
            }
            n => n,
        };
        let time_scale = request.time_scale;
        let scale = if time_scale == 0.0 {
            1.0
        } else if time_scale.is_finite() && time_scale > 0.0 {
            f64::from(time_scale)
        } else {
            return Err(Status::invalid_argument(format!(
                "time_scale must be a positive number, got {time_scale}"
            )));
        };
        let seed = request.seed.unwrap_or_else(rand::random);
        let class = match request.model_class.as_str() {
            "" => default_class,
            class => class,
        };

        let mut plan = latency_plan(seed, tokens, class);
        if let Some(ms) = request.first_token_delay_ms {
            plan.first_token = Duration::from_millis(ms.into());
        }
        if let Some(ms) = request.token_interval_ms {
            plan.gaps.fill(Duration::from_millis(ms.into()));
        }
        plan.first_token = scaled(plan.first_token, scale);
        for gap in &mut plan.gaps {
            *gap = scaled(*gap, scale);
        }

        Ok(Self {
            tokens,
            plan,
            words: Words::new(seed, &request.prompt),
            fail_after: request.fail_after_tokens,
            next_index: 0,
            ended: false,
        })
    }

    fn into_stream(self) -> impl Stream<Item = Result<GenerateResponse, Status>> + Send + 'static {
        stream::unfold(self, |mut generation| async move {
            let item = generation.next_token().await?;
            Some((item, generation))
        })
    }

    async fn next_token(&mut self) -> Option<Result<GenerateResponse, Status>> {
        let index = self.next_index;
        if self.ended || index >= self.tokens {
            return None;
        }
        let delay = usize::try_from(index).map_or(Duration::ZERO, |i| self.plan.delay_before(i));
        tokio::time::sleep(delay).await;
        if self.fail_after == Some(index) {
            self.ended = true;
            return Some(Err(Status::unavailable("model crashed")));
        }
        self.next_index += 1;
        let done = self.next_index == self.tokens;
        Some(Ok(GenerateResponse {
            text: self.words.next_token(index),
            index,
            done,
            finish_reason: if done { FINISH_LENGTH } else { "" }.to_owned(),
        }))
    }
}

fn scaled(delay: Duration, scale: f64) -> Duration {
    Duration::try_from_secs_f64(delay.as_secs_f64() * scale)
        .map_or(MAX_SCALED_DELAY, |d| d.min(MAX_SCALED_DELAY))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> GenerateRequest {
        GenerateRequest {
            prompt: "hello".to_owned(),
            seed: Some(42),
            ..GenerateRequest::default()
        }
    }

    #[test]
    fn defaults_apply() {
        let generation = Generation::from_request(&request(), "llm").expect("valid request");
        assert_eq!(generation.tokens, DEFAULT_MAX_TOKENS);
        assert_eq!(generation.plan, latency_plan(42, DEFAULT_MAX_TOKENS, "llm"));
    }

    #[test]
    fn overrides_and_scale_apply_to_every_delay() {
        let generation = Generation::from_request(
            &GenerateRequest {
                max_tokens: 3,
                time_scale: 0.5,
                first_token_delay_ms: Some(100),
                token_interval_ms: Some(20),
                ..request()
            },
            "llm",
        )
        .expect("valid request");
        assert_eq!(generation.plan.first_token, Duration::from_millis(50));
        assert_eq!(generation.plan.gaps, vec![Duration::from_millis(10); 2]);
    }

    #[test]
    fn bad_values_are_invalid_arguments() {
        for bad in [
            GenerateRequest {
                max_tokens: MAX_TOKENS + 1,
                ..request()
            },
            GenerateRequest {
                time_scale: -1.0,
                ..request()
            },
            GenerateRequest {
                time_scale: f32::NAN,
                ..request()
            },
        ] {
            let Err(status) = Generation::from_request(&bad, "llm") else {
                panic!("accepted {bad:?}");
            };
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
    }

    #[test]
    fn huge_scale_is_capped_not_a_panic() {
        let generation = Generation::from_request(
            &GenerateRequest {
                time_scale: f32::MAX,
                ..request()
            },
            "llm",
        )
        .expect("valid request");
        assert_eq!(generation.plan.first_token, MAX_SCALED_DELAY);
    }

    #[tokio::test(start_paused = true)]
    async fn stream_follows_the_plan_and_ends_with_done() {
        use futures_util::StreamExt;
        let generation = Generation::from_request(
            &GenerateRequest {
                max_tokens: 4,
                first_token_delay_ms: Some(1000),
                token_interval_ms: Some(100),
                ..request()
            },
            "llm",
        )
        .expect("valid request");
        let start = tokio::time::Instant::now();
        let items: Vec<_> = generation.into_stream().collect().await;
        assert_eq!(start.elapsed(), Duration::from_millis(1300));
        let messages: Vec<GenerateResponse> = items
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("no error");
        assert_eq!(messages.len(), 4);
        assert_eq!(
            messages.iter().map(|m| m.index).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        assert!(messages[..3]
            .iter()
            .all(|m| !m.done && m.finish_reason.is_empty()));
        assert!(messages[3].done);
        assert_eq!(messages[3].finish_reason, "length");
    }
}
