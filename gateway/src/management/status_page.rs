//! The status page for the person standing next to the machine: `GET /status`, a read-only
//! page that shows devices (state, last values, last error), uplinks (connection, backlog,
//! oldest unsent age), dropped readings by reason and the applied config version, refreshed
//! every 2 s from `GET /status/data.json` (a [`super::state::GatewayStatus`]).
//!
//! Everything is in the binary (HTML, CSS and script served from the management port, no
//! external assets, no build step). The script sets every value as text.
//!
//! Access: with `--api-token-file` the page, its script and its data need the API token. A
//! browser is asked for it with a `Basic` challenge: the browser's own login dialog, any user
//! name, the token as the password; the browser then sends it with every request of the page.
//! `Authorization: Bearer <token>` works as well (scripts, `curl -H`). Without a token file
//! the page is open, like `/metrics`, on the address `--listen` binds (loopback by default).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::Management;
use super::state::StatusSource as _;

const PAGE: &str = include_str!("status_page.html");
const SCRIPT: &str = include_str!("status_page.js");
const STYLE: &str = include_str!("status_page.css");

/// Same-origin only: the page loads its own script, style and data, nothing else.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

async fn data(State(m): State<Arc<Management>>) -> Response {
    let mut r = axum::Json(m.snapshot()).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// With an API token: the token as a Basic password (what a browser's dialog sends) or as a
/// Bearer token; else 401 with a Basic challenge, so a browser asks for it.
async fn authorize(State(m): State<Arc<Management>>, req: Request, next: Next) -> Response {
    let Some(api) = &m.api else { return next.run(req).await };
    if api.token.accepts(req.headers()) {
        return next.run(req).await;
    }
    let mut r = (
        StatusCode::UNAUTHORIZED,
        "the status page needs the gateway's API token: any user name, the token as the password\n",
    )
        .into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"fieldgate\", charset=\"UTF-8\""));
    r
}

/// `/status`, `/status/page.js`, `/status/page.css`, `/status/data.json`.
pub fn routes(m: Arc<Management>) -> Router<Arc<Management>> {
    Router::new()
        .route("/status", get(page))
        .route("/status/page.js", get(script))
        .route("/status/page.css", get(style))
        .route("/status/data.json", get(data))
        .layer(axum::middleware::from_fn_with_state(m, authorize))
}
