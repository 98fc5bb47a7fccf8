//! Which gateway node serves a device.
//!
//! - `placement.nodeName` pins a device to that node, whatever its health.
//! - Otherwise the device's *home* is chosen among the gateway nodes matching
//!   `placement.nodeSelector` (all of them without a selector) by rendezvous
//!   (highest-random-weight) hashing: every (device, node) pair gets a pseudo-random weight and
//!   the heaviest node wins. Adding a node takes over only the devices for which it is now the
//!   heaviest (about 1/N of them); removing a node moves only its own devices.
//! - A node NotReady for longer than the grace period has *failed*: its network devices move to
//!   the heaviest surviving candidate (so they spread over the others) and remember their home
//!   in `status.failedOverFrom`. Devices that need their node (serial lines) stay.
//! - When the home recovers, failed-over devices go back only with `fail_back`; otherwise they
//!   stay where they are until their current node fails or their candidates change.

use std::collections::BTreeMap;
use std::time::Duration;

use fieldgate_crds::GATEWAY_NODE_LABEL;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::{Resource, ResourceExt};

use crate::render::ObjectKey;

/// Where a device runs, and the home it was moved away from, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    /// The node serving the device.
    pub node: String,
    /// The device's home node, when it was moved away because that node failed.
    pub failed_over_from: Option<String>,
}

/// Health of a gateway node as placement sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Ready, or without a Ready condition at all (a Node written by hand for offline render).
    Ready,
    /// NotReady (or Unknown), but for less than the grace period: devices stay.
    Suspect {
        /// When the grace period ends.
        until: Timestamp,
    },
    /// NotReady for longer than the grace period: network devices move away.
    Failed,
}

/// A gateway node: a Node labelled `fieldgate.io/gateway=true` and not being deleted.
#[derive(Clone, Debug)]
pub struct GatewayNode {
    /// Node name.
    pub name: String,
    /// Node labels (for `placement.nodeSelector`).
    pub labels: BTreeMap<String, String>,
    /// Health at render time.
    pub health: Health,
}

impl GatewayNode {
    /// The gateway node view of `node`, or `None` when it is not a gateway node.
    pub fn from_node(node: &Node, now: Timestamp, grace: Duration) -> Option<Self> {
        if node.labels().get(GATEWAY_NODE_LABEL).map(String::as_str) != Some("true")
            || node.meta().deletion_timestamp.is_some()
        {
            return None;
        }
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
        let health = match ready {
            None => Health::Ready,
            Some(c) if c.status == "True" => Health::Ready,
            Some(c) => {
                let grace = SignedDuration::try_from(grace).unwrap_or(SignedDuration::MAX);
                match c.last_transition_time.as_ref().map(|t| t.0.checked_add(grace)) {
                    Some(Ok(until)) if until > now => Health::Suspect { until },
                    _ => Health::Failed,
                }
            }
        };
        Some(Self { name: node.name_any(), labels: node.labels().clone(), health })
    }

    fn failed(&self) -> bool {
        self.health == Health::Failed
    }

    fn matches(&self, selector: Option<&BTreeMap<String, String>>) -> bool {
        selector.is_none_or(|sel| sel.iter().all(|(k, v)| self.labels.get(k) == Some(v)))
    }
}

/// How placement treats nodes that fail.
#[derive(Clone, Copy, Debug)]
pub struct FailoverPolicy {
    /// Whether failed-over devices return to their home node once it is Ready again.
    pub fail_back: bool,
}

/// Why a device could not be placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unplaceable {
    /// Field path of the placement setting that cannot be met.
    pub path: &'static str,
    /// What is wrong.
    pub message: String,
}

/// The rendezvous weight of `node` for `device`: a stable 64-bit hash of both names.
/// FNV-1a followed by the SplitMix64 finaliser; stable across processes and versions
/// (unlike `std`'s hasher), so every operator replica computes the same placement.
pub fn weight(node: &str, device: &ObjectKey) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let parts: [&[u8]; 5] = [node.as_bytes(), &[0xff], device.namespace.as_bytes(), b"/", device.name.as_bytes()];
    for part in parts {
        for &b in part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The heaviest node for `device` among `nodes` (ties: the smaller name, for determinism).
pub fn rendezvous<'a>(device: &ObjectKey, nodes: impl IntoIterator<Item = &'a GatewayNode>) -> Option<&'a GatewayNode> {
    nodes
        .into_iter()
        .max_by(|a, b| weight(&a.name, device).cmp(&weight(&b.name, device)).then_with(|| b.name.cmp(&a.name)))
}

