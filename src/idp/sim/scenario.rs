//! Simulator scenarios, selected by the 3-digit serial (`NNN` in `YYYYMMDDNNNC`) of a valid personal
//! number, and helpers that build such numbers.
//!
//! Invariant: the table is total (every valid number maps to exactly one scenario; serials without a row
//! approve), and every number produced here passes the Luhn check.

use crate::idp::bankid::wire::HintCode;

/// Birth date used for the numbers in [`scenario_table`].
pub const TABLE_DATE: &str = "19800101";

/// What the simulator does with an order for a given personal number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scenario {
    /// outstandingTransaction → userCallConfirm → userSign → complete (one step each).
    Approve,
    /// outstandingTransaction → userCallConfirm → failed `userCancel`.
    UserCancels,
    /// outstandingTransaction → userCallConfirm → failed `userDeclinedCall`.
    DeclinesCall,
    /// outstandingTransaction for three steps → failed `expiredTransaction`.
    Expires,
    /// outstandingTransaction → failed `certificateErr`.
    BlockedId,
    /// Every start answers 400 `alreadyInProgress`.
    AlreadyInProgress,
    /// Every start answers 503 `maintenance`.
    Maintenance,
    /// Every start answers 500 `internalError`.
    InternalError,
    /// Every start answers 429 `tooManyRequests` with `RateLimit-*` headers.
    RateLimited,
    /// The order is created at once, but the start is answered only after [`SLOW_DELAY`]; then approves.
    Slow,
    /// outstandingTransaction → pending `someNewHint` → complete.
    UnknownHint,
    /// Approves, but `completionData` names another (valid) personal number.
    WrongPerson,
    /// outstandingTransaction → failed `someNewFailure`.
    UnknownFailure,
}

/// How long the [`Scenario::Slow`] start waits before answering.
pub const SLOW_DELAY: std::time::Duration = std::time::Duration::from_secs(10);

/// The value of `RateLimit-Reset` (seconds) in [`Scenario::RateLimited`] answers.
pub const RATE_LIMIT_RESET_SECS: u64 = 7;

/// An unknown pending hint code used by [`Scenario::UnknownHint`].
pub const UNKNOWN_PENDING_HINT: &str = "someNewHint";
/// An unknown failed hint code used by [`Scenario::UnknownFailure`].
pub const UNKNOWN_FAILED_HINT: &str = "someNewFailure";

impl Scenario {
    /// Every scenario, in table order.
    pub const ALL: [Scenario; 13] = [
        Scenario::Approve,
        Scenario::UserCancels,
        Scenario::DeclinesCall,
        Scenario::Expires,
        Scenario::BlockedId,
        Scenario::AlreadyInProgress,
        Scenario::Maintenance,
        Scenario::InternalError,
        Scenario::RateLimited,
        Scenario::Slow,
        Scenario::UnknownHint,
        Scenario::WrongPerson,
        Scenario::UnknownFailure,
    ];

    /// The serial selecting this scenario (`Approve` is any serial without a row; 123 is shown).
    pub fn serial(self) -> u16 {
        match self {
            Scenario::Approve => 123,
            Scenario::UserCancels => 901,
            Scenario::DeclinesCall => 902,
            Scenario::Expires => 903,
            Scenario::BlockedId => 904,
            Scenario::AlreadyInProgress => 905,
            Scenario::Maintenance => 906,
            Scenario::InternalError => 907,
            Scenario::RateLimited => 908,
            Scenario::Slow => 909,
            Scenario::UnknownHint => 910,
            Scenario::WrongPerson => 911,
            Scenario::UnknownFailure => 912,
        }
    }

    pub fn from_serial(serial: u16) -> Scenario {
        Scenario::ALL
            .into_iter()
            .find(|s| *s != Scenario::Approve && s.serial() == serial)
            .unwrap_or(Scenario::Approve)
    }

    /// The scenario of a 12-digit number (digits 9–11 are the serial); `None` if not 12 digits.
    pub fn of_number(number: &str) -> Option<Scenario> {
        if number.len() != 12 || !number.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        number[8..11].parse().ok().map(Scenario::from_serial)
    }

    /// A valid number (born [`TABLE_DATE`]) selecting this scenario.
    pub fn number(self) -> String {
        number_with_serial(TABLE_DATE, self.serial())
    }

