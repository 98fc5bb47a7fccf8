//! `fieldgate-operator render -f <files or dirs>`: what each node would get, offline.
//!
//! Reads YAML (or JSON) manifests of Devices, DeviceProfiles, Uplinks, Nodes and Secrets
//! (multi-document files and `List`s too; other kinds are skipped), renders them, and prints
//! each node's GatewayConfig as a YAML stream followed by every verdict as `#` comments, so the
//! whole output is still valid YAML. Secret values are never printed; without Secret manifests,
//! Secret references are not checked. Without Node manifests, use `--gateway-nodes`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fieldgate_crds::{Device, DeviceProfile, Uplink};
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;

use crate::render::{self, ObjectKey, Placements, Rendered, SecretIndex, Settings, World};

/// Arguments of `render`.
#[derive(Clone, Debug, clap::Args)]
pub struct RenderArgs {
    /// Manifest files or directories (read recursively: *.yaml, *.yml, *.json).
    #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// Print only this node's config.
    #[arg(long)]
    pub node: Option<String>,
    /// Ready gateway nodes to assume in addition to the Node manifests (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub gateway_nodes: Vec<String>,
    /// How long a node may be NotReady before its network devices move.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub failover_grace: Duration,
}

/// Why manifests could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A document is not valid YAML or not a valid object of its kind.
    #[error("{path}: document {index}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Zero-based document index.
        index: usize,
        /// What is wrong.
        message: String,
    },
}

impl ManifestError {
    /// Metrics/exit label.
    pub fn kind(&self) -> &'static str {
        match self {
            ManifestError::Io { .. } => "io",
            ManifestError::Parse { .. } => "parse",
        }
    }
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), ManifestError> {
    let io = |source| ManifestError::Io { path: path.to_path_buf(), source };
    if path.is_dir() {
        let mut entries: Vec<PathBuf> =
            std::fs::read_dir(path).map_err(io)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() || p.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json") {
                collect_files(&p, out)?;
            }
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// What the manifests hold, plus notes about skipped documents.
#[derive(Default)]
pub struct Manifests {
    /// The objects, as a world for render.
    pub world: World,
    /// Documents skipped (other kinds), for the user.
    pub skipped: Vec<String>,
}

fn add(m: &mut Manifests, path: &Path, index: usize, doc: serde_json::Value) -> Result<(), ManifestError> {
    let parse_err =
        |e: serde_json::Error| ManifestError::Parse { path: path.to_path_buf(), index, message: e.to_string() };
    let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_string();
    // What the API server would refuse at `kubectl apply` (unknown fields, types, ranges,
    // patterns), every problem at once with its path.
    let schema = match kind.as_str() {
        "Device" => Some(fieldgate_crds::schema::device_spec()),
        "DeviceProfile" => Some(fieldgate_crds::schema::device_profile_spec()),
        "Uplink" => Some(fieldgate_crds::schema::uplink_spec()),
        _ => None,
    };
    if let Some(schema) = schema {
        let mut errs = fieldgate_crds::ValidationErrors::default();
        schema.check(doc.get("spec").unwrap_or(&serde_json::Value::Null), "spec", &mut errs);
        if !errs.0.is_empty() {
            let name = doc.pointer("/metadata/name").and_then(|n| n.as_str()).unwrap_or_default();
            return Err(ManifestError::Parse {
                path: path.to_path_buf(),
                index,
                message: format!("{kind} {name}: {errs}"),
            });
        }
    }
    match kind.as_str() {
        "Device" => m.world.devices.push(Arc::new(serde_json::from_value::<Device>(doc).map_err(parse_err)?)),
        "DeviceProfile" => {
            m.world.profiles.push(Arc::new(serde_json::from_value::<DeviceProfile>(doc).map_err(parse_err)?))
        }
        "Uplink" => m.world.uplinks.push(Arc::new(serde_json::from_value::<Uplink>(doc).map_err(parse_err)?)),
        "Node" => m.world.nodes.push(Arc::new(serde_json::from_value::<Node>(doc).map_err(parse_err)?)),
        "Secret" => {
            let s: Secret = serde_json::from_value(doc).map_err(parse_err)?;
            let keys = s
                .data
                .iter()
                .flatten()
                .map(|(k, _)| k.clone())
                .chain(s.string_data.iter().flatten().map(|(k, _)| k.clone()));
            let key = ObjectKey::new(
                s.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
                s.metadata.name.clone().unwrap_or_default(),
            );
            m.world.secrets.get_or_insert_with(SecretIndex::new).entry(key).or_default().extend(keys);
        }
        "List" | "DeviceList" | "DeviceProfileList" | "UplinkList" | "NodeList" | "SecretList" => {
            if let Some(items) = doc.get("items").and_then(|i| i.as_array()) {
                for item in items {
                    add(m, path, index, item.clone())?;
                }
            }
        }
        "" => {}
        other => m.skipped.push(format!("{}: document {index}: kind {other} skipped", path.display())),
    }
    Ok(())
}

/// Reads every manifest under `paths`.
pub fn read_manifests(paths: &[PathBuf]) -> Result<Manifests, ManifestError> {
    let mut files = Vec::new();
    for p in paths {
        collect_files(p, &mut files)?;
    }
    let mut m = Manifests::default();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|source| ManifestError::Io { path: path.clone(), source })?;
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).map_err(|e| ManifestError::Parse {
            path: path.clone(),
            index: 0,
            message: e.to_string(),
        })?;
        for (index, doc) in docs.into_iter().enumerate() {
            if !doc.is_null() {
                add(&mut m, &path, index, doc)?;
            }
        }
    }
    Ok(m)
}

