//! `[queues.<name>]` and `[defaults]`: parsing a queue table into a partial [`Spec`], layering it over
//! `[defaults]`, and finishing it into a [`QueuePolicy`].
//!
//! Invariant: a value inherited from `[defaults]` is checked (and reported) once, at its `defaults.*`
//! path; checks that involve several keys are reported at the queue's own path.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ::config::{Map, Value};

use super::walk::{join, sorted_keys, Ctx};
use super::{duration, Idp};
use crate::outcome::{Disclosure, Field, Reason};
use crate::pnr::Kind;
use crate::policy::{Mode, PromptOverrides, QueueName, QueuePolicy, Route, Routes};
use crate::prompts::{Language, PromptId};

/// Every key of a queue table (and of `[defaults]`).
pub const QUEUE_KEYS: [&str; 21] = [
    "mode",
    "idp",
    "languages",
    "max_entry_attempts",
    "max_orders",
    "first_digit_timeout",
    "inter_digit_timeout",
    "verify_timeout",
    "gate_deadline",
    "accept",
    "accept_10_digits",
    "user_visible_text",
    "pin_code",
    "progress_prompts",
    "announce_outcome",
    "moh_class",
    "disclose",
    "prompts",
    "routes",
    "routes_by_reason",
    "agent_keys",
];

/// Keys of `routes`; the first three are required.
pub const ROUTE_KEYS: [&str; 8] = [
    "verified",
    "failed",
    "unavailable",
    "skipped",
    "interrupted",
    "no_agent",
    "after_agent",
    "agent",
];

const MODES: [Mode; 4] = [Mode::Off, Mode::BeforeAgent, Mode::DuringCall, Mode::Both];
const MEDIA_SCHEMES: [&str; 6] = [
    "sound",
    "recording",
    "number",
    "digits",
    "characters",
    "tone",
];
/// Longest `agent_keys` sequence.
pub const MAX_AGENT_KEYS: usize = 8;
/// Longest `user_visible_text`, in characters.
pub const MAX_USER_VISIBLE_TEXT: usize = 1000;

/// A queue table as written: every key optional, each value already checked on its own.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    mode: Option<Mode>,
    /// The provider name and the path it was written at.
    idp: Option<(String, String)>,
    languages: Option<Vec<Language>>,
    max_entry_attempts: Option<u32>,
    max_orders: Option<u32>,
    first_digit_timeout: Option<Duration>,
    inter_digit_timeout: Option<Duration>,
    verify_timeout: Option<Duration>,
    gate_deadline: Option<Duration>,
    accept: Option<Vec<Kind>>,
    accept_10_digits: Option<bool>,
    user_visible_text: Option<Option<String>>,
    pin_code: Option<bool>,
    progress_prompts: Option<bool>,
    announce_outcome: Option<bool>,
    moh_class: Option<String>,
    disclose: Option<Vec<Field>>,
    prompts: PromptOverrides,
    routes: BTreeMap<&'static str, Route>,
    routes_by_reason: BTreeMap<Reason, Route>,
    agent_keys: Option<String>,
    /// Keys written with a bad value (already reported), so they are not also reported as missing.
    reported: BTreeSet<&'static str>,
}

