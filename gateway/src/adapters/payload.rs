//! Payloads of message-based devices (CoAP, MQTT, TCP, UDP) mapped to reading points (pure).
//!
//! - A JSON object: each point is looked up at its `path` (dotted, array indexes as numbers;
//!   default: the point's name). Points absent from the message are not in the reading; a
//!   value of the wrong type refuses the whole message.
//! - A plain value (`21.5`, `true`, `"text"` or bare text for string points): goes to the
//!   point named by `hint` (an MQTT topic's last level, a CoAP resource's last segment), or
//!   to the device's only point.
//! - A line frame (`key=value key=value`, for TCP and UDP) becomes a JSON object first.
//!
//! Every refusal has a static `kind()` for metrics.

use fieldgate_crds::{Point, ValueType};
use serde_json::{Map, Value as Json};

use crate::reading::{Value, pb};

/// Why a payload was refused.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum PayloadError {
    /// Not UTF-8 text.
    #[error("payload is not UTF-8")]
    NotUtf8,
    /// Looked like JSON but did not parse.
    #[error("malformed JSON: {0}")]
    Json(String),
    /// A line frame token without `=`.
    #[error("malformed line frame near {0:?}")]
    Line(String),
    /// Nothing in the message maps to a point.
    #[error("no point of the device in the message")]
    NoPoints,
    /// A plain value, but no single point it belongs to.
    #[error("a plain value needs a one-point device or a topic/path naming the point")]
    Ambiguous,
    /// A value does not fit its point's type.
    #[error("point {point}: {found} does not fit type {expected:?}")]
    Type {
        /// The point.
        point: String,
        /// Its type.
        expected: ValueType,
        /// What the message carried (shortened).
        found: String,
    },
    /// Larger than allowed.
    #[error("{0} bytes exceed the limit of {1}")]
    TooLarge(usize, usize),
}

impl PayloadError {
    /// A static label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PayloadError::NotUtf8 => "not_utf8",
            PayloadError::Json(_) => "json",
            PayloadError::Line(_) => "line",
            PayloadError::NoPoints => "no_points",
            PayloadError::Ambiguous => "ambiguous",
            PayloadError::Type { .. } => "type",
            PayloadError::TooLarge(..) => "too_large",
        }
    }
}

/// Decodes a message payload (JSON object or plain value) into points.
pub fn decode(points: &[Point], payload: &[u8], hint: Option<&str>) -> Result<Vec<pb::Point>, PayloadError> {
    let text = std::str::from_utf8(payload).map_err(|_| PayloadError::NotUtf8)?;
    let trimmed = text.trim();
    if trimmed.starts_with('{') {
        let value: Json = serde_json::from_str(trimmed).map_err(|e| PayloadError::Json(e.to_string()))?;
        let Json::Object(map) = value else {
            return Err(PayloadError::Json("not an object".into()));
        };
        return from_object(points, &map);
    }
    decode_plain(points, trimmed, hint)
}

/// A plain value for the point `hint` names, or the only point.
pub fn decode_plain(points: &[Point], text: &str, hint: Option<&str>) -> Result<Vec<pb::Point>, PayloadError> {
    let point = match hint.and_then(|h| points.iter().find(|p| p.name == h)) {
        Some(p) => p,
        None if points.len() == 1 => &points[0],
        None => return Err(PayloadError::Ambiguous),
    };
    let json = match serde_json::from_str::<Json>(text) {
        Ok(v @ (Json::Number(_) | Json::Bool(_) | Json::String(_))) => v,
        Ok(_) | Err(_) if point.value_type == ValueType::String => Json::String(text.to_string()),
        Ok(_) => return Err(PayloadError::Json("neither an object nor a plain value".into())),
        Err(_) if text.starts_with(['[', '"']) => return Err(PayloadError::Json(format!("bad value {}", short(text)))),
        Err(_) => return Err(type_error(point, text)),
    };
    Ok(vec![convert(point, &json)?])
}

/// Every point found in a JSON object.
pub fn from_object(points: &[Point], map: &Map<String, Json>) -> Result<Vec<pb::Point>, PayloadError> {
    let mut out = Vec::new();
    for p in points {
        let path = p.path.as_deref().unwrap_or(&p.name);
        if let Some(v) = lookup(map, path) {
            if v.is_null() {
                continue;
            }
            out.push(convert(p, v)?);
        }
    }
    if out.is_empty() {
        return Err(PayloadError::NoPoints);
    }
    Ok(out)
}

