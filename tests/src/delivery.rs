//! The judge of the data-path tests: what the devices served against what the cloud received,
//! never what the gateway says about itself.
//!
//! Each simulated device numbers the samples it serves and logs them
//! ([`fieldgate_sim::SimDevice::served`]); each reading carries its sample number as the point
//! `sample`. A sample served and never received is **lost**, with one exception the device
//! side can see for itself: the last sample served on a connection the gateway then closed
//! (a poll that timed out, an adapter stopped or killed mid-poll) was never a reading — it is
//! **abandoned**, at most one per connection, and reported apart. A sample received more than
//! once is a duplicate; a sample received that was never served, or one `bufferSeq` carrying
//! two different samples, is a bug.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use anyhow::{Result, bail};
use fieldgate_sim::Served;

use crate::cloud::ReadingKey;

/// Samples each device (`namespace/name`) served, in order.
pub type ServedLog = BTreeMap<String, Vec<Served>>;

/// What the cloud received against what the devices served.
#[derive(Clone, Debug, Default)]
pub struct DeliveryReport {
    /// Samples served.
    pub served: usize,
    /// Messages the cloud received.
    pub received: usize,
    /// Distinct samples the cloud received.
    pub delivered: usize,
    /// Distinct readings the cloud received without a sample number (a poll whose holding
    /// registers failed while other requests answered): not a sample, still a reading.
    pub unsampled: usize,
    /// Served, never received, not excused: `device -> sample numbers`.
    pub lost: BTreeMap<String, Vec<u32>>,
    /// The last sample of a closed connection, never received (the gateway gave up the poll).
    pub abandoned: BTreeMap<String, Vec<u32>>,
    /// Messages beyond the first of their sample.
    pub duplicates: usize,
    /// Received but never served.
    pub unknown: Vec<(String, u32)>,
    /// A `bufferSeq` that carried two different samples of one uplink.
    pub seq_conflicts: Vec<u64>,
    /// Connections each device served samples on. Each may have ended in a poll cut after
    /// its first requests answered and before its holding registers were read: a reading
    /// without a sample the judge cannot see from the device side (at most one per
    /// connection).
    pub connections: BTreeMap<String, usize>,
}

/// Compares the cloud's readings with the devices' sample logs.
pub fn delivery_report(served: &ServedLog, keys: &[ReadingKey]) -> DeliveryReport {
    let mut got: BTreeMap<(&str, u32), usize> = BTreeMap::new();
    let mut by_seq: BTreeMap<u64, BTreeSet<(&str, u32)>> = BTreeMap::new();
    let mut unsampled: BTreeSet<&str> = BTreeSet::new();
    for k in keys {
        if k.sample.is_none() {
            unsampled.insert(k.id.as_str());
        }
        if let Some(s) = k.sample {
            *got.entry((k.device.as_str(), s)).or_default() += 1;
            by_seq.entry(k.buffer_seq).or_default().insert((k.device.as_str(), s));
        }
    }
    let mut r = DeliveryReport { received: keys.len(), unsampled: unsampled.len(), ..Default::default() };
    let mut known: BTreeSet<(&str, u32)> = BTreeSet::new();
    for (device, samples) in served {
        r.served += samples.len();
        // The last sample of each connection, unless it is the device's last connection's
        // sample still being read: every connection but the newest one is closed.
        let mut last_of: BTreeMap<u64, u32> = BTreeMap::new();
        for s in samples {
            last_of.insert(s.connection, s.sample);
        }
        let last_samples: BTreeSet<u32> = last_of.values().copied().collect();
        r.connections.insert(device.clone(), last_of.len());
        for s in samples {
            known.insert((device.as_str(), s.sample));
            if got.contains_key(&(device.as_str(), s.sample)) {
                continue;
            }
            let into = if last_samples.contains(&s.sample) { &mut r.abandoned } else { &mut r.lost };
            into.entry(device.clone()).or_default().push(s.sample);
        }
    }
    for (&(device, sample), &n) in &got {
        r.delivered += 1;
        r.duplicates += n - 1;
        if !known.contains(&(device, sample)) {
            r.unknown.push((device.to_string(), sample));
        }
    }
    r.seq_conflicts = by_seq.into_iter().filter(|(_, s)| s.len() > 1).map(|(seq, _)| seq).collect();
    r
}

