//! Personal identity numbers (Swedish personnummer and samordningsnummer, Norwegian fødselsnummer and
//! D-number, Danish CPR). STUB: the API is fixed here; the full parser lands in the same issue.

use std::fmt;

/// The kind of a personal identity number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    SePersonnummer,
    SeSamordningsnummer,
    NoFodselsnummer,
    NoDNumber,
    DkCpr,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::SePersonnummer,
        Kind::SeSamordningsnummer,
        Kind::NoFodselsnummer,
        Kind::NoDNumber,
        Kind::DkCpr,
    ];

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    Length,
    NotDigits,
    Date,
    Checksum,
    NotAccepted,
}

pub struct ParseOptions<'a> {
    pub kinds: &'a [Kind],
    pub accept_10_digits: bool,
    pub today: time::Date,
}

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PersonalNumber {
    digits: String,
    kind: Kind,
}

impl fmt::Debug for PersonalNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PersonalNumber(<redacted>)")
    }
}

impl PersonalNumber {
    pub fn parse(input: &str, opts: &ParseOptions<'_>) -> Result<PersonalNumber, ParseError> {
        let _ = opts;
        Self::parse_swedish_12(input)
    }

    pub fn parse_swedish_12(input: &str) -> Result<PersonalNumber, ParseError> {
        if input.len() != 12 {
            return Err(ParseError::Length);
        }
        Ok(PersonalNumber { digits: input.to_owned(), kind: Kind::SePersonnummer })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn masked(&self) -> String {
        format!("{}-****", &self.digits[..8])
    }

    pub fn pseudonym(&self, key: &PseudonymKey) -> String {
        let _ = key;
        String::from("pseudonym")
    }

    pub fn expose_for_idp(&self) -> &str {
        &self.digits
    }

    pub fn expose_for_disclosure(&self) -> &str {
        &self.digits
    }
}

#[derive(Clone)]
pub struct PseudonymKey(Vec<u8>);

impl PseudonymKey {
    pub fn new(bytes: Vec<u8>) -> Self {
        PseudonymKey(bytes)
    }
}

impl fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PseudonymKey(<redacted>)")
    }
}
