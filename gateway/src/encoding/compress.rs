//! Per-message compression (`compression: gzip | zstd`), applied after encoding.
//!
//! A message is sent compressed only when that makes it smaller; each message tells how it is
//! compressed: the MQTT 5 user property `content-encoding`, and over MQTT 3.1.1 its first bytes
//! (a zstd frame starts with `28 B5 2F FD`, gzip with `1F 8B`; an uncompressed JSON message
//! with `{`, a protobuf one with `0A`).

use std::io::{Read, Write};

use fieldgate_crds::Compression;

/// The first bytes of a zstd frame.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// The first bytes of a gzip member.
pub const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// zstd level: zstd's default, a few microseconds for a reading of 100 points.
const ZSTD_LEVEL: i32 = 3;

/// `payload` compressed as `compression` says, with the name of the compression applied; the
/// payload as it is (and `None`) when compressing would not make it smaller.
pub fn apply(compression: Compression, payload: Vec<u8>) -> (Vec<u8>, Option<&'static str>) {
    let packed = match compression {
        Compression::None => return (payload, None),
        Compression::Zstd => zstd::bulk::compress(&payload, ZSTD_LEVEL).ok(),
        Compression::Gzip => {
            let mut enc =
                flate2::write::GzEncoder::new(Vec::with_capacity(payload.len() / 2), flate2::Compression::default());
            enc.write_all(&payload).and_then(|()| enc.finish()).ok()
        }
    };
    match packed {
        Some(p) if p.len() < payload.len() => (p, Some(compression.as_str())),
        // Not smaller (or the compressor failed): the message goes as encoded, and says so.
        _ => (payload, None),
    }
}

/// Why a payload could not be decompressed.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    /// The compressed data is malformed.
    #[error("{compression}: {source}")]
    Malformed {
        /// `gzip` or `zstd`.
        compression: &'static str,
        /// What the decoder said.
        source: std::io::Error,
    },
    /// The payload decompresses to more than the limit.
    #[error("decompresses to more than {0} bytes")]
    TooLarge(usize),
}

impl DecompressError {
    /// A static label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DecompressError::Malformed { .. } => "malformed",
            DecompressError::TooLarge(_) => "too_large",
        }
    }
}

/// The compression a payload's first bytes announce (`None`: not compressed).
pub fn sniff(payload: &[u8]) -> Option<Compression> {
    if payload.starts_with(&ZSTD_MAGIC) {
        Some(Compression::Zstd)
    } else if payload.starts_with(&GZIP_MAGIC) {
        Some(Compression::Gzip)
    } else {
        None
    }
}

/// What a consumer does: `payload` decompressed as its first bytes announce (as it is when they
/// announce no compression), refusing more than `limit` bytes of output.
pub fn decompress(payload: &[u8], limit: usize) -> Result<Vec<u8>, DecompressError> {
    let (compression, reader): (&'static str, Box<dyn Read + '_>) = match sniff(payload) {
        None => return Ok(payload.to_vec()),
        Some(Compression::Zstd) => {
            let d = zstd::stream::read::Decoder::new(payload)
                .map_err(|source| DecompressError::Malformed { compression: "zstd", source })?;
            ("zstd", Box::new(d))
        }
        Some(_) => ("gzip", Box::new(flate2::read::GzDecoder::new(payload))),
    };
    let mut out = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|source| DecompressError::Malformed { compression, source })?;
    if out.len() > limit {
        return Err(DecompressError::TooLarge(limit));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_that_would_not_shrink_goes_as_it_is() {
        for c in [Compression::Gzip, Compression::Zstd] {
            assert_eq!(apply(c, b"{}".to_vec()), (b"{}".to_vec(), None));
        }
    }

    #[test]
    fn both_compressions_round_trip_and_are_told_by_their_first_bytes() {
        let text = br#"{"r0":1,"r1":2,"r2":3,"r3":4,"r4":5,"r5":6,"r6":7,"r7":8,"r8":9,"r9":10}"#.repeat(4);
        for (c, name) in [(Compression::Gzip, "gzip"), (Compression::Zstd, "zstd")] {
            let (packed, said) = apply(c, text.clone());
            assert_eq!(said, Some(name));
            assert_eq!(sniff(&packed), Some(c));
            assert_eq!(decompress(&packed, 1 << 20).unwrap(), text);
        }
        assert_eq!(decompress(b"{\"a\":1}", 10).unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn decompression_is_bounded_and_refuses_garbage() {
        let zeros = vec![0u8; 1 << 20];
        for c in [Compression::Gzip, Compression::Zstd] {
            let (bomb, _) = apply(c, zeros.clone());
            assert!(bomb.len() < 4096);
            assert!(matches!(decompress(&bomb, 1 << 16), Err(DecompressError::TooLarge(_))));
        }
        let mut garbage = ZSTD_MAGIC.to_vec();
        garbage.extend_from_slice(&[0xff; 16]);
        assert!(matches!(decompress(&garbage, 1024), Err(DecompressError::Malformed { compression: "zstd", .. })));
        let mut garbage = GZIP_MAGIC.to_vec();
        garbage.extend_from_slice(&[0xff; 16]);
        assert!(matches!(decompress(&garbage, 1024), Err(DecompressError::Malformed { compression: "gzip", .. })));
    }
}
