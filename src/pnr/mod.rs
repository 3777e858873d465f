//! Personal identity numbers: Swedish personnummer and samordningsnummer, Norwegian fødselsnummer and
//! D-number, Danish CPR.
//!
//! Responsibility: turn caller or provider input into a validated [`PersonalNumber`] (length, calendar
//! date, century, check digits, accepted kinds) and offer the only sanctioned views of it.
//!
//! Invariant: the digits never leave [`PersonalNumber`] except through the explicit methods
//! [`PersonalNumber::masked`], [`PersonalNumber::pseudonym`], [`PersonalNumber::expose_for_idp`] and
//! [`PersonalNumber::expose_for_disclosure`]. There is no `Display`, no `Serialize` and no `Deref`;
//! `Debug` prints a redaction without a single digit, and [`ParseError`] messages never carry input.
//! The module reads no clock: "today" is passed in through [`ParseOptions`].

use std::fmt;

use ring::hmac;
use time::{Date, Month};

#[cfg(test)]
mod tests;

/// Upper bound on raw input length (digits plus separators); longer input is rejected as
/// [`ParseError::Length`] before any other work.
const MAX_INPUT_LEN: usize = 32;

/// The kind of a personal identity number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Swedish personnummer, 12 digits `YYYYMMDDNNNC`.
    SePersonnummer,
    /// Swedish samordningsnummer: a personnummer whose day of month is raised by 60.
    SeSamordningsnummer,
    /// Norwegian fødselsnummer, 11 digits `DDMMYYIIIKK`.
    NoFodselsnummer,
    /// Norwegian D-number: a fødselsnummer whose day of month is raised by 40.
    NoDNumber,
    /// Danish CPR number, 10 digits `DDMMYYSSSS`.
    DkCpr,
}

/// The country that issues a [`Kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Country {
    Se,
    No,
    Dk,
}

/// Why an input is not an acceptable personal number. Messages are short and never contain the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ParseError {
    /// The digit count matches no form that applies. A 10-digit entry gets this too when the Swedish
    /// short form is switched off and Danish CPR is not accepted (the caller should enter 12 digits).
    #[error("wrong number of digits")]
    Length,
    /// Something other than digits and the separators `-`, `+` and space.
    #[error("contains characters other than digits and separators")]
    NotDigits,
    /// No real calendar date, an unknown century, or a day/month outside every known form.
    #[error("not a valid birth date")]
    Date,
    /// A real date that lies after the `today` the parse was given.
    #[error("birth date is in the future")]
    FutureDate,
    /// The check digit(s) do not match.
    #[error("check digit does not match")]
    Checksum,
    /// A valid number of a kind this caller does not accept.
    #[error("kind of number not accepted")]
    NotAccepted,
}

/// What a parse accepts and the date it treats as today.
pub struct ParseOptions<'a> {
    /// Kinds accepted; a valid number of any other kind is [`ParseError::NotAccepted`].
    pub kinds: &'a [Kind],
    /// Accept the Swedish 10-digit form `YYMMDDNNNC` (century inferred, see [`PersonalNumber::parse`]).
    pub accept_10_digits: bool,
    /// Birth dates after this day are rejected; also the reference for 10-digit century inference.
    pub today: Date,
}

/// A validated personal identity number. The digits are private; see the module invariant.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PersonalNumber {
    /// Canonical ASCII digits: 12 for Swedish, 11 for Norwegian, 10 for Danish.
    digits: String,
    kind: Kind,
    /// The real birth date (coordination/D-number offsets removed).
    birth_date: Date,
}

