//! `encoding: protobufCompact`: each reading as a `fieldgate.v1.CompactReading`
//! (`proto/fieldgate/v1/compact.proto`), its points' names, kinds and units interned in a point
//! table per device.
//!
//! A device's table holds every point it reported since the uplink started (a point whose kind
//! or unit changed is replaced in place, a new one appended), so a reading that reports only
//! some points (`report: {onChange: true}`) keeps the table and lists the indexes it carries.
//! A message carries the table itself:
//!
//! - with the first reading of each device on every MQTT session (after each connect, so after
//!   a gateway restart too);
//! - whenever the device's table changes (a point renamed, added, or of another kind: a config
//!   change);
//! - and at least every [`TABLE_EVERY`], so that a consumer that started late, or lost a message,
//!   learns it without waiting for a reconnect.
//!
//! A table's id is derived from its content (`fieldgate_proto::compact::table_id`): the same
//! points give the same id on every gateway and after every restart.

use std::collections::HashMap;
use std::time::Duration;

use fieldgate_proto::compact::TableIndex;
use fieldgate_proto::v1::PointTable;
use prost::Message as _;
use tokio::time::Instant;

use crate::reading::Reading;

/// Longest time a device's readings go without their table.
pub const TABLE_EVERY: Duration = Duration::from_secs(600);

/// The point tables of an uplink's devices, and which ones the current session has sent.
#[derive(Debug, Default)]
pub struct Interner {
    /// By device name (an uplink's devices are all of its namespace).
    devices: HashMap<String, DeviceTable>,
}

#[derive(Debug)]
struct DeviceTable {
    index: TableIndex,
    /// When the table was last sent on the current session (`None`: not yet).
    sent: Option<Instant>,
}

impl Interner {
    /// A new MQTT session: every table is sent again with its device's next reading.
    pub fn new_session(&mut self) {
        for d in self.devices.values_mut() {
            d.sent = None;
        }
    }

    /// The compact protobuf bytes of `reading`, with its device's table when it is due.
    pub fn encode(&mut self, reading: &Reading) -> Vec<u8> {
        let d = match self.devices.get_mut(&reading.device) {
            Some(d) => d,
            None => self
                .devices
                .entry(reading.device.clone())
                .or_insert_with(|| DeviceTable { index: TableIndex::new(PointTable::default()), sent: None }),
        };
        if !d.index.covers(reading) {
            d.index = TableIndex::new(d.index.extended(reading));
            d.sent = None;
        }
        let mut c = d.index.compact(reading);
        let now = Instant::now();
        if d.sent.is_none_or(|at| now.duration_since(at) >= TABLE_EVERY) {
            c.table = Some(d.index.table().clone());
            d.sent = Some(now);
        }
        c.encode_to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::tests::registers;
    use fieldgate_proto::compact::Tables;
    use fieldgate_proto::v1::CompactReading;

    fn decode(bytes: &[u8]) -> CompactReading {
        CompactReading::decode(bytes).unwrap()
    }

    #[test]
    fn the_table_goes_with_the_first_reading_of_each_session_only() {
        let mut i = Interner::default();
        let (a, b) = (registers("m1", 100, 7), registers("m2", 100, 9000));
        let first = decode(&i.encode(&a));
        assert_eq!(first.table.as_ref().map(|t| t.points.len()), Some(100));
        assert!(decode(&i.encode(&b)).table.is_some(), "each device has its table");
        let second = decode(&i.encode(&a));
        assert!(second.table.is_none());
        assert_eq!(second.table_id, first.table_id);
        assert!(second.present.is_empty(), "a full reading in table order lists no indexes");
        i.new_session();
        assert!(decode(&i.encode(&a)).table.is_some(), "a new session sends the table again");

        let mut consumer = Tables::default();
        assert_eq!(consumer.decode(&first).unwrap(), a);
        assert_eq!(consumer.decode(&second).unwrap(), a);
    }

    #[test]
    fn a_renamed_point_sends_a_new_table_at_once() {
        let mut i = Interner::default();
        let a = registers("m1", 4, 1);
        let old = decode(&i.encode(&a));
        let mut renamed = a.clone();
        renamed.points[1].name = "pressure".into();
        let new = decode(&i.encode(&renamed));
        assert_ne!(new.table_id, old.table_id);
        let table = new.table.as_ref().unwrap();
        assert_eq!(table.points.len(), 5, "the old name stays in the table");
        let mut consumer = Tables::default();
        consumer.learn(&old);
        assert_eq!(consumer.decode(&new).unwrap(), renamed);
    }

    #[test]
    fn a_reading_with_some_points_keeps_the_table() {
        let mut i = Interner::default();
        let all = registers("m1", 10, 100);
        let first = decode(&i.encode(&all));
        let mut some = all.clone();
        some.points.retain(|p| p.name == "r3" || p.name == "r7");
        let sub = decode(&i.encode(&some));
        assert_eq!((sub.table_id, sub.present.as_slice(), sub.table.is_none()), (first.table_id, &[3, 7][..], true));
        let mut consumer = Tables::default();
        consumer.learn(&first);
        assert_eq!(consumer.decode(&sub).unwrap(), some);
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_sent_again_after_ten_minutes() {
        let mut i = Interner::default();
        let a = registers("m1", 3, 1);
        assert!(decode(&i.encode(&a)).table.is_some());
        tokio::time::advance(TABLE_EVERY - Duration::from_secs(1)).await;
        assert!(decode(&i.encode(&a)).table.is_none());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(decode(&i.encode(&a)).table.is_some());
    }

    #[test]
    fn a_point_costs_its_value_only() {
        let mut i = Interner::default();
        let r = registers("m1", 100, 9000);
        let _ = i.encode(&r);
        let bytes = i.encode(&r).len();
        // 100 values of 2 varint bytes, and the envelope.
        assert!(bytes < 300, "{bytes} bytes for 100 points");
    }
}
