//! Job profiles compiled for the data path: each route's profile turned into the policies a
//! call needs, once at start-up.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pnp_config::{FirstMessage, Jobs, Profile};
use pnp_policy::first_message::FirstMessageTable;
use pnp_policy::retry::{RetryPolicy, RetryPolicyConfig};

/// The policies of one profile, ready for calls.
#[derive(Debug)]
pub(crate) struct CallPolicy {
    /// Profile name (for logs).
    pub(crate) name: String,
    /// Time to first response message; `None` = no clock.
    pub(crate) first_message: Option<Duration>,
    /// The profile set `first_message` itself (else it is the default, which yields to a longer
    /// `grpc-timeout`: see [`CallPolicy::stream_clocks`]).
    pub(crate) first_message_explicit: bool,
    /// Longest gap between messages once the first response message arrived.
    pub(crate) idle: Option<Duration>,
    /// The profile set `idle` itself.
    pub(crate) idle_explicit: bool,
    /// Cap on the total deadline.
    pub(crate) max_duration: Option<Duration>,
    /// Retry rules; `None` when the profile allows a single attempt.
    pub(crate) retry: Option<RetryPolicy>,
    /// Retrying after the upstream saw the request is safe.
    pub(crate) idempotent: bool,
    /// May be answered as one buffered reply under overload.
    pub(crate) degradable: bool,
    /// The profile's message limit, if it sets one (else the global limit).
    pub(crate) max_message_size: Option<usize>,
}

impl CallPolicy {
    /// The first-message and idle clocks of a call whose client asked for `grpc_timeout`.
    ///
    /// A clock the profile left at its default never ends a call before a longer deadline the
    /// client asked for: it is left out, and the deadline covers the call. A clock the profile
    /// set explicitly always runs.
    pub(crate) fn stream_clocks(
        &self,
        grpc_timeout: Option<Duration>,
    ) -> (Option<Duration>, Option<Duration>) {
        (
            yield_to_deadline(
                self.first_message,
                self.first_message_explicit,
                grpc_timeout,
            ),
            yield_to_deadline(self.idle, self.idle_explicit, grpc_timeout),
        )
    }
}

fn yield_to_deadline(
    clock: Option<Duration>,
    explicit: bool,
    grpc_timeout: Option<Duration>,
) -> Option<Duration> {
    match (clock, grpc_timeout) {
        (Some(clock), Some(timeout)) if !explicit && timeout > clock => None,
        _ => clock,
    }
}

/// All profiles and the routes that pick them.
#[derive(Debug)]
pub(crate) struct Profiles {
    jobs: Jobs,
    compiled: HashMap<String, Arc<CallPolicy>>,
}

