//! Values people write as text — durations (`500ms`), byte quantities (`1Gi`), broker URLs
//! (`mqtts://broker:8883`) — as types that are parsed exactly once, when a document is read.
//!
//! Each type (de)serializes as the very text that was written (so a document round-trips
//! unchanged), and its schema is a string with the [`pattern`](HumanDuration::PATTERN) that its
//! parser enforces: the API server and the config check refuse exactly what the parser would,
//! so reading an accepted document into these types cannot fail.

use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use regex::Regex;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A text that is not a valid value of its type.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not {expected}")]
pub struct ValueError {
    /// The text.
    pub text: String,
    /// What was expected, such as "a duration such as 500ms, 1s or 72h".
    pub expected: &'static str,
}

/// Compiles one of the patterns below (constants, covered by tests).
fn compile(pattern: &str) -> Regex {
    #[allow(clippy::expect_used)]
    Regex::new(pattern).expect("the pattern constants compile")
}

/// The parts every text value shares: `FromStr`, `Display`, serde as the text, a string schema
/// with the type's pattern.
macro_rules! text_value {
    ($ty:ident, $name:literal) => {
        impl FromStr for $ty {
            type Err = ValueError;
            fn from_str(text: &str) -> Result<Self, ValueError> {
                Self::parse(text)
            }
        }

        impl TryFrom<&str> for $ty {
            type Error = ValueError;
            fn try_from(text: &str) -> Result<Self, ValueError> {
                Self::parse(text)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.text)
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.text)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                Self::parse(&text).map_err(serde::de::Error::custom)
            }
        }

        impl JsonSchema for $ty {
            fn inline_schema() -> bool {
                true
            }

            fn schema_name() -> std::borrow::Cow<'static, str> {
                $name.into()
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({"type": "string", "pattern": Self::PATTERN, "maxLength": Self::MAX_LENGTH})
            }
        }

        impl $ty {
            /// The text as written.
            pub fn as_str(&self) -> &str {
                &self.text
            }
        }
    };
}

/// A duration such as `500ms`, `1s`, `2m30s` or `72h` (also `1 min`; units `ns` `us` `ms` `s`
/// `m` `h` `d` `w` `M` `y` and their long forms). Whole numbers only: `90m`, not `1.5h`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HumanDuration {
    text: String,
    value: Duration,
}

impl HumanDuration {
    /// What a duration looks like, for messages.
    pub const EXPECTED: &'static str = "a duration such as 500ms, 1s, 2m30s or 72h";
    /// The grammar: whole numbers of up to 9 digits, each followed by a unit, with optional
    /// single spaces. The bounds keep every accepted text within the range of a `Duration`, so
    /// parsing an accepted text cannot fail.
    pub const PATTERN: &'static str = concat!(
        r"^(?:[0-9]{1,9} ?(?:nanos|nsec|ns|usec|us|µs|millis|msec|ms|seconds|second|secs|sec|s|",
        "minutes|minute|mins|min|m|hours|hour|hrs|hr|h|days|day|d|weeks|week|wks|wk|w|",
        r"months|month|M|years|year|yrs|yr|y) ?)+$"
    );
    /// Longest text accepted.
    pub const MAX_LENGTH: usize = 64;

    /// Parses a duration.
    pub fn parse(text: &str) -> Result<Self, ValueError> {
        static RE: LazyLock<Regex> = LazyLock::new(|| compile(HumanDuration::PATTERN));
        let err = || ValueError { text: text.to_string(), expected: Self::EXPECTED };
        if text.len() > Self::MAX_LENGTH || !RE.is_match(text) {
            return Err(err());
        }
        let value = humantime::parse_duration(text).map_err(|_| err())?;
        Ok(Self { text: text.to_string(), value })
    }

    /// The duration.
    pub fn get(&self) -> Duration {
        self.value
    }
}

impl From<Duration> for HumanDuration {
    /// The duration in its largest whole unit (`90s`, `500ms`, `3h`).
    fn from(value: Duration) -> Self {
        let nanos = value.as_nanos();
        let units: [(u128, &str); 7] = [
            (86_400_000_000_000, "d"),
            (3_600_000_000_000, "h"),
            (60_000_000_000, "m"),
            (1_000_000_000, "s"),
            (1_000_000, "ms"),
            (1_000, "us"),
            (1, "ns"),
        ];
        let text = match units.iter().find(|(n, _)| nanos.is_multiple_of(*n) && nanos > 0) {
            Some((n, unit)) => format!("{}{unit}", nanos / n),
            None => "0s".to_string(),
        };
        Self { text, value }
    }
}

