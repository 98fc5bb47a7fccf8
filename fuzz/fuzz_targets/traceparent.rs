//! `traceparent` as it comes in headers and command messages: parsed, and what parses
//! round-trips through its text form.
#![no_main]
use fieldgate_gateway::telemetry::TraceParent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(tp) = TraceParent::parse(text) {
        let again = TraceParent::parse(tp.text().as_str());
        assert!(again.is_some_and(|a| a.text().as_str() == tp.text().as_str()), "{text:?} does not round-trip");
    }
});
