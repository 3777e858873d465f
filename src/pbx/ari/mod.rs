//! Asterisk ARI: wire types, REST client and the events websocket.
//!
//! `wire` decodes what Asterisk sends (leniently), `rest::Client` issues commands and maps status codes
//! to meaningful errors, `events::spawn` keeps the events websocket alive. Nothing here decides routing.

use std::time::Duration;

pub mod events;
pub mod rest;
pub(crate) mod tls;
pub mod wire;

pub use events::{ConnState, Incoming};
pub use rest::{Client, Error, Originate};
pub use wire::Event;

#[cfg(test)]
mod tests;

use crate::secret::Secret;

/// Settings of the ARI connection (`[pbx.ari]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Base HTTP URL of Asterisk's HTTP server, e.g. `http://127.0.0.1:8088` (the `/ari` prefix is added).
    pub url: String,
    /// Stasis application name.
    pub app: String,
    pub username: String,
    pub password: Secret,
    /// Hard timeout on every REST request.
    pub request_timeout: Duration,
    /// Websocket ping interval; the connection is declared dead after two unanswered pings.
    pub ping_interval: Duration,
    /// Reconnect backoff: first delay and cap (jittered, exponential).
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            url: "http://127.0.0.1:8088".into(),
            app: "callgate".into(),
            username: "callgate".into(),
            password: Secret::default(),
            request_timeout: Duration::from_secs(3),
            ping_interval: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(10),
        }
    }
}