/// Key for [`PersonalNumber::pseudonym`] (HMAC-SHA256). `Debug` is redacted.
#[derive(Clone)]
pub struct PseudonymKey(hmac::Key);

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::SePersonnummer,
        Kind::SeSamordningsnummer,
        Kind::NoFodselsnummer,
        Kind::NoDNumber,
        Kind::DkCpr,
    ];

    /// Stable snake_case code (config, metrics, audit).
    pub fn code(self) -> &'static str {
        match self {
            Kind::SePersonnummer => "se_personnummer",
            Kind::SeSamordningsnummer => "se_samordningsnummer",
            Kind::NoFodselsnummer => "no_fodselsnummer",
            Kind::NoDNumber => "no_d_number",
            Kind::DkCpr => "dk_cpr",
        }
    }

    pub fn from_code(code: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.code() == code)
    }

    pub fn country(self) -> Country {
        match self {
            Kind::SePersonnummer | Kind::SeSamordningsnummer => Country::Se,
            Kind::NoFodselsnummer | Kind::NoDNumber => Country::No,
            Kind::DkCpr => Country::Dk,
        }
    }
}

impl Country {
    /// ISO 3166-1 alpha-2, lowercase.
    pub fn code(self) -> &'static str {
        match self {
            Country::Se => "se",
            Country::No => "no",
            Country::Dk => "dk",
        }
    }
}

impl ParseError {
    /// Stable snake_case code (metrics, audit).
    pub fn code(self) -> &'static str {
        match self {
            ParseError::Length => "length",
            ParseError::NotDigits => "not_digits",
            ParseError::Date => "date",
            ParseError::FutureDate => "future_date",
            ParseError::Checksum => "checksum",
            ParseError::NotAccepted => "not_accepted",
        }
    }
}

impl fmt::Debug for PersonalNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PersonalNumber")
            .field("kind", &self.kind)
            .field("digits", &format_args!("<redacted>"))
            .finish()
    }
}

impl PersonalNumber {
    /// Parses caller or API input.
    ///
    /// The input may hold only ASCII digits and the separators `-`, `+` and space (anywhere; they are
    /// dropped). The digit count picks the form:
    /// - 12: Swedish personnummer or samordningsnummer `YYYYMMDDNNNC`;
    /// - 11: Norwegian fødselsnummer or D-number `DDMMYYIIIKK`;
    /// - 10: the Swedish short form `YYMMDDNNNC` if `accept_10_digits` is set and a Swedish kind is
    ///   accepted, otherwise Danish CPR `DDMMYYSSSS` if [`Kind::DkCpr`] is accepted, otherwise
    ///   [`ParseError::Length`]. A Swedish short form that fails is not retried as Danish.
    ///
    /// Swedish short form: without `+` the century is the latest one that does not put the birth date
    /// after `today` (the person is under 100). A `+` anywhere marks someone who turns 100 or more this
    /// year: the century is the latest whose birth year is at most `today`'s year minus 100. The result
    /// is canonicalised to 12 digits.
    ///
    /// Checks run as: characters, length, check digits, date, future date, accepted kind. A number of
    /// a kind not in `opts.kinds` is fully validated first and then refused with
    /// [`ParseError::NotAccepted`].
    pub fn parse(input: &str, opts: &ParseOptions<'_>) -> Result<PersonalNumber, ParseError> {
        let (digits, plus) = normalise(input)?;
        let accepts = |k: Kind| opts.kinds.contains(&k);
        let number = match digits.len() {
            12 => swedish_12(&digits, Some(opts.today))?,
            11 => norwegian(&digits, opts.today)?,
            10 if opts.accept_10_digits
                && (accepts(Kind::SePersonnummer) || accepts(Kind::SeSamordningsnummer)) =>
            {
                swedish_10(&digits, plus, opts.today)?
            }
            10 if accepts(Kind::DkCpr) => danish(&digits, opts.today)?,
            _ => return Err(ParseError::Length),
        };
        if accepts(number.kind) {
            Ok(number)
        } else {
            Err(ParseError::NotAccepted)
        }
    }

