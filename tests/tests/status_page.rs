//! The status page in a real headless Chromium, and the diagnostics bundle, against a running
//! gateway with real nats-server, mosquitto and simulated Modbus devices.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fieldgate_sim::Fault;
use fieldgate_tests::api::request;
use fieldgate_tests::chromium::{Chromium, Page};
use fieldgate_tests::{ConfigBuilder, Gateway, Mosquitto, NatsServer, SimFleet, wait_until};
use serde_json::Value as Json;

const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "status-token-0123456789abcdef";

async fn gateway_with_token(nats: &NatsServer, config: &ConfigBuilder) -> Result<Gateway> {
    let mut gw = Gateway::new(&nats.url())?;
    gw.api_token(TOKEN)?;
    gw.write_config(&config.yaml()?)?;
    gw.start_ready().await?;
    Ok(gw)
}

/// What the page shows for each device row: name → (state, last error cell, value cells).
async fn device_rows(browser: &Chromium, page: &Page) -> Result<Json> {
    browser
        .eval(
            page,
            r##"Object.fromEntries([...document.querySelectorAll("#devices tbody tr")].map(r => [
                 r.dataset.device,
                 {state: r.dataset.state, error: r.cells[5].textContent,
                  values: [...r.querySelectorAll("[data-point]")].map(s => s.textContent)}]))"##,
        )
        .await
}

