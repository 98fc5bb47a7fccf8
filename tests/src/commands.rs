//! What the command tests share: starting a gateway that listens for commands, and reading
//! the results the cloud receives.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value as Json;

use crate::listening::ListeningGateway;
use crate::{CloudMessage, CloudSubscriber, wait_until};

/// How long a command test waits for anything.
pub const WAIT: Duration = Duration::from_secs(60);

/// Results published for command `id`, as `status` or `status: reason`, in order.
pub fn statuses(msgs: &[CloudMessage], id: &str) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.topic.ends_with("/result"))
        .filter_map(|m| serde_json::from_slice::<Json>(&m.payload).ok())
        .filter(|j| j["id"] == id)
        .map(|j| {
            let reason = j["reason"].as_str().map(|r| format!(": {r}")).unwrap_or_default();
            format!("{}{reason}", j["status"].as_str().unwrap_or("?"))
        })
        .collect()
}

/// Waits until a result of command `id` starts with `status`; returns every result so far.
pub async fn wait_status(
    cloud: &CloudSubscriber,
    gw: &ListeningGateway,
    id: &str,
    status: &str,
) -> Result<Vec<String>> {
    cloud
        .wait_for(&format!("command {id} to be {status}"), WAIT, |msgs| {
            statuses(msgs, id).iter().any(|s| s.starts_with(status))
        })
        .await
        .with_context(|| format!("results so far: {:?}\n{}", statuses(&cloud.messages(), id), gw.log()))?;
    Ok(statuses(&cloud.messages(), id))
}

/// Starts the gateway and waits until it subscribed to the uplink's command topic.
pub async fn start_subscribed(gw: &mut ListeningGateway) -> Result<()> {
    gw.start_ready().await?;
    wait_until("the gateway to subscribe to commands", WAIT, || async {
        Ok(gw.stderr().contains("subscribed to commands").then_some(()))
    })
    .await
    .with_context(|| gw.log())
}
