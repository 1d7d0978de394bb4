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
    /// Longest gap between messages once the first response message arrived.
    pub(crate) idle: Option<Duration>,
    /// Cap on the total deadline.
    pub(crate) max_duration: Option<Duration>,
    /// Retry rules; `None` when the profile allows a single attempt.
    pub(crate) retry: Option<RetryPolicy>,
    /// Retrying after the upstream saw the request is safe.
    pub(crate) idempotent: bool,
    /// May be answered as one buffered reply under overload.
    pub(crate) degradable: bool,
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
        idle: profile.idle_timeout,
        max_duration: profile.max_duration,
        retry,
        idempotent: profile.idempotent,
        degradable: profile.degradable,
    })
}

/// Only reached if the config invariants were broken: the default profile's policies.
fn fallback() -> CallPolicy {
    let profile = Profile::default();
    compile("default", &profile, &FirstMessageTable::default()).unwrap_or(CallPolicy {
        name: "default".to_owned(),
        first_message: None,
        idle: None,
        max_duration: None,
        retry: None,
        idempotent: false,
        degradable: false,
    })
}
