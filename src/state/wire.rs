//! The JSON of call views, live events and forwarded requests between instances (always sealed
//! before they reach Redis, see `seal`). Times are Unix milliseconds; enums travel as their codes.
//!
//! Invariant: `call_from_json(call_to_json(c)) == c` for every view (a property test checks it); a
//! value this version cannot read is `None`, never a panic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::calls::live::{
    CallState, CallView, CheckMethod, Limit, LiveKind, Owner, Refusal, StartedBy, TypedNumber,
    VerificationView,
};
use crate::outcome::{Outcome, Reason};
use crate::verify::Stage;

pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn time(v: &Value) -> Option<SystemTime> {
    Some(UNIX_EPOCH + Duration::from_millis(v.as_u64()?))
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key)?.as_str().map(str::to_owned)
}

fn opt_text(v: &Value, key: &str) -> Option<Option<String>> {
    match v.get(key)? {
        Value::Null => Some(None),
        Value::String(s) => Some(Some(s.clone())),
        _ => None,
    }
}

const STATES: [CallState; 4] = [
    CallState::Gate,
    CallState::WaitingForAgent,
    CallState::Talking,
    CallState::Ended,
];
const METHODS: [CheckMethod; 3] = [
    CheckMethod::Ivr,
    CheckMethod::Keypad,
    CheckMethod::AgentTyped,
];
const STAGES: [Stage; 6] = [
    Stage::Starting,
    Stage::OrderCreated,
    Stage::AwaitingApp,
    Stage::ConfirmingCall,
    Stage::Identifying,
    Stage::Done,
];

pub fn started_by_to_json(by: &StartedBy) -> Value {
    match by {
        StartedBy::Gate => json!({"kind": "gate"}),
        StartedBy::Api(name) => json!({"kind": "api", "name": name}),
        StartedBy::AgentKeys => json!({"kind": "agent_keys"}),
        StartedBy::Switchboard(name) => json!({"kind": "switchboard", "name": name}),
    }
}

pub fn started_by_from_json(v: &Value) -> Option<StartedBy> {
    Some(match v.get("kind")?.as_str()? {
        "gate" => StartedBy::Gate,
        "api" => StartedBy::Api(text(v, "name")?),
        "agent_keys" => StartedBy::AgentKeys,
        "switchboard" => StartedBy::Switchboard(text(v, "name")?),
        _ => return None,
    })
}

fn outcome_to_json(o: Option<Outcome>) -> Value {
    match o {
        None => Value::Null,
        Some(Outcome::Verified) => json!({"reason": null}),
        Some(Outcome::NotVerified(r)) => json!({"reason": r.code()}),
    }
}

fn outcome_from_json(v: &Value) -> Option<Option<Outcome>> {
    match v {
        Value::Null => Some(None),
        Value::Object(_) => match v.get("reason")? {
            Value::Null => Some(Some(Outcome::Verified)),
            Value::String(code) => Some(Some(Outcome::NotVerified(Reason::from_code(code)?))),
            _ => None,
        },
        _ => None,
    }
}

pub fn verification_to_json(v: &VerificationView) -> Value {
    json!({
        "id": v.id,
        "call_id": v.call_id,
        "queue": v.queue,
        "idp": v.idp,
        "method": v.method.code(),
        "started_by": started_by_to_json(&v.started_by),
        "started_at": millis(v.started_at),
        "ended_at": v.ended_at.map(millis),
        "stages": v.stages.iter().map(|(s, at)| json!([s.code(), millis(*at)])).collect::<Vec<_>>(),
        "outcome": outcome_to_json(v.outcome),
        "fields": v.fields.iter().map(|(k, val)| json!([k, val])).collect::<Vec<_>>(),
        "limit": v.limit.map(|l| l.code()),
        "word_pair": v.word_pair,
    })
}

