//! Bounded label values.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

/// The label value used once a label has seen its limit of distinct values.
pub(crate) const OTHER: &str = "other";

/// Hands out label values, at most `limit` distinct ones; later newcomers become `"other"`.
#[derive(Debug)]
pub(crate) struct BoundedValues {
    limit: usize,
    seen: RwLock<HashSet<Arc<str>>>,
}

impl BoundedValues {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            seen: RwLock::new(HashSet::new()),
        }
    }

    /// The label value for `value`.
    pub(crate) fn get(&self, value: &str) -> Arc<str> {
        if let Ok(seen) = self.seen.read() {
            if let Some(known) = seen.get(value) {
                return known.clone();
            }
        }
        let Ok(mut seen) = self.seen.write() else {
            return Arc::from(OTHER);
        };
        if let Some(known) = seen.get(value) {
            return known.clone();
        }
        if seen.len() >= self.limit {
            return Arc::from(OTHER);
        }
        let value: Arc<str> = Arc::from(value);
        seen.insert(value.clone());
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_past_the_limit_collapse() {
        let values = BoundedValues::new(2);
        assert_eq!(&*values.get("a"), "a");
        assert_eq!(&*values.get("b"), "b");
        assert_eq!(&*values.get("c"), OTHER);
        assert_eq!(&*values.get("a"), "a");
    }
}
