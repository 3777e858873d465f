//! The agent widget: one page at `/widget` on `server.listen`, with its script and style sheet, all
//! three compiled into the binary. The page is a client of the `/v1` API like any other (bearer token,
//! `fetch`, the live stream); this module only serves it, with the headers that decide who may frame it,
//! and builds the CORS layer `/v1` gets for pages on other origins.
//!
//! Invariants: the widget loads nothing from elsewhere (its Content-Security-Policy allows its own
//! origin only, no inline script or style); it is framed only by callgate's own origin and
//! `api.widget_frame_ancestors`; none of its routes is under `/v1`, so the API's route table and its
//! OpenAPI document stay the API alone; the widget routes take no token and serve no data.

#[cfg(test)]
mod tests;

use std::time::Duration;

use axum::http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
    LOCATION, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::Api;

/// The page.
pub const PAGE: &str = "/widget";
/// Its script.
pub const SCRIPT: &str = "/widget/widget.js";
/// Its style sheet.
pub const STYLE: &str = "/widget/widget.css";

const HTML: &str = include_str!("widget.html");
const JS: &str = include_str!("widget.js");
const CSS: &str = include_str!("widget.css");

/// How long a browser may reuse a CORS preflight answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// What browsers on other origins may do: frame the widget, call `/v1`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Embedding {
    /// Origins besides callgate's own that may show `/widget` in a frame (`api.widget_frame_ancestors`).
    pub frame_ancestors: Vec<String>,
    /// Origins whose pages may call `/v1` (`api.cors_origins`).
    pub cors_origins: Vec<String>,
}

impl Embedding {
    pub fn from_config(api: &Api) -> Embedding {
        Embedding {
            frame_ancestors: api.widget_frame_ancestors.clone(),
            cors_origins: api.cors_origins.clone(),
        }
    }

    /// The page's Content-Security-Policy: its own origin for everything, nothing inline, no plugins,
    /// no `<base>`, no form submission, framed only by the allowed ancestors.
    pub fn page_policy(&self) -> String {
        let mut ancestors = String::from("'self'");
        for origin in &self.frame_ancestors {
            ancestors.push(' ');
            ancestors.push_str(origin);
        }
        format!(
            "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; \
             frame-ancestors {ancestors}"
        )
    }

    /// CORS for `/v1` when origins are configured: those origins exactly, `GET`/`POST`/`DELETE`, the
    /// `Authorization` and `Content-Type` headers, `Location` readable; no cookies are involved.
    pub fn cors(&self) -> Option<CorsLayer> {
        let origins: Vec<HeaderValue> = self
            .cors_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        if origins.is_empty() {
            return None;
        }
        Some(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_methods([Method::GET, Method::POST, Method::DELETE])
                .allow_headers([AUTHORIZATION, CONTENT_TYPE])
                .expose_headers([LOCATION])
                .max_age(PREFLIGHT_MAX_AGE),
        )
    }
}

/// One embedded file and the headers it is served with.
#[derive(Clone)]
struct Asset {
    body: &'static str,
    content_type: HeaderValue,
    etag: HeaderValue,
    policy: HeaderValue,
}

impl Asset {
    fn new(body: &'static str, content_type: &'static str, policy: &HeaderValue) -> Asset {
        let digest = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
        let hex: String = digest.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Asset {
            body,
            content_type: HeaderValue::from_static(content_type),
            // Hex digits in quotes are always a valid header value.
            etag: HeaderValue::from_str(&format!("\"{hex}\""))
                .unwrap_or_else(|_| HeaderValue::from_static("\"0\"")),
            policy: policy.clone(),
        }
    }

    /// The file, or `304` when the browser's copy is current. Browsers revalidate every time
    /// (`no-cache`), so a new binary's page never runs an old script.
    fn respond(&self, request: &HeaderMap) -> Response {
        let fresh = request
            .get_all(IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|tag| tag.trim().trim_start_matches("W/") == self.etag);
        let mut response = if fresh {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            let mut r = self.body.into_response();
            r.headers_mut()
                .insert(CONTENT_TYPE, self.content_type.clone());
            r
        };
        let h = response.headers_mut();
        h.insert(ETAG, self.etag.clone());
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert(CONTENT_SECURITY_POLICY, self.policy.clone());
        h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        response
    }
}

/// The widget's routes: path and content type of each (none under `/v1`).
pub fn paths() -> [(&'static str, &'static str); 3] {
    [
        (PAGE, "text/html; charset=utf-8"),
        (SCRIPT, "text/javascript; charset=utf-8"),
        (STYLE, "text/css; charset=utf-8"),
    ]
}

/// The widget's page, script and style sheet.
pub fn router(embedding: &Embedding) -> Router {
    // Origins were checked by the config (no spaces, quotes or separators); a value that still is
    // not a header falls back to the strictest policy.
    let policy = HeaderValue::from_str(&embedding.page_policy())
        .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"));
    let mut router = Router::new();
    for ((path, content_type), body) in paths().into_iter().zip([HTML, JS, CSS]) {
        let asset = Asset::new(body, content_type, &policy);
        router = router.route(
            path,
            get(move |headers: HeaderMap| {
                let response = asset.respond(&headers);
                async move { response }
            }),
        );
    }
    router
}
