//! Reporting rules per point (`report: {onChange, deadband, maxInterval, sampling}`): which
//! values read are sent on. Pure state machine; adapters do not see it — [`apply`] runs in
//! `DeviceTask::emit` and `emit_confirmed`, so every protocol follows the same rules.
//!
//! A point's value is reported when it is the device's first, when the point has no rule,
//! when `onChange` is set and it moved by more than `deadband` from the last *reported*
//! value (any change for bool and text), or when `maxInterval` passed since its last report;
//! `sampling` drops values less than that long after the last report. A reading left with
//! no point is not sent at all (and a device waiting for acceptance is told it was accepted:
//! there was nothing to keep). `maxInterval` needs a value to report: for pushing devices it
//! applies when their next value arrives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use fieldgate_crds::{GatewayDevice, HumanDuration, Point};

use crate::reading::{Value, pb};

#[derive(Clone, Debug, PartialEq)]
struct Rule {
    on_change: bool,
    deadband: f64,
    max_interval: Option<Duration>,
    sampling: Option<Duration>,
}

#[derive(Clone, Debug, Default)]
struct State {
    value: Option<Value>,
    at: Option<Instant>,
}

/// The reporting state of one device.
#[derive(Debug, Default)]
pub struct Reporter {
    rules: HashMap<String, (Rule, State)>,
}

impl Reporter {
    /// The rules of `points` (points without a rule are always reported).
    pub fn new(points: &[Point]) -> Self {
        let rules = points
            .iter()
            .filter_map(|p| {
                let r = p.report.as_ref()?;
                let rule = Rule {
                    on_change: r.on_change.unwrap_or(false),
                    deadband: r.deadband.unwrap_or(0.0).max(0.0),
                    max_interval: r.max_interval.as_ref().map(HumanDuration::get),
                    sampling: r.sampling.as_ref().map(HumanDuration::get),
                };
                Some((p.name.clone(), (rule, State::default())))
            })
            .collect();
        Self { rules }
    }

    /// Whether any point has a rule.
    pub fn is_active(&self) -> bool {
        !self.rules.is_empty()
    }

    /// Keeps the points to report at `now` and remembers them as reported.
    pub fn filter(&mut self, points: &mut Vec<pb::Point>, now: Instant) {
        points.retain(|p| {
            let Some((rule, state)) = self.rules.get_mut(&p.name) else { return true };
            let since = state.at.map(|t| now.saturating_duration_since(t));
            if let (Some(s), Some(since)) = (rule.sampling, since)
                && since < s
            {
                return false;
            }
            let due = rule.max_interval.is_some_and(|m| since.is_none_or(|s| s >= m));
            let changed = match (&state.value, &p.value) {
                (Some(old), Some(new)) => moved(old, new, rule.deadband),
                _ => true,
            };
            if rule.on_change && !changed && !due {
                return false;
            }
            state.value.clone_from(&p.value);
            state.at = Some(now);
            true
        });
    }
}

fn number(v: &Value) -> Option<f64> {
    match *v {
        Value::IntValue(i) => Some(i as f64),
        Value::UintValue(u) => Some(u as f64),
        Value::DoubleValue(d) => Some(d),
        _ => None,
    }
}

/// Whether `new` differs from `old` by more than `deadband` (numbers) or at all (others).
fn moved(old: &Value, new: &Value, deadband: f64) -> bool {
    match (number(old), number(new)) {
        (Some(a), Some(b)) if deadband > 0.0 => (b - a).abs() > deadband,
        _ => old != new,
    }
}

/// Reporters of running devices, keyed by device; a device whose config changed (a new
/// `GatewayDevice`) starts afresh.
#[derive(Default)]
pub struct Reporters(Mutex<HashMap<String, ReporterEntry>>);

/// The device a reporter was made for, and the reporter.
type ReporterEntry = (Weak<GatewayDevice>, Arc<Mutex<Reporter>>);

impl Reporters {
    /// The reporter of `device` (`key` is `namespace/name`); `None` when it has no rules.
    pub fn of(&self, key: &str, device: &Arc<GatewayDevice>) -> Option<Arc<Mutex<Reporter>>> {
        if device.points.iter().all(|p| p.report.is_none()) {
            return None;
        }
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((d, r)) = map.get(key)
            && d.upgrade().is_some_and(|d| Arc::ptr_eq(&d, device))
        {
            return Some(Arc::clone(r));
        }
        map.retain(|_, (d, _)| d.strong_count() > 0);
        let r = Arc::new(Mutex::new(Reporter::new(&device.points)));
        map.insert(key.to_string(), (Arc::downgrade(device), Arc::clone(&r)));
        Some(r)
    }
}