pub fn verification_from_json(v: &Value) -> Option<VerificationView> {
    let method = v.get("method")?.as_str()?;
    let stages = v
        .get("stages")?
        .as_array()?
        .iter()
        .map(|pair| {
            let code = pair.get(0)?.as_str()?;
            let stage = STAGES.into_iter().find(|s| s.code() == code)?;
            Some((stage, time(pair.get(1)?)?))
        })
        .collect::<Option<Vec<_>>>()?;
    let fields = v
        .get("fields")?
        .as_array()?
        .iter()
        .map(|pair| {
            Some((
                pair.get(0)?.as_str()?.to_owned(),
                pair.get(1)?.as_str()?.to_owned(),
            ))
        })
        .collect::<Option<Vec<_>>>()?;
    let limit = match v.get("limit")? {
        Value::Null => None,
        Value::String(code) => Some(Limit::from_code(code)?),
        _ => return None,
    };
    let ended_at = match v.get("ended_at")? {
        Value::Null => None,
        t => Some(time(t)?),
    };
    Some(VerificationView {
        id: text(v, "id")?,
        call_id: text(v, "call_id")?,
        queue: text(v, "queue")?,
        idp: text(v, "idp")?,
        method: METHODS.into_iter().find(|m| m.code() == method)?,
        started_by: started_by_from_json(v.get("started_by")?)?,
        started_at: time(v.get("started_at")?)?,
        ended_at,
        stages,
        outcome: outcome_from_json(v.get("outcome")?)?,
        fields,
        limit,
        word_pair: opt_text(v, "word_pair")?,
    })
}

pub fn call_to_json(c: &CallView) -> Value {
    json!({
        "call_id": c.call_id,
        "queue": c.queue,
        "state": c.state.code(),
        "agent": c.agent,
        "aliases": c.aliases,
        "started_at": millis(c.started_at),
        "can_verify": c.can_verify,
        "verification": c.verification.as_ref().map(verification_to_json),
        "keypad": c.keypad,
        "owner": c.owner.as_ref().map(|o| json!({"instance": o.instance, "lost": o.lost})),
    })
}

pub fn call_from_json(v: &Value) -> Option<CallView> {
    let state = v.get("state")?.as_str()?;
    let verification = match v.get("verification")? {
        Value::Null => None,
        x => Some(verification_from_json(x)?),
    };
    let owner = match v.get("owner")? {
        Value::Null => None,
        o => Some(Owner {
            instance: text(o, "instance")?,
            lost: o.get("lost")?.as_bool()?,
        }),
    };
    Some(CallView {
        call_id: text(v, "call_id")?,
        queue: text(v, "queue")?,
        state: STATES.into_iter().find(|s| s.code() == state)?,
        agent: opt_text(v, "agent")?,
        aliases: v
            .get("aliases")?
            .as_array()?
            .iter()
            .map(|a| a.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()?,
        started_at: time(v.get("started_at")?)?,
        can_verify: v.get("can_verify")?.as_bool()?,
        verification,
        keypad: v.get("keypad")?.as_bool()?,
        owner,
    })
}

/// A live event as it travels between instances.
pub fn event_to_json(kind: LiveKind, call: &CallView) -> Value {
    json!({"kind": kind.code(), "call": call_to_json(call)})
}

pub fn event_from_json(v: &Value) -> Option<(LiveKind, CallView)> {
    let kind = LiveKind::from_code(v.get("kind")?.as_str()?)?;
    Some((kind, call_from_json(v.get("call")?)?))
}

/// What a forwarded request asks the owning instance to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Start a check; `number` as typed by the agent (redacted in `Debug`), `None` for the keypad.
    Start {
        number: Option<TypedNumber>,
    },
    Cancel,
    /// The person of this call's order started an order on another instance's call.
    Superseded,
    /// A hosted switchboard's cancel node for a request-node verification this instance runs
    /// (`call_id` is the switchboard's call id).
    SwitchboardCancel {
        board: String,
        verification: String,
    },
    /// A hosted switchboard's start node, for the instance consuming the switchboard's feed (so the
    /// verification runs beside the feed's call); `call_id` is the switchboard's call id.
    SwitchboardStart {
        board: String,
        queue: String,
        number: TypedNumber,
        caller: String,
        language: Option<String>,
        attempt: u32,
    },
}