fn lookup<'a>(map: &'a Map<String, Json>, path: &str) -> Option<&'a Json> {
    // A key containing dots wins over a nested path.
    if let Some(v) = map.get(path) {
        return Some(v);
    }
    let mut parts = path.split('.');
    let mut cur = map.get(parts.next()?)?;
    for part in parts {
        cur = match cur {
            Json::Object(m) => m.get(part)?,
            Json::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Parses a line frame (`key=value` pairs separated by spaces) into a JSON object. Values
/// are JSON scalars when they parse as one (`21.5`, `true`, `"a b"`), else text.
pub fn parse_line(line: &str) -> Result<Map<String, Json>, PayloadError> {
    let mut map = Map::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            return Err(PayloadError::Line(short(rest)));
        };
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(PayloadError::Line(short(rest)));
        }
        let (raw, next) = if after.starts_with('"') {
            // A quoted JSON string: up to the closing quote not escaped.
            let mut end = None;
            let mut escaped = false;
            for (i, c) in after.char_indices().skip(1) {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = Some(i + 1);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            let end = end.ok_or_else(|| PayloadError::Line(short(after)))?;
            (&after[..end], &after[end..])
        } else {
            match after.find(char::is_whitespace) {
                Some(i) => (&after[..i], &after[i..]),
                None => (after, ""),
            }
        };
        let value = match serde_json::from_str::<Json>(raw) {
            Ok(v @ (Json::Number(_) | Json::Bool(_) | Json::String(_))) => v,
            _ if raw.starts_with('"') => return Err(PayloadError::Line(short(raw))),
            _ => Json::String(raw.to_string()),
        };
        map.insert(key.to_string(), value);
        rest = next.trim_start();
    }
    Ok(map)
}

/// A raw TCP/UDP frame: a JSON object or a line of `key=value` pairs.
pub fn parse_frame(frame: &[u8]) -> Result<Map<String, Json>, PayloadError> {
    let text = std::str::from_utf8(frame).map_err(|_| PayloadError::NotUtf8)?.trim();
    if text.starts_with('{') {
        match serde_json::from_str::<Json>(text) {
            Ok(Json::Object(m)) => Ok(m),
            Ok(_) => Err(PayloadError::Json("not an object".into())),
            Err(e) => Err(PayloadError::Json(e.to_string())),
        }
    } else {
        parse_line(text)
    }
}

/// Takes the credentials (`id`, `token`) out of a frame.
pub fn take_credentials(frame: &mut Map<String, Json>) -> (Option<String>, Option<String>) {
    let text = |v: Json| match v {
        Json::String(s) => Some(s),
        Json::Number(n) => Some(n.to_string()),
        _ => None,
    };
    (frame.remove("id").and_then(text), frame.remove("token").and_then(text))
}

fn short(text: &str) -> String {
    text.chars().take(24).collect()
}

fn type_error(point: &Point, found: &str) -> PayloadError {
    PayloadError::Type { point: point.name.clone(), expected: point.value_type, found: short(found) }
}

/// Converts one JSON value to a point of `point`'s type, scale and offset applied.
pub fn convert(point: &Point, v: &Json) -> Result<pb::Point, PayloadError> {
    let bad = || type_error(point, &v.to_string());
    let value = match point.value_type {
        ValueType::Bool => match v {
            Json::Bool(b) => Value::BoolValue(*b),
            Json::Number(n) if n.as_u64() == Some(0) => Value::BoolValue(false),
            Json::Number(n) if n.as_u64() == Some(1) => Value::BoolValue(true),
            _ => return Err(bad()),
        },
        ValueType::String => match v {
            Json::String(s) => Value::StringValue(s.clone()),
            _ => return Err(bad()),
        },
        t => {
            let Json::Number(n) = v else { return Err(bad()) };
            let value = integer(t, n).ok_or_else(bad)?;
            if point.is_scaled() {
                let x = match value {
                    Value::IntValue(i) => i as f64,
                    Value::UintValue(u) => u as f64,
                    Value::DoubleValue(d) => d,
                    _ => return Err(bad()),
                };
                Value::DoubleValue(x * point.scale.unwrap_or(1.0) + point.offset.unwrap_or(0.0))
            } else {
                value
            }
        }
    };
    Ok(pb::Point { name: point.name.clone(), value: Some(value), unit: point.unit.clone().unwrap_or_default() })
}