/// A Ready gateway node with nothing but a name.
pub fn assumed_gateway_node(name: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([(fieldgate_crds::GATEWAY_NODE_LABEL.to_string(), "true".to_string())].into()),
            ..ObjectMeta::default()
        },
        ..Node::default()
    }
}

/// Prints the rendered configs (YAML stream) and the verdicts (comments).
pub fn report(rendered: &Rendered, only: Option<&str>) -> Result<String, serde_saphyr::ser::Error> {
    let mut out = String::new();
    for (node, nc) in &rendered.nodes {
        if only.is_some_and(|n| n != node) {
            continue;
        }
        let _ = writeln!(
            out,
            "---\n# node {node}: {} devices, {} uplinks",
            nc.config.devices.len(),
            nc.config.uplinks.len()
        );
        for s in &nc.secrets {
            let _ = writeln!(out, "# needs Secret {} key {}", s.secret, s.key);
        }
        out.push_str(&serde_saphyr::to_string(&nc.config)?);
    }
    if let Some(n) = only
        && !rendered.nodes.contains_key(n)
    {
        let _ = writeln!(out, "# node {n} serves no device");
    }
    let _ = writeln!(out, "---\n# verdicts");
    for (k, v) in &rendered.profiles {
        line(&mut out, "DeviceProfile", k, v.configured(), "", &v.message());
    }
    for (k, v) in &rendered.devices {
        let node = v.placed.as_ref().map(|p| match &p.failed_over_from {
            Some(home) => format!(" on {} (failed over from {home})", p.node),
            None => format!(" on {}", p.node),
        });
        line(&mut out, "Device", k, v.verdict.configured(), &node.unwrap_or_default(), &v.verdict.message());
    }
    for (k, v) in &rendered.uplinks {
        let nodes = format!(" selects {} devices on {} nodes", v.devices, v.nodes.len());
        line(&mut out, "Uplink", k, v.verdict.configured(), &nodes, &v.verdict.message());
    }
    Ok(out)
}

fn line(out: &mut String, kind: &str, key: &ObjectKey, ok: bool, extra: &str, message: &str) {
    if ok {
        let _ = writeln!(out, "# {kind} {key}: Configured{extra}");
    } else {
        let _ = writeln!(out, "# {kind} {key}: NOT configured: {message}");
    }
}

/// Runs `render`; returns the report and whether every object is configured.
pub fn run(args: &RenderArgs) -> anyhow::Result<(String, bool)> {
    let mut m = read_manifests(&args.files)?;
    for name in &args.gateway_nodes {
        m.world.nodes.push(Arc::new(assumed_gateway_node(name)));
    }
    let settings = Settings { failover_grace: args.failover_grace, ..Settings::at(Timestamp::now()) };
    let previous: Placements = render::placements_from_status(&m.world.devices);
    let rendered = render::render(&m.world, &previous, &settings);
    let mut out = report(&rendered, args.node.as_deref())?;
    for s in &m.skipped {
        let _ = writeln!(out, "# {s}");
    }
    if m.world.secrets.is_none() {
        let _ = writeln!(out, "# no Secret manifests given: Secret references were not checked");
    }
    let all_ok = rendered.devices.values().all(|v| v.verdict.configured())
        && rendered.uplinks.values().all(|v| v.verdict.configured())
        && rendered.profiles.values().all(|v| v.configured());
    Ok((out, all_ok))
}