/// A request for the instance owning a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Matches the reply to the request.
    pub id: String,
    /// The instance to reply to.
    pub from: String,
    pub call_id: String,
    pub by: StartedBy,
    pub op: Op,
}

pub fn command_to_json(c: &Command) -> Value {
    let (op, number) = match &c.op {
        Op::Start { number } => ("start", number.as_ref().map(|n| n.0.clone())),
        Op::Cancel => ("cancel", None),
        Op::Superseded => ("superseded", None),
        Op::SwitchboardCancel { .. } => ("switchboard_cancel", None),
        Op::SwitchboardStart { number, .. } => ("switchboard_start", Some(number.0.clone())),
    };
    let mut v = json!({
        "id": c.id,
        "from": c.from,
        "call_id": c.call_id,
        "by": started_by_to_json(&c.by),
        "op": op,
        "number": number,
    });
    if let Some(map) = v.as_object_mut() {
        match &c.op {
            Op::SwitchboardCancel {
                board,
                verification,
            } => {
                map.insert("board".into(), json!(board));
                map.insert("verification".into(), json!(verification));
            }
            Op::SwitchboardStart {
                board,
                queue,
                caller,
                language,
                attempt,
                ..
            } => {
                map.insert("board".into(), json!(board));
                map.insert("queue".into(), json!(queue));
                map.insert("caller".into(), json!(caller));
                map.insert("language".into(), json!(language));
                map.insert("attempt".into(), json!(attempt));
            }
            _ => {}
        }
    }
    v
}

pub fn command_from_json(v: &Value) -> Option<Command> {
    let op = match v.get("op")?.as_str()? {
        "start" => Op::Start {
            number: opt_text(v, "number")?.map(TypedNumber),
        },
        "cancel" => Op::Cancel,
        "superseded" => Op::Superseded,
        "switchboard_cancel" => Op::SwitchboardCancel {
            board: text(v, "board")?,
            verification: text(v, "verification")?,
        },
        "switchboard_start" => Op::SwitchboardStart {
            board: text(v, "board")?,
            queue: text(v, "queue")?,
            number: TypedNumber(text(v, "number")?),
            caller: text(v, "caller")?,
            language: opt_text(v, "language")?,
            attempt: u32::try_from(v.get("attempt")?.as_u64()?).ok()?,
        },
        _ => return None,
    };
    Some(Command {
        id: text(v, "id")?,
        from: text(v, "from")?,
        call_id: text(v, "call_id")?,
        by: started_by_from_json(v.get("by")?)?,
        op,
    })
}

/// The owner's answer: the verification id, or why not.
pub fn reply_to_json(id: &str, answer: &Result<String, Refusal>) -> Value {
    match answer {
        Ok(verification) => json!({"id": id, "ok": verification}),
        Err(r) => json!({"id": id, "refused": r.code()}),
    }
}

