//! The Fieldgate reading envelope, `fieldgate/v1/reading.proto`, as Rust types (prost).
//!
//! The gateway encodes readings with these types; a cloud consumer written in Rust can decode
//! what an uplink delivers with them (`Reading::decode`).

/// `fieldgate.v1`: the reading envelope.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/fieldgate.v1.rs"));
}