    /// Parses a Swedish 12-digit personnummer or samordningsnummer exactly as an identity provider
    /// returns it: 12 ASCII digits, no separators. There is no `today` here, so a future birth date is
    /// not checked; everything else (century 18/19/20, calendar date, Luhn) is.
    pub fn parse_swedish_12(input: &str) -> Result<PersonalNumber, ParseError> {
        if input.len() != 12 {
            return Err(ParseError::Length);
        }
        let digits = input
            .bytes()
            .map(|b| {
                if b.is_ascii_digit() {
                    Ok(b - b'0')
                } else {
                    Err(ParseError::NotDigits)
                }
            })
            .collect::<Result<Vec<u8>, _>>()?;
        swedish_12(&digits, None)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn country(&self) -> Country {
        self.kind.country()
    }

    /// The real birth date (for samordningsnummer and D-numbers, the day offset removed).
    pub fn birth_date(&self) -> Date {
        self.birth_date
    }

    /// Birth-date part visible, serial and check digits hidden: Swedish `YYYYMMDD-****`, Norwegian
    /// `DDMMYY*****`, Danish `DDMMYY-****`. Coordination and D-numbers show their stored (offset) day.
    pub fn masked(&self) -> String {
        let d = &self.digits;
        match self.kind.country() {
            Country::Se => format!("{}-****", &d[..8]),
            Country::No => format!("{}*****", &d[..6]),
            Country::Dk => format!("{}-****", &d[..6]),
        }
    }

    /// Lowercase hex HMAC-SHA256 of the canonical digits under `key`: stable for one key, unrelated
    /// across keys.
    pub fn pseudonym(&self, key: &PseudonymKey) -> String {
        let tag = hmac::sign(&key.0, self.digits.as_bytes());
        let mut out = String::with_capacity(tag.as_ref().len() * 2);
        for byte in tag.as_ref() {
            out.push(HEX[usize::from(byte >> 4)]);
            out.push(HEX[usize::from(byte & 0x0f)]);
        }
        out
    }

    /// The canonical digits for an identity provider (12 for Swedish numbers).
    pub fn expose_for_idp(&self) -> &str {
        &self.digits
    }

    /// The canonical digits, for use only where a queue's policy allows disclosing the full number.
    pub fn expose_for_disclosure(&self) -> &str {
        &self.digits
    }
}

const HEX: [char; 16] = [
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', 'a', 'b', 'c', 'd', 'e', 'f',
];

impl PseudonymKey {
    /// Builds a key from secret bytes. Key strength is the caller's concern (config validation).
    pub fn new(bytes: Vec<u8>) -> Self {
        PseudonymKey(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
    }

    /// A 32-byte key for another purpose, derived from this one and a label (HMAC of the label), so
    /// that instances sharing the pseudonym key share it too without configuring a second secret.
    pub fn derive(&self, label: &str) -> [u8; 32] {
        let tag = hmac::sign(&self.0, label.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(&tag.as_ref()[..32]);
        out
    }
}

impl fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PseudonymKey(<redacted>)")
    }
}

/// Luhn check digit for `payload` (digit values 0–9, not ASCII): weights 2,1,2,… from the digit next to
/// the check digit leftwards, two-digit products reduced by 9. For the Swedish 9-digit payload
/// `YYMMDDNNN` this is the weights 2,1,2,… from the left.
pub fn luhn_check_digit(payload: &[u8]) -> u8 {
    let sum: u32 = payload
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 0 {
                let p = d * 2;
                if p > 9 {
                    p - 9
                } else {
                    p
                }
            } else {
                d
            }
        })
        .sum();
    // sum % 10 < 10, so the cast cannot truncate.
    ((10 - sum % 10) % 10) as u8
}

/// True when the last digit of `digits` (values 0–9) is the Luhn check digit of the rest.
pub fn luhn_valid(digits: &[u8]) -> bool {
    match digits.split_last() {
        Some((&check, payload)) => luhn_check_digit(payload) == check,
        None => false,
    }
}

/// Builds a Luhn-valid Swedish 12-digit number from `YYYYMMDD` and a 3-digit serial, for tests. The date
/// part is not validated (a samordningsnummer day such as 67 works).
///
/// # Panics
/// If `date_yyyymmdd` is not 8 ASCII digits or `serial3` is not 3 ASCII digits.
#[cfg(test)]
pub(crate) fn swedish_with_check(date_yyyymmdd: &str, serial3: &str) -> String {
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    assert!(
        date_yyyymmdd.len() == 8 && all_digits(date_yyyymmdd),
        "swedish_with_check: date must be 8 digits"
    );
    assert!(
        serial3.len() == 3 && all_digits(serial3),
        "swedish_with_check: serial must be 3 digits"
    );
    let payload: Vec<u8> = date_yyyymmdd[2..]
        .bytes()
        .chain(serial3.bytes())
        .map(|b| b - b'0')
        .collect();
    let check = luhn_check_digit(&payload);
    format!("{date_yyyymmdd}{serial3}{check}")
}

