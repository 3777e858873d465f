//! Outcomes of a gated call and the call-metadata contract.
//!
//! Invariant: the set of statuses and reasons is closed and every code is a stable snake_case string;
//! every surface (channel variables, REST, events, webhooks) renders a [`Record`] through
//! [`render`] and a queue's [`Disclosure`] policy, so no surface can show more than the policy allows.

use std::fmt;
use std::time::SystemTime;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::pnr::{PersonalNumber, PseudonymKey};

/// The status of a verification, the first thing a dialplan or CRM routes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    Verified,
    Failed,
    Unavailable,
    Skipped,
    Interrupted,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Verified,
        Status::Failed,
        Status::Unavailable,
        Status::Skipped,
        Status::Interrupted,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Status::Verified => "verified",
            Status::Failed => "failed",
            Status::Unavailable => "unavailable",
            Status::Skipped => "skipped",
            Status::Interrupted => "interrupted",
        }
    }

    pub fn from_code(code: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.code() == code)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Why a call did not end verified. Each reason belongs to exactly one [`Status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    // failed
    UserCancelled,
    DeclinedCall,
    Expired,
    Timeout,
    InvalidNumber,
    NoInput,
    TooManyAttempts,
    RateLimited,
    AlreadyInProgress,
    IdBlocked,
    IdentityMismatch,
    CallerHungUp,
    AgentCancelled,
    Superseded,
    // unavailable
    ProviderUnavailable,
    ProviderBusy,
    ProviderError,
    // skipped
    NotGated,
    Draining,
    UnknownQueue,
    // interrupted
    Restart,
    PbxLost,
}

impl Reason {
    pub const ALL: [Reason; 22] = [
        Reason::UserCancelled,
        Reason::DeclinedCall,
        Reason::Expired,
        Reason::Timeout,
        Reason::InvalidNumber,
        Reason::NoInput,
        Reason::TooManyAttempts,
        Reason::RateLimited,
        Reason::AlreadyInProgress,
        Reason::IdBlocked,
        Reason::IdentityMismatch,
        Reason::CallerHungUp,
        Reason::AgentCancelled,
        Reason::Superseded,
        Reason::ProviderUnavailable,
        Reason::ProviderBusy,
        Reason::ProviderError,
        Reason::NotGated,
        Reason::Draining,
        Reason::UnknownQueue,
        Reason::Restart,
        Reason::PbxLost,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Reason::UserCancelled => "user_cancelled",
            Reason::DeclinedCall => "declined_call",
            Reason::Expired => "expired",
            Reason::Timeout => "timeout",
            Reason::InvalidNumber => "invalid_number",
            Reason::NoInput => "no_input",
            Reason::TooManyAttempts => "too_many_attempts",
            Reason::RateLimited => "rate_limited",
            Reason::AlreadyInProgress => "already_in_progress",
            Reason::IdBlocked => "id_blocked",
            Reason::IdentityMismatch => "identity_mismatch",
            Reason::CallerHungUp => "caller_hung_up",
            Reason::AgentCancelled => "agent_cancelled",
            Reason::Superseded => "superseded",
            Reason::ProviderUnavailable => "provider_unavailable",
            Reason::ProviderBusy => "provider_busy",
            Reason::ProviderError => "provider_error",
            Reason::NotGated => "not_gated",
            Reason::Draining => "draining",
            Reason::UnknownQueue => "unknown_queue",
            Reason::Restart => "restart",
            Reason::PbxLost => "pbx_lost",
        }
    }

    pub fn from_code(code: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.code() == code)
    }

    pub fn status(self) -> Status {
        use Reason::*;
        match self {
            UserCancelled | DeclinedCall | Expired | Timeout | InvalidNumber | NoInput
            | TooManyAttempts | RateLimited | AlreadyInProgress | IdBlocked | IdentityMismatch
            | CallerHungUp | AgentCancelled | Superseded => Status::Failed,
            ProviderUnavailable | ProviderBusy | ProviderError => Status::Unavailable,
            NotGated | Draining | UnknownQueue => Status::Skipped,
            Restart | PbxLost => Status::Interrupted,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// How a check (or a gated call) ended: verified, or not, for exactly one reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Verified,
    NotVerified(Reason),
}

impl Outcome {
    pub fn status(self) -> Status {
        match self {
            Outcome::Verified => Status::Verified,
            Outcome::NotVerified(r) => r.status(),
        }
    }

    pub fn reason(self) -> Option<Reason> {
        match self {
            Outcome::Verified => None,
            Outcome::NotVerified(r) => Some(r),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Verified => f.write_str("verified"),
            Outcome::NotVerified(r) => write!(f, "{}/{}", r.status(), r),
        }
    }
}

/// The identity a provider vouched for. The number stays inside [`PersonalNumber`].
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub number: PersonalNumber,
    pub name: Option<String>,
    pub given_name: Option<String>,
    pub surname: Option<String>,
    /// Hex SHA-256 over the provider's signature and OCSP response (kept as evidence, not the data).
    pub evidence_digest: Option<String>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("number", &self.number)
            .field("name", &self.name.as_ref().map(|_| "<present>"))
            .field("evidence_digest", &self.evidence_digest)
            .finish()
    }
}

/// Identity fields a queue may disclose. An empty set means status only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    Name,
    Pseudonym,
    MaskedNumber,
    Number,
}

impl Field {
    pub const ALL: [Field; 4] = [
        Field::Name,
        Field::Pseudonym,
        Field::MaskedNumber,
        Field::Number,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Field::Name => "name",
            Field::Pseudonym => "pseudonym",
            Field::MaskedNumber => "masked_number",
            Field::Number => "number",
        }
    }

    pub fn from_code(code: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.code() == code)
    }
}

/// A queue's disclosure policy: which identity fields leave callgate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Disclosure {
    fields: Vec<Field>,
}

impl Disclosure {
    pub fn new(mut fields: Vec<Field>) -> Self {
        fields.sort();
        fields.dedup();
        Disclosure { fields }
    }

    pub fn status_only() -> Self {
        Disclosure::default()
    }

    pub fn allows(&self, field: Field) -> bool {
        self.fields.contains(&field)
    }

    pub fn fields(&self) -> &[Field] {
        &self.fields
    }
}

/// The result of one verification, as recorded and rendered.
#[derive(Debug, Clone)]
pub struct Record {
    /// Verification id (`CALLGATE_REF`), the key for the REST API.
    pub reference: String,
    /// How the check was made, e.g. `bankid_phone` (empty when no check ran).
    pub method: String,
    pub outcome: Outcome,
    pub at: SystemTime,
    pub identity: Option<Identity>,
}

/// The channel-variable names of the call-metadata contract.
pub mod vars {
    pub const STATUS: &str = "CALLGATE_STATUS";
    pub const REASON: &str = "CALLGATE_REASON";
    pub const REF: &str = "CALLGATE_REF";
    pub const METHOD: &str = "CALLGATE_METHOD";
    pub const AT: &str = "CALLGATE_AT";
    pub const NAME: &str = "CALLGATE_NAME";
    pub const PSEUDONYM: &str = "CALLGATE_PSEUDONYM";
    pub const NUMBER_MASKED: &str = "CALLGATE_NUMBER_MASKED";
    pub const NUMBER: &str = "CALLGATE_NUMBER";
    /// Every name, in the order they are rendered.
    pub const ALL: [&str; 9] = [
        STATUS,
        REASON,
        REF,
        METHOD,
        AT,
        NAME,
        PSEUDONYM,
        NUMBER_MASKED,
        NUMBER,
    ];
}

/// RFC 3339 UTC with second precision, e.g. `2026-11-23T10:00:00Z`.
pub fn rfc3339(at: SystemTime) -> String {
    let t = OffsetDateTime::from(at).replace_nanosecond(0);
    match t {
        Ok(t) => t.format(&Rfc3339).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Renders a record through a disclosure policy: the one function every surface uses.
///
/// Status, reason, reference, method and time are always present (reason empty when verified);
/// identity fields appear only when the record carries an identity and the policy allows them.
pub fn render(
    record: &Record,
    policy: &Disclosure,
    key: &PseudonymKey,
) -> Vec<(&'static str, String)> {
    let mut out = vec![
        (vars::STATUS, record.outcome.status().code().to_owned()),
        (
            vars::REASON,
            record
                .outcome
                .reason()
                .map(|r| r.code().to_owned())
                .unwrap_or_default(),
        ),
        (vars::REF, record.reference.clone()),
        (vars::METHOD, record.method.clone()),
        (vars::AT, rfc3339(record.at)),
    ];
    let Some(identity) = record
        .identity
        .as_ref()
        .filter(|_| record.outcome == Outcome::Verified)
    else {
        return out;
    };
    if policy.allows(Field::Name) {
        if let Some(name) = &identity.name {
            out.push((vars::NAME, name.clone()));
        }
    }
    if policy.allows(Field::Pseudonym) {
        out.push((vars::PSEUDONYM, identity.number.pseudonym(key)));
    }
    if policy.allows(Field::MaskedNumber) {
        out.push((vars::NUMBER_MASKED, identity.number.masked()));
    }
    if policy.allows(Field::Number) {
        out.push((
            vars::NUMBER,
            identity.number.expose_for_disclosure().to_owned(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn record(outcome: Outcome) -> Record {
        let number = PersonalNumber::parse_swedish_12("199908072391").unwrap();
        Record {
            reference: "ref-1".into(),
            method: "bankid_phone".into(),
            outcome,
            at: UNIX_EPOCH + Duration::from_secs(1_795_000_000),
            identity: Some(Identity {
                number,
                name: Some("Anna Andersson".into()),
                given_name: None,
                surname: None,
                evidence_digest: None,
            }),
        }
    }

    #[test]
    fn every_reason_has_a_unique_code_that_round_trips() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.code()), "duplicate {}", r.code());
            assert_eq!(Reason::from_code(r.code()), Some(r));
            assert!(r.code().chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        }
        for s in Status::ALL {
            assert_eq!(Status::from_code(s.code()), Some(s));
        }
    }

    #[test]
    fn status_only_policy_renders_no_identity() {
        let key = PseudonymKey::new(b"k".to_vec());
        let vars = render(&record(Outcome::Verified), &Disclosure::status_only(), &key);
        let names: Vec<_> = vars.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                vars::STATUS,
                vars::REASON,
                vars::REF,
                vars::METHOD,
                vars::AT
            ]
        );
        assert_eq!(vars[0].1, "verified");
        assert_eq!(vars[1].1, "");
        assert_eq!(vars[4].1, "2026-11-18T11:06:40Z");
    }

    #[test]
    fn policy_decides_each_identity_field() {
        let key = PseudonymKey::new(b"k".to_vec());
        let rec = record(Outcome::Verified);
        let only_name = render(&rec, &Disclosure::new(vec![Field::Name]), &key);
        assert!(only_name
            .iter()
            .any(|(n, v)| *n == vars::NAME && v == "Anna Andersson"));
        assert!(!only_name.iter().any(|(_, v)| v.contains("199908072391")));
        let masked = render(&rec, &Disclosure::new(vec![Field::MaskedNumber]), &key);
        assert!(masked.iter().any(|(n, _)| *n == vars::NUMBER_MASKED));
        assert!(!masked.iter().any(|(_, v)| v.contains("2391")));
        let all = render(&rec, &Disclosure::new(Field::ALL.to_vec()), &key);
        assert!(all
            .iter()
            .any(|(n, v)| *n == vars::NUMBER && v == "199908072391"));
        assert_eq!(all.len(), 9);
    }

    #[test]
    fn each_disclose_setting_renders_exactly_its_variables() {
        let key = PseudonymKey::new(b"k".to_vec());
        let rec = record(Outcome::Verified);
        let always = [
            vars::STATUS,
            vars::REASON,
            vars::REF,
            vars::METHOD,
            vars::AT,
        ];
        for (fields, extra) in [
            (vec![], vec![]),
            (vec![Field::Name], vec![vars::NAME]),
            (vec![Field::Pseudonym], vec![vars::PSEUDONYM]),
            (vec![Field::MaskedNumber], vec![vars::NUMBER_MASKED]),
            (vec![Field::Number], vec![vars::NUMBER]),
        ] {
            let out = render(&rec, &Disclosure::new(fields.clone()), &key);
            let names: Vec<_> = out.iter().map(|(n, _)| *n).collect();
            let expected: Vec<_> = always.iter().chain(extra.iter()).copied().collect();
            assert_eq!(names, expected, "{fields:?}");
            let digits = out
                .iter()
                .any(|(_, v)| v.contains("199908072391") || v.contains("9908072391"));
            assert_eq!(digits, fields == [Field::Number], "{fields:?}");
        }
    }

    #[test]
    fn a_failed_record_never_discloses_identity() {
        let key = PseudonymKey::new(b"k".to_vec());
        let rec = record(Outcome::NotVerified(Reason::IdentityMismatch));
        let vars = render(&rec, &Disclosure::new(Field::ALL.to_vec()), &key);
        assert_eq!(vars.len(), 5);
        assert_eq!(vars[0].1, "failed");
        assert_eq!(vars[1].1, "identity_mismatch");
    }
}