/// Applies the device's rules to `points`; `false` when nothing is left to report.
pub fn apply(reporters: &Reporters, key: &str, device: &Arc<GatewayDevice>, points: &mut Vec<pb::Point>) -> bool {
    let Some(r) = reporters.of(key, device) else { return true };
    r.lock().unwrap_or_else(PoisonError::into_inner).filter(points, Instant::now());
    !points.is_empty()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn point(name: &str, report: serde_json::Value) -> Point {
        serde_json::from_value(serde_json::json!({"name": name, "type": "float64", "report": report})).unwrap()
    }

    fn val(name: &str, v: f64) -> pb::Point {
        pb::Point { name: name.into(), value: Some(Value::DoubleValue(v)), unit: String::new() }
    }

    fn reported(r: &mut Reporter, values: &[(&str, f64)], at: Instant) -> Vec<String> {
        let mut points: Vec<pb::Point> = values.iter().map(|(n, v)| val(n, *v)).collect();
        r.filter(&mut points, at);
        points.into_iter().map(|p| p.name).collect()
    }

    #[test]
    fn on_change_with_deadband_and_max_interval() {
        let mut r =
            Reporter::new(&[point("t", serde_json::json!({"onChange": true, "deadband": 0.5, "maxInterval": "10s"}))]);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(reported(&mut r, &[("t", 20.0)], t0), ["t"], "the first value");
        assert!(reported(&mut r, &[("t", 20.4)], t0 + s(1)).is_empty(), "within the deadband");
        assert!(reported(&mut r, &[("t", 20.5)], t0 + s(2)).is_empty(), "on the deadband");
        assert_eq!(reported(&mut r, &[("t", 20.6)], t0 + s(3)), ["t"], "beyond it");
        // The deadband is measured from the last reported value, so slow drift is reported.
        assert!(reported(&mut r, &[("t", 21.0)], t0 + s(4)).is_empty());
        assert_eq!(reported(&mut r, &[("t", 21.2)], t0 + s(5)), ["t"]);
        assert_eq!(reported(&mut r, &[("t", 21.2)], t0 + s(15)), ["t"], "maxInterval passed");
    }

    #[test]
    fn sampling_and_points_without_rules() {
        let mut r = Reporter::new(&[
            point("fast", serde_json::json!({"sampling": "5s"})),
            point("free", serde_json::Value::Null),
        ]);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(reported(&mut r, &[("fast", 1.0), ("free", 1.0)], t0), ["fast", "free"]);
        assert_eq!(reported(&mut r, &[("fast", 2.0), ("free", 2.0)], t0 + s(1)), ["free"]);
        assert_eq!(reported(&mut r, &[("fast", 3.0)], t0 + s(5)), ["fast"]);
    }

    #[test]
    fn non_numbers_change_on_any_difference() {
        assert!(moved(&Value::BoolValue(true), &Value::BoolValue(false), 10.0));
        assert!(!moved(&Value::StringValue("a".into()), &Value::StringValue("a".into()), 0.0));
        assert!(moved(&Value::IntValue(1), &Value::IntValue(2), 0.0));
        assert!(!moved(&Value::IntValue(1), &Value::UintValue(2), 1.0));
    }

    #[test]
    fn a_changed_device_starts_afresh() {
        let rs = Reporters::default();
        let d: GatewayDevice = serde_json::from_value(serde_json::json!({
            "name": "d", "connection": {"coap": {}},
            "points": [{"name": "t", "type": "float64", "report": {"onChange": true}}]
        }))
        .unwrap();
        let a = Arc::new(d.clone());
        let mut p = vec![val("t", 1.0)];
        assert!(apply(&rs, "default/d", &a, &mut p));
        let mut p = vec![val("t", 1.0)];
        assert!(!apply(&rs, "default/d", &a, &mut p), "unchanged: suppressed");
        let b = Arc::new(d);
        let mut p = vec![val("t", 1.0)];
        assert!(apply(&rs, "default/d", &b, &mut p), "new config: first value again");
    }
}