/// Saves a screenshot when `FIELDGATE_SCREENSHOT_DIR` is set (to look at the page).
async fn screenshot(browser: &Chromium, page: &Page, name: &str) -> Result<()> {
    if let Some(dir) = std::env::var_os("FIELDGATE_SCREENSHOT_DIR") {
        let size = serde_json::json!({"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": false});
        browser.call(Some(page), "Emulation.setDeviceMetricsOverride", size).await?;
        let png = browser.screenshot(page).await?;
        std::fs::write(std::path::Path::new(&dir).join(name), png)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_devices_in_a_real_browser_and_updates_when_a_device_goes_down() -> Result<()> {
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let fleet = SimFleet::healthy(2).await?;
    let config = ConfigBuilder::new().devices(fleet.gateway_devices("300ms")).cloud(&broker.url(), |_| {});
    let gw = gateway_with_token(&nats, &config).await?;
    let url = format!("http://{}/status", gw.listen());
    let [healthy, failing] = [fleet.devices()[0].key(), fleet.devices()[1].key()];

    // Without the token: 401 with a Basic challenge, so a browser shows its login dialog.
    let r = request(gw.listen(), "GET", "/status", None, None, b"").await?;
    ensure!(r.code == 401 && r.header("www-authenticate").is_some_and(|h| h.starts_with("Basic")), "{r:?}");
    let r = request(gw.listen(), "GET", "/status/data.json", Some("wrong-token-0123456789"), None, b"").await?;
    ensure!(r.code == 401, "{r:?}");

    // A browser whose user types any name and the token into that dialog.
    let browser = Chromium::start().await?;
    let page = browser.open(&url, Some(("technician", TOKEN))).await?;
    let rows = wait_until("both devices up with their values on the page", WAIT, || async {
        let rows = device_rows(&browser, &page).await?;
        let up = [&healthy, &failing].iter().all(|d| {
            rows[d.as_str()]["state"] == "up"
                && rows[d.as_str()]["values"]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|p| p.as_str().is_some_and(|p| p.starts_with("u32="))))
        });
        Ok(up.then_some(rows))
    })
    .await
    .with_context(|| format!("{}\n{}", gw.log(), browser.log()))?;
    ensure!(rows[failing.as_str()]["error"] == "none", "{rows}");
    let uplink = browser
        .eval(&page, r##"document.querySelector('#uplinks tr[data-uplink="default/cloud"]')?.dataset.connected"##)
        .await?;
    ensure!(uplink == "true", "uplink row: {uplink}");
    let header = browser.eval(&page, "document.getElementById('ready').textContent").await?;
    ensure!(header == "ready", "{header}");
    let updated = browser.eval(&page, "document.body.dataset.updated").await?;
    screenshot(&browser, &page, "status-page-up.png").await?;

    // One device goes down; the same page (no reload) shows it with its error.
    fleet.devices()[1].device.set_fault(Fault::Reset);
    let rows = wait_until("the failing device shown down with its error", WAIT, || async {
        let rows = device_rows(&browser, &page).await?;
        let down = rows[failing.as_str()]["state"] == "down" && rows[failing.as_str()]["error"] != "none";
        Ok(down.then_some(rows))
    })
    .await
    .with_context(|| gw.log())?;
    ensure!(rows[healthy.as_str()]["state"] == "up", "{rows}");
    let navigations = browser.eval(&page, "performance.getEntriesByType('navigation').length").await?;
    ensure!(navigations == 1, "the page reloaded: {navigations}");
    ensure!(browser.eval(&page, "document.body.dataset.updated").await? != updated, "no refresh happened");
    screenshot(&browser, &page, "status-page-down.png").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_diagnostics_bundle_has_versions_status_config_warnings_tasks_and_metrics() -> Result<()> {
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let fleet = SimFleet::start(&[Fault::None, Fault::Reset]).await?;
    let config = ConfigBuilder::new().devices(fleet.gateway_devices("300ms")).cloud(&broker.url(), |_| {});
    let gw = gateway_with_token(&nats, &config).await?;
    let failing = fleet.devices()[1].key();

    ensure!(request(gw.listen(), "GET", "/api/v1/diagnostics", None, None, b"").await?.code == 401);
    let bundle = wait_until("a warning about the failing device in the bundle", WAIT, || async {
        let r = request(gw.listen(), "GET", "/api/v1/diagnostics", Some(TOKEN), None, b"").await?;
        ensure!(r.code == 200, "{r:?}");
        let j = r.json()?;
        let warned = j["recentWarnings"].as_array().is_some_and(|w| {
            w.iter()
                .any(|w| w["level"] == "WARN" && w["message"].as_str().is_some_and(|m| m.contains(failing.as_str())))
        });
        let delivered = j["status"]["uplinks"][0]["delivered"].as_u64().is_some_and(|n| n > 0);
        Ok((warned && delivered).then_some(j))
    })
    .await
    .with_context(|| gw.log())?;
    ensure!(bundle["versions"]["gateway"] == env!("CARGO_PKG_VERSION"), "{}", bundle["versions"]);
    ensure!(bundle["versions"]["natsServer"].as_str().is_some_and(|v| !v.is_empty()), "{}", bundle["versions"]);
    ensure!(bundle["config"]["uplinks"][0]["name"] == "cloud", "{}", bundle["config"]);
    ensure!(bundle["status"]["node"] == "test-node", "{}", bundle["status"]);
    let task = format!("device {}", fleet.devices()[0].key());
    ensure!(
        bundle["tasks"].as_object().is_some_and(|t| t.keys().any(|k| k.contains(&fleet.devices()[0].name))),
        "no {task}: {}",
        bundle["tasks"]
    );
    ensure!(bundle["metrics"].as_str().is_some_and(|m| m.contains("fieldgate_readings_received_total")), "no metrics");
    ensure!(bundle["logLevel"].is_string(), "{}", bundle["logLevel"]);

    // The status carries last values and the delivery counters.
    let status = request(gw.listen(), "GET", "/api/v1/status", Some(TOKEN), None, b"").await?.json()?;
    let device = &status["devices"][0];
    ensure!(device["lastValues"].as_array().is_some_and(|v| v.iter().any(|p| p["name"] == "label")), "{device}");
    let uplink = &status["uplinks"][0];
    ensure!(uplink["accepted"].as_u64() >= uplink["delivered"].as_u64(), "{uplink}");
    ensure!(uplink["dropped"].as_object().is_some_and(serde_json::Map::is_empty), "{uplink}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_api_token_the_status_page_is_open_and_the_api_absent() -> Result<()> {
    let nats = NatsServer::start().await?;
    let broker = Mosquitto::start().await?;
    let config = ConfigBuilder::new().cloud(&broker.url(), |_| {});
    let mut gw = Gateway::new(&nats.url())?;
    gw.write_config(&config.yaml()?)?;
    gw.start_ready().await?;
    for path in ["/status", "/status/page.js", "/status/page.css", "/status/data.json"] {
        let r = request(gw.listen(), "GET", path, None, None, b"").await?;
        ensure!(r.code == 200, "{path}: {r:?}");
        let csp = r.header("content-security-policy").unwrap_or_default();
        ensure!(path.ends_with(".json") || csp.contains("default-src 'none'"), "{path}: {r:?}");
    }
    let j = request(gw.listen(), "GET", "/status/data.json", None, None, b"").await?.json()?;
    ensure!(j["ready"] == true && j["uplinks"][0]["name"] == "default/cloud", "{j}");
    ensure!(request(gw.listen(), "GET", "/api/v1/diagnostics", None, None, b"").await?.code == 404);
    Ok(())
}