    pub fn description(self) -> &'static str {
        match self {
            Scenario::Approve => "approves (any serial not listed): outstandingTransaction, userCallConfirm, userSign, complete",
            Scenario::UserCancels => "user cancels after confirming the call: failed userCancel",
            Scenario::DeclinesCall => "user says they are not in a call with us: failed userDeclinedCall",
            Scenario::Expires => "app never picks the order up: failed expiredTransaction after 3 steps",
            Scenario::BlockedId => "blocked BankID: failed certificateErr",
            Scenario::AlreadyInProgress => "every start answers 400 alreadyInProgress",
            Scenario::Maintenance => "every start answers 503 maintenance",
            Scenario::InternalError => "every start answers 500 internalError",
            Scenario::RateLimited => "every start answers 429 tooManyRequests (RateLimit-Reset: 7)",
            Scenario::Slow => "start creates the order but answers only after 10 s, then approves",
            Scenario::UnknownHint => "pending with an unknown hint code (someNewHint), then completes",
            Scenario::WrongPerson => "completes, but completionData names another person",
            Scenario::UnknownFailure => "fails with an unknown hint code (someNewFailure)",
        }
    }

    /// The collect script of an order, or `None` when a start never creates one.
    pub(crate) fn script(self) -> Option<Vec<Phase>> {
        use HintCode as H;
        use Phase::{Complete, Failed, Pending};
        let script = match self {
            Scenario::Approve | Scenario::Slow | Scenario::WrongPerson => vec![
                Pending(H::OutstandingTransaction, 1),
                Pending(H::UserCallConfirm, 1),
                Pending(H::UserSign, 1),
                Complete,
            ],
            Scenario::UserCancels => vec![
                Pending(H::OutstandingTransaction, 1),
                Pending(H::UserCallConfirm, 1),
                Failed(H::UserCancel),
            ],
            Scenario::DeclinesCall => vec![
                Pending(H::OutstandingTransaction, 1),
                Pending(H::UserCallConfirm, 1),
                Failed(H::UserDeclinedCall),
            ],
            Scenario::Expires => vec![
                Pending(H::OutstandingTransaction, 3),
                Failed(H::ExpiredTransaction),
            ],
            Scenario::BlockedId => vec![
                Pending(H::OutstandingTransaction, 1),
                Failed(H::CertificateErr),
            ],
            Scenario::UnknownHint => vec![
                Pending(H::OutstandingTransaction, 1),
                Pending(H::from(UNKNOWN_PENDING_HINT), 1),
                Complete,
            ],
            Scenario::UnknownFailure => vec![
                Pending(H::OutstandingTransaction, 1),
                Failed(H::from(UNKNOWN_FAILED_HINT)),
            ],
            Scenario::AlreadyInProgress
            | Scenario::Maintenance
            | Scenario::InternalError
            | Scenario::RateLimited => return None,
        };
        Some(script)
    }
}

/// One state of an order's collect script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Pending with this hint for at least this many steps (and at least one collect).
    Pending(HintCode, u32),
    Failed(HintCode),
    Complete,
}

/// `(number, description)` for every scenario, for docs and the CLI.
pub fn scenario_table() -> Vec<(String, &'static str)> {
    Scenario::ALL
        .into_iter()
        .map(|s| (s.number(), s.description()))
        .collect()
}

/// Luhn check digit of the 9 digits `YYMMDDNNN` (weights 2,1,2,… from the left).
pub fn luhn_check_digit(nine: &str) -> Option<u8> {
    if nine.len() != 9 {
        return None;
    }
    let mut sum = 0u32;
    for (i, b) in nine.bytes().enumerate() {
        if !b.is_ascii_digit() {
            return None;
        }
        let mut v = u32::from(b - b'0') * if i % 2 == 0 { 2 } else { 1 };
        if v > 9 {
            v -= 9;
        }
        sum += v;
    }
    u8::try_from((10 - sum % 10) % 10).ok()
}

/// Builds the valid 12-digit number `date` (`YYYYMMDD`) + `serial` (3 digits, taken modulo 1000) + check.
/// Returns an empty string if `date` is not 8 digits.
pub fn number_with_serial(date: &str, serial: u16) -> String {
    let serial = format!("{:03}", serial % 1000);
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return String::new();
    }
    match luhn_check_digit(&format!("{}{serial}", &date[2..])) {
        Some(check) => format!("{date}{serial}{check}"),
        None => String::new(),
    }
}

/// Whether `number` is 12 digits with a correct check digit.
pub fn is_valid_number(number: &str) -> bool {
    number.len() == 12
        && number.bytes().all(|b| b.is_ascii_digit())
        && luhn_check_digit(&number[2..11]).map(|c| c + b'0') == number.as_bytes().get(11).copied()
}

/// Another valid number with the same birth date (for [`Scenario::WrongPerson`]).
pub(crate) fn other_person(number: &str) -> String {
    let serial = if number.get(8..11) == Some("111") {
        112
    } else {
        111
    };
    number_with_serial(number.get(..8).unwrap_or(TABLE_DATE), serial)
}

const GIVEN_NAMES: [&str; 8] = [
    "Astrid", "Bertil", "Cecilia", "Dragan", "Elsa", "Folke", "Greta", "Hassan",
];
const SURNAMES: [&str; 8] = [
    "Andersson",
    "Berg",
    "Carlsson",
    "Dahl",
    "Ek",
    "Forsberg",
    "Gustafsson",
    "Holm",
];

/// A name derived deterministically from the number: `(given name, surname)`.
pub(crate) fn name_for(number: &str) -> (&'static str, &'static str) {
    // FNV-1a over the digits.
    let mut h: u32 = 0x811c_9dc5;
    for b in number.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let given = GIVEN_NAMES[(h % 8) as usize];
    let surname = SURNAMES[((h >> 8) % 8) as usize];
    (given, surname)
}
