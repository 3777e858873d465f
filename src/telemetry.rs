//! Logging setup and the Prometheus metrics registry.
//!
//! Invariant: metric labels come only from bounded sets (queue, provider, status, reason, stage,
//! operation); never a call id, a channel id or a number.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use crate::outcome::Outcome;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global tracing subscriber on stderr (`RUST_LOG` filters; default `info`).
pub fn init_logging(format: LogFormat) {
    init_logging_with(format, "info");
}

/// Installs the global tracing subscriber on stderr with a default filter used when `RUST_LOG` is
/// unset. Text is coloured only when stderr is a terminal and `NO_COLOR` is unset or empty.
pub fn init_logging_with(format: LogFormat, default_filter: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::util::SubscriberInitExt;
    let env = |name: &str| std::env::var(name).ok();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let ansi = use_colour(std::io::stderr().is_terminal(), &env);
    let _ = subscriber(format, filter, ansi, std::io::stderr).try_init();
}

/// Whether text logs get ANSI colours: only on a terminal, and never when `NO_COLOR` has a non-empty
/// value (<https://no-color.org>). `env` looks up an environment variable.
pub fn use_colour(is_terminal: bool, env: &dyn Fn(&str) -> Option<String>) -> bool {
    is_terminal && env("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Targets that log request headers (bearer tokens, basic credentials) at trace level: never
/// logged, whatever the filter says.
pub const SECRET_BEARING_TARGETS: [&str; 1] = ["tungstenite::handshake"];

/// `filter` with the [`SECRET_BEARING_TARGETS`] turned off (a more specific directive wins).
pub fn safe_filter(mut filter: tracing_subscriber::EnvFilter) -> tracing_subscriber::EnvFilter {
    for target in SECRET_BEARING_TARGETS {
        if let Ok(d) = format!("{target}=off").parse() {
            filter = filter.add_directive(d);
        }
    }
    filter
}

/// The log subscriber: `format` lines written to `writer`, filtered by `filter` (never below
/// [`safe_filter`]); `ansi` colours text.
pub fn subscriber<W>(
    format: LogFormat,
    filter: tracing_subscriber::EnvFilter,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(safe_filter(filter))
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(builder.json().with_ansi(false).finish()),
    }
}

/// Displays an error followed by its sources (`outer: cause: root cause`), for log fields: many errors
/// (reqwest's among them) name only their own layer and leave the cause to `source()`. A source whose
/// text the line already ends with is not repeated.
pub struct ErrorChain<'e>(pub &'e (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut line = self.0.to_string();
        let mut next = self.0.source();
        while let Some(e) = next {
            let text = e.to_string();
            if !line.ends_with(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            next = e.source();
        }
        f.write_str(&line)
    }
}

/// Steps of the verification funnel, each counted at most once per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FunnelStep {
    /// The call entered the gate.
    Entered,
    /// A valid number was typed and an order is asked for.
    NumberAccepted,
    /// The provider created the order.
    OrderCreated,
    AppOpened,
    CallConfirmed,
    Verified,
    Declined,
    Expired,
    /// The provider could not be used (plan B).
    Unavailable,
}

impl FunnelStep {
    pub const ALL: [FunnelStep; 9] = [
        FunnelStep::Entered,
        FunnelStep::NumberAccepted,
        FunnelStep::OrderCreated,
        FunnelStep::AppOpened,
        FunnelStep::CallConfirmed,
        FunnelStep::Verified,
        FunnelStep::Declined,
        FunnelStep::Expired,
        FunnelStep::Unavailable,
    ];

    pub fn code(self) -> &'static str {
        match self {
            FunnelStep::Entered => "entered",
            FunnelStep::NumberAccepted => "number_accepted",
            FunnelStep::OrderCreated => "order_created",
            FunnelStep::AppOpened => "app_opened",
            FunnelStep::CallConfirmed => "call_confirmed",
            FunnelStep::Verified => "verified",
            FunnelStep::Declined => "declined",
            FunnelStep::Expired => "expired",
            FunnelStep::Unavailable => "unavailable",
        }
    }
}