/// Strips separators and returns digit values plus whether a `+` was present.
fn normalise(input: &str) -> Result<(Vec<u8>, bool), ParseError> {
    if input.len() > MAX_INPUT_LEN {
        return Err(ParseError::Length);
    }
    let mut digits = Vec::with_capacity(12);
    let mut plus = false;
    for b in input.bytes() {
        match b {
            b'0'..=b'9' => digits.push(b - b'0'),
            b'+' => plus = true,
            b'-' | b' ' => {}
            _ => return Err(ParseError::NotDigits),
        }
    }
    Ok((digits, plus))
}

/// Two digit values as a number. Callers pass slices of the right length.
fn pair(d: &[u8], at: usize) -> u8 {
    d[at] * 10 + d[at + 1]
}

fn to_ascii(d: &[u8]) -> String {
    d.iter().map(|&v| char::from(b'0' + v)).collect()
}

fn calendar_date(year: i32, month: u8, day: u8) -> Result<Date, ParseError> {
    let month = Month::try_from(month).map_err(|_| ParseError::Date)?;
    Date::from_calendar_date(year, month, day).map_err(|_| ParseError::Date)
}

fn not_future(date: Date, today: Option<Date>) -> Result<Date, ParseError> {
    match today {
        Some(today) if date > today => Err(ParseError::FutureDate),
        _ => Ok(date),
    }
}

/// Swedish `YYYYMMDDNNNC` (digit values, length 12).
fn swedish_12(d: &[u8], today: Option<Date>) -> Result<PersonalNumber, ParseError> {
    if d.len() != 12 {
        return Err(ParseError::Length);
    }
    if !luhn_valid(&d[2..]) {
        return Err(ParseError::Checksum);
    }
    let century = pair(d, 0);
    if !(18..=20).contains(&century) {
        return Err(ParseError::Date);
    }
    let year = i32::from(century) * 100 + i32::from(pair(d, 2));
    let (day, kind) = match pair(d, 6) {
        day @ 61..=91 => (day - 60, Kind::SeSamordningsnummer),
        day => (day, Kind::SePersonnummer),
    };
    let birth_date = not_future(calendar_date(year, pair(d, 4), day)?, today)?;
    Ok(PersonalNumber {
        digits: to_ascii(d),
        kind,
        birth_date,
    })
}

/// Swedish short form `YYMMDDNNNC` (digit values, length 10): infer the century, then validate as 12.
fn swedish_10(d: &[u8], plus: bool, today: Date) -> Result<PersonalNumber, ParseError> {
    if !luhn_valid(d) {
        return Err(ParseError::Checksum);
    }
    let yy = i32::from(pair(d, 0));
    let month = pair(d, 2);
    let day = match pair(d, 4) {
        day @ 61..=91 => day - 60,
        day => day,
    };
    let this_year = today.year();
    let year = if plus {
        // Latest year ending in `yy` that is at most `this_year - 100`.
        latest_year_at_most(yy, this_year - 100)
    } else {
        // Latest year ending in `yy` whose (month, day) does not lie after today.
        let y = latest_year_at_most(yy, this_year);
        if y == this_year && (month, day) > (u8::from(today.month()), today.day()) {
            y - 100
        } else {
            y
        }
    };
    let mut full = Vec::with_capacity(12);
    // `year` is within 100 years below `this_year`; negative or 5-digit years fail the century check.
    let century = year.div_euclid(100);
    match u8::try_from(century) {
        Ok(c) if c <= 99 => full.extend([c / 10, c % 10]),
        _ => return Err(ParseError::Date),
    }
    full.extend_from_slice(d);
    swedish_12(&full, Some(today))
}