pub fn reply_from_json(v: &Value) -> Option<(String, Result<String, Refusal>)> {
    let id = text(v, "id")?;
    if let Some(ok) = v.get("ok").and_then(Value::as_str) {
        return Some((id, Ok(ok.to_owned())));
    }
    let refused = Refusal::from_code(v.get("refused")?.as_str()?)?;
    Some((id, Err(refused)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn arb_outcome() -> impl Strategy<Value = Option<Outcome>> {
        prop_oneof![
            Just(None),
            Just(Some(Outcome::Verified)),
            (0..Reason::ALL.len()).prop_map(|i| Some(Outcome::NotVerified(Reason::ALL[i]))),
        ]
    }

    fn arb_verification() -> impl Strategy<Value = VerificationView> {
        (
            "[a-z0-9-]{1,12}",
            0..METHODS.len(),
            0u8..4,
            proptest::collection::vec((0..STAGES.len(), 0u64..1 << 40), 0..5),
            arb_outcome(),
            proptest::collection::vec(("[a-z_]{1,8}", "\\PC{0,12}"), 0..4),
            proptest::option::of(0..Limit::ALL.len()),
            proptest::option::of("[a-z ]{1,12}"),
            proptest::option::of(0u64..1 << 40),
        )
            .prop_map(
                |(id, m, by, stages, outcome, fields, limit, word_pair, ended)| VerificationView {
                    id: id.clone(),
                    call_id: format!("call-{id}"),
                    queue: "support".into(),
                    idp: "bankid".into(),
                    method: METHODS[m],
                    started_by: match by {
                        0 => StartedBy::Gate,
                        1 => StartedBy::Api(format!("crm-{id}")),
                        2 => StartedBy::AgentKeys,
                        _ => StartedBy::Switchboard("tvx".into()),
                    },
                    started_at: at(1_700_000_000_123),
                    ended_at: ended.map(at),
                    stages: stages
                        .into_iter()
                        .map(|(s, t)| (STAGES[s], at(t)))
                        .collect(),
                    outcome,
                    fields,
                    limit: limit.map(|i| Limit::ALL[i]),
                    word_pair,
                },
            )
    }

    fn arb_call() -> impl Strategy<Value = CallView> {
        (
            "[a-z0-9.-]{1,20}",
            0..STATES.len(),
            proptest::option::of("PJSIP/[0-9]{3,4}"),
            proptest::collection::vec("[a-z0-9-]{1,10}", 0..3),
            any::<bool>(),
            proptest::option::of(arb_verification()),
            proptest::option::of(("[a-z0-9-]{1,10}", any::<bool>())),
        )
            .prop_map(|(id, s, agent, aliases, can_verify, verification, owner)| {
                CallView {
                    call_id: id,
                    queue: "care".into(),
                    state: STATES[s],
                    agent,
                    aliases,
                    started_at: at(1_700_000_000_000),
                    can_verify,
                    verification,
                    keypad: s % 2 == 0,
                    owner: owner.map(|(instance, lost)| Owner { instance, lost }),
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn a_call_view_survives_the_wire(call in arb_call()) {
            let kind = LiveKind::ALL[call.call_id.len() % LiveKind::ALL.len()];
            let back = event_from_json(&event_to_json(kind, &call));
            prop_assert_eq!(back, Some((kind, call)));
        }
    }

    #[test]
    fn commands_and_replies_survive_the_wire() {
        for op in [
            Op::Start {
                number: Some(TypedNumber("19900101-1234".into())),
            },
            Op::Start { number: None },
            Op::Cancel,
            Op::Superseded,
            Op::SwitchboardCancel {
                board: "tvx".into(),
                verification: "v-1".into(),
            },
            Op::SwitchboardStart {
                board: "tvx".into(),
                queue: "support".into(),
                number: TypedNumber("198112189876#".into()),
                caller: "+46701234567".into(),
                language: Some("sv".into()),
                attempt: 3,
            },
            Op::SwitchboardStart {
                board: "tvx".into(),
                queue: "support".into(),
                number: TypedNumber("198112189876".into()),
                caller: String::new(),
                language: None,
                attempt: 0,
            },
        ] {
            let c = Command {
                id: "r1".into(),
                from: "site-b".into(),
                call_id: "c1".into(),
                by: StartedBy::Api("agent1".into()),
                op,
            };
            assert_eq!(command_from_json(&command_to_json(&c)), Some(c));
        }
        for answer in [
            Ok("v1".to_owned()),
            Err(Refusal::NotAnchored),
            Err(Refusal::OwnerUnreachable),
        ] {
            assert_eq!(
                reply_from_json(&reply_to_json("r1", &answer)),
                Some(("r1".to_owned(), answer))
            );
        }
        assert_eq!(command_from_json(&json!({"op": "explode"})), None);
        assert_eq!(event_from_json(&json!({"kind": "call_started"})), None);
    }
}
