//! Delivery accounting: did the cloud receive every accepted reading?
//!
//! The gateway stamps each cloud message with `bufferSeq`, the position of the reading in that
//! uplink's buffer. Every accepted reading has one, gap-free from 1 to the gateway's
//! `fieldgate_buffer_last_seq`, except where a gateway started on an empty buffer and the
//! sequence continued further on (it logs where: [`seq_floors`]). So "no accepted reading
//! lost" means every sequence in `1..=last_seq` not skipped that way arrived, and a duplicate
//! is only acceptable as the same reading again (same sequence, same id).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use anyhow::{Result, bail};

use crate::cloud::ReadingKey;

/// What the cloud received compared with what the buffer accepted.
#[derive(Clone, Debug, Default)]
pub struct DeliveryReport {
    /// The buffer stream's last sequence.
    pub last_seq: u64,
    /// Messages received.
    pub received: usize,
    /// Distinct sequences received within `1..=last_seq`.
    pub unique_seqs: usize,
    /// Distinct reading ids received.
    pub unique_ids: usize,
    /// Sequences in `1..=last_seq` that never arrived.
    pub missing: Vec<u64>,
    /// Sequences above `last_seq` (should not exist).
    pub beyond: Vec<u64>,
    /// A sequence that arrived with different ids.
    pub seq_conflicts: Vec<(u64, BTreeSet<String>)>,
    /// An id that arrived with different sequences from one gateway run (the same reading
    /// accepted twice).
    pub id_conflicts: Vec<(String, BTreeSet<u64>)>,
    /// Messages beyond the first of their sequence.
    pub duplicates: usize,
}