impl From<&HumanDuration> for Duration {
    fn from(d: &HumanDuration) -> Duration {
        d.value
    }
}

text_value!(HumanDuration, "Duration");

/// A byte quantity written the Kubernetes way: `512Mi`, `1Gi`, `100M`, `4096`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ByteSize {
    text: String,
    bytes: u64,
}

impl ByteSize {
    /// What a byte quantity looks like, for messages.
    pub const EXPECTED: &'static str = "a byte quantity such as 512Mi or 1Gi (suffixes Ki Mi Gi Ti Pi Ei, k M G T P E)";
    /// The grammar: a whole number of up to 18 digits with an optional binary or decimal suffix.
    pub const PATTERN: &'static str = r"^[0-9]{1,18}(?:Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";
    /// Longest text accepted.
    pub const MAX_LENGTH: usize = 20;

    /// Parses a byte quantity. A quantity beyond `u64` saturates (range checks refuse it).
    pub fn parse(text: &str) -> Result<Self, ValueError> {
        static RE: LazyLock<Regex> = LazyLock::new(|| compile(ByteSize::PATTERN));
        let err = || ValueError { text: text.to_string(), expected: Self::EXPECTED };
        if !RE.is_match(text) {
            return Err(err());
        }
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (digits, suffix) = text.split_at(split);
        let number: u64 = digits.parse().map_err(|_| err())?;
        let factor: u64 = match suffix {
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            "Pi" => 1 << 50,
            "Ei" => 1 << 60,
            "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "T" => 1_000_000_000_000,
            "P" => 1_000_000_000_000_000,
            "E" => 1_000_000_000_000_000_000,
            _ => 1,
        };
        Ok(Self { text: text.to_string(), bytes: number.saturating_mul(factor) })
    }

    /// The number of bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl From<u64> for ByteSize {
    /// The quantity in its largest whole binary unit (`64Ki`, `1Gi`, `1000`).
    fn from(bytes: u64) -> Self {
        let units = [(60, "Ei"), (50, "Pi"), (40, "Ti"), (30, "Gi"), (20, "Mi"), (10, "Ki")];
        let text = match units.iter().find(|(shift, _)| bytes != 0 && bytes.is_multiple_of(1u64 << shift)) {
            Some((shift, unit)) => format!("{}{unit}", bytes >> shift),
            None => bytes.to_string(),
        };
        Self { text, bytes }
    }
}

text_value!(ByteSize, "ByteSize");

/// The address of an MQTT broker: `mqtt://host:port` (or `tcp://`) in plain text,
/// `mqtts://host:port` (or `ssl://`) over TLS. The port defaults to 1883 (plain) or 8883 (TLS).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BrokerUrl {
    text: String,
    tls: bool,
    host: String,
    port: u16,
    /// Where the host is in `text`.
    host_at: std::ops::Range<usize>,
}

/// What a parsed URL type (`text`, `tls`, `host`, `port`, `host_at`; a `parse`) offers: the same
/// URL with another host, and its parts.
macro_rules! url_parts {
    ($t:ty, $tls_schemes:literal) => {
        impl $t {
            /// The same URL with another host (an IPv6 address is bracketed).
            pub fn with_host(&self, host: &str) -> Result<Self, ValueError> {
                Self::parse(&replace_host(&self.text, &self.host_at, host))
            }

            #[doc = concat!("Whether the connection uses TLS ", $tls_schemes, ".")]
            pub fn tls(&self) -> bool {
                self.tls
            }

            /// The host name or address (an IPv6 address without brackets).
            pub fn host(&self) -> &str {
                &self.host
            }

            /// The port, defaults applied.
            pub fn port(&self) -> u16 {
                self.port
            }
        }
    };
}

/// The parts of a URL matched by a pattern whose groups are scheme, host and port: whether the
/// scheme is one of `tls_schemes`, the host (an IPv6 address without brackets), the port with
/// the scheme's default (`ports`: plain, TLS) applied, and where the host is in `text`.
fn endpoint(
    re: &Regex,
    text: &str,
    expected: &'static str,
    tls_schemes: &[&str],
    ports: (u16, u16),
) -> Result<(bool, String, u16, std::ops::Range<usize>), ValueError> {
    let err = || ValueError { text: text.to_string(), expected };
    let caps = re.captures(text).ok_or_else(err)?;
    let tls = tls_schemes.contains(&&caps[1]);
    let host_at = caps.get(2).map_or(0..0, |m| m.range());
    let host = caps[2].trim_start_matches('[').trim_end_matches(']').to_string();
    let port = match caps.get(3) {
        Some(p) => p.as_str().parse().map_err(|_| err())?,
        None if tls => ports.1,
        None => ports.0,
    };
    Ok((tls, host, port, host_at))
}

