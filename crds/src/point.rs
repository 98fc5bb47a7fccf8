//! A point: one named value of a device, and how to read it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::values::HumanDuration;

/// One named value of a device (a register, a coil, a field of a message).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Point {
    /// Name of the point, unique within its device; it names the value in every reading.
    pub name: String,
    /// Type of the raw value on the wire.
    #[serde(rename = "type")]
    pub value_type: ValueType,
    /// Whether commands may write the point. Defaults to `read`.
    #[serde(default, skip_serializing_if = "Access::is_read")]
    pub access: Access,
    /// Unit of the reported value (UCUM code such as `Cel`, `kW.h`, `%`), carried to the cloud.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Factor applied to numeric values: `value = raw * scale + offset`. Defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// Added to numeric values after `scale`. Defaults to 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<f64>,
    /// Where the point lives on a Modbus device. Required for Modbus connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modbus: Option<ModbusPoint>,
    /// Where the value is in a JSON message (CoAP, MQTT, TCP, UDP): a dotted path such as
    /// `env.temp` or `values.0`. Defaults to the point's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// When a new value is reported. Without it every value read is reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ReportRule>,
}

/// Reporting rule of a point: which values read are sent on.
///
/// A value is reported when it is the first, when `onChange` is set and it moved by more than
/// `deadband` from the last reported value (any change for non-numbers), or when `maxInterval`
/// passed since the last report. `sampling` keeps at most one value per period.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReportRule {
    /// Report only values that changed. Defaults to false (every value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_change: Option<bool>,
    /// Smallest change of a number that counts as a change (absolute, after scale and
    /// offset). Defaults to 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadband: Option<f64>,
    /// Longest time without a report, such as `60s`: the value is reported then even if
    /// unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<HumanDuration>,
    /// Shortest time between two reports, such as `5s`: values in between are skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<HumanDuration>,
}

impl Point {
    /// A read-only point at `address` of a Modbus `table`, unscaled, big-endian.
    pub fn modbus(name: &str, value_type: ValueType, table: ModbusTable, address: u16) -> Self {
        Self {
            name: name.to_string(),
            value_type,
            access: Access::Read,
            unit: None,
            scale: None,
            offset: None,
            modbus: Some(ModbusPoint { table, address, word_order: None, length: None, bit: None }),
            path: None,
            report: None,
        }
    }

    /// Whether `scale` or `offset` change the raw value.
    pub fn is_scaled(&self) -> bool {
        self.scale.is_some_and(|s| s != 1.0) || self.offset.is_some_and(|o| o != 0.0)
    }
}

/// Type of a point's raw value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ValueType {
    /// A single bit: a coil, a discrete input, or a bit of a register.
    Bool,
    /// Signed 16-bit integer (one register).
    Int16,
    /// Unsigned 16-bit integer (one register).
    Uint16,
    /// Signed 32-bit integer (two registers).
    Int32,
    /// Unsigned 32-bit integer (two registers).
    Uint32,
    /// Signed 64-bit integer (four registers).
    Int64,
    /// Unsigned 64-bit integer (four registers).
    Uint64,
    /// IEEE 754 single precision (two registers).
    Float32,
    /// IEEE 754 double precision (four registers).
    Float64,
    /// Text, two ASCII bytes per register, `modbus.length` registers long.
    String,
}

impl ValueType {
    /// Registers this type occupies in a register table (strings: see `ModbusPoint::length`).
    pub fn registers(self) -> Option<u16> {
        match self {
            ValueType::Bool | ValueType::Int16 | ValueType::Uint16 => Some(1),
            ValueType::Int32 | ValueType::Uint32 | ValueType::Float32 => Some(2),
            ValueType::Int64 | ValueType::Uint64 | ValueType::Float64 => Some(4),
            ValueType::String => None,
        }
    }

    /// Whether values of this type are numbers (so `scale` and `offset` apply).
    pub fn is_numeric(self) -> bool {
        !matches!(self, ValueType::Bool | ValueType::String)
    }
}

/// Whether a point can be written by commands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Access {
    /// Read only.
    #[default]
    Read,
    /// Read and written.
    ReadWrite,
}

impl Access {
    fn is_read(&self) -> bool {
        *self == Access::Read
    }
}

/// Location of a point on a Modbus device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModbusPoint {
    /// Modbus table the point lives in.
    pub table: ModbusTable,
    /// Zero-based address of the (first) coil or register, as sent on the wire.
    pub address: u16,
    /// Order of the 16-bit words of a multi-register value. Defaults to `bigEndian`
    /// (most significant word first). Bytes within a register are always big-endian.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub word_order: Option<WordOrder>,
    /// Number of registers of a `string` point (two characters each, 1-125). Only for strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 125))]
    pub length: Option<u16>,
    /// Bit (0 = least significant, 0-15) of a register holding a `bool` point. Without it a
    /// register-backed bool is true when the register is non-zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 15))]
    pub bit: Option<u8>,
}

impl ModbusPoint {
    /// Registers (or bits, for coil and discrete tables) this point spans.
    pub fn span(&self, value_type: ValueType) -> u16 {
        if !self.table.is_register() {
            return 1;
        }
        match value_type {
            ValueType::String => self.length.unwrap_or(0),
            other => other.registers().unwrap_or(1),
        }
    }
}

/// A Modbus data table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ModbusTable {
    /// Read-write single bits (function codes 1, 5, 15).
    Coil,
    /// Read-only single bits (function code 2).
    Discrete,
    /// Read-only 16-bit registers (function code 4).
    Input,
    /// Read-write 16-bit registers (function codes 3, 6, 16).
    Holding,
}

impl ModbusTable {
    /// Whether the table holds 16-bit registers (rather than bits).
    pub fn is_register(self) -> bool {
        matches!(self, ModbusTable::Input | ModbusTable::Holding)
    }

    /// Whether the table can be written.
    pub fn is_writable(self) -> bool {
        matches!(self, ModbusTable::Coil | ModbusTable::Holding)
    }

    /// The most items one read request may ask for (Modbus application protocol, 6.1-6.4).
    pub fn max_read(self) -> u16 {
        if self.is_register() { 125 } else { 2000 }
    }
}

/// Order of 16-bit words in a multi-register value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum WordOrder {
    /// Most significant word first (the Modbus convention, "ABCD").
    #[default]
    BigEndian,
    /// Least significant word first ("CDAB"), common on some PLCs and meters.
    LittleEndian,
}
