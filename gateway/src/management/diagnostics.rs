//! `GET /api/v1/diagnostics`: one JSON document for remote support — versions, the status, the
//! applied config with anything secret-looking redacted, the last warnings, the supervised
//! tasks and a metrics snapshot.
//!
//! The config holds only references to Secrets, never their values; what could still carry a
//! credential is redacted anyway: the password of any URL (`mqtt://user:pass@host`) and any
//! string field whose name says password or token.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value as Json, json};

use super::Management;
use super::state::StatusSource as _;

/// What replaces a redacted value.
pub const REDACTED: &str = "REDACTED";

fn secret_field(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.contains("password") || name.contains("passwd") || name == "token" || name.ends_with("_token")
}

/// Replaces secret-looking values in `v` with [`REDACTED`].
pub fn redact(v: &mut Json) {
    match v {
        Json::Object(map) => {
            for (k, v) in map.iter_mut() {
                if v.is_string() && secret_field(k) {
                    *v = Json::from(REDACTED);
                } else {
                    redact(v);
                }
            }
        }
        Json::Array(items) => items.iter_mut().for_each(redact),
        Json::String(s) => {
            if let Ok(mut url) = url::Url::parse(s)
                && url.password().is_some()
                && url.set_password(Some(REDACTED)).is_ok()
            {
                *s = url.to_string();
            }
        }
        _ => {}
    }
}

/// The bundle.
pub async fn diagnostics(State(m): State<Arc<Management>>) -> Response {
    let cfg = m.applied();
    let mut config = cfg.as_deref().map_or(Json::Null, |c| serde_json::to_value(c).unwrap_or(Json::Null));
    redact(&mut config);
    let mut metrics = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut metrics, &m.registry) {
        metrics = format!("encoding metrics failed: {e}");
    }
    let logs = m.api.as_ref().and_then(|a| a.logs.as_ref());
    let tasks = m.metrics.as_ref().map(|x| x.task_states.snapshot()).unwrap_or_default();
    axum::Json(json!({
        "generatedAt": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "versions": {
            "gateway": env!("CARGO_PKG_VERSION"),
            "natsServer": m.nats_server_version(),
            "config": cfg.as_ref().and_then(|c| c.version.clone()),
            "configApiVersion": cfg.as_ref().map(|c| c.api_version.clone()),
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
        },
        "uptimeSeconds": m.started.elapsed().as_secs_f64(),
        "logLevel": logs.map(|l| l.level()),
        "status": m.snapshot(),
        "config": config,
        "recentWarnings": logs.map(|l| l.recent_warnings()).unwrap_or_default(),
        "tasks": tasks,
        "metrics": metrics,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_and_secret_named_fields_are_redacted_and_references_kept() {
        let mut v = json!({
            "uplinks": [{"mqtt": {
                "url": "mqtts://gw:s3cr3t@broker.example.com:8883",
                "auth": {"secretRef": {"name": "cloud-creds"}},
            }}],
            "devices": [{"connection": {"tcp": {"tokenSecretRef": {"name": "t", "key": "token"}}}, "password": "p"}],
            "plain": "mqtt://broker:1883",
        });
        redact(&mut v);
        let text = v.to_string();
        assert!(!text.contains("s3cr3t") && !text.contains("\"p\""), "{text}");
        assert_eq!(v["uplinks"][0]["mqtt"]["url"], "mqtts://gw:REDACTED@broker.example.com:8883");
        assert_eq!(v["uplinks"][0]["mqtt"]["auth"]["secretRef"]["name"], "cloud-creds");
        assert_eq!(v["devices"][0]["connection"]["tcp"]["tokenSecretRef"]["key"], "token");
        assert_eq!(v["devices"][0]["password"], REDACTED);
        assert_eq!(v["plain"], "mqtt://broker:1883");
    }
}
