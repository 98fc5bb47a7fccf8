//! The gateway binary and its config file: an invalid config exits with status 2 before
//! anything is touched, naming every problem at once with its field path and what is allowed.
//!
//! Needs `cargo build --workspace --bins` first (the tests run the gateway binary).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fieldgate_crds::{MqttAuth, OnFull, SecretRef};
use fieldgate_tests::config::{ConfigBuilder, mqtt_of, mqtt_uplink, set_buffer};
use fieldgate_tests::{Gateway, NatsServer, SimFleet, wait_until};

/// Generous deadline for a process that should exit at once, on a busy 2-core machine.
const WAIT: Duration = Duration::from_secs(60);

/// Runs the gateway on `yaml` and returns its stderr, checking it exited with status 2.
async fn refused(gw: &mut Gateway, yaml: &str) -> Result<String> {
    gw.write_config(yaml)?;
    gw.start()?;
    let status = gw.wait_exit(WAIT).await?;
    let stderr = gw.stderr();
    ensure!(status.code() == Some(2), "exit status {status}\n{stderr}");
    Ok(stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_names_every_problem_with_its_path_and_touches_nothing() -> Result<()> {
    let nats = NatsServer::start().await?;
    let fleet = SimFleet::healthy(2).await?;
    let mut second = mqtt_uplink("second", "mqtt://127.0.0.1:1");
    mqtt_of(&mut second).qos = Some(0);
    mqtt_of(&mut second).protocol_version = Some(4);
    mqtt_of(&mut second).auth = Some(MqttAuth { secret_ref: SecretRef { name: "../../etc".into() } });
    let mut cfg = ConfigBuilder::new()
        .devices(fleet.gateway_devices("1s"))
        .cloud("mqtt://127.0.0.1:1", |u| set_buffer(u, "1Gi", OnFull::DropOldest))
        .uplink(second)
        .build();
    cfg.devices[1].poll_interval = Some("7s".parse()?);
    // Misspelt nested fields, an out-of-range number, malformed text values, a Secret reference
    // leaving its directory: things the typed config cannot even hold, written as people do.
    let first_point = "  - name: u16\n    type: uint16\n";
    let yaml = serde_saphyr::to_string(&cfg)?
        .replacen(first_point, "  - name: u16\n    scael: 2\n    type: uint16\n", 1)
        .replacen("pollInterval: 7s", "pollInterval: fast", 1)
        .replacen("port: ", "port: 70000\n      portt: ", 1)
        .replace("onFull: dropOldest", "onFul: dropOldest")
        .replace("maxBytes: 1Gi", "maxBytes: 1GB")
        .replacen("keepAlive: 5s", "keepAlive: 5s\n    qso: 1", 1);
    let mut gw = Gateway::new(&nats.url())?;
    let stderr = refused(&mut gw, &yaml).await.with_context(|| yaml.clone())?;
    for line in [
        "devices[0].connection.modbusTcp.port: 70000 is out of range 1-65535",
        "devices[0].connection.modbusTcp.portt: unknown field (did you mean port?); expected one of host, port, \
         timeout, unitId",
        "devices[0].points[0].scael: unknown field (did you mean scale?)",
        "devices[1].pollInterval: \"fast\" is not a duration such as 500ms, 1s, 2m30s or 72h",
        "uplinks[0].buffer.maxBytes: \"1GB\" is not a byte quantity such as 512Mi or 1Gi",
        "uplinks[0].buffer.onFul: unknown field (did you mean onFull?)",
        "uplinks[0].mqtt.qso: unknown field (did you mean qos?)",
        // Semantic problems of the parts that are well-formed come in the same run.
        "uplinks[1].mqtt.protocolVersion: 4 is not 3 (3.1.1) or 5",
        "uplinks[1].mqtt.qos: 0 is not supported",
        "uplinks[1].mqtt.auth.secretRef.name: \"../../etc\" is not a Secret name",
    ] {
        ensure!(stderr.contains(line), "stderr does not say {line:?}:\n{stderr}\n{yaml}");
    }
    ensure!(stderr.contains("invalid config"), "{stderr}");
    let streams = nats.stream_names().await?;
    ensure!(streams.is_empty(), "streams exist after a refused config: {streams:?}");
    let clients = nats.connection_names().await?;
    ensure!(
        !clients.iter().any(|n| n.contains("fieldgate-gateway")),
        "the gateway connected to NATS with a refused config: {clients:?}"
    );

    // A document that is not YAML at all: also exit 2, with the line.
    let stderr = refused(&mut gw, "apiVersion: fieldgate.io/v1alpha1\ndevices: [this is not\n").await?;
    ensure!(stderr.contains("line"), "{stderr}");
    ensure!(nats.stream_names().await?.is_empty());
    Ok(())
}

/// The README's example config and the error it documents for it: run as it stands, without
/// its Secrets, the gateway names every missing one with the file it looked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_example_reports_every_missing_secret_with_the_file_searched() -> Result<()> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    let block = |start: &str| -> Result<String> {
        let at = readme.find(start).with_context(|| format!("README has no block starting {start:?}"))?;
        let body = &readme[at + start.len()..];
        let end = body.find("\n```").context("unterminated block")?;
        Ok(body[..end].to_string())
    };
    let config = block("```yaml\napiVersion: fieldgate.io/v1alpha1\nkind: GatewayConfig\n")?;
    let config = format!("apiVersion: fieldgate.io/v1alpha1\nkind: GatewayConfig\n{config}");
    let documented = block("```text\n$ fieldgate-gateway --config gateway.yaml\n")?;

    let mut gw = Gateway::new("nats://127.0.0.1:1")?;
    let stderr = refused(&mut gw, &config).await?;
    let secrets = gw.secrets_dir().display().to_string();
    let path = gw.config_path().display().to_string();
    let mut lines = 0;
    for line in documented.lines() {
        let expected = line.replace("/etc/fieldgate/secrets", &secrets).replace("gateway.yaml", &path);
        ensure!(stderr.contains(expected.trim_start()), "stderr does not say {expected:?}:\n{stderr}");
        lines += 1;
    }
    ensure!(lines >= 6, "the README documents {lines} lines:\n{documented}");

    // With the Secrets in place the same config is loaded.
    let pki = fieldgate_tests::certs::TestPki::generate()?;
    for (name, key, value) in [
        ("cloud-creds", "username", "gw"),
        ("cloud-creds", "password", "secret"),
        ("ca", "ca.crt", pki.ca_cert.as_str()),
        ("gw-cert", "tls.crt", pki.client_cert.as_str()),
        ("gw-cert", "tls.key", pki.client_key.as_str()),
    ] {
        gw.write_secret(name, key, value)?;
    }
    gw.start()?;
    wait_until("the config loaded", WAIT, || async {
        let stderr = gw.stderr();
        let second = stderr.split("start #2").nth(1).unwrap_or_default();
        ensure!(!second.contains("invalid config"), "{second}");
        Ok(second.contains("configuration loaded").then_some(()))
    })
    .await?;
    gw.kill()?;
    Ok(())
}
