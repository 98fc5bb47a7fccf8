//! A set of `u64` values kept as disjoint half-open ranges.

use std::collections::BTreeMap;

/// Disjoint half-open ranges `start..end`, merged when they touch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end.
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// Adds `start..end`.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        // Every range that overlaps or touches `start..end` is folded into it.
        let touching: Vec<(u64, u64)> =
            self.ranges.range(..=end).rev().take_while(|(_, e)| **e >= start).map(|(s, e)| (*s, *e)).collect();
        for (s, e) in touching {
            self.ranges.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    /// Whether `value` is in the set.
    pub fn contains(&self, value: u64) -> bool {
        self.ranges.range(..=value).next_back().is_some_and(|(_, end)| value < *end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(r: &RangeSet) -> Vec<(u64, u64)> {
        r.ranges.iter().map(|(s, e)| (*s, *e)).collect()
    }

    #[test]
    fn inserts_merge_and_membership_follows() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(20, 25);
        assert_eq!(of(&r), vec![(10, 25), (30, 40)]);
        assert!(r.contains(10) && r.contains(24) && !r.contains(25) && !r.contains(9) && r.contains(39));
        r.insert(5, 35);
        assert_eq!(of(&r), vec![(5, 40)]);
        r.insert(3, 3);
        assert_eq!(of(&r), vec![(5, 40)]);
        assert!(!r.contains(40) && !r.contains(4));
    }
}
