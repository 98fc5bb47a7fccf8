//! The last warnings and errors the gateway logged, kept in memory for the diagnostics bundle
//! (`GET /api/v1/diagnostics`): a support engineer sees what went wrong without the pod's logs.
//!
//! Bounded: the last [`RecentWarnings::CAPACITY`] events, each cut to
//! [`RecentWarnings::MAX_LINE`] bytes. It sees what the log filter lets through, so it holds
//! no more than the log itself (which never carries a secret).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;

/// One logged warning or error.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Warning {
    /// When it was logged (RFC 3339, milliseconds).
    pub time: String,
    /// `WARN` or `ERROR`.
    pub level: &'static str,
    /// The module that logged it.
    pub target: String,
    /// The sentence, then its fields as `name=value`.
    pub message: String,
}

/// A tracing layer that keeps the last warnings and errors; clones share them.
#[derive(Clone, Debug, Default)]
pub struct RecentWarnings(Arc<Mutex<VecDeque<Warning>>>);

impl RecentWarnings {
    /// Most events kept.
    pub const CAPACITY: usize = 100;
    /// Longest message kept, in bytes.
    pub const MAX_LINE: usize = 1024;

    /// The kept events, oldest first.
    pub fn snapshot(&self) -> Vec<Warning> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect()
    }

    fn push(&self, warning: Warning) {
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.len() == Self::CAPACITY {
            kept.pop_front();
        }
        kept.push_back(warning);
    }
}

/// Writes the message first, then the other fields, up to [`RecentWarnings::MAX_LINE`].
#[derive(Default)]
struct Line {
    message: String,
    fields: String,
}

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if self.message.len() + self.fields.len() >= RecentWarnings::MAX_LINE {
            return;
        }
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.record_debug(field, &value);
        }
    }
}

fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for RecentWarnings {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        // tracing orders levels by verbosity: WARN and ERROR are the two least verbose.
        if level > Level::WARN {
            return;
        }
        let mut line = Line::default();
        event.record(&mut line);
        self.push(Warning {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            level: if level == Level::ERROR { "ERROR" } else { "WARN" },
            target: event.metadata().target().to_string(),
            message: cut(line.message + &line.fields, RecentWarnings::MAX_LINE),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn keeps_the_last_warnings_and_errors_with_their_fields_and_nothing_else() {
        let recent = RecentWarnings::default();
        let subscriber = tracing_subscriber::registry().with(recent.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("not kept");
            tracing::warn!(device = "default/m1", kind = "timeout", "device unreachable");
            tracing::error!("task panicked; restarting");
            for i in 0..RecentWarnings::CAPACITY {
                tracing::warn!(i, "again");
            }
        });
        let kept = recent.snapshot();
        assert_eq!(kept.len(), RecentWarnings::CAPACITY);
        assert_eq!(kept[0].message, "again i=0");
        assert_eq!(kept[0].level, "WARN");

        let recent = RecentWarnings::default();
        let subscriber = tracing_subscriber::registry().with(recent.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(device = "default/m1", kind = "timeout", "device unreachable");
            tracing::error!(text = "x".repeat(5000), "long");
        });
        let kept = recent.snapshot();
        assert_eq!(kept[0].message, "device unreachable device=\"default/m1\" kind=\"timeout\"");
        assert_eq!(kept[1].level, "ERROR");
        assert!(kept[1].message.len() <= RecentWarnings::MAX_LINE + '…'.len_utf8(), "{}", kept[1].message.len());
    }
}