/// `text` with the host at `host_at` replaced by `host` (an IPv6 address is bracketed).
fn replace_host(text: &str, host_at: &std::ops::Range<usize>, host: &str) -> String {
    let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
    format!("{}{host}{}", &text[..host_at.start], &text[host_at.end..])
}

impl BrokerUrl {
    /// What a broker URL looks like, for messages.
    pub const EXPECTED: &'static str = "an mqtt://host:port or mqtts://host:port URL";
    /// The grammar: a scheme, a host name (a trailing `.` marks a fully qualified one) or IPv4
    /// address or bracketed IPv6 address, an optional port 1-65535, an optional trailing `/`.
    pub const PATTERN: &'static str = concat!(
        r"^(mqtts?|tcp|ssl)://",
        r"([A-Za-z0-9](?:[-A-Za-z0-9_.]{0,251}[A-Za-z0-9])?\.?|\[[0-9A-Fa-f:.]{2,45}\])",
        r"(?::(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?/?$"
    );
    /// Longest text accepted.
    pub const MAX_LENGTH: usize = 280;

    /// Parses a broker URL.
    pub fn parse(text: &str) -> Result<Self, ValueError> {
        static RE: LazyLock<Regex> = LazyLock::new(|| compile(BrokerUrl::PATTERN));
        let (tls, host, port, host_at) = endpoint(&RE, text, Self::EXPECTED, &["mqtts", "ssl"], (1883, 8883))?;
        Ok(Self { text: text.to_string(), tls, host, port, host_at })
    }
}

url_parts!(BrokerUrl, "(`mqtts://`, `ssl://`)");

impl Default for BrokerUrl {
    /// A broker on the local host: `mqtt://localhost`.
    fn default() -> Self {
        Self {
            text: "mqtt://localhost".to_string(),
            tls: false,
            host: "localhost".to_string(),
            port: 1883,
            host_at: 7..16,
        }
    }
}

text_value!(BrokerUrl, "BrokerUrl");

/// The address of an HTTP endpoint: `http://host[:port][/path][?query]` in plain text,
/// `https://...` over TLS. The port defaults to 80 (plain) or 443 (TLS).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HttpUrl {
    text: String,
    tls: bool,
    host: String,
    port: u16,
    /// Where the host is in `text`.
    host_at: std::ops::Range<usize>,
}

impl HttpUrl {
    /// What an HTTP URL looks like, for messages.
    pub const EXPECTED: &'static str = "an http:// or https://host[:port]/path URL";
    /// The grammar: a scheme, a host as in [`BrokerUrl`], an optional port 1-65535, an optional
    /// path and query of URL characters (no fragment, no user information).
    pub const PATTERN: &'static str = concat!(
        r"^(https?)://",
        r"([A-Za-z0-9](?:[-A-Za-z0-9_.]{0,251}[A-Za-z0-9])?\.?|\[[0-9A-Fa-f:.]{2,45}\])",
        r"(?::(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?",
        r"(/[-A-Za-z0-9._~!$&'()*+,;=:@%/]*)?(\?[-A-Za-z0-9._~!$&'()*+,;=:@%/?]*)?$"
    );
    /// Longest text accepted.
    pub const MAX_LENGTH: usize = 2048;

    /// Parses an HTTP URL.
    pub fn parse(text: &str) -> Result<Self, ValueError> {
        static RE: LazyLock<Regex> = LazyLock::new(|| compile(HttpUrl::PATTERN));
        if text.len() > Self::MAX_LENGTH {
            return Err(ValueError { text: text.to_string(), expected: Self::EXPECTED });
        }
        let (tls, host, port, host_at) = endpoint(&RE, text, Self::EXPECTED, &["https"], (80, 443))?;
        Ok(Self { text: text.to_string(), tls, host, port, host_at })
    }
}

url_parts!(HttpUrl, "(`https://`)");

impl Default for HttpUrl {
    /// An endpoint on the local host: `http://localhost/`.
    fn default() -> Self {
        Self {
            text: "http://localhost/".to_string(),
            tls: false,
            host: "localhost".to_string(),
            port: 80,
            host_at: 7..16,
        }
    }
}