impl Spec {
    /// `self` layered over `base`: a key set here wins; `prompts`, `routes` and `routes_by_reason`
    /// merge entry by entry.
    pub fn over(self, base: &Spec) -> Spec {
        let b = base.clone();
        let mut prompts = b.prompts;
        prompts.extend(self.prompts);
        let mut routes = b.routes;
        routes.extend(self.routes);
        let mut routes_by_reason = b.routes_by_reason;
        routes_by_reason.extend(self.routes_by_reason);
        let mut reported = b.reported;
        reported.extend(self.reported);
        Spec {
            mode: self.mode.or(b.mode),
            idp: self.idp.or(b.idp),
            languages: self.languages.or(b.languages),
            max_entry_attempts: self.max_entry_attempts.or(b.max_entry_attempts),
            max_orders: self.max_orders.or(b.max_orders),
            first_digit_timeout: self.first_digit_timeout.or(b.first_digit_timeout),
            inter_digit_timeout: self.inter_digit_timeout.or(b.inter_digit_timeout),
            verify_timeout: self.verify_timeout.or(b.verify_timeout),
            gate_deadline: self.gate_deadline.or(b.gate_deadline),
            accept: self.accept.or(b.accept),
            accept_10_digits: self.accept_10_digits.or(b.accept_10_digits),
            user_visible_text: self.user_visible_text.or(b.user_visible_text),
            pin_code: self.pin_code.or(b.pin_code),
            progress_prompts: self.progress_prompts.or(b.progress_prompts),
            announce_outcome: self.announce_outcome.or(b.announce_outcome),
            moh_class: self.moh_class.or(b.moh_class),
            disclose: self.disclose.or(b.disclose),
            prompts,
            routes,
            routes_by_reason,
            agent_keys: self.agent_keys.or(b.agent_keys),
            reported,
        }
    }
}

/// Reads a queue (or `[defaults]`) table at `path`, reporting unknown keys and bad values.
pub fn parse(ctx: &mut Ctx<'_>, path: &str, t: &Map<String, Value>) -> Spec {
    ctx.known_keys(path, t, &QUEUE_KEYS);
    let mut s = Spec::default();
    for key in sorted_keys(t) {
        let p = join(path, key);
        let v = &t[key];
        match key.as_str() {
            "mode" => {
                s.mode = ctx.parsed(&p, v, |x| {
                    MODES.into_iter().find(|m| m.code() == x).ok_or_else(|| {
                        format!("unknown mode {x:?} (known: off, before_agent, during_call, both)")
                    })
                })
            }
            "idp" => {
                s.idp = ctx
                    .parsed(&p, v, |x| {
                        if x.is_empty() {
                            Err("must not be empty".to_owned())
                        } else {
                            Ok(x.to_owned())
                        }
                    })
                    .map(|name| (name, p.clone()))
            }
            "languages" => {
                let codes: Vec<&str> = Language::ALL.iter().map(|l| l.code()).collect();
                s.languages = ctx
                    .codes(&p, v, "language", &codes, |c| {
                        Language::ALL.into_iter().find(|l| l.code() == c)
                    })
                    .and_then(|l| non_empty(ctx, &p, l))
            }
            "max_entry_attempts" => s.max_entry_attempts = small(ctx, &p, v, 10),
            "max_orders" => s.max_orders = small(ctx, &p, v, 5),
            "first_digit_timeout" => s.first_digit_timeout = ctx.duration(&p, v, false),
            "inter_digit_timeout" => s.inter_digit_timeout = ctx.duration(&p, v, false),
            "verify_timeout" => s.verify_timeout = ctx.duration(&p, v, false),
            "gate_deadline" => s.gate_deadline = ctx.duration(&p, v, false),
            "accept" => {
                let codes: Vec<&str> = Kind::ALL.iter().map(|k| k.code()).collect();
                s.accept = ctx
                    .codes(&p, v, "number kind", &codes, Kind::from_code)
                    .and_then(|k| non_empty(ctx, &p, k))
            }
            "accept_10_digits" => s.accept_10_digits = ctx.boolean(&p, v),
            "user_visible_text" => {
                s.user_visible_text = ctx.parsed(&p, v, |x| {
                    let n = x.chars().count();
                    if n > MAX_USER_VISIBLE_TEXT {
                        Err(format!(
                            "is {n} characters long; at most {MAX_USER_VISIBLE_TEXT} are allowed"
                        ))
                    } else {
                        Ok((!x.is_empty()).then(|| x.to_owned()))
                    }
                })
            }
            "pin_code" => s.pin_code = ctx.boolean(&p, v),
            "progress_prompts" => s.progress_prompts = ctx.boolean(&p, v),
            "announce_outcome" => s.announce_outcome = ctx.boolean(&p, v),
            "moh_class" => s.moh_class = ctx.text(&p, v),
            "agent_keys" => {
                s.agent_keys = ctx.parsed(&p, v, |x| {
                    let ok = x.len() <= MAX_AGENT_KEYS
                        && x.chars().all(|c| matches!(c, '0'..='9' | '*' | '#'));
                    if !ok {
                        Err(format!(
                            "{x:?} is not a key sequence (up to {MAX_AGENT_KEYS} of 0-9, * and #)"
                        ))
                    } else if x.len() == 1 {
                        Err("a single key would start checks by accident; use two or more (e.g. \"*5\")".to_owned())
                    } else {
                        Ok(x.to_owned())
                    }
                })
            }
            "disclose" => {
                let codes: Vec<&str> = Field::ALL.iter().map(|f| f.code()).collect();
                s.disclose = ctx.codes(&p, v, "field", &codes, Field::from_code)
            }
            "prompts" => {
                if let Some(pt) = ctx.table(&p, v) {
                    s.prompts = prompts(ctx, &p, pt);
                }
            }
            "routes" => {
                let Some(rt) = ctx.table(&p, v) else {
                    s.reported.extend(ROUTE_KEYS);
                    continue;
                };
                {
                    ctx.known_keys(&p, rt, &ROUTE_KEYS);
                    for k in ROUTE_KEYS {
                        if let Some(rv) = rt.get(k) {
                            match ctx.parsed(&join(&p, k), rv, Route::parse) {
                                Some(route) => {
                                    s.routes.insert(k, route);
                                }
                                None => {
                                    s.reported.insert(k);
                                }
                            }
                        }
                    }
                }
            }
            "routes_by_reason" => {
                if let Some(rt) = ctx.table(&p, v) {
                    for k in sorted_keys(rt) {
                        let rp = join(&p, k);
                        let Some(reason) = Reason::from_code(k) else {
                            let known: Vec<&str> = Reason::ALL.iter().map(|r| r.code()).collect();
                            ctx.issue(rp, format!("unknown reason (known: {})", known.join(", ")));
                            continue;
                        };
                        if let Some(route) = ctx.parsed(&rp, &rt[k], Route::parse) {
                            s.routes_by_reason.insert(reason, route);
                        }
                    }
                }
            }
            _ => {} // reported by known_keys
        }
    }
    s
}

