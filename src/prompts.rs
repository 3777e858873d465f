//! The prompt catalogue: every prompt the dialogue can play, its sound file and its text in Swedish,
//! English and Norwegian (bokmål), plus how a call's language is chosen (see `QueuePolicy::language_for`).
//!
//! Invariant: the dialogue refers to prompts only by [`PromptId`]; media names are derived here (or from a
//! queue's overrides), so one table says what must exist under `sounds/<lang>/callgate/`.

use std::fmt;

/// A language prompts are available in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Language {
    Sv,
    En,
    Nb,
}

impl Language {
    pub const ALL: [Language; 3] = [Language::Sv, Language::En, Language::Nb];

    /// The code used in config, in `lang=` on playbacks and as the sounds sub-directory.
    pub fn code(self) -> &'static str {
        match self {
            Language::Sv => "sv",
            Language::En => "en",
            Language::Nb => "nb",
        }
    }

    /// Accepts `sv`, `en`, `nb` and `no` (Asterisk channels often say `no` for Norwegian), and
    /// regional variants such as `en_GB` or `sv-SE`.
    pub fn from_code(code: &str) -> Option<Language> {
        let base = code
            .split(['_', '-'])
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        match base.as_str() {
            "sv" => Some(Language::Sv),
            "en" => Some(Language::En),
            "nb" | "no" | "nn" => Some(Language::Nb),
            _ => None,
        }
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Every prompt the before-agent dialogue can emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PromptId {
    /// Ask for the personal number on the keypad, ended with hash.
    EnterNumber,
    /// The entered number was not valid; asks again.
    InvalidNumber,
    /// Nothing was typed; asks again.
    NoInput,
    /// The connection to the PBX dropped while the caller typed: the entry starts over (not counted
    /// as the caller's mistake).
    StartAgain,
    /// Open the BankID app and approve; hold music follows.
    OpenApp,
    /// Progress: the app asks the caller to confirm the call.
    ConfirmCall,
    /// Progress: the caller is identifying with PIN or biometrics.
    Identify,
    /// The previous approval did not complete; press 1 to try again.
    RetryOffer,
    /// Outcome: verified, connecting to an agent.
    Verified,
    /// Outcome: not verified, connecting to an agent.
    NotVerified,
    /// Outcome: identification unavailable right now, connecting to an agent.
    Unavailable,
    /// Outcome: an abuse limit refused a new identification for this number; try again later.
    RateLimited,
    /// To the agent (a check started from their phone's keys): the caller is verified.
    AgentVerified,
    /// To the agent: the caller could not be verified.
    AgentNotVerified,
    /// To the agent: the person said in their app that they are not on a call with us.
    AgentFraud,
}

impl PromptId {
    pub const ALL: [PromptId; 15] = [
        PromptId::EnterNumber,
        PromptId::InvalidNumber,
        PromptId::NoInput,
        PromptId::StartAgain,
        PromptId::OpenApp,
        PromptId::ConfirmCall,
        PromptId::Identify,
        PromptId::RetryOffer,
        PromptId::Verified,
        PromptId::NotVerified,
        PromptId::Unavailable,
        PromptId::RateLimited,
        PromptId::AgentVerified,
        PromptId::AgentNotVerified,
        PromptId::AgentFraud,
    ];

    /// Stable id, also the file name (without extension) under `sounds/<lang>/callgate/`.
    pub fn code(self) -> &'static str {
        match self {
            PromptId::EnterNumber => "enter-number",
            PromptId::InvalidNumber => "invalid-number",
            PromptId::NoInput => "no-input",
            PromptId::StartAgain => "start-again",
            PromptId::OpenApp => "open-app",
            PromptId::ConfirmCall => "confirm-call",
            PromptId::Identify => "identify",
            PromptId::RetryOffer => "retry-offer",
            PromptId::Verified => "verified",
            PromptId::NotVerified => "not-verified",
            PromptId::Unavailable => "unavailable",
            PromptId::RateLimited => "rate-limited",
            PromptId::AgentVerified => "agent-verified",
            PromptId::AgentNotVerified => "agent-not-verified",
            PromptId::AgentFraud => "agent-fraud",
        }
    }

    pub fn from_code(code: &str) -> Option<PromptId> {
        PromptId::ALL.into_iter().find(|p| p.code() == code)
    }

    /// Default media URI: `sound:callgate/<code>`, language chosen by the playback's `lang`.
    pub fn default_media(self) -> String {
        format!("sound:callgate/{}", self.code())
    }

    /// What the prompt says, for recording studios, the speech generator and the README.
    pub fn text(self, lang: Language) -> &'static str {
        use Language::*;
        use PromptId::*;
        match (self, lang) {
            (EnterNumber, Sv) => "Ange ditt personnummer med tolv siffror och avsluta med fyrkant.",
            (EnterNumber, En) => {
                "Please enter your twelve-digit personal identity number, followed by the hash key."
            }
            (EnterNumber, Nb) => "Tast inn fødselsnummeret ditt og avslutt med firkant.",
            (InvalidNumber, Sv) => "Numret är inte giltigt. Försök igen.",
            (InvalidNumber, En) => "That number is not valid. Please try again.",
            (InvalidNumber, Nb) => "Nummeret er ikke gyldig. Prøv igjen.",
            (NoInput, Sv) => "Vi fick inga siffror.",
            (NoInput, En) => "We did not receive any digits.",
            (NoInput, Nb) => "Vi mottok ingen sifre.",
            (StartAgain, Sv) => "Förlåt, vi tappade dina siffror. Vi börjar om.",
            (StartAgain, En) => "Sorry, we lost your digits. Let's start again.",
            (StartAgain, Nb) => "Beklager, vi mistet sifrene dine. Vi begynner på nytt.",
            (OpenApp, Sv) => {
                "Öppna BankID-appen och bekräfta att du pratar med oss. Vänta kvar i luren."
            }
            (OpenApp, En) => {
                "Open your BankID app and confirm that you are on a call with us. Please stay on the line."
            }
            (OpenApp, Nb) => "Åpne BankID-appen og bekreft at du snakker med oss. Vennligst vent.",
            (ConfirmCall, Sv) => "Svara i appen att du pratar med oss just nu.",
            (ConfirmCall, En) => "In the app, confirm that you are on a call with us right now.",
            (ConfirmCall, Nb) => "Bekreft i appen at du snakker med oss nå.",
            (Identify, Sv) => "Legitimera dig nu i appen.",
            (Identify, En) => "Now identify yourself in the app.",
            (Identify, Nb) => "Identifiser deg nå i appen.",
            (RetryOffer, Sv) => "Legitimeringen slutfördes inte. Tryck ett för att försöka igen.",
            (RetryOffer, En) => {
                "The identification was not completed. Press one to try again."
            }
            (RetryOffer, Nb) => "Identifiseringen ble ikke fullført. Trykk én for å prøve igjen.",
            (Verified, Sv) => "Tack, du är nu legitimerad. Vi kopplar dig vidare.",
            (Verified, En) => "Thank you, you are now identified. We are connecting you.",
            (Verified, Nb) => "Takk, du er nå identifisert. Vi setter deg over.",
            (NotVerified, Sv) => "Legitimeringen lyckades inte. Vi kopplar dig vidare.",
            (NotVerified, En) => "The identification did not succeed. We are connecting you.",
            (NotVerified, Nb) => "Identifiseringen lyktes ikke. Vi setter deg over.",
            (Unavailable, Sv) => "Legitimering går inte att göra just nu. Vi kopplar dig vidare.",
            (Unavailable, En) => {
                "Identification is not available right now. We are connecting you."
            }
            (Unavailable, Nb) => {
                "Identifisering er ikke tilgjengelig akkurat nå. Vi setter deg over."
            }
            (RateLimited, Sv) => {
                "Vi kan inte starta en ny legitimering för det här numret just nu. Försök igen senare."
            }
            (RateLimited, En) => {
                "We cannot start a new identification for this number right now. Please try again later."
            }
            (RateLimited, Nb) => {
                "Vi kan ikke starte en ny identifisering for dette nummeret akkurat nå. Prøv igjen senere."
            }
            (AgentVerified, Sv) => "Kunden är legitimerad.",
            (AgentVerified, En) => "The caller is verified.",
            (AgentVerified, Nb) => "Kunden er identifisert.",
            (AgentNotVerified, Sv) => "Kunden kunde inte legitimeras.",
            (AgentNotVerified, En) => "The caller could not be verified.",
            (AgentNotVerified, Nb) => "Kunden kunne ikke identifiseres.",
            (AgentFraud, Sv) => {
                "Varning. Personen svarade i appen att hen inte pratar med oss. Lämna inte ut något."
            }
            (AgentFraud, En) => {
                "Warning. The person said in the app that they are not on a call with us. Disclose nothing."
            }
            (AgentFraud, Nb) => {
                "Advarsel. Personen svarte i appen at de ikke snakker med oss. Ikke gi ut noe."
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_every_prompt_has_text_in_every_language() {
        for p in PromptId::ALL {
            assert_eq!(PromptId::from_code(p.code()), Some(p));
            for l in Language::ALL {
                assert!(!p.text(l).is_empty());
            }
        }
    }

    #[test]
    fn language_codes() {
        assert_eq!(Language::from_code("no"), Some(Language::Nb));
        assert_eq!(Language::from_code("en_GB"), Some(Language::En));
        assert_eq!(Language::from_code("sv-SE"), Some(Language::Sv));
        assert_eq!(Language::from_code("de"), None);
        assert_eq!(Language::from_code(""), None);
    }
}
