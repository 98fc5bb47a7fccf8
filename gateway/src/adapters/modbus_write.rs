//! Modbus commands, for both Modbus adapters: a value encoded like the poller decodes it,
//! written on the device's own connection (TCP: the poller's; RTU: the bus scheduler, writes
//! before queued reads), then read back and compared.
//!
//! A job whose earlier attempt was interrupted (`resume`) is read back first: if the value is
//! already there it is `verified` without writing again, so a command interrupted between the
//! write and the record is written once.

use std::borrow::Cow;

use fieldgate_crds::{ModbusTable, Point, ValueType, WordOrder};
use serde_json::Value as Json;
use tokio_modbus::{Request, Response};

use crate::command::{Job, Outcome, Reason, Status};
use crate::telemetry;
use opentelemetry::trace::SpanKind;

/// One Modbus request at a time on the device's connection.
pub(crate) trait Caller {
    /// Sends `req` and waits for its answer (bounded by the connection's timeout).
    async fn call(&mut self, req: Request<'static>) -> Result<Response, (Reason, String)>;
}

/// Executes `job` on `point` through `caller`.
pub(crate) async fn execute(caller: &mut impl Caller, point: &Point, job: &Job) -> Outcome {
    if job.expired() {
        return Outcome::of(Status::Expired);
    }
    if job.late() {
        return Outcome::failed(Reason::Timeout, "waited past its deadline in the device's queue");
    }
    let address = point.modbus.as_ref().map_or(0, |m| m.address);
    let w = match encode(point, &job.value.to_json()) {
        Ok(w) => w,
        Err((reason, detail)) => return Outcome::refused(reason, detail),
    };
    if job.resume
        && let Ok(r) = caller.call(read_back_request(address, &w)).await
        && matches_read_back(&w, &r).is_ok()
    {
        return Outcome::of(Status::Verified);
    }
    let mut write = telemetry::child_of(job.trace, "fieldgate.device.write", SpanKind::Client);
    if let Err((reason, e)) = caller.call(write_request(address, &w)).await {
        write.fail(reason.label());
        return Outcome::failed(reason, format!("write: {e}"));
    }
    write.ok();
    write.end();
    let mut readback = telemetry::child_of(job.trace, "fieldgate.device.readback", SpanKind::Client);
    let outcome = match caller.call(read_back_request(address, &w)).await {
        Ok(r) => match matches_read_back(&w, &r) {
            Ok(()) => Outcome::of(Status::Verified),
            Err(e) => Outcome::failed(Reason::ReadBackMismatch, e),
        },
        Err((reason, e)) => Outcome::failed(reason, format!("read back: {e}")),
    };
    match outcome.reason {
        None => readback.ok(),
        Some(r) => readback.fail(r.label()),
    }
    readback.end();
    outcome
}

/// What a Modbus write puts on the wire.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// One coil.
    Coil(bool),
    /// Registers from the point's address.
    Registers(Vec<u16>),
}

/// Encodes `value` for a writable Modbus point (scale and offset reversed).
pub fn encode(point: &Point, value: &Json) -> Result<Write, (Reason, String)> {
    let Some(m) = &point.modbus else { return Err((Reason::NotWritable, "the point has no Modbus location".into())) };
    if !m.table.is_writable() {
        return Err((Reason::NotWritable, format!("the {:?} table is read-only", m.table)));
    }
    let bad = || (Reason::BadValue, format!("{value} does not fit type {:?}", point.value_type));
    match point.value_type {
        ValueType::Bool => {
            let b = match value {
                Json::Bool(b) => *b,
                Json::Number(n) if n.as_u64() == Some(0) => false,
                Json::Number(n) if n.as_u64() == Some(1) => true,
                _ => return Err(bad()),
            };
            match (m.table, m.bit) {
                (ModbusTable::Coil, _) => Ok(Write::Coil(b)),
                (_, Some(_)) => Err((Reason::NotWritable, "a bit of a register cannot be written alone".into())),
                _ => Ok(Write::Registers(vec![u16::from(b)])),
            }
        }
        ValueType::String => {
            let s = value.as_str().ok_or_else(bad)?;
            let len = usize::from(m.length.unwrap_or(0)) * 2;
            if s.len() > len || !s.is_ascii() {
                return Err((Reason::BadValue, format!("text longer than {len} ASCII characters")));
            }
            let mut bytes = s.as_bytes().to_vec();
            bytes.resize(len, 0);
            Ok(Write::Registers(bytes.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()))
        }
        t => {
            let x = value.as_f64().ok_or_else(bad)?;
            let raw = (x - point.offset.unwrap_or(0.0)) / point.scale.unwrap_or(1.0);
            let int = |lo: f64, hi: f64| -> Result<i128, (Reason, String)> {
                let r = raw.round();
                if !(lo..=hi).contains(&r) || (raw - r).abs() > 1e-6 * raw.abs().max(1.0) && !point.is_scaled() {
                    return Err(bad());
                }
                Ok(r as i128)
            };
            let bits: u64 = match t {
                ValueType::Int16 => int(i16::MIN.into(), i16::MAX.into())? as i16 as u16 as u64,
                ValueType::Uint16 => int(0.0, u16::MAX.into())? as u64,
                ValueType::Int32 => int(i32::MIN.into(), i32::MAX.into())? as i32 as u32 as u64,
                ValueType::Uint32 => int(0.0, u32::MAX.into())? as u64,
                ValueType::Int64 => int(i64::MIN as f64, i64::MAX as f64)? as i64 as u64,
                ValueType::Uint64 => int(0.0, u64::MAX as f64)? as u64,
                ValueType::Float32 => u64::from((raw as f32).to_bits()),
                ValueType::Float64 => raw.to_bits(),
                ValueType::Bool | ValueType::String => return Err(bad()),
            };
            let n = usize::from(t.registers().unwrap_or(1));
            let mut words: Vec<u16> = (0..n).rev().map(|i| (bits >> (16 * i)) as u16).collect();
            if m.word_order == Some(WordOrder::LittleEndian) {
                words.reverse();
            }
            Ok(Write::Registers(words))
        }
    }
}

