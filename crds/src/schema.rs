//! Documents checked against the JSON schemas generated from the Rust types.
//!
//! A document (a `GatewayConfig` file, a Device manifest) is first read as a generic value and
//! checked against the schema of its type, made strict: every object refuses unknown fields,
//! and numbers, enumerations and the text values of [`crate::values`] carry their ranges and
//! patterns. Every violation is reported at once, each with its field path and a sentence for a
//! person (`devices[0].points[2].scael: unknown field (did you mean scale?); expected one of
//! name, type, ...`). A document that passes can then be read into the typed structs without
//! failing, and the semantic checks of [`crate::validate`] do the rest.
//!
//! The same module keeps the CRD schemas free of integer formats the API server does not know
//! ([`kubernetes_formats`]); their ranges stay as `minimum`/`maximum`.

use std::sync::LazyLock;

use jsonschema::error::ValidationErrorKind;
use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value};

use crate::validate::ValidationErrors;
use crate::values::{BrokerUrl, ByteSize, HttpUrl, HumanDuration};

/// A type's strict schema, compiled.
pub struct DocumentSchema {
    schema: Value,
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for DocumentSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocumentSchema").finish_non_exhaustive()
    }
}

impl DocumentSchema {
    /// The strict schema of `T`: subschemas inlined, unknown fields refused everywhere.
    ///
    /// Panics if the generated schema does not compile, which the tests of this crate rule out
    /// for every schema it builds.
    pub fn of<T: JsonSchema>() -> Self {
        let generator = SchemaSettings::draft2020_12()
            .with(|s| {
                s.inline_subschemas = true;
                s.meta_schema = None;
            })
            .into_generator();
        let mut schema = generator.into_root_schema_for::<T>().to_value();
        make_strict(&mut schema);
        // The text values are checked by their own parsers (one compiled pattern each) rather
        // than by a regex compiled for every field that holds one.
        let options = jsonschema::options()
            .should_validate_formats(true)
            .with_format(DURATION, |s| HumanDuration::parse(s).is_ok())
            .with_format(BYTE_SIZE, |s| ByteSize::parse(s).is_ok())
            .with_format(BROKER_URL, |s| BrokerUrl::parse(s).is_ok())
            .with_format(HTTP_URL, |s| HttpUrl::parse(s).is_ok());
        #[allow(clippy::expect_used)]
        let validator = options.build(&schema).expect("generated schemas compile");
        Self { schema, validator }
    }

    /// The schema as JSON.
    pub fn as_value(&self) -> &Value {
        &self.schema
    }

    /// Records every violation of `doc`; paths start with `prefix` (empty: at the document root).
    pub fn check(&self, doc: &Value, prefix: &str, errs: &mut ValidationErrors) {
        // Most documents are valid: the plain check keeps no paths and builds no errors.
        if self.validator.is_valid(doc) {
            return;
        }
        for e in self.validator.iter_errors(doc) {
            self.record(doc, prefix, &e, errs);
        }
    }