text_value!(HttpUrl, "HttpUrl");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_read_as_written_and_keep_their_text() {
        for (text, ms) in [("500ms", 500), ("1s", 1000), ("2m30s", 150_000), ("72h", 259_200_000), ("90m", 5_400_000)] {
            let d: HumanDuration = text.parse().unwrap();
            assert_eq!(d.get(), Duration::from_millis(ms), "{text}");
            assert_eq!(d.to_string(), text);
        }
        assert_eq!(HumanDuration::parse("1 min 30 s").unwrap().get(), Duration::from_secs(90));
        for bad in ["", "fast", "1", "1 fortnight", "ms", "1.5h", "-1s", "1s ms", "1\ts", "9999999999s"] {
            let e = HumanDuration::parse(bad).unwrap_err();
            assert!(e.to_string().contains("is not a duration such as 500ms"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_largest_durations_the_pattern_admits_still_parse() {
        let nine = "999999999y".repeat(6);
        assert!(nine.len() <= HumanDuration::MAX_LENGTH);
        HumanDuration::parse(&nine).unwrap();
        HumanDuration::parse("999999999 years 999999999 months").unwrap();
    }

    #[test]
    fn durations_made_from_values_use_their_largest_whole_unit() {
        for (d, text) in [
            (Duration::from_millis(500), "500ms"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(3 * 3600), "3h"),
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(1500), "1500ns"),
        ] {
            let h = HumanDuration::from(d);
            assert_eq!(h.as_str(), text);
            assert_eq!(HumanDuration::parse(text).unwrap(), h);
        }
    }

    #[test]
    fn byte_quantities_know_binary_and_decimal_suffixes() {
        assert_eq!(ByteSize::parse("1Gi").unwrap().bytes(), 1 << 30);
        assert_eq!(ByteSize::parse("512Mi").unwrap().bytes(), 512 << 20);
        assert_eq!(ByteSize::parse("100M").unwrap().bytes(), 100_000_000);
        assert_eq!(ByteSize::parse("4096").unwrap().bytes(), 4096);
        assert_eq!(ByteSize::parse("999999999999999999Ei").unwrap().bytes(), u64::MAX);
        for bad in ["1GB", "Gi", "", "1.5Gi", " 1Gi", "-1"] {
            assert!(ByteSize::parse(bad).unwrap_err().to_string().contains("byte quantity"), "{bad}");
        }
        assert_eq!(ByteSize::from(64 << 10).as_str(), "64Ki");
        assert_eq!(ByteSize::from(1000).as_str(), "1000");
    }

    #[test]
    fn broker_urls_give_scheme_host_and_port() {
        let u = BrokerUrl::parse("mqtts://broker.example.com:8884").unwrap();
        assert!(u.tls());
        assert_eq!((u.host(), u.port()), ("broker.example.com", 8884));
        let u = BrokerUrl::parse("mqtt://10.0.0.7").unwrap();
        assert_eq!((u.tls(), u.host(), u.port()), (false, "10.0.0.7", 1883));
        assert_eq!(BrokerUrl::parse("ssl://[::1]/").unwrap().port(), 8883);
        assert_eq!(BrokerUrl::parse("ssl://[::1]:99").unwrap().host(), "::1");
        for bad in ["http://x", "mqtt://", "mqtt://h:0", "mqtt://h:65536", "mqtt://h:1/x", "mqtt://u@h", "mqtt://-h"] {
            assert!(BrokerUrl::parse(bad).unwrap_err().to_string().contains("mqtt://host:port"), "{bad}");
        }
        assert_eq!(BrokerUrl::parse("tcp://h:65535").unwrap().port(), 65535);
        assert_eq!(BrokerUrl::parse("mqtt://plc-7.").unwrap().host(), "plc-7.");
        assert_eq!(BrokerUrl::default(), BrokerUrl::parse("mqtt://localhost").unwrap());
        let u = BrokerUrl::parse("mqtts://broker:8883/").unwrap().with_host("broker.plant-a.svc").unwrap();
        assert_eq!((u.as_str(), u.host(), u.port()), ("mqtts://broker.plant-a.svc:8883/", "broker.plant-a.svc", 8883));
        assert_eq!(BrokerUrl::default().with_host("::1").unwrap().as_str(), "mqtt://[::1]");
    }

    #[test]
    fn http_urls_give_scheme_host_port_and_keep_their_path() {
        let u = HttpUrl::parse("https://ingest.example.com:8443/v1/readings?site=a").unwrap();
        assert!(u.tls());
        assert_eq!((u.host(), u.port()), ("ingest.example.com", 8443));
        let u = HttpUrl::parse("http://10.0.0.7/x").unwrap();
        assert_eq!((u.tls(), u.host(), u.port()), (false, "10.0.0.7", 80));
        assert_eq!(HttpUrl::parse("https://[::1]").unwrap().port(), 443);
        for bad in ["mqtt://x", "https://", "http://h:0", "http://u@h/", "http://h/#frag", "http://h/a b", "ftp://h"] {
            assert!(HttpUrl::parse(bad).unwrap_err().to_string().contains("http:// or https://"), "{bad}");
        }
        let u = HttpUrl::parse("http://cloud:8080/in").unwrap().with_host("cloud.plant-a.svc").unwrap();
        assert_eq!(u.as_str(), "http://cloud.plant-a.svc:8080/in");
        assert_eq!(HttpUrl::default(), HttpUrl::parse("http://localhost/").unwrap());
    }

    #[test]
    fn the_published_patterns_accept_exactly_what_the_parsers_accept() {
        // The API server checks the pattern (an ECMA/RE2 regex); the parsers must agree, or an
        // object it accepted could not be read.
        let pattern_accepts = |pattern: &str, text: &str| {
            let v = jsonschema::validator_for(&serde_json::json!({"type": "string", "pattern": pattern})).unwrap();
            v.is_valid(&serde_json::json!(text))
        };
        let durations = [
            "1s",
            "500ms",
            "2m30s",
            "72h",
            "1 min",
            "1 min 30 s",
            "90m",
            "1µs",
            "10ns",
            "3d",
            "2w",
            "1M",
            "1y",
            "999999999y",
            "0s",
            "1.5h",
            "1",
            "s",
            "1 fortnight",
            "1s ",
            " 1s",
            "1  s",
            "1s2",
            "1S",
            "1e3s",
            "-1s",
            "1h-1s",
            "fast",
            "",
            "1sec",
            "2 hours",
            "1hr30min",
        ];
        for text in durations {
            assert_eq!(pattern_accepts(HumanDuration::PATTERN, text), HumanDuration::parse(text).is_ok(), "{text:?}");
        }
        for text in ["1Gi", "512Mi", "100M", "4096", "1GB", "1gi", "Gi", "1.5Gi", "", "1 Gi", "999999999999999999Ei"] {
            assert_eq!(pattern_accepts(ByteSize::PATTERN, text), ByteSize::parse(text).is_ok(), "{text:?}");
        }
        let urls = [
            "mqtt://h",
            "mqtts://broker.example.com:8883",
            "tcp://10.0.0.7:1883/",
            "ssl://[::1]:8883",
            "mqtt://h:0",
            "mqtt://h:65536",
            "mqtt://h:65535",
            "mqtt://h:99999",
            "http://h",
            "mqtt://",
            "mqtt://h/x",
            "mqtt://u@h",
            "mqtt://-h",
            "mqtt://h-",
            "mqtt://h_1.local",
            "MQTT://h",
            "mqtt://h:01",
            "mqtt://plc-7.",
            "mqtt://h..",
        ];
        for text in urls {
            assert_eq!(pattern_accepts(BrokerUrl::PATTERN, text), BrokerUrl::parse(text).is_ok(), "{text:?}");
        }
        let http = [
            "http://h",
            "https://h/",
            "https://ingest.example.com:8443/v1/readings?site=a&x=%20",
            "http://[::1]:8080/x",
            "http://h:0",
            "http://h:65536",
            "http://u@h",
            "http://h/#f",
            "http://h/a b",
            "HTTP://h",
            "https://",
            "mqtt://h",
            "http://h?x",
            "http://-h/",
        ];
        for text in http {
            assert_eq!(pattern_accepts(HttpUrl::PATTERN, text), HttpUrl::parse(text).is_ok(), "{text:?}");
        }
    }

    #[test]
    fn values_serialize_as_the_text_that_was_written() {
        let d: HumanDuration = serde_json::from_str("\"2m30s\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"2m30s\"");
        let err = serde_json::from_str::<ByteSize>("\"1GB\"").unwrap_err().to_string();
        assert!(err.contains("\"1GB\" is not a byte quantity"), "{err}");
    }
}
