//! `encoding: protobufCompact`: a [`Reading`] with the names, kinds and units of its points
//! interned in a per-device [`PointTable`] ([`TableIndex::compact`]), and back
//! ([`Tables::decode`], what a cloud consumer keeps).

use std::collections::HashMap;

use prost::Message;
use sha2::{Digest, Sha256};

use crate::v1::point::Value;
use crate::v1::{CompactReading, Point, PointInfo, PointKind, PointTable, Reading};

/// Why a compact reading cannot be turned back into a reading.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompactError {
    /// No table with this id was seen yet: keep the message until one arrives.
    #[error("point table {0:016x} not known yet")]
    UnknownTable(u64),
    /// A value refers to a table entry that does not exist.
    #[error("value {position} refers to point {index} of a table of {len}")]
    NoSuchPoint {
        /// Position of the value in the message.
        position: usize,
        /// The table index it names.
        index: u32,
        /// Entries in the table.
        len: usize,
    },
    /// A table entry has no usable kind.
    #[error("point {0} of the table has no kind")]
    NoKind(u32),
    /// A values list is shorter than the points of its kind.
    #[error("too few {0} values")]
    TooFew(&'static str),
    /// A values list is longer than the points of its kind.
    #[error("{0} values left over")]
    LeftOver(&'static str),
}

impl CompactError {
    /// A static label (for metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            CompactError::UnknownTable(_) => "unknown_table",
            CompactError::NoSuchPoint { .. } => "no_such_point",
            CompactError::NoKind(_) => "no_kind",
            CompactError::TooFew(_) => "too_few_values",
            CompactError::LeftOver(_) => "values_left_over",
        }
    }
}

/// The id of a table: the first 8 bytes, big-endian, of the SHA-256 of its protobuf encoding.
pub fn table_id(table: &PointTable) -> u64 {
    let digest = Sha256::digest(table.encode_to_vec());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The kind of a value.
pub fn kind_of(v: &Value) -> PointKind {
    match v {
        Value::BoolValue(_) => PointKind::Bool,
        Value::IntValue(_) => PointKind::Int,
        Value::UintValue(_) => PointKind::Uint,
        Value::DoubleValue(_) => PointKind::Double,
        Value::StringValue(_) => PointKind::String,
    }
}

/// A table with its id and a lookup by name: what an encoder compacts readings against.
#[derive(Clone, Debug, Default)]
pub struct TableIndex {
    table: PointTable,
    id: u64,
    by_name: HashMap<String, u32>,
}

impl TableIndex {
    /// Indexes `table` (computing its id once).
    pub fn new(table: PointTable) -> Self {
        let id = table_id(&table);
        let by_name = table
            .points
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), u32::try_from(i).unwrap_or(u32::MAX)))
            .collect();
        Self { table, id, by_name }
    }

    /// The table.
    pub fn table(&self) -> &PointTable {
        &self.table
    }

    /// Its id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether every valued point of `reading` is in the table with the same kind and unit.
    pub fn covers(&self, reading: &Reading) -> bool {
        reading.points.iter().all(|p| match &p.value {
            None => true,
            Some(v) => self.by_name.get(&p.name).is_some_and(|&i| {
                let info = &self.table.points[i as usize];
                info.kind == kind_of(v) as i32 && info.unit == p.unit
            }),
        })
    }

    /// A table that covers `reading`: this one's points, those of the reading whose kind or unit
    /// changed replaced in place, new ones appended in the reading's order.
    pub fn extended(&self, reading: &Reading) -> PointTable {
        let mut table = self.table.clone();
        for p in &reading.points {
            let Some(v) = &p.value else { continue };
            let info = PointInfo { name: p.name.clone(), kind: kind_of(v) as i32, unit: p.unit.clone() };
            match self.by_name.get(&p.name) {
                Some(&i) => table.points[i as usize] = info,
                None => table.points.push(info),
            }
        }
        table
    }

    /// `reading` against this table, which must [cover](Self::covers) it (points it does not
    /// know are left out). Points without a value are not carried. The table itself is not
    /// attached: set `table` on the result to send it.
    pub fn compact(&self, reading: &Reading) -> CompactReading {
        let mut c = CompactReading {
            id: reading.id.clone(),
            namespace: reading.namespace.clone(),
            device: reading.device.clone(),
            node: reading.node.clone(),
            time_unix_nano: reading.time_unix_nano,
            buffer_seq: reading.buffer_seq,
            table_id: self.id,
            ..Default::default()
        };
        let mut in_table_order = true;
        for p in &reading.points {
            let (Some(v), Some(&index)) = (&p.value, self.by_name.get(&p.name)) else { continue };
            in_table_order &= index as usize == c.present.len();
            c.present.push(index);
            match v {
                Value::BoolValue(b) => c.bool_values.push(*b),
                Value::IntValue(i) => c.int_values.push(*i),
                Value::UintValue(u) => c.uint_values.push(*u),
                Value::DoubleValue(d) => c.double_values.push(*d),
                Value::StringValue(s) => c.string_values.push(s.clone()),
            }
        }
        if in_table_order && c.present.len() == self.table.points.len() {
            c.present.clear();
        }
        c
    }
}