impl DeliveryReport {
    /// Distinct readings the cloud received: samples and unsampled readings.
    pub fn readings(&self) -> usize {
        self.delivered + self.unsampled
    }

    /// Samples lost (not counting abandoned ones).
    pub fn lost_count(&self) -> usize {
        self.lost.values().map(Vec::len).sum()
    }

    /// Samples abandoned.
    pub fn abandoned_count(&self) -> usize {
        self.abandoned.values().map(Vec::len).sum()
    }

    /// Polls the judge cannot see that may still have made a reading: one per connection a
    /// device served samples on ([`DeliveryReport::connections`]).
    pub fn cut_polls_possible(&self) -> usize {
        self.connections.values().sum()
    }

    /// Fails unless every served sample arrived (abandoned polls aside) and nothing arrived
    /// that was not served.
    pub fn assert_complete(&self) -> Result<()> {
        self.assert_consistent()?;
        if self.lost_count() > 0 {
            bail!("served samples were lost: {self}");
        }
        Ok(())
    }

    /// Fails if the cloud got a sample never served, or one `bufferSeq` carried two samples;
    /// lost samples are allowed (the caller accounts for them).
    pub fn assert_consistent(&self) -> Result<()> {
        if self.delivered == 0 {
            bail!("the cloud received no sample: {self}");
        }
        if !self.unknown.is_empty() || !self.seq_conflicts.is_empty() {
            bail!("inconsistent deliveries: {self}");
        }
        Ok(())
    }
}

/// `1-5, 9, 12-13` for a sorted list.
pub fn ranges<T: Copy + Into<u64>>(values: &[T]) -> String {
    let values: Vec<u64> = values.iter().map(|v| (*v).into()).collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < values.len() {
        let start = values[i];
        let mut end = start;
        while i + 1 < values.len() && values[i + 1] == end + 1 {
            i += 1;
            end = values[i];
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
            "served {}, received {} ({} distinct samples, {} duplicates), lost {}, abandoned polls {}",
            self.served,
            self.received,
            self.delivered,
            self.duplicates,
            self.lost_count(),
            self.abandoned_count()
        )?;
        for (device, samples) in self.lost.iter().take(5) {
            write!(f, "\n  lost of {device}: [{}]", ranges(samples))?;
        }
        if !self.unknown.is_empty() {
            write!(f, "\n  never served: {:?}", &self.unknown[..self.unknown.len().min(10)])?;
        }
        if !self.seq_conflicts.is_empty() {
            write!(f, "\n  bufferSeqs carrying two samples: [{}]", ranges(&self.seq_conflicts))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn k(device: &str, sample: u32, seq: u64) -> ReadingKey {
        ReadingKey { id: format!("{device}/{sample}"), device: device.into(), buffer_seq: seq, sample: Some(sample) }
    }

    fn served(samples: &[(u32, u64)]) -> Vec<Served> {
        samples.iter().map(|&(sample, connection)| Served { sample, connection, at: SystemTime::now() }).collect()
    }

    #[test]
    fn lost_abandoned_and_duplicates_come_from_the_devices_and_the_cloud() {
        let mut log = ServedLog::new();
        // Samples 1-4 on connection 1 (4 its last), 5-6 on connection 2.
        log.insert("d".into(), served(&[(1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (6, 2)]));
        let keys = [k("d", 1, 1), k("d", 1, 1), k("d", 3, 2), k("d", 5, 3)];
        let r = delivery_report(&log, &keys);
        assert_eq!(r.lost["d"], [2]);
        assert_eq!(r.abandoned["d"], [4, 6]);
        assert_eq!(r.connections["d"], 2);
        assert_eq!((r.served, r.received, r.delivered, r.duplicates), (6, 4, 3, 1));
        r.assert_consistent().unwrap();
        assert!(r.assert_complete().unwrap_err().to_string().contains("lost of d: [2]"));

        let r = delivery_report(&log, &[k("d", 9, 1), k("d", 1, 1)]);
        assert_eq!(r.unknown, [("d".to_string(), 9)]);
        assert_eq!(r.seq_conflicts, [1]);
        assert!(r.assert_consistent().is_err());
        assert_eq!(ranges(&[1u32, 2, 3, 5, 7, 8]), "1-3, 5, 7-8");
    }
}