type Labels = Vec<(&'static str, String)>;

const BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Debug, Default)]
struct Inner {
    counters: BTreeMap<(&'static str, Labels), u64>,
    gauges: BTreeMap<(&'static str, Labels), f64>,
    histograms: BTreeMap<(&'static str, Labels), Histogram>,
}

/// All metrics of one process.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// Every metric callgate exports: name, type, help. The registry: `render` writes only these, and
/// the shipped dashboard and alerts are checked against [`exported_names`].
pub const METRICS: [(&str, &str, &str); 22] = [
    (
        "callgate_build_info",
        "gauge",
        "Always 1; the version label says which callgate runs.",
    ),
    (
        "callgate_calls_total",
        "counter",
        "Gated calls by queue and outcome (status, reason).",
    ),
    (
        "callgate_verifications_total",
        "counter",
        "Identity checks by provider and outcome.",
    ),
    (
        "callgate_funnel_total",
        "counter",
        "Calls reaching each step of the verification funnel, by queue and provider: entered, number_accepted, order_created, app_opened, call_confirmed, verified, declined, expired, unavailable.",
    ),
    (
        "callgate_provider_request_seconds",
        "histogram",
        "Identity-provider request latency by provider and operation.",
    ),
    (
        "callgate_provider_errors_total",
        "counter",
        "Failed identity-provider requests by provider, operation and class (not_sent, outcome_unknown, unavailable, rate_limited, rejected, fatal).",
    ),
    (
        "callgate_limit_refusals_total",
        "counter",
        "Identity orders refused by an abuse limit, by queue and limit (per_number, per_line, per_agent, per_queue, cool_down, per_idp, concurrent, shared_state).",
    ),
    (
        "callgate_pbx_connected",
        "gauge",
        "1 while the PBX event stream is connected.",
    ),
    ("callgate_calls_active", "gauge", "Calls in the gate now."),
    (
        "callgate_rp_certificate_expiry_timestamp_seconds",
        "gauge",
        "When the RP (client) certificate of each identity provider expires, in Unix seconds.",
    ),
    (
        "callgate_server_ca_expiry_timestamp_seconds",
        "gauge",
        "When the server_ca of each identity provider expires, in Unix seconds.",
    ),
    (
        "callgate_webhook_deliveries_total",
        "counter",
        "Webhook delivery attempts and ends by target and result: delivered, retried (an attempt failed, another follows), failed (refused by the target or attempts used up), dropped (outbox full, too old, or target removed).",
    ),
    (
        "callgate_webhook_outbox_size",
        "gauge",
        "Webhook deliveries in the outbox not yet delivered or given up.",
    ),
    (
        "callgate_webhook_request_seconds",
        "histogram",
        "Latency of each webhook request (one attempt) by target.",
    ),
    (
        "callgate_state_up",
        "gauge",
        "With shared state (Redis): 1 while the last operation reached Redis.",
    ),
    (
        "callgate_state_subscribed",
        "gauge",
        "With shared state: 1 while this instance listens for the others' events and forwarded requests.",
    ),
    (
        "callgate_state_errors_total",
        "counter",
        "Failed operations on the shared state by operation.",
    ),
    (
        "callgate_state_fallbacks_total",
        "counter",
        "Orders whose limits this instance decided alone because Redis was unreachable (state.on_unavailable = local_limits).",
    ),
    (
        "callgate_state_forwarded_total",
        "counter",
        "Starts and cancels forwarded to the instance owning the call, by result: answered, refused, unreachable.",
    ),
    (
        "callgate_state_instances",
        "gauge",
        "Instances with a live heartbeat in the shared state, as this instance last counted them.",
    ),
    (
        "callgate_switchboard_feed_connected",
        "gauge",
        "1 while the call-event feed of each switchboard (by name) is connected.",
    ),
    (
        "callgate_switchboard_feed_skipped_total",
        "counter",
        "Call-event feed messages skipped, by switchboard and reason (malformed, unknown, no_call_id).",
    ),
];

/// Every series name a scrape of callgate can contain (histograms with their `_bucket`, `_sum` and
/// `_count` series).
pub fn exported_names() -> Vec<String> {
    let mut out = Vec::new();
    for (name, kind, _) in METRICS {
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                out.push(format!("{name}{suffix}"));
            }
        } else {
            out.push(name.to_owned());
        }
    }
    out
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics::default();
        m.set_gauge_with(
            "callgate_build_info",
            vec![("version", env!("CARGO_PKG_VERSION").to_owned())],
            1.0,
        );
        m
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut guard = match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    fn inc(&self, name: &'static str, labels: Labels) {
        self.with(|i| *i.counters.entry((name, labels)).or_default() += 1);
    }

    pub fn call_ended(&self, queue: &str, outcome: Outcome) {
        self.inc(
            "callgate_calls_total",
            outcome_labels(("queue", queue), outcome),
        );
    }

    pub fn verification_ended(&self, idp: &str, outcome: Outcome) {
        self.inc(
            "callgate_verifications_total",
            outcome_labels(("idp", idp), outcome),
        );
    }

    pub fn funnel(&self, queue: &str, idp: &str, step: FunnelStep) {
        self.inc(
            "callgate_funnel_total",
            vec![
                ("queue", queue.to_owned()),
                ("idp", idp.to_owned()),
                ("step", step.code().to_owned()),
            ],
        );
    }

    /// An abuse limit refused an order; `limit` is a `calls::limits::Limit` code.
    pub fn limit_refused(&self, queue: &str, limit: &'static str) {
        self.inc(
            "callgate_limit_refusals_total",
            vec![("queue", queue.to_owned()), ("limit", limit.to_owned())],
        );
    }

    /// An operation on the shared state failed.
    pub fn state_error(&self, op: &'static str) {
        self.inc("callgate_state_errors_total", vec![("op", op.to_owned())]);
    }

    /// An order's limits were decided locally because the shared state was unreachable.
    pub fn state_fallback(&self) {
        self.inc("callgate_state_fallbacks_total", Vec::new());
    }

    /// A start or cancel went to another instance; `result` is answered, refused or unreachable.
    pub fn state_forwarded(&self, result: &'static str) {
        self.inc(
            "callgate_state_forwarded_total",
            vec![("result", result.to_owned())],
        );
    }

    /// A provider request failed; `class` is [`ProviderError::class`](crate::verify::ProviderError::class).
    pub fn provider_error(&self, idp: &str, op: &'static str, class: &'static str) {
        self.inc(
            "callgate_provider_errors_total",
            vec![
                ("idp", idp.to_owned()),
                ("op", op.to_owned()),
                ("class", class.to_owned()),
            ],
        );
    }

    /// Records when an identity provider's RP certificate and server CA expire.
    pub fn certificate_expiry(
        &self,
        idp: &str,
        rp: Option<time::OffsetDateTime>,
        server_ca: Option<time::OffsetDateTime>,
    ) {
        let labels = || vec![("idp", idp.to_owned())];
        if let Some(at) = rp {
            self.set_gauge_with(
                "callgate_rp_certificate_expiry_timestamp_seconds",
                labels(),
                at.unix_timestamp() as f64,
            );
        }
        if let Some(at) = server_ca {
            self.set_gauge_with(
                "callgate_server_ca_expiry_timestamp_seconds",
                labels(),
                at.unix_timestamp() as f64,
            );
        }
    }

    pub fn provider_latency(&self, idp: &str, op: &'static str, took: Duration) {
        self.observe(
            "callgate_provider_request_seconds",
            vec![("idp", idp.to_owned()), ("op", op.to_owned())],
            took,
        );
    }

    /// A webhook delivery's `result`: `delivered`, `retried`, `failed` or `dropped`.
    pub fn webhook_delivery(&self, target: &str, result: &'static str) {
        self.inc(
            "callgate_webhook_deliveries_total",
            vec![("target", target.to_owned()), ("result", result.to_owned())],
        );
    }

    /// How long one webhook request took.
    pub fn webhook_latency(&self, target: &str, took: Duration) {
        self.observe(
            "callgate_webhook_request_seconds",
            vec![("target", target.to_owned())],
            took,
        );
    }

    fn observe(&self, name: &'static str, labels: Labels, took: Duration) {
        let secs = took.as_secs_f64();
        self.with(|i| {
            let h = i.histograms.entry((name, labels)).or_default();
            for (n, b) in BUCKETS.iter().enumerate() {
                if secs <= *b {
                    h.counts[n] += 1;
                }
            }
            h.count += 1;
            h.sum += secs;
        });
    }

    pub fn set_gauge(&self, name: &'static str, value: f64) {
        self.set_gauge_with(name, Vec::new(), value);
    }

    fn set_gauge_with(&self, name: &'static str, labels: Labels, value: f64) {
        self.with(|i| {
            i.gauges.insert((name, labels), value);
        });
    }

    /// Whether a switchboard's call-event feed is connected.
    pub fn set_feed_connected(&self, board: &str, up: bool) {
        self.set_gauge_with(
            "callgate_switchboard_feed_connected",
            vec![("switchboard", board.to_owned())],
            if up { 1.0 } else { 0.0 },
        );
    }

    /// Another instance consumes a switchboard's feed: this one no longer exports its link state.
    pub fn forget_feed_connected(&self, board: &str) {
        self.with(|i| {
            i.gauges.remove(&(
                "callgate_switchboard_feed_connected",
                vec![("switchboard", board.to_owned())],
            ));
        });
    }

    /// A feed message was skipped; `reason` is a `switchboard::feed::Skip` code.
    pub fn feed_event_skipped(&self, board: &str, reason: &'static str) {
        self.inc(
            "callgate_switchboard_feed_skipped_total",
            vec![
                ("switchboard", board.to_owned()),
                ("reason", reason.to_owned()),
            ],
        );
    }

    pub fn set_pbx_connected(&self, up: bool) {
        self.set_gauge("callgate_pbx_connected", if up { 1.0 } else { 0.0 });
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        self.with(|i| {
            let mut out = String::new();
            for (name, kind, help) in METRICS {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for ((n, labels), v) in &i.counters {
                    if *n == name {
                        let _ = writeln!(out, "{name}{} {v}", fmt_labels(labels, None));
                    }
                }
                for ((n, labels), v) in &i.gauges {
                    if *n == name {
                        let _ = writeln!(out, "{name}{} {v}", fmt_labels(labels, None));
                    }
                }
                for ((n, labels), h) in &i.histograms {
                    if *n == name {
                        for (k, b) in BUCKETS.iter().enumerate() {
                            let le = format!("{b}");
                            let _ = writeln!(
                                out,
                                "{name}_bucket{} {}",
                                fmt_labels(labels, Some(&le)),
                                h.counts[k]
                            );
                        }
                        let _ = writeln!(
                            out,
                            "{name}_bucket{} {}",
                            fmt_labels(labels, Some("+Inf")),
                            h.count
                        );
                        let _ = writeln!(out, "{name}_sum{} {}", fmt_labels(labels, None), h.sum);
                        let _ =
                            writeln!(out, "{name}_count{} {}", fmt_labels(labels, None), h.count);
                    }
                }
            }
            out
        })
    }
}

fn outcome_labels(first: (&'static str, &str), outcome: Outcome) -> Labels {
    vec![
        (first.0, first.1.to_owned()),
        ("status", outcome.status().code().to_owned()),
        (
            "reason",
            outcome.reason().map(|r| r.code()).unwrap_or("").to_owned(),
        ),
    ]
}

fn fmt_labels(labels: &Labels, le: Option<&str>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A log writer for tests that is not a terminal: everything written ends up in one buffer.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct LogCapture(std::sync::Arc<Mutex<Vec<u8>>>);

#[cfg(test)]
impl LogCapture {
    /// Installs a text subscriber (no colour, everything at debug and above) writing here, for the
    /// current thread until the guard is dropped.
    pub(crate) fn install(&self) -> tracing::subscriber::DefaultGuard {
        let filter = tracing_subscriber::EnvFilter::new("debug");
        tracing::subscriber::set_default(subscriber(LogFormat::Text, filter, false, self.clone()))
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[cfg(test)]
impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for LogCapture {
    type Writer = LogCapture;
    fn make_writer(&'w self) -> LogCapture {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Reason;

    fn logged(format: LogFormat, ansi: bool) -> String {
        let out = LogCapture::default();
        let sub = subscriber(
            format,
            tracing_subscriber::EnvFilter::new("info"),
            ansi,
            out.clone(),
        );
        tracing::subscriber::with_default(sub, || {
            tracing::warn!(queue = "support", "call left the gate");
        });
        out.text()
    }

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Layer {
        text: &'static str,
        #[source]
        source: Option<Box<Layer>>,
    }

    #[test]
    fn error_chain_shows_every_source_once() {
        let root = Layer {
            text: "received fatal alert: BadCertificate",
            source: None,
        };
        let middle = Layer {
            text: "client error (Connect)",
            source: Some(Box::new(root)),
        };
        let outer = Layer {
            text: "error sending request",
            source: Some(Box::new(middle)),
        };
        assert_eq!(
            ErrorChain(&outer).to_string(),
            "error sending request: client error (Connect): received fatal alert: BadCertificate"
        );
        // A layer that already prints its source does not get it twice.
        let io = Layer {
            text: "no such file",
            source: None,
        };
        let read = Layer {
            text: "cannot read x: no such file",
            source: Some(Box::new(io)),
        };
        assert_eq!(ErrorChain(&read).to_string(), "cannot read x: no such file");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        let unset = |_: &str| None;
        let set = |v: &'static str| move |name: &str| (name == "NO_COLOR").then(|| v.to_owned());
        assert!(use_colour(true, &unset));
        assert!(!use_colour(false, &unset));
        assert!(!use_colour(true, &set("1")));
        assert!(!use_colour(false, &set("1")));
        // An empty NO_COLOR does not count (no-color.org).
        assert!(use_colour(true, &set("")));
    }

    #[test]
    fn logs_to_a_file_carry_no_escape_codes() {
        // A file or the journal is not a terminal.
        let text = logged(LogFormat::Text, use_colour(false, &|_: &str| None));
        assert!(text.contains("call left the gate"), "{text}");
        assert!(text.contains("queue=\"support\""), "{text}");
        assert!(!text.contains('\x1b'), "{text:?}");
        let json = logged(LogFormat::Json, true);
        assert!(json.contains("\"call left the gate\""), "{json}");
        assert!(!json.contains('\x1b'), "{json:?}");
        // The same line on a terminal is coloured, so the checks above can fail.
        let coloured = logged(LogFormat::Text, use_colour(true, &|_: &str| None));
        assert!(coloured.contains('\x1b'), "{coloured:?}");
    }

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let m = Metrics::new();
        m.call_ended("support", Outcome::NotVerified(Reason::DeclinedCall));
        m.funnel("support", "bankid", FunnelStep::NumberAccepted);
        m.provider_latency("bankid", "collect", Duration::from_millis(120));
        m.set_pbx_connected(true);
        m.provider_error("bankid", "start", "outcome_unknown");
        let text = m.render();
        assert!(text.contains(
            "callgate_provider_errors_total{idp=\"bankid\",op=\"start\",class=\"outcome_unknown\"} 1"
        ));
        assert!(text.contains(
            "callgate_calls_total{queue=\"support\",status=\"failed\",reason=\"declined_call\"} 1"
        ));
        assert!(text.contains(
            "callgate_funnel_total{queue=\"support\",idp=\"bankid\",step=\"number_accepted\"} 1"
        ));
        assert!(text.contains(&format!(
            "callgate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.contains(
            "callgate_provider_request_seconds_bucket{idp=\"bankid\",op=\"collect\",le=\"0.25\"} 1"
        ));
        assert!(text.contains(
            "callgate_provider_request_seconds_bucket{idp=\"bankid\",op=\"collect\",le=\"0.1\"} 0"
        ));
        assert!(text.contains("callgate_pbx_connected 1"));
    }
}