/// What a consumer keeps: every point table seen, by id.
#[derive(Clone, Debug, Default)]
pub struct Tables {
    by_id: HashMap<u64, PointTable>,
}

impl Tables {
    /// Remembers the table a message carries, if any.
    pub fn learn(&mut self, msg: &CompactReading) {
        if let Some(t) = &msg.table {
            self.by_id.entry(msg.table_id).or_insert_with(|| t.clone());
        }
    }

    /// Whether the table of `msg` is known (after [`Self::learn`]ing `msg`'s own).
    pub fn knows(&self, msg: &CompactReading) -> bool {
        self.by_id.contains_key(&msg.table_id)
    }

    /// Number of tables kept.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no table is kept.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Learns the table `msg` carries, if any, and expands `msg` into the reading it stands for.
    pub fn decode(&mut self, msg: &CompactReading) -> Result<Reading, CompactError> {
        self.learn(msg);
        let table = self.by_id.get(&msg.table_id).ok_or(CompactError::UnknownTable(msg.table_id))?;
        expand(msg, table)
    }
}

/// `msg` expanded with `table` (the table of its `table_id`).
pub fn expand(msg: &CompactReading, table: &PointTable) -> Result<Reading, CompactError> {
    let len = table.points.len();
    let indexes: Vec<u32> = if msg.present.is_empty() {
        (0..u32::try_from(len).unwrap_or(u32::MAX)).collect()
    } else {
        msg.present.clone()
    };
    let (mut b, mut i, mut u, mut d, mut s) = (
        msg.bool_values.iter(),
        msg.int_values.iter(),
        msg.uint_values.iter(),
        msg.double_values.iter(),
        msg.string_values.iter(),
    );
    let mut points = Vec::with_capacity(indexes.len());
    for (position, index) in indexes.into_iter().enumerate() {
        let info = table.points.get(index as usize).ok_or(CompactError::NoSuchPoint { position, index, len })?;
        let value = match PointKind::try_from(info.kind).unwrap_or(PointKind::Unspecified) {
            PointKind::Bool => Value::BoolValue(*b.next().ok_or(CompactError::TooFew("bool"))?),
            PointKind::Int => Value::IntValue(*i.next().ok_or(CompactError::TooFew("int"))?),
            PointKind::Uint => Value::UintValue(*u.next().ok_or(CompactError::TooFew("uint"))?),
            PointKind::Double => Value::DoubleValue(*d.next().ok_or(CompactError::TooFew("double"))?),
            PointKind::String => Value::StringValue(s.next().ok_or(CompactError::TooFew("string"))?.clone()),
            PointKind::Unspecified => return Err(CompactError::NoKind(index)),
        };
        points.push(Point { name: info.name.clone(), value: Some(value), unit: info.unit.clone() });
    }
    for (left, kind) in
        [(b.len(), "bool"), (i.len(), "int"), (u.len(), "uint"), (d.len(), "double"), (s.len(), "string")]
    {
        if left > 0 {
            return Err(CompactError::LeftOver(kind));
        }
    }
    Ok(Reading {
        id: msg.id.clone(),
        namespace: msg.namespace.clone(),
        device: msg.device.clone(),
        node: msg.node.clone(),
        time_unix_nano: msg.time_unix_nano,
        buffer_seq: msg.buffer_seq,
        points,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn point(name: &str, value: Value, unit: &str) -> Point {
        Point { name: name.into(), value: Some(value), unit: unit.into() }
    }

    fn reading(points: Vec<Point>) -> Reading {
        Reading {
            id: "ns/d/1".into(),
            namespace: "ns".into(),
            device: "d".into(),
            node: "n".into(),
            time_unix_nano: 7,
            buffer_seq: 3,
            points,
        }
    }

    fn full() -> Reading {
        reading(vec![
            point("t", Value::DoubleValue(21.5), "Cel"),
            point("on", Value::BoolValue(true), ""),
            point("r0", Value::UintValue(65535), ""),
            point("neg", Value::IntValue(-3), ""),
            point("tag", Value::StringValue("SIM".into()), ""),
        ])
    }

    #[test]
    fn a_full_reading_round_trips_with_no_indexes() {
        let index = TableIndex::new(TableIndex::default().extended(&full()));
        assert!(index.covers(&full()));
        let mut c = index.compact(&full());
        assert!(c.present.is_empty());
        c.table = Some(index.table().clone());
        let mut tables = Tables::default();
        let bytes = c.encode_to_vec();
        assert_eq!(tables.decode(&CompactReading::decode(bytes.as_slice()).unwrap()).unwrap(), full());
    }

    #[test]
    fn a_subset_lists_its_indexes_and_round_trips() {
        let index = TableIndex::new(TableIndex::default().extended(&full()));
        let subset = reading(vec![full().points[4].clone(), full().points[0].clone()]);
        let c = index.compact(&subset);
        assert_eq!(c.present, [4, 0]);
        assert_eq!(expand(&c, index.table()).unwrap(), subset);
    }

    #[test]
    fn a_message_without_its_table_waits_for_it() {
        let index = TableIndex::new(TableIndex::default().extended(&full()));
        let c = index.compact(&full());
        let mut tables = Tables::default();
        assert_eq!(tables.decode(&c), Err(CompactError::UnknownTable(index.id())));
        let mut with_table = c.clone();
        with_table.table = Some(index.table().clone());
        tables.learn(&with_table);
        assert_eq!(tables.decode(&c).unwrap(), full());
    }

    #[test]
    fn a_changed_kind_or_a_new_point_makes_another_table() {
        let index = TableIndex::new(TableIndex::default().extended(&full()));
        let mut changed = full();
        changed.points[2].value = Some(Value::DoubleValue(0.5));
        assert!(!index.covers(&changed));
        let mut renamed = full();
        renamed.points[0].name = "temperature".into();
        assert!(!index.covers(&renamed));
        let next = TableIndex::new(index.extended(&renamed));
        assert_ne!(next.id(), index.id());
        assert_eq!(next.table().points.len(), 6);
        assert_eq!(expand(&next.compact(&renamed), next.table()).unwrap(), renamed);
    }

    #[test]
    fn table_ids_are_stable_and_depend_on_the_content_only() {
        let a = TableIndex::new(TableIndex::default().extended(&full()));
        let b = TableIndex::new(TableIndex::default().extended(&full()));
        assert_eq!(a.id(), b.id());
        // The first 8 bytes of SHA-256 of the empty string: the id of the empty table.
        assert_eq!(table_id(&PointTable::default()), 0xe3b0_c442_98fc_1c14);
    }

    #[test]
    fn malformed_messages_are_refused_with_the_reason() {
        let index = TableIndex::new(TableIndex::default().extended(&full()));
        let mut c = index.compact(&full());
        c.uint_values.push(1);
        assert_eq!(expand(&c, index.table()), Err(CompactError::LeftOver("uint")));
        let mut c = index.compact(&full());
        c.bool_values.clear();
        assert_eq!(expand(&c, index.table()), Err(CompactError::TooFew("bool")));
        let mut c = index.compact(&full());
        c.present = vec![9];
        assert!(matches!(expand(&c, index.table()), Err(CompactError::NoSuchPoint { index: 9, .. })));
    }
}