/// A number as the value of a numeric type, if it fits (integers: whole and in range).
fn integer(t: ValueType, n: &serde_json::Number) -> Option<Value> {
    let whole = |f: f64| (f.fract() == 0.0 && f.is_finite()).then_some(f);
    let signed = n.as_i64().or_else(|| n.as_f64().and_then(whole).filter(|f| f.abs() < 9.0e15).map(|f| f as i64));
    let unsigned =
        n.as_u64().or_else(|| n.as_f64().and_then(whole).filter(|f| (0.0..9.0e15).contains(f)).map(|f| f as u64));
    Some(match t {
        ValueType::Int16 => Value::IntValue(i64::from(i16::try_from(signed?).ok()?)),
        ValueType::Int32 => Value::IntValue(i64::from(i32::try_from(signed?).ok()?)),
        ValueType::Int64 => Value::IntValue(signed?),
        ValueType::Uint16 => Value::UintValue(u64::from(u16::try_from(unsigned?).ok()?)),
        ValueType::Uint32 => Value::UintValue(u64::from(u32::try_from(unsigned?).ok()?)),
        ValueType::Uint64 => Value::UintValue(unsigned?),
        ValueType::Float32 | ValueType::Float64 => Value::DoubleValue(n.as_f64()?),
        ValueType::Bool | ValueType::String => return None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pt(name: &str, t: ValueType) -> Point {
        serde_json::from_value(serde_json::json!({"name": name, "type": t})).unwrap()
    }

    fn values(points: &[pb::Point]) -> Vec<(String, Option<Value>)> {
        points.iter().map(|p| (p.name.clone(), p.value.clone())).collect()
    }

    #[test]
    fn json_objects_map_points_by_name_and_path() {
        let mut t = pt("temp", ValueType::Float32);
        t.path = Some("env.t".into());
        let points = vec![t, pt("on", ValueType::Bool), pt("count", ValueType::Uint16), pt("label", ValueType::String)];
        let out = decode(&points, br#"{"env":{"t":21.5},"on":1,"count":7,"extra":3}"#, None).unwrap();
        assert_eq!(
            values(&out),
            [
                ("temp".into(), Some(Value::DoubleValue(21.5))),
                ("on".into(), Some(Value::BoolValue(true))),
                ("count".into(), Some(Value::UintValue(7))),
            ]
        );
        let mut arr = pt("second", ValueType::Int16);
        arr.path = Some("v.1".into());
        let out = decode(&[arr], br#"{"v":[1,-2]}"#, None).unwrap();
        assert_eq!(out[0].value, Some(Value::IntValue(-2)));
    }

    #[test]
    fn plain_values_go_to_the_named_or_only_point() {
        let one = vec![pt("temp", ValueType::Float64)];
        assert_eq!(decode(&one, b" 21.5\n", None).unwrap()[0].value, Some(Value::DoubleValue(21.5)));
        let two = vec![pt("temp", ValueType::Float64), pt("on", ValueType::Bool)];
        assert_eq!(decode(&two, b"true", Some("on")).unwrap()[0].value, Some(Value::BoolValue(true)));
        assert_eq!(decode(&two, b"1.5", None).unwrap_err(), PayloadError::Ambiguous);
        let text = vec![pt("label", ValueType::String)];
        assert_eq!(
            decode(&text, b"hello world", None).unwrap()[0].value,
            Some(Value::StringValue("hello world".into()))
        );
    }

    #[test]
    fn malformed_payloads_are_refused_with_their_kind() {
        let one = vec![pt("temp", ValueType::Int16)];
        let kind = |p: &[u8]| decode(&one, p, None).unwrap_err().kind();
        assert_eq!(kind(b"{\"temp\":"), "json");
        assert_eq!(kind(b"[1,2]"), "json");
        assert_eq!(kind(&[0xff, 0xfe]), "not_utf8");
        assert_eq!(kind(b"{\"other\":1}"), "no_points");
        assert_eq!(kind(b"{\"temp\":\"hot\"}"), "type");
        assert_eq!(kind(b"40000"), "type");
        assert_eq!(kind(b"1.5"), "type");
        assert_eq!(kind(b"warm"), "type");
    }

    #[test]
    fn scale_and_offset_apply() {
        let mut p = pt("t", ValueType::Int16);
        p.scale = Some(0.1);
        p.offset = Some(1.0);
        let out = decode(&[p], b"215", None).unwrap();
        let Some(Value::DoubleValue(d)) = out[0].value else { panic!("{out:?}") };
        assert!((d - 22.5).abs() < 1e-9);
    }

    #[test]
    fn line_frames_become_objects() {
        let m = parse_line(r#"id=th-1 token=s3cret temp=21.5 on=true name="a b""#).unwrap();
        assert_eq!(m["id"], "th-1");
        assert_eq!(m["temp"], 21.5);
        assert_eq!(m["on"], true);
        assert_eq!(m["name"], "a b");
        assert_eq!(parse_line("temp 21").unwrap_err().kind(), "line");
        assert_eq!(parse_line("x=\"open").unwrap_err().kind(), "line");
        assert!(parse_line("").unwrap().is_empty());
    }
}