    fn record(&self, doc: &Value, prefix: &str, e: &jsonschema::ValidationError<'_>, errs: &mut ValidationErrors) {
        let at = field_path(prefix, doc, e.instance_path().as_str());
        // The schema object holding the keyword that failed (its siblings give ranges and names).
        let keyword_at = e.schema_path().as_str();
        let node =
            keyword_at.rsplit_once('/').and_then(|(parent, _)| self.schema.pointer(parent)).unwrap_or(&Value::Null);
        let instance = e.instance();
        match e.kind() {
            ValidationErrorKind::AdditionalProperties { unexpected } => {
                let known: Vec<&str> = node
                    .get("properties")
                    .and_then(Value::as_object)
                    .map(|p| p.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                for field in unexpected {
                    errs.push(join(&at, field), unknown_field(field, &known));
                }
            }
            ValidationErrorKind::Required { property } => {
                let name = property.as_str().unwrap_or_default();
                errs.push(join(&at, name), "required field is missing");
            }
            ValidationErrorKind::Type { .. } => {
                errs.push(at, format!("expected {}, found {}", expected_type(node), show(instance)));
            }
            ValidationErrorKind::Minimum { .. } | ValidationErrorKind::Maximum { .. } => {
                let (min, max) = (node.get("minimum").map(number), node.get("maximum").map(number));
                let message = match (min, max) {
                    (Some(min), Some(max)) => format!("{} is out of range {min}-{max}", show(instance)),
                    (Some(min), None) => format!("{} is below the minimum {min}", show(instance)),
                    (None, Some(max)) => format!("{} is above the maximum {max}", show(instance)),
                    (None, None) => e.to_string(),
                };
                errs.push(at, message);
            }
            ValidationErrorKind::Enum { options } => {
                let options: Vec<String> =
                    options.as_array().into_iter().flatten().filter(|o| !o.is_null()).map(plain).collect();
                errs.push(at, format!("{} is not one of {}", show(instance), options.join(", ")));
            }
            ValidationErrorKind::Constant { expected_value } => {
                errs.push(at, format!("{} is not {}", show(instance), plain(expected_value)));
            }
            ValidationErrorKind::Format { format } => {
                let expected = TEXT_VALUES.iter().find(|(f, _, _)| f == format).map_or(format.as_str(), |v| v.2);
                errs.push(at, format!("{} is not {expected}", show(instance)));
            }
            ValidationErrorKind::Pattern { pattern } => {
                errs.push(at, format!("{} is not a text matching {pattern}", show(instance)));
            }
            ValidationErrorKind::MinProperties { .. } | ValidationErrorKind::MaxProperties { .. }
                if node.get(ONE_OF_KEYS).is_some() =>
            {
                let names: Vec<&str> = node
                    .get("properties")
                    .and_then(Value::as_object)
                    .map(|p| p.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                errs.push(at, format!("set exactly one of {}", names.join(", ")));
            }
            ValidationErrorKind::MinLength { limit: 1 } => errs.push(at, "must not be empty"),
            ValidationErrorKind::MinLength { limit } => errs.push(at, format!("must be at least {limit} characters")),
            ValidationErrorKind::MaxLength { limit } => {
                errs.push(at, format!("is longer than the maximum of {limit} characters"))
            }
            ValidationErrorKind::MinItems { limit } => {
                errs.push(at, format!("needs at least {limit} item{}", if *limit == 1 { "" } else { "s" }))
            }
            ValidationErrorKind::MaxItems { limit } => errs.push(at, format!("has more than {limit} items")),
            ValidationErrorKind::AnyOf { context } | ValidationErrorKind::OneOfNotValid { context } => {
                // Report the branch the value was meant for: the one whose errors are not a
                // plain type mismatch at the value itself.
                let here = e.instance_path().as_str();
                let meant: Vec<&Vec<jsonschema::ValidationError<'static>>> = context
                    .iter()
                    .filter(|branch| {
                        !branch.iter().all(|b| {
                            b.instance_path().as_str() == here && matches!(b.kind(), ValidationErrorKind::Type { .. })
                        })
                    })
                    .collect();
                match meant.as_slice() {
                    [branch] => branch.iter().for_each(|b| self.record(doc, prefix, b, errs)),
                    _ => errs.push(at, e.to_string()),
                }
            }
            _ => errs.push(at, e.to_string()),
        }
    }
}

/// The strict schema of a `GatewayConfig`.
pub fn gateway_config() -> &'static DocumentSchema {
    static SCHEMA: LazyLock<DocumentSchema> = LazyLock::new(DocumentSchema::of::<crate::GatewayConfig>);
    &SCHEMA
}

/// The strict schema of a Device's spec.
pub fn device_spec() -> &'static DocumentSchema {
    static SCHEMA: LazyLock<DocumentSchema> = LazyLock::new(DocumentSchema::of::<crate::DeviceSpec>);
    &SCHEMA
}

/// The strict schema of a DeviceProfile's spec.
pub fn device_profile_spec() -> &'static DocumentSchema {
    static SCHEMA: LazyLock<DocumentSchema> = LazyLock::new(DocumentSchema::of::<crate::DeviceProfileSpec>);
    &SCHEMA
}

/// The strict schema of an Uplink's spec.
pub fn uplink_spec() -> &'static DocumentSchema {
    static SCHEMA: LazyLock<DocumentSchema> = LazyLock::new(DocumentSchema::of::<crate::UplinkSpec>);
    &SCHEMA
}

const DURATION: &str = "fieldgate-duration";
const BYTE_SIZE: &str = "fieldgate-byte-size";
const BROKER_URL: &str = "fieldgate-broker-url";
const HTTP_URL: &str = "fieldgate-http-url";