/// The latest year `<= limit` whose last two digits are `yy`.
fn latest_year_at_most(yy: i32, limit: i32) -> i32 {
    let candidate = limit.div_euclid(100) * 100 + yy;
    if candidate > limit {
        candidate - 100
    } else {
        candidate
    }
}

/// Mod-11 check digit with `weights`, or `None` where the remainder would give 10.
fn mod11_check_digit(payload: &[u8], weights: &[u8]) -> Option<u8> {
    let sum: u32 = payload
        .iter()
        .zip(weights)
        .map(|(&d, &w)| u32::from(d) * u32::from(w))
        .sum();
    // 11 - (sum % 11) is in 1..=11, so the cast cannot truncate.
    match 11 - (sum % 11) as u8 {
        11 => Some(0),
        10 => None,
        k => Some(k),
    }
}

const NO_K1_WEIGHTS: [u8; 9] = [3, 7, 6, 1, 8, 9, 4, 5, 2];
const NO_K2_WEIGHTS: [u8; 10] = [5, 4, 3, 2, 7, 6, 5, 4, 3, 2];

/// Norwegian check digits `K1 K2` for the first 9 digits (values), or `None` if either would be 10.
fn norwegian_check_digits(first9: &[u8]) -> Option<(u8, u8)> {
    let k1 = mod11_check_digit(first9, &NO_K1_WEIGHTS)?;
    let mut first10 = first9.to_vec();
    first10.push(k1);
    let k2 = mod11_check_digit(&first10, &NO_K2_WEIGHTS)?;
    Some((k1, k2))
}

/// Norwegian birth year from the two-digit year and the individual number, or `None` for a combination
/// no range assigns.
fn norwegian_year(yy: u8, individual: u16) -> Option<i32> {
    let yy_i = i32::from(yy);
    match individual {
        0..=499 => Some(1900 + yy_i),
        500..=999 if yy <= 39 => Some(2000 + yy_i),
        500..=749 if yy >= 54 => Some(1800 + yy_i),
        900..=999 if yy >= 40 => Some(1900 + yy_i),
        _ => None,
    }
}

/// Norwegian `DDMMYYIIIKK` (digit values, length 11).
fn norwegian(d: &[u8], today: Date) -> Result<PersonalNumber, ParseError> {
    match norwegian_check_digits(&d[..9]) {
        Some((k1, k2)) if k1 == d[9] && k2 == d[10] => {}
        _ => return Err(ParseError::Checksum),
    }
    let (day, kind) = match pair(d, 0) {
        day @ 41..=71 => (day - 40, Kind::NoDNumber),
        day => (day, Kind::NoFodselsnummer),
    };
    let individual = u16::from(d[6]) * 100 + u16::from(d[7]) * 10 + u16::from(d[8]);
    let year = norwegian_year(pair(d, 4), individual).ok_or(ParseError::Date)?;
    let birth_date = not_future(calendar_date(year, pair(d, 2), day)?, Some(today))?;
    Ok(PersonalNumber {
        digits: to_ascii(d),
        kind,
        birth_date,
    })
}

/// Danish birth year from the two-digit year and the 7th digit (first serial digit).
fn danish_year(yy: u8, seventh: u8) -> i32 {
    let yy_i = i32::from(yy);
    match seventh {
        0..=3 => 1900 + yy_i,
        4 | 9 if yy <= 36 => 2000 + yy_i,
        4 | 9 => 1900 + yy_i,
        _ if yy <= 57 => 2000 + yy_i,
        _ => 1800 + yy_i,
    }
}

/// Danish `DDMMYYSSSS` (digit values, length 10). No modulus check: it was abolished.
fn danish(d: &[u8], today: Date) -> Result<PersonalNumber, ParseError> {
    let year = danish_year(pair(d, 4), d[6]);
    let birth_date = not_future(calendar_date(year, pair(d, 2), pair(d, 0))?, Some(today))?;
    Ok(PersonalNumber {
        digits: to_ascii(d),
        kind: Kind::DkCpr,
        birth_date,
    })
}
