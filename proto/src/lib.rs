//! The Fieldgate reading envelope and the schemas of every binary encoding, as Rust types (prost).
//!
//! - [`v1`]: `fieldgate/v1/reading.proto` (`encoding: protobuf`) and `fieldgate/v1/compact.proto`
//!   (`encoding: protobufCompact`, point names interned per device: [`compact`] turns one into
//!   the other, both ways).
//! - [`sparkplug_b`]: Eclipse Tahu's `sparkplug_b/sparkplug_b.proto` (`encoding: sparkplugB`).
//!
//! The gateway encodes readings with these types; a cloud consumer written in Rust can decode
//! what an uplink delivers with them (`Reading::decode`, [`compact::Tables::decode`]).

/// `fieldgate.v1`: the reading envelope and its compact form.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/fieldgate.v1.rs"));
}

/// `org.eclipse.tahu.protobuf`: the Sparkplug B payload (Eclipse Tahu, EPL-2.0).
pub mod sparkplug_b {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/org.eclipse.tahu.protobuf.rs"));
}

pub mod compact;