/// Where a gateway's log says each run's `bufferSeq` started: `(first bufferSeq, jumped)`,
/// `jumped` when it continued past an empty buffer rather than right after its last entry.
pub fn seq_starts(log: &str) -> Vec<(u64, bool)> {
    const MARK: &str = "bufferSeq continues at ";
    log.match_indices(MARK)
        .filter_map(|(at, _)| {
            let rest = &log[at + MARK.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let jumped = rest.lines().next().is_some_and(|l| l.contains("past any earlier entry"));
            Some((digits.parse().ok()?, jumped))
        })
        .collect()
}

/// Compares received reading keys with the buffer's last sequence. `starts` are where each
/// gateway run's sequence started ([`seq_starts`]): the unreceived sequences just below a jump
/// are not missing, and a poll slot read by two runs (a restart within one poll interval) may
/// be stored by both, under the same id: the cloud drops the second by id.
pub fn delivery_report(keys: &[ReadingKey], last_seq: u64, starts: &[(u64, bool)]) -> DeliveryReport {
    let mut by_seq: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let mut by_id: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for k in keys {
        by_seq.entry(k.buffer_seq).or_default().insert(k.id.clone());
        by_id.entry(k.id.clone()).or_default().insert(k.buffer_seq);
    }
    let skipped = |s: u64| starts.iter().any(|&(f, jumped)| jumped && s < f && by_seq.range(s..f).next().is_none());
    let run = |s: u64| starts.iter().filter(|(f, _)| *f <= s).count();
    let missing = (1..=last_seq).filter(|s| !by_seq.contains_key(s) && !skipped(*s)).collect();
    let beyond = by_seq.keys().copied().filter(|s| *s > last_seq || *s == 0).collect();
    DeliveryReport {
        last_seq,
        received: keys.len(),
        unique_seqs: by_seq.keys().filter(|s| (1..=last_seq).contains(*s)).count(),
        unique_ids: by_id.len(),
        missing,
        beyond,
        seq_conflicts: by_seq.iter().filter(|(_, ids)| ids.len() > 1).map(|(s, i)| (*s, i.clone())).collect(),
        id_conflicts: by_id
            .iter()
            .filter(|(_, s)| s.iter().map(|s| run(*s)).collect::<BTreeSet<_>>().len() < s.len())
            .map(|(i, s)| (i.clone(), s.clone()))
            .collect(),
        duplicates: keys.len().saturating_sub(by_seq.len()),
    }
}

impl DeliveryReport {
    /// Fails unless every accepted reading arrived and duplicates are true duplicates.
    pub fn assert_complete(&self) -> Result<()> {
        self.assert_consistent()?;
        if !self.missing.is_empty() {
            bail!("accepted readings were lost: {self}");
        }
        Ok(())
    }

    /// Fails if a sequence carried two readings, a reading got two sequences, or a sequence
    /// is out of range; missing sequences are allowed (the caller accounts for them).
    pub fn assert_consistent(&self) -> Result<()> {
        if self.last_seq == 0 {
            bail!("the buffer accepted nothing: {self}");
        }
        if !self.beyond.is_empty() || !self.seq_conflicts.is_empty() || !self.id_conflicts.is_empty() {
            bail!("inconsistent deliveries: {self}");
        }
        Ok(())
    }
}

/// `1-5, 9, 12-13` for a sorted list.
pub fn ranges(seqs: &[u64]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < seqs.len() {
        let start = seqs[i];
        let mut end = start;
        while i + 1 < seqs.len() && seqs[i + 1] == end + 1 {
            i += 1;
            end = seqs[i];
        }
        out.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
        if out.len() >= 30 {
            out.push("...".into());
            break;
        }
    }
    out.join(", ")
}

impl fmt::Display for DeliveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "last_seq {}, received {} ({} distinct seqs, {} distinct ids, {} duplicates), missing {} [{}]",
            self.last_seq,
            self.received,
            self.unique_seqs,
            self.unique_ids,
            self.duplicates,
            self.missing.len(),
            ranges(&self.missing)
        )?;
        if !self.beyond.is_empty() {
            write!(f, ", out of range [{}]", ranges(&self.beyond))?;
        }
        for (s, ids) in self.seq_conflicts.iter().take(5) {
            write!(f, "\n  seq {s} carried different readings {ids:?}")?;
        }
        for (id, seqs) in self.id_conflicts.iter().take(5) {
            write!(f, "\n  reading {id} arrived under seqs {seqs:?}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(id: &str, seq: u64) -> ReadingKey {
        ReadingKey { id: id.into(), device: "default/d".into(), buffer_seq: seq }
    }

    #[test]
    fn duplicates_of_the_same_reading_are_fine_and_gaps_are_not() {
        let r = delivery_report(&[k("a", 1), k("b", 2), k("b", 2), k("d", 4)], 4, &[]);
        assert_eq!(r.missing, [3]);
        assert_eq!(r.duplicates, 1);
        r.assert_consistent().unwrap();
        assert!(r.assert_complete().unwrap_err().to_string().contains("missing 1 [3]"));
        let r = delivery_report(&[k("a", 1), k("x", 1), k("a", 2)], 2, &[]);
        assert_eq!(r.seq_conflicts.len(), 1);
        assert_eq!(r.id_conflicts.len(), 1);
        assert!(r.assert_consistent().is_err());
        assert_eq!(ranges(&[1, 2, 3, 5, 7, 8]), "1-3, 5, 7-8");
    }

    #[test]
    fn a_sequence_continued_past_an_empty_buffer_is_not_a_gap() {
        let log = "x INFO bufferSeq continues at 1 after the buffer's last entry\n\
                   x INFO the buffer is empty: bufferSeq continues at 2561, past any earlier entry\n";
        let starts = seq_starts(log);
        assert_eq!(starts, [(1, false), (2561, true)]);
        let keys = [k("a", 1), k("b", 2), k("d", 2561), k("e", 2562)];
        let r = delivery_report(&keys, 2563, &starts);
        assert_eq!(r.missing, [2563]);
        // A gap before the last reading ahead of the jump is still missing.
        let r = delivery_report(&[k("a", 1), k("c", 3), k("d", 2561)], 2561, &starts);
        assert_eq!(r.missing, [2]);
        // The same slot stored by two runs is fine; twice by one run is not.
        let r = delivery_report(&[k("a", 1), k("a", 2561)], 2561, &starts);
        assert!(r.id_conflicts.is_empty(), "{r}");
        let r = delivery_report(&[k("a", 1), k("a", 2)], 2, &starts);
        assert_eq!(r.id_conflicts.len(), 1);
    }
}