fn write_request(address: u16, w: &Write) -> Request<'static> {
    match w {
        Write::Coil(b) => Request::WriteSingleCoil(address, *b),
        Write::Registers(words) if words.len() == 1 => Request::WriteSingleRegister(address, words[0]),
        Write::Registers(words) => Request::WriteMultipleRegisters(address, Cow::Owned(words.clone())),
    }
}

fn read_back_request(address: u16, w: &Write) -> Request<'static> {
    match w {
        Write::Coil(_) => Request::ReadCoils(address, 1),
        Write::Registers(words) => {
            Request::ReadHoldingRegisters(address, u16::try_from(words.len()).unwrap_or(u16::MAX))
        }
    }
}

fn matches_read_back(w: &Write, r: &Response) -> Result<(), String> {
    match (w, r) {
        (Write::Coil(b), Response::ReadCoils(bits)) if bits.first() == Some(b) => Ok(()),
        (Write::Registers(words), Response::ReadHoldingRegisters(got)) if got == words => Ok(()),
        (_, other) => Err(format!("read back {other:?} instead of what was written")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::reading;
    use serde_json::json;

    fn point(t: &str, table: &str, extra: Json) -> Point {
        let mut p = json!({"name": "p", "type": t, "access": "readWrite", "modbus": {"table": table, "address": 4}});
        if let (Json::Object(o), Json::Object(e)) = (&mut p, extra) {
            o.extend(e);
        }
        serde_json::from_value(p).unwrap()
    }

    #[test]
    fn values_are_encoded_like_they_are_decoded() {
        assert_eq!(encode(&point("uint16", "holding", json!({})), &json!(1234)), Ok(Write::Registers(vec![1234])));
        assert_eq!(encode(&point("int16", "holding", json!({})), &json!(-2)), Ok(Write::Registers(vec![0xfffe])));
        assert_eq!(
            encode(&point("uint32", "holding", json!({})), &json!(0x1234_5678)),
            Ok(Write::Registers(vec![0x1234, 0x5678]))
        );
        let le = point(
            "uint32",
            "holding",
            json!({"modbus": {"table": "holding", "address": 4, "wordOrder": "littleEndian"}}),
        );
        assert_eq!(encode(&le, &json!(0x1234_5678)), Ok(Write::Registers(vec![0x5678, 0x1234])));
        assert_eq!(encode(&point("float32", "holding", json!({})), &json!(1.5)), Ok(Write::Registers(vec![0x3fc0, 0])));
        assert_eq!(
            encode(&point("int16", "holding", json!({"scale": 0.1})), &json!(21.5)),
            Ok(Write::Registers(vec![215]))
        );
        assert_eq!(encode(&point("bool", "coil", json!({})), &json!(true)), Ok(Write::Coil(true)));
        assert!(encode(&point("uint16", "holding", json!({})), &json!(70000)).is_err());
        assert!(encode(&point("uint16", "holding", json!({})), &json!(1.5)).is_err());
        assert!(encode(&point("uint16", "input", json!({})), &json!(1)).is_err());
        // And back: the reference decoder reads what was written.
        let p = point("int32", "holding", json!({}));
        let Ok(Write::Registers(words)) = encode(&p, &json!(-70000)) else { panic!() };
        let back =
            crate::adapters::modbus_tcp::decode(&p, crate::adapters::modbus_tcp::Raw::Registers(&words)).unwrap();
        assert_eq!(back.value, Some(reading::Value::IntValue(-70000)));
    }
}