fn small(ctx: &mut Ctx<'_>, path: &str, v: &Value, max: u64) -> Option<u32> {
    ctx.number(path, v, 1, max)
        .and_then(|n| u32::try_from(n).ok())
}

fn non_empty<T>(ctx: &mut Ctx<'_>, path: &str, items: Vec<T>) -> Option<Vec<T>> {
    if items.is_empty() {
        ctx.issue(path, "must not be empty");
        None
    } else {
        Some(items)
    }
}

/// `prompts`: `<prompt id> = "<media>"` for every language, or `[…prompts.<prompt id>]` with
/// `<language> = "<media>"`.
fn prompts(ctx: &mut Ctx<'_>, path: &str, t: &Map<String, Value>) -> PromptOverrides {
    let mut out = PromptOverrides::new();
    for key in sorted_keys(t) {
        let p = join(path, key);
        let Some(prompt) = PromptId::from_code(key) else {
            let known: Vec<&str> = PromptId::ALL.iter().map(|x| x.code()).collect();
            ctx.issue(p, format!("unknown prompt (known: {})", known.join(", ")));
            continue;
        };
        let v = &t[key];
        if let ::config::ValueKind::Table(per_lang) = &v.kind {
            for lang_key in sorted_keys(per_lang) {
                let lp = join(&p, lang_key);
                let Some(lang) = Language::ALL.into_iter().find(|l| l.code() == lang_key) else {
                    ctx.issue(lp, "unknown language (known: sv, en, nb)");
                    continue;
                };
                if let Some(media) = ctx.parsed(&lp, &per_lang[lang_key], media) {
                    out.insert((prompt, lang), media);
                }
            }
        } else if let Some(media) = ctx.parsed(&p, v, media) {
            for lang in Language::ALL {
                out.insert((prompt, lang), media.clone());
            }
        }
    }
    out
}