impl Profiles {
    pub(crate) fn new(jobs: &Jobs) -> Result<Self, String> {
        let table = FirstMessageTable::default();
        let compiled = jobs
            .profiles
            .iter()
            .map(|(name, profile)| {
                compile(name, profile, &table)
                    .map(|policy| (name.clone(), Arc::new(policy)))
                    .map_err(|e| format!("profiles.{name}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            jobs: jobs.clone(),
            compiled,
        })
    }

    /// The policy for a call.
    pub(crate) fn select(
        &self,
        service: Option<&str>,
        method: Option<&str>,
        job: Option<&str>,
    ) -> Arc<CallPolicy> {
        let name = self.jobs.profile_for(service, method, job);
        match self.compiled.get(name) {
            Some(policy) => policy.clone(),
            // Config guarantees every routed profile exists and that the default does.
            None => self
                .compiled
                .get(pnp_config::DEFAULT_PROFILE)
                .or_else(|| self.compiled.values().next())
                .cloned()
                .unwrap_or_else(|| Arc::new(fallback())),
        }
    }
}

fn compile(name: &str, profile: &Profile, table: &FirstMessageTable) -> Result<CallPolicy, String> {
    let first_message = match &profile.first_message {
        FirstMessage::Off => None,
        FirstMessage::After(d) => Some(*d),
        FirstMessage::Class { class, tier } => Some(table.budget(Some(class), Some(tier))),
    };
    let retry = if profile.retry.max_attempts < 2 {
        None
    } else {
        Some(
            RetryPolicy::new(RetryPolicyConfig {
                max_attempts: profile.retry.max_attempts,
                initial_backoff: profile.retry.initial_backoff,
                max_backoff: profile.retry.max_backoff,
                backoff_multiplier: profile.retry.backoff_multiplier,
                retryable_codes: profile.retry.retryable_codes.clone(),
                replay_buffer_limit: profile.retry.replay_buffer,
            })
            .map_err(|e| e.to_string())?,
        )
    };
    Ok(CallPolicy {
        name: name.to_owned(),
        first_message,
        first_message_explicit: profile.first_message_explicit,
        idle: profile.idle_timeout,
        idle_explicit: profile.idle_timeout_explicit,
        max_duration: profile.max_duration,
        retry,
        idempotent: profile.idempotent,
        degradable: profile.degradable,
        max_message_size: profile.max_message_size,
    })
}

/// Only reached if the config invariants were broken: the default profile's policies.
fn fallback() -> CallPolicy {
    let profile = Profile::default();
    compile("default", &profile, &FirstMessageTable::default()).unwrap_or(CallPolicy {
        name: "default".to_owned(),
        first_message: None,
        first_message_explicit: false,
        idle: None,
        idle_explicit: false,
        max_duration: None,
        retry: None,
        idempotent: false,
        degradable: false,
        max_message_size: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn policy(first: Option<Duration>, idle: Option<Duration>, explicit: bool) -> CallPolicy {
        CallPolicy {
            first_message: first,
            first_message_explicit: explicit,
            idle,
            idle_explicit: explicit,
            ..fallback()
        }
    }

    #[test]
    fn default_clocks_yield_to_a_longer_grpc_timeout() {
        let default = policy(Some(secs(30)), Some(secs(30)), false);
        assert_eq!(default.stream_clocks(Some(secs(40))), (None, None));
        // Not longer: the clock fires first or together with the deadline, and stays.
        assert_eq!(
            default.stream_clocks(Some(secs(30))),
            (Some(secs(30)), Some(secs(30)))
        );
        assert_eq!(
            default.stream_clocks(Some(secs(10))),
            (Some(secs(30)), Some(secs(30)))
        );
        // No grpc-timeout: nothing else ends a silent call, so the clocks stay.
        assert_eq!(
            default.stream_clocks(None),
            (Some(secs(30)), Some(secs(30)))
        );
    }

    #[test]
    fn explicit_clocks_apply_whatever_the_grpc_timeout() {
        let explicit = policy(Some(secs(1)), Some(secs(2)), true);
        assert_eq!(
            explicit.stream_clocks(Some(secs(40))),
            (Some(secs(1)), Some(secs(2)))
        );
        assert_eq!(explicit.stream_clocks(None), (Some(secs(1)), Some(secs(2))));
    }

    #[test]
    fn each_clock_follows_its_own_setting() {
        let mixed = CallPolicy {
            first_message_explicit: true,
            ..policy(Some(secs(5)), Some(secs(30)), false)
        };
        assert_eq!(mixed.stream_clocks(Some(secs(60))), (Some(secs(5)), None));
        let off = policy(None, None, false);
        assert_eq!(off.stream_clocks(Some(secs(60))), (None, None));
    }

    #[test]
    fn compiled_profiles_carry_whether_a_clock_was_set() {
        let configured = pnp_config::Config::from_toml(
            "[profiles.default]\nfirst_message_timeout = \"2s\"\n[profiles.chat]\nmodel_class = \"llm\"",
        )
        .expect("parses");
        let profiles = Profiles::new(&configured.jobs).expect("compiles");
        let default = profiles.select(None, None, None);
        assert_eq!(default.stream_clocks(Some(secs(40))), (Some(secs(2)), None));
        let chat = profiles.compiled["chat"].clone();
        assert_eq!(chat.stream_clocks(Some(secs(40))).0, chat.first_message);
        assert!(chat.first_message.is_some());

        let defaults = Profiles::new(&Jobs::default()).expect("compiles");
        let default = defaults.select(None, None, None);
        assert_eq!(default.stream_clocks(Some(secs(40))), (None, None));
        assert_eq!(
            default.stream_clocks(None),
            (Some(secs(30)), Some(secs(30)))
        );
    }
}
