//! Token text for the model stand-in: words from a small built-in vocabulary.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Words the stand-in "generates"; enough variety to look like text in a demo.
const VOCABULARY: &[&str] = &[
    "the",
    "a",
    "model",
    "stream",
    "token",
    "proxy",
    "browser",
    "cluster",
    "gradient",
    "message",
    "latency",
    "tail",
    "first",
    "every",
    "byte",
    "flows",
    "through",
    "quietly",
    "over",
    "under",
    "fast",
    "slow",
    "transport",
    "bridge",
    "edge",
    "service",
    "call",
    "status",
    "deadline",
    "idle",
    "retry",
    "budget",
    "breaker",
    "shed",
    "load",
    "while",
    "because",
    "and",
    "but",
    "then",
    "when",
    "it",
    "they",
    "we",
    "arrives",
    "waits",
    "thinks",
    "answers",
    "returns",
    "carries",
    "chooses",
    "reaches",
    "ends",
    "begins",
    "HTTP/2",
    "QUIC",
    "RDMA",
    "gRPC",
    "web",
    "frame",
    "trailer",
    "header",
    "window",
    "buffer",
    "flush",
    "socket",
    "path",
    "route",
    "profile",
    "job",
    "metric",
    "alert",
    "text",
    "prompt",
    "answer",
    "again",
    "soon",
    "now",
];

/// The words of one stream: a pure function of the seed and the prompt.
pub(crate) struct Words {
    rng: ChaCha8Rng,
}

impl Words {
    pub(crate) fn new(seed: u64, prompt: &str) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed ^ fnv1a(prompt.as_bytes())),
        }
    }

    /// The text of token `index`: a word, with a leading space after the first token.
    pub(crate) fn next_token(&mut self, index: u32) -> String {
        let word = VOCABULARY[self.rng.random_range(0..VOCABULARY.len())];
        if index == 0 {
            word.to_owned()
        } else {
            format!(" {word}")
        }
    }
}

/// FNV-1a: a hash fixed by its definition, so token streams stay the same across Rust
/// releases (std's `DefaultHasher` makes no such promise).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(seed: u64, prompt: &str) -> String {
        let mut words = Words::new(seed, prompt);
        (0..16).map(|i| words.next_token(i)).collect()
    }

    #[test]
    fn same_seed_and_prompt_give_same_text() {
        assert_eq!(text(1, "hello"), text(1, "hello"));
    }

    #[test]
    fn seed_and_prompt_both_change_text() {
        assert_ne!(text(1, "hello"), text(2, "hello"));
        assert_ne!(text(1, "hello"), text(1, "goodbye"));
    }

    #[test]
    fn tokens_after_the_first_start_with_a_space() {
        let mut words = Words::new(9, "x");
        assert!(!words.next_token(0).starts_with(' '));
        assert!(words.next_token(1).starts_with(' '));
    }
}
