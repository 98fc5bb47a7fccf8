//! Checking what a consumer received from a gateway reading simulated devices: JSON points
//! typed by the point map, and a decoded reading checked against the register map.

use anyhow::{Result, anyhow, bail};
use fieldgate_crds::{Point, ValueType};
use serde_json::Value as Json;

use crate::pb;
use crate::pb::point::Value;

/// Converts the JSON points of a reading into typed protobuf points, using each point's
/// declared type: a JSON number must be exactly representable as that type. A point of the
/// reading missing from `schema`, or a value of the wrong JSON kind, is an error.
pub fn typed_points(reading: &Json, schema: &[Point]) -> Result<Vec<pb::Point>> {
    let points = reading["points"].as_array().ok_or_else(|| anyhow!("no points array in {reading}"))?;
    points
        .iter()
        .map(|p| {
            let name = p["name"].as_str().ok_or_else(|| anyhow!("point without a name: {p}"))?;
            let decl = schema
                .iter()
                .find(|d| d.name == name)
                .ok_or_else(|| anyhow!("point {name:?} is not in the device's point map"))?;
            let v = &p["value"];
            let value = match decl.value_type {
                ValueType::Bool => v.as_bool().map(Value::BoolValue),
                ValueType::String => v.as_str().map(|s| Value::StringValue(s.to_string())),
                ValueType::Uint16 | ValueType::Uint32 | ValueType::Uint64 if !decl.is_scaled() => {
                    v.as_u64().map(Value::UintValue)
                }
                ValueType::Int16 | ValueType::Int32 | ValueType::Int64 if !decl.is_scaled() => {
                    v.as_i64().map(Value::IntValue)
                }
                _ => v.as_f64().map(Value::DoubleValue),
            };
            let Some(value) = value else {
                bail!("point {name:?} of type {:?} has value {v}", decl.value_type);
            };
            Ok(pb::Point {
                name: name.to_string(),
                value: Some(value),
                unit: p["unit"].as_str().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// Checks one decoded reading of a simulated device: every point of the map present once, in
/// map order, each value of its declared type and consistent with the others
/// ([`crate::expected_c_consistent`]). Returns the device counter `c`.
pub fn check_sim_reading(points: &[pb::Point], schema: &[Point]) -> Result<u32> {
    let got: Vec<&str> = points.iter().map(|p| p.name.as_str()).collect();
    let want: Vec<&str> = schema.iter().map(|p| p.name.as_str()).collect();
    if got != want {
        bail!("point names {got:?}, want {want:?}");
    }
    for (p, decl) in points.iter().zip(schema) {
        let ok = matches!(
            (&p.value, decl.value_type),
            (Some(Value::BoolValue(_)), ValueType::Bool)
                | (Some(Value::StringValue(_)), ValueType::String)
                | (Some(Value::UintValue(_)), ValueType::Uint16 | ValueType::Uint32 | ValueType::Uint64)
                | (Some(Value::IntValue(_)), ValueType::Int16 | ValueType::Int32 | ValueType::Int64)
                | (Some(Value::DoubleValue(_)), ValueType::Float32 | ValueType::Float64)
        );
        if !ok {
            bail!("point {:?} of type {:?} carries {:?}", p.name, decl.value_type, p.value);
        }
    }
    crate::expected_c_consistent(points).map_err(|e| anyhow!("inconsistent values: {e}"))
}