/// An ARI media URI such as `sound:callgate/enter-number`.
fn media(s: &str) -> Result<String, String> {
    match s.split_once(':') {
        Some((scheme, rest)) if MEDIA_SCHEMES.contains(&scheme) && !rest.is_empty() => {
            Ok(s.to_owned())
        }
        _ => Err(format!(
            "{s:?} is not a media URI (e.g. \"sound:callgate/enter-number\"; schemes: {})",
            MEDIA_SCHEMES.join(", ")
        )),
    }
}

/// Completes a spec with the built-in defaults and runs the checks that involve several keys or other
/// sections. `inherits` adds "or in [defaults]" to messages about missing keys.
pub fn finish(
    ctx: &mut Ctx<'_>,
    path: &str,
    name: &str,
    s: Spec,
    idps: &BTreeMap<String, Idp>,
    inherits: bool,
) -> Option<QueuePolicy> {
    let where_ = if inherits {
        " (here or in [defaults])"
    } else {
        ""
    };
    let mode = s.mode.unwrap_or(Mode::BeforeAgent);
    let known_idps = || idps.keys().cloned().collect::<Vec<_>>().join(", ");

    let mut complete = true;
    let idp = match s.idp {
        Some((idp, at)) => {
            if !idps.contains_key(&idp) {
                let known = if idps.is_empty() {
                    "none are configured under [idp]".to_owned()
                } else {
                    format!("known: {}", known_idps())
                };
                ctx.issue(at, format!("no provider named {idp:?} ({known})"));
                complete = false;
            }
            idp
        }
        None => match idps.keys().next() {
            Some(only) if idps.len() == 1 => only.clone(),
            _ if mode == Mode::Off => String::new(),
            _ if idps.is_empty() => {
                ctx.issue(
                    join(path, "idp"),
                    "no identity provider is configured under [idp]",
                );
                complete = false;
                String::new()
            }
            _ => {
                ctx.issue(
                    join(path, "idp"),
                    format!(
                        "required{where_}: several providers are configured ({})",
                        known_idps()
                    ),
                );
                complete = false;
                String::new()
            }
        },
    };

    let mut p = QueuePolicy::with_defaults(name, &idp, placeholder_routes());
    p.name = QueueName(name.to_owned());
    p.mode = mode;
    if let Some(v) = s.languages {
        p.languages = v;
    }
    p.max_entry_attempts = s.max_entry_attempts.unwrap_or(p.max_entry_attempts);
    p.max_orders = s.max_orders.unwrap_or(p.max_orders);
    p.first_digit_timeout = s.first_digit_timeout.unwrap_or(p.first_digit_timeout);
    p.inter_digit_timeout = s.inter_digit_timeout.unwrap_or(p.inter_digit_timeout);
    p.verify_timeout = s.verify_timeout.unwrap_or(p.verify_timeout);
    p.gate_deadline = s.gate_deadline.unwrap_or(p.gate_deadline);
    if let Some(v) = s.accept {
        p.accept_kinds = v;
    }
    p.accept_10_digits = s.accept_10_digits.unwrap_or(p.accept_10_digits);
    if let Some(v) = s.user_visible_text {
        p.user_visible_text = v;
    }
    p.pin_code = s.pin_code.unwrap_or(p.pin_code);
    p.progress_prompts = s.progress_prompts.unwrap_or(p.progress_prompts);
    p.announce_outcome = s.announce_outcome.unwrap_or(p.announce_outcome);
    if let Some(v) = s.moh_class {
        p.moh_class = v;
    }
    if let Some(v) = s.disclose {
        p.disclose = Disclosure::new(v);
    }
    p.prompts = s.prompts;
    p.routes_by_reason = s.routes_by_reason;
    if let Some(keys) = s.agent_keys {
        if !keys.is_empty() && !mode.anchors() {
            ctx.issue(
                join(path, "agent_keys"),
                format!(
                    "is used only in modes during_call and both (this queue is {})",
                    mode.code()
                ),
            );
        }
        p.agent_keys = keys;
    }

    let floor = p.verify_timeout + p.first_digit_timeout;
    if p.gate_deadline <= floor {
        ctx.issue(
            join(path, "gate_deadline"),
            format!(
                "{} must be longer than verify_timeout + first_digit_timeout ({} + {})",
                duration::format(p.gate_deadline),
                duration::format(p.verify_timeout),
                duration::format(p.first_digit_timeout)
            ),
        );
        complete = false;
    }
    if p.accept_10_digits
        && !p
            .accept_kinds
            .iter()
            .any(|k| matches!(k, Kind::SePersonnummer | Kind::SeSamordningsnummer))
    {
        ctx.issue(
            join(path, "accept_10_digits"),
            "needs se_personnummer or se_samordningsnummer in accept",
        );
        complete = false;
    }

    // An agent must read a word pair to the caller: the gate (IVR) cannot say it.
    if let Some(Idp::Ciba(c)) = idps.get(&p.idp) {
        if c.word_pair && matches!(mode, Mode::BeforeAgent | Mode::Both) {
            ctx.issue(
                join(path, "mode"),
                format!(
                    "provider {:?} answers with a word pair an agent reads to the caller \
                     (idp.{}.word_pair = true), which the gate cannot say: use mode = \"during_call\" \
                     in queue {name:?}, or another provider",
                    p.idp, p.idp
                ),
            );
            complete = false;
        }
    }

    // BankID (and its simulators) identify Swedish numbers only; a CIBA broker may take others.
    if matches!(
        idps.get(&p.idp),
        Some(Idp::BankId(_) | Idp::Simulator { .. } | Idp::CibaSimulator)
    ) {
        let foreign: Vec<&str> = p
            .accept_kinds
            .iter()
            .filter(|k| !matches!(k, Kind::SePersonnummer | Kind::SeSamordningsnummer))
            .map(|k| k.code())
            .collect();
        if !foreign.is_empty() {
            ctx.issue(
                join(path, "accept"),
                format!(
                    "provider {:?} is BankID, which takes Swedish numbers only: remove {}",
                    p.idp,
                    foreign.join(", ")
                ),
            );
            complete = false;
        }
    }

    let mut routes = s.routes;
    let mut required = vec!["verified", "failed", "unavailable"];
    if matches!(mode, Mode::DuringCall | Mode::Both) {
        required.push("agent");
    }
    for key in required {
        if !routes.contains_key(key) && !s.reported.contains(key) {
            let why = if key == "agent" {
                format!("required{where_} in mode {}", mode.code())
            } else {
                format!("required{where_}")
            };
            ctx.issue(join(&join(path, "routes"), key), why);
            complete = false;
        }
    }
    let (Some(verified), Some(failed), Some(unavailable)) = (
        routes.remove("verified"),
        routes.remove("failed"),
        routes.remove("unavailable"),
    ) else {
        return None;
    };
    p.routes = Routes {
        verified,
        failed,
        unavailable,
        skipped: routes.remove("skipped"),
        interrupted: routes.remove("interrupted"),
        no_agent: routes.remove("no_agent"),
        after_agent: routes.remove("after_agent"),
        agent: routes.remove("agent"),
    };
    complete.then_some(p)
}

/// Routes `with_defaults` needs before the real ones are known; always replaced.
fn placeholder_routes() -> Routes {
    let r = Route {
        context: String::new(),
        extension: String::new(),
        priority: 1,
    };
    Routes {
        verified: r.clone(),
        failed: r.clone(),
        unavailable: r,
        skipped: None,
        interrupted: None,
        no_agent: None,
        after_agent: None,
        agent: None,
    }
}
