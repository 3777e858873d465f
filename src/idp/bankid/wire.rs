//! JSON bodies of the BankID RP API v6.0 as used for phone orders: `phone/auth`, `collect`, `cancel`
//! and the error body of every non-2xx answer.
//!
//! Invariants: field names are BankID's (camelCase); unknown fields are ignored; every code BankID may
//! extend (hint codes, error codes, risk levels) parses into an enum with an `Unknown(String)` arm, so a
//! new code never makes an answer unreadable. Types that carry a personal number redact it in `Debug`.
//! The client and the loopback simulator share these types.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Declares a string code enum with a catch-all `Unknown(String)` arm, (de)serialized as the bare string.
macro_rules! code_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $code:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(from = "String", into = "String")]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
            /// A code this client does not know (BankID adds codes without notice).
            Unknown(String),
        }

        impl $name {
            /// Every known code (without `Unknown`).
            pub const KNOWN: &'static [$name] = &[$($name::$variant,)+];

            /// The code as BankID spells it.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $code,)+
                    $name::Unknown(code) => code,
                }
            }
        }

        impl From<String> for $name {
            fn from(code: String) -> Self {
                match code.as_str() {
                    $($code => $name::$variant,)+
                    _ => $name::Unknown(code),
                }
            }
        }

        impl From<&str> for $name {
            fn from(code: &str) -> Self {
                $name::from(code.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(code: $name) -> String {
                match code {
                    $name::Unknown(code) => code,
                    known => known.as_str().to_owned(),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

code_enum! {
    /// `hintCode` of a `collect` answer (pending and failed codes share one field).
    HintCode {
        // pending
        /// Order created; no app has picked it up yet.
        OutstandingTransaction => "outstandingTransaction",
        /// Still not received by any app.
        NoClient => "noClient",
        /// App started but no usable BankID found yet.
        Started => "started",
        /// The app asks for an ID-document scan (extra control).
        UserMrtd => "userMrtd",
        /// Phone orders: the app asks whether the user is in a call with this RP.
        UserCallConfirm => "userCallConfirm",
        /// The user is entering the security code / biometrics.
        UserSign => "userSign",
        // failed
        /// The order timed out.
        ExpiredTransaction => "expiredTransaction",
        /// The BankID is blocked, revoked or invalid (or too many wrong PINs).
        CertificateErr => "certificateErr",
        /// The user cancelled in the app.
        UserCancel => "userCancel",
        /// Cancelled by the RP or because a new order for the same person arrived.
        Cancelled => "cancelled",
        /// The app did not start in time.
        StartFailed => "startFailed",
        /// Phone orders: the user said they are not in a call with this RP.
        UserDeclinedCall => "userDeclinedCall",
        /// The user's app is too old for a requested feature.
        NotSupportedByUserApp => "notSupportedByUserApp",
        /// BankID's risk engine blocked the order.
        TransactionRiskBlocked => "transactionRiskBlocked",
    }
}

code_enum! {
    /// `errorCode` of a non-2xx answer.
    ErrorCode {
        /// 400: another order for this personal number is live; no order was created.
        AlreadyInProgress => "alreadyInProgress",
        /// 400: bad input, unknown/too old order, or cancelling twice.
        InvalidParameters => "invalidParameters",
        /// 401/403: the RP lacks access.
        Unauthorized => "unauthorized",
        /// 404: wrong path.
        NotFound => "notFound",
        /// 405: not POST.
        MethodNotAllowed => "methodNotAllowed",
        /// 408: the request was sent too slowly.
        RequestTimeout => "requestTimeout",
        /// 415: wrong or missing content type (or a charset parameter).
        UnsupportedMediaType => "unsupportedMediaType",
        /// 429: too many requests; see the `RateLimit-*` headers.
        TooManyRequests => "tooManyRequests",
        /// 500: BankID internal error.
        InternalError => "internalError",
        /// 503: temporarily down.
        Maintenance => "maintenance",
    }
}

code_enum! {
    /// `completionData.risk`.
    Risk {
        Low => "low",
        Moderate => "moderate",
        High => "high",
    }
}

/// `callInitiator` of a phone order: who placed the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallInitiator {
    /// The user called the RP.
    #[serde(rename = "user")]
    User,
    /// The RP called the user.
    #[serde(rename = "RP")]
    Rp,
}

/// `userVisibleDataFormat`; BankID knows one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VisibleDataFormat {
    #[serde(rename = "simpleMarkdownV1")]
    SimpleMarkdownV1,
}

/// `requirement` of a phone order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PhoneRequirement {
    /// Force the security code even when biometrics are enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_code: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_policies: Option<Vec<String>>,
}

/// Body of `POST phone/auth`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PhoneAuthRequest {
    /// 12 digits, `YYYYMMDDNNNC`.
    pub personal_number: String,
    pub call_initiator: CallInitiator,
    /// Base64 of UTF-8 text, 1–1500 characters after encoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_visible_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_visible_data_format: Option<VisibleDataFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_non_visible_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirement: Option<PhoneRequirement>,
}

impl fmt::Debug for PhoneAuthRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PhoneAuthRequest")
            .field("personal_number", &"<redacted>")
            .field("call_initiator", &self.call_initiator)
            .field("user_visible_data", &self.user_visible_data.is_some())
            .field("requirement", &self.requirement)
            .finish()
    }
}

/// Answer to `phone/auth` (and `phone/sign`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PhoneAuthResponse {
    pub order_ref: String,
}

/// Body of `POST collect` and `POST cancel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderRefRequest {
    pub order_ref: String,
}

/// Answer to `cancel`: an empty object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelResponse {}

/// `status` of a `collect` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Failed,
    Complete,
}

/// Answer to `collect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CollectResponse {
    pub order_ref: String,
    pub status: Status,
    /// Present while pending and when failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint_code: Option<HintCode>,
    /// Present when complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_data: Option<CompletionData>,
}

/// `completionData` of a complete order.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompletionData {
    pub user: User,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<Device>,
    /// `YYYY-MM-DD` (possibly with an offset); kept as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bank_id_issue_date: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_up: Option<StepUp>,
    /// Base64 XML signature.
    #[serde(default)]
    pub signature: String,
    /// Base64 OCSP response.
    #[serde(default)]
    pub ocsp_response: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<Risk>,
}

impl fmt::Debug for CompletionData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionData")
            .field("user", &self.user)
            .field("step_up", &self.step_up)
            .field("signature_len", &self.signature.len())
            .field("ocsp_response_len", &self.ocsp_response.len())
            .field("risk", &self.risk)
            .finish_non_exhaustive()
    }
}

/// `completionData.user`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub personal_number: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub surname: Option<String>,
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("User(<redacted>)")
    }
}

/// `completionData.device`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uhi: Option<String>,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Device(<redacted>)")
    }
}

/// `completionData.stepUp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepUp {
    /// true: ID-document check done and passed; false: done and failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mrtd: Option<bool>,
}

/// Body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub error_code: ErrorCode,
    #[serde(default)]
    pub details: String,
}