/// The text values: the format that checks them, their pattern, and what they look like.
const TEXT_VALUES: [(&str, &str, &str); 4] = [
    (DURATION, HumanDuration::PATTERN, HumanDuration::EXPECTED),
    (BYTE_SIZE, ByteSize::PATTERN, ByteSize::EXPECTED),
    (BROKER_URL, BrokerUrl::PATTERN, BrokerUrl::EXPECTED),
    (HTTP_URL, HttpUrl::PATTERN, HttpUrl::EXPECTED),
];

/// Marks an object schema rewritten from an externally tagged enum (exactly one key is set).
const ONE_OF_KEYS: &str = "x-one-of-keys";

/// Makes a generated schema strict and its errors precise, bottom-up:
/// - every object with `properties` refuses other fields (`additionalProperties: false`);
/// - an externally tagged enum (`oneOf` of single-key objects) becomes one object whose keys are
///   the variants, exactly one set — so an error inside a variant is reported with its path
///   instead of "not valid under any of the schemas";
/// - an enum documented per variant (`oneOf` of `const`s) becomes a plain `enum`;
/// - an optional value (`anyOf` of a schema and `null`) becomes that schema admitting `null`;
/// - a text value of [`crate::values`] is checked by its parser (a `format`), not a `pattern`.
fn make_strict(node: &mut Value) {
    let Some(obj) = node.as_object_mut() else { return };
    for key in ["properties", "patternProperties", "$defs"] {
        if let Some(children) = obj.get_mut(key).and_then(Value::as_object_mut) {
            children.values_mut().for_each(make_strict);
        }
    }
    for key in ["items", "additionalProperties", "not"] {
        if let Some(child) = obj.get_mut(key) {
            make_strict(child);
        }
    }
    for key in ["anyOf", "oneOf", "allOf", "prefixItems"] {
        if let Some(children) = obj.get_mut(key).and_then(Value::as_array_mut) {
            children.iter_mut().for_each(make_strict);
        }
    }
    rewrite_one_of(obj);
    flatten_nullable(obj);
    let pattern = obj.get("pattern").and_then(Value::as_str);
    if let Some((format, _, _)) = TEXT_VALUES.iter().find(|(_, p, _)| Some(*p) == pattern) {
        obj.remove("pattern");
        obj.insert("format".into(), (*format).into());
    }
    if obj.contains_key("properties") && !obj.contains_key("additionalProperties") {
        obj.insert("additionalProperties".into(), Value::Bool(false));
    }
}

fn rewrite_one_of(obj: &mut Map<String, Value>) {
    let Some(branches) = obj.get("oneOf").and_then(Value::as_array) else { return };
    let consts: Option<Vec<Value>> = branches.iter().map(|b| b.get("const").cloned()).collect();
    if let Some(values) = consts {
        obj.remove("oneOf");
        if values.iter().all(Value::is_string) {
            obj.insert("type".into(), "string".into());
        }
        obj.insert("enum".into(), Value::Array(values));
        return;
    }
    let mut variants = Map::new();
    for b in branches {
        let props = b.get("properties").and_then(Value::as_object);
        match props {
            Some(p) if p.len() == 1 && b.get("type").and_then(Value::as_str) == Some("object") => {
                variants.extend(p.clone());
            }
            _ => return,
        }
    }
    obj.remove("oneOf");
    obj.insert("type".into(), "object".into());
    obj.insert("properties".into(), Value::Object(variants));
    obj.insert("additionalProperties".into(), Value::Bool(false));
    obj.insert("minProperties".into(), 1.into());
    obj.insert("maxProperties".into(), 1.into());
    obj.insert(ONE_OF_KEYS.into(), Value::Bool(true));
}

fn flatten_nullable(obj: &mut Map<String, Value>) {
    let Some(branches) = obj.get("anyOf").and_then(Value::as_array) else { return };
    let is_null = |b: &Value| {
        b.get("type").and_then(Value::as_str) == Some("null") && b.as_object().is_some_and(|o| o.len() == 1)
    };
    let [a, b] = branches.as_slice() else { return };
    let inner = match (is_null(a), is_null(b)) {
        (true, false) => b.clone(),
        (false, true) => a.clone(),
        _ => return,
    };
    let Value::Object(mut inner) = inner else { return };
    match inner.get_mut("type") {
        Some(Value::String(t)) => {
            let t = std::mem::take(t);
            inner.insert("type".into(), Value::Array(vec![t.into(), "null".into()]));
        }
        Some(Value::Array(types)) => types.push("null".into()),
        _ => return,
    }
    if let Some(Value::Array(values)) = inner.get_mut("enum") {
        values.push(Value::Null);
    }
    obj.remove("anyOf");
    for (k, v) in inner {
        obj.entry(k).or_insert(v);
    }
}

