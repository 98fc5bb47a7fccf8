//! A set of `buffer_seq` values kept as disjoint half-open ranges.

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

    /// Removes `start..end`; returns how many values were in the set.
    pub fn remove(&mut self, start: u64, end: u64) -> u64 {
        if start >= end {
            return 0;
        }
        let overlapping: Vec<(u64, u64)> =
            self.ranges.range(..end).rev().take_while(|(_, e)| **e > start).map(|(s, e)| (*s, *e)).collect();
        let mut removed = 0;
        for (s, e) in overlapping {
            self.ranges.remove(&s);
            if s < start {
                self.ranges.insert(s, start);
            }
            if e > end {
                self.ranges.insert(end, e);
            }
            removed += e.min(end) - s.max(start);
        }
        removed
    }

    /// Removes every value below `bound`; returns how many there were.
    pub fn remove_below(&mut self, bound: u64) -> u64 {
        self.remove(0, bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(r: &RangeSet) -> Vec<(u64, u64)> {
        r.ranges.iter().map(|(s, e)| (*s, *e)).collect()
    }

    #[test]
    fn inserts_merge_and_removes_split() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(20, 25);
        assert_eq!(of(&r), vec![(10, 25), (30, 40)]);
        r.insert(5, 35);
        assert_eq!(of(&r), vec![(5, 40)]);
        assert_eq!(r.remove(10, 12), 2);
        assert_eq!(of(&r), vec![(5, 10), (12, 40)]);
        assert_eq!(r.remove(0, 100), 33);
        assert_eq!(of(&r), vec![]);
    }

    #[test]
    fn removing_below_a_bound_counts_what_was_there() {
        let mut r = RangeSet::default();
        r.insert(1, 4);
        r.insert(8, 12);
        assert_eq!(r.remove_below(10), 5);
        assert_eq!(of(&r), vec![(10, 12)]);
        assert_eq!(r.remove(50, 60), 0);
        r.insert(3, 3);
        assert_eq!(of(&r), vec![(10, 12)]);
    }
}
