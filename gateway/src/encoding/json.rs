//! `encoding: json` and `encoding: jsonCompact`: the reading envelope as a JSON object, written
//! straight from the protobuf type (no intermediate tree).
//!
//! Both carry the protobuf fields in camelCase (`id`, `namespace`, `device`, `node` when set,
//! `timeUnixNano`, `bufferSeq`); they differ in `points`:
//!
//! - `json` (schema `proto/fieldgate/v1/reading.schema.json`): an array of
//!   `{"name", "value", "unit"?}`, in the device's point order;
//! - `jsonCompact` (schema `proto/fieldgate/v1/compact-reading.schema.json`): one object
//!   `{"name": value, ...}`, in the device's point order, without units.
//!
//! JSON has no NaN or infinity: those become `null`. Integers are written exactly (a consumer
//! in JavaScript loses precision above 2^53).

use fieldgate_proto::v1::point::Value;
use fieldgate_proto::v1::{Point, Reading};
use serde::ser::{SerializeMap, Serializer};
use serde_json::Value as Json;

/// How the points are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// `"points": [{"name": "r12", "value": 13, "unit": "..."}]`.
    Full,
    /// `"points": {"r12": 13}`.
    Compact,
}

/// The JSON bytes of a reading.
pub fn to_vec(r: &Reading, form: Form) -> Result<Vec<u8>, serde_json::Error> {
    // Sized once for the usual cost of a point: no regrowth while writing.
    let per_point = match form {
        Form::Full => 32,
        Form::Compact => 12,
    };
    let mut out = Vec::with_capacity(192 + per_point * r.points.len());
    serde_json::to_writer(&mut out, &JsonReading(r, form))?;
    Ok(out)
}

/// The JSON tree of a reading (tests, tools).
pub fn to_value(r: &Reading, form: Form) -> Json {
    serde_json::to_value(JsonReading(r, form)).unwrap_or(Json::Null)
}

struct JsonReading<'a>(&'a Reading, Form);
struct FullPoints<'a>(&'a [Point]);
struct FullPoint<'a>(&'a Point);
struct CompactPoints<'a>(&'a [Point]);
struct JsonValue<'a>(Option<&'a Value>);

impl serde::Serialize for JsonReading<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &r.id)?;
        m.serialize_entry("namespace", &r.namespace)?;
        m.serialize_entry("device", &r.device)?;
        if !r.node.is_empty() {
            m.serialize_entry("node", &r.node)?;
        }
        m.serialize_entry("timeUnixNano", &r.time_unix_nano)?;
        m.serialize_entry("bufferSeq", &r.buffer_seq)?;
        match self.1 {
            Form::Full => m.serialize_entry("points", &FullPoints(&r.points))?,
            Form::Compact => m.serialize_entry("points", &CompactPoints(&r.points))?,
        }
        m.end()
    }
}

impl serde::Serialize for FullPoints<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(FullPoint))
    }
}

impl serde::Serialize for FullPoint<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let p = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("name", &p.name)?;
        m.serialize_entry("value", &JsonValue(p.value.as_ref()))?;
        if !p.unit.is_empty() {
            m.serialize_entry("unit", &p.unit)?;
        }
        m.end()
    }
}

impl serde::Serialize for CompactPoints<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|p| (&p.name, JsonValue(p.value.as_ref()))))
    }
}

impl serde::Serialize for JsonValue<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(Value::BoolValue(b)) => s.serialize_bool(*b),
            Some(Value::IntValue(i)) => s.serialize_i64(*i),
            Some(Value::UintValue(u)) => s.serialize_u64(*u),
            Some(Value::DoubleValue(d)) if d.is_finite() => s.serialize_f64(*d),
            Some(Value::DoubleValue(_)) | None => s.serialize_unit(),
            Some(Value::StringValue(v)) => s.serialize_str(v),
        }
    }
}

/// What a consumer of `jsonCompact` does to get the `json` form back (units aside, which the
/// compact form does not carry): the points object turned into the array of
/// `{"name", "value"}`, in the order the message lists them (the device's point order).
pub fn compact_to_full(bytes: &[u8]) -> Result<Json, serde_json::Error> {
    let compact: CompactEnvelope = serde_json::from_slice(bytes)?;
    let mut full = compact.rest;
    let points = compact.points.0.into_iter().map(|(name, value)| serde_json::json!({"name": name, "value": value}));
    full.insert("points".into(), Json::Array(points.collect()));
    Ok(Json::Object(full))
}

#[derive(serde::Deserialize)]
struct CompactEnvelope {
    points: OrderedMap,
    #[serde(flatten)]
    rest: serde_json::Map<String, Json>,
}

/// A JSON object's entries in the order they were written.
struct OrderedMap(Vec<(String, Json)>);

impl<'de> serde::Deserialize<'de> for OrderedMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = OrderedMap;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of point values")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<OrderedMap, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(OrderedMap(entries))
            }
        }
        d.deserialize_map(Entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codecs' sample reading and a negative, a text and a NaN value.
    fn sample() -> Reading {
        let mut r = crate::reading::tests::sample();
        r.points.extend([
            Point { name: "neg".into(), value: Some(Value::IntValue(-5)), unit: String::new() },
            Point { name: "label".into(), value: Some(Value::StringValue("SIM".into())), unit: String::new() },
            Point { name: "nan".into(), value: Some(Value::DoubleValue(f64::NAN)), unit: String::new() },
        ]);
        r
    }

    #[test]
    fn json_carries_every_field_and_exact_integers() {
        let j = to_value(&sample(), Form::Full);
        assert_eq!(j["id"], "default/m1/1700000000000");
        assert_eq!(j["timeUnixNano"], 1_700_000_000_000_000_123u64);
        assert_eq!(j["bufferSeq"], 7);
        assert_eq!(j["points"][0]["value"], 21.5);
        assert_eq!(j["points"][0]["unit"], "Cel");
        assert_eq!(j["points"][1]["value"], true);
        assert_eq!(j["points"][2]["value"], u64::MAX);
        assert_eq!(j["points"][5]["value"], Json::Null);
        assert!(j.get("node").is_none());
    }

    #[test]
    fn bytes_match_the_json_tree_in_both_forms() {
        for form in [Form::Full, Form::Compact] {
            let bytes = to_vec(&sample(), form).unwrap();
            let parsed: Json = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(parsed, to_value(&sample(), form));
        }
    }

    #[test]
    fn the_compact_form_keys_points_by_name_in_point_order() {
        let bytes = to_vec(&sample(), Form::Compact).unwrap();
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.ends_with(
                r#""points":{"t":21.5,"on":true,"big":18446744073709551615,"neg":-5,"label":"SIM","nan":null}}"#
            ),
            "{text}"
        );
        let mut full = to_value(&sample(), Form::Full);
        for p in full["points"].as_array_mut().unwrap() {
            p.as_object_mut().unwrap().remove("unit");
        }
        assert_eq!(compact_to_full(text.as_bytes()).unwrap(), full);
    }
}