/// Removes integer `format`s the Kubernetes API server does not know (`uint8`, `uint16`,
/// `uint32`, `uint64`, ...) from a schema and its subschemas; `minimum` and `maximum` keep the
/// range. Used as `#[schemars(transform = ...)]` on the CRDs' spec and status types.
pub fn kubernetes_formats(schema: &mut schemars::Schema) {
    fn strip(node: &mut Value) {
        match node {
            Value::Object(obj) => {
                let known = obj.get("format").and_then(Value::as_str).is_none_or(|f| KNOWN_FORMATS.contains(&f));
                if !known {
                    obj.remove("format");
                }
                obj.values_mut().for_each(strip);
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    if let Some(obj) = schema.as_object_mut() {
        obj.values_mut().for_each(strip);
        let known = obj.get("format").and_then(Value::as_str).is_none_or(|f| KNOWN_FORMATS.contains(&f));
        if !known {
            obj.remove("format");
        }
    }
}

/// Formats the API server knows (the OpenAPI ones and kube-openapi's string formats).
const KNOWN_FORMATS: &[&str] = &[
    "int32",
    "int64",
    "float",
    "double",
    "byte",
    "binary",
    "date",
    "date-time",
    "password",
    "duration",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
];

/// `prefix` and a JSON pointer into `doc` as a field path: `devices[0].points[2].name`.
fn field_path(prefix: &str, doc: &Value, pointer: &str) -> String {
    let mut out = prefix.to_string();
    let mut at = doc;
    for raw in pointer.split('/').skip(1) {
        let segment = raw.replace("~1", "/").replace("~0", "~");
        match at {
            Value::Array(items) => {
                out.push_str(&format!("[{segment}]"));
                at = segment.parse::<usize>().ok().and_then(|i| items.get(i)).unwrap_or(&Value::Null);
            }
            _ => {
                out = join(&out, &segment);
                at = at.get(&segment).unwrap_or(&Value::Null);
            }
        }
    }
    out
}

/// `path.field`, or `path["odd.field"]` when the field name would read as a path.
fn join(path: &str, field: &str) -> String {
    let plain = !field.is_empty() && field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (path.is_empty(), plain) {
        (true, true) => field.to_string(),
        (false, true) => format!("{path}.{field}"),
        (_, false) => format!("{path}[{field:?}]"),
    }
}

fn unknown_field(field: &str, known: &[&str]) -> String {
    // The closest known name, when it is close: few edits (a swap counts as one) or a long
    // common start.
    let guess = known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(field, k), -strsim::jaro_winkler(field, k), *k))
        .filter(|(edits, jw, k)| *edits <= (k.len() / 3).max(1) || -*jw >= 0.85)
        .min_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)))
        .map(|(_, _, k)| format!(" (did you mean {k}?)"))
        .unwrap_or_default();
    if known.is_empty() {
        format!("unknown field{guess}")
    } else {
        format!("unknown field{guess}; expected one of {}", known.join(", "))
    }
}

fn expected_type(node: &Value) -> String {
    let types: Vec<&str> = match node.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).filter(|t| *t != "null").collect(),
        _ => vec![],
    };
    let names: Vec<&str> = types
        .iter()
        .map(|t| match *t {
            "integer" => "a whole number",
            "number" => "a number",
            "string" => "a text",
            "boolean" => "true or false",
            "array" => "a list",
            "object" => "a mapping",
            other => other,
        })
        .collect();
    if names.is_empty() { "another type".to_string() } else { names.join(" or ") }
}

/// A value as it appears in a message: text quoted, numbers and the rest as JSON.
fn show(v: &Value) -> String {
    match v {
        Value::Object(_) => "a mapping".to_string(),
        Value::Array(_) => "a list".to_string(),
        Value::Null => "nothing (null)".to_string(),
        other => other.to_string(),
    }
}

/// A value as a plain word: text without quotes.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => number(other),
    }
}

/// A number without a needless fraction (`65535`, not `65535.0`).
fn number(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        _ => v.to_string(),
    }
}