/// Places one device.
///
/// `nodes` are the gateway nodes (sorted by name), `previous` where the device was last placed.
pub fn place(
    device: &ObjectKey,
    placement: Option<&fieldgate_crds::Placement>,
    network: bool,
    nodes: &[GatewayNode],
    previous: Option<&Placed>,
    policy: FailoverPolicy,
) -> Result<Placed, Unplaceable> {
    let by_name = |name: &str| nodes.iter().find(|n| n.name == name);
    if let Some(name) = placement.and_then(|p| p.node_name.as_deref()) {
        return match by_name(name) {
            Some(n) => Ok(Placed { node: n.name.clone(), failed_over_from: None }),
            None => Err(Unplaceable {
                path: "spec.placement.nodeName",
                message: format!("node {name:?} is not a gateway node (label {GATEWAY_NODE_LABEL}=true)"),
            }),
        };
    }
    let selector = placement.and_then(|p| p.node_selector.as_ref());
    let candidates: Vec<&GatewayNode> = nodes.iter().filter(|n| n.matches(selector)).collect();
    let Some(home) = rendezvous(device, candidates.iter().copied()) else {
        return Err(match selector {
            Some(sel) => Unplaceable {
                path: "spec.placement.nodeSelector",
                message: format!("no gateway node carries all of the labels {sel:?}"),
            },
            None => Unplaceable {
                path: "spec.placement",
                message: format!("there is no gateway node (label a node {GATEWAY_NODE_LABEL}=true)"),
            },
        });
    };
    let stay_home = Placed { node: home.name.clone(), failed_over_from: None };
    if !home.failed() || !network {
        if policy.fail_back {
            return Ok(stay_home);
        }
        // Still away from a home that recovered: stay where we are while that node is fine.
        let away =
            previous.filter(|p| p.failed_over_from.as_deref() == Some(home.name.as_str()) && p.node != home.name);
        if let Some(p) = away
            && candidates.iter().any(|n| n.name == p.node && !n.failed())
        {
            return Ok(p.clone());
        }
        return Ok(stay_home);
    }
    match rendezvous(device, candidates.iter().copied().filter(|n| !n.failed())) {
        Some(n) => Ok(Placed { node: n.name.clone(), failed_over_from: Some(home.name.clone()) }),
        // Every candidate failed: nowhere better to go.
        None => Ok(stay_home),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn key(i: usize) -> ObjectKey {
        ObjectKey::new("default", format!("dev-{i}"))
    }

    fn nodes(n: usize) -> Vec<GatewayNode> {
        (0..n)
            .map(|i| GatewayNode { name: format!("edge-{i:03}"), labels: BTreeMap::new(), health: Health::Ready })
            .collect()
    }

    const STAY: FailoverPolicy = FailoverPolicy { fail_back: false };

    const GOLDEN: u64 = 3_835_500_432_087_497_625;

    #[test]
    fn weights_are_stable_across_runs() {
        // A change here moves devices on upgrade: keep the function as it is.
        assert_eq!(
            weight("edge-1", &ObjectKey::new("default", "meter-1")),
            weight("edge-1", &ObjectKey::new("default", "meter-1"))
        );
        assert_ne!(weight("edge-1", &key(1)), weight("edge-2", &key(1)));
        assert_eq!(weight("edge-1", &ObjectKey::new("default", "meter-1")), GOLDEN);
    }

    #[test]
    fn devices_spread_evenly_over_nodes() {
        let ns = nodes(10);
        let mut counts = BTreeMap::<String, usize>::new();
        for i in 0..10_000 {
            let p = place(&key(i), None, true, &ns, None, STAY).unwrap();
            *counts.entry(p.node).or_default() += 1;
        }
        assert_eq!(counts.len(), 10);
        assert!(counts.values().all(|&c| (800..1200).contains(&c)), "{counts:?}");
    }

    #[test]
    fn serial_devices_stay_on_a_failed_node() {
        let mut ns = nodes(3);
        for n in &mut ns {
            n.health = Health::Failed;
        }
        ns[1].health = Health::Ready;
        let home = rendezvous(&key(7), ns.iter()).unwrap().name.clone();
        let serial = place(&key(7), None, false, &ns, None, STAY).unwrap();
        assert_eq!(serial, Placed { node: home.clone(), failed_over_from: None });
        let network = place(&key(7), None, true, &ns, None, STAY).unwrap();
        if home != "edge-001" {
            assert_eq!(network, Placed { node: "edge-001".into(), failed_over_from: Some(home) });
        }
    }

    #[test]
    fn when_every_candidate_failed_devices_stay_home() {
        let mut ns = nodes(2);
        for n in &mut ns {
            n.health = Health::Failed;
        }
        let p = place(&key(1), None, true, &ns, None, STAY).unwrap();
        assert_eq!(p.failed_over_from, None);
    }
}
