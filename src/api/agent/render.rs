//! The JSON of calls and verifications: the one renderer behind every answer and stream event of the
//! agent API.
//!
//! Invariant: identity fields come only from `VerificationView::fields`, which the call task rendered
//! through the queue's disclosure policy (`outcome::render`); nothing here adds any.

use serde_json::{json, Map, Value};

use crate::calls::live::{is_fraud, CallView, VerificationView};
use crate::outcome::rfc3339;

pub fn call(c: &CallView) -> Value {
    let mut out = json!({
        "call_id": c.call_id,
        "queue": c.queue,
        "state": c.state.code(),
        "agent": c.agent,
        "aliases": c.aliases,
        "started_at": rfc3339(c.started_at),
        "can_verify": c.can_verify,
        "keypad": c.keypad,
        "verification": c.verification.as_ref().map(verification),
        "links": call_links(&c.call_id),
    });
    // Only with shared state: which instance owns the call, and whether it is still beating.
    if let (Some(owner), Value::Object(map)) = (&c.owner, &mut out) {
        map.insert("instance".into(), Value::String(owner.instance.clone()));
        map.insert("instance_lost".into(), Value::Bool(owner.lost));
    }
    out
}

pub fn verification(v: &VerificationView) -> Value {
    let fields: Map<String, Value> = v
        .fields
        .iter()
        .map(|(k, val)| (k.clone(), Value::String(val.clone())))
        .collect();
    json!({
        "verification_id": v.id,
        "call_id": v.call_id,
        "queue": v.queue,
        "idp": v.idp,
        "method": v.method.code(),
        "started_by": v.started_by.to_string(),
        "started_at": rfc3339(v.started_at),
        "ended_at": v.ended_at.map(rfc3339),
        "stage": v.stage().map(|s| s.code()),
        "stages": v.stages.iter().map(|(s, at)| json!({"stage": s.code(), "at": rfc3339(*at)})).collect::<Vec<_>>(),
        "status": v.outcome.map_or("in_progress", |o| o.status().code()),
        "reason": v.outcome.and_then(|o| o.reason()).map(|r| r.code()),
        "limit": v.limit.map(|l| l.code()),
        // Only useful while the caller is choosing in their app.
        "word_pair": v.word_pair.as_ref().filter(|_| !v.is_over()),
        "fraud": v.outcome.is_some_and(is_fraud),
        "fields": fields,
        "links": {"self": verification_link(&v.id), "call": call_link(&v.call_id)},
    })
}

/// The names of the identity fields (name, pseudonym, masked or full number) a verification's
/// answer shows; empty when it shows status only.
pub fn identity_fields(v: &VerificationView) -> Vec<String> {
    let identity = [
        crate::outcome::vars::NAME,
        crate::outcome::vars::PSEUDONYM,
        crate::outcome::vars::NUMBER_MASKED,
        crate::outcome::vars::NUMBER,
    ];
    v.fields
        .iter()
        .map(|(k, _)| k)
        .filter(|k| {
            identity.iter().any(|n| {
                n.strip_prefix("CALLGATE_")
                    .is_some_and(|s| s.eq_ignore_ascii_case(k))
            })
        })
        .cloned()
        .collect()
}

pub fn call_link(call_id: &str) -> String {
    format!("/v1/calls/{call_id}")
}

pub fn verification_link(id: &str) -> String {
    format!("/v1/verifications/{id}")
}

fn call_links(call_id: &str) -> Value {
    json!({
        "self": call_link(call_id),
        "verifications": format!("/v1/calls/{call_id}/verifications"),
        "events": format!("/v1/calls/{call_id}/events"),
    })
}
