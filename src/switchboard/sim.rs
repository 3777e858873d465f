//! A switchboard simulator for tests and the demo: an IVR's HTTP request nodes calling
//! `/switchboard/v1` the way a hosted switchboard does (form answers, a loop node long-polling until
//! the status is final, a cancel when the caller hangs up).
//!
//! Invariant: the number travels only in the start request's body.

use std::collections::HashMap;

/// One switchboard's HTTP request nodes.
#[derive(Clone)]
pub struct Ivr {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// What an IVR asks for when the caller typed their number.
#[derive(Clone)]
pub struct Typed<'a> {
    pub call_id: &'a str,
    pub queue: &'a str,
    pub number: &'a str,
    pub caller: &'a str,
    pub attempt: u32,
}

impl std::fmt::Debug for Typed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Typed")
            .field("call_id", &self.call_id)
            .field("queue", &self.queue)
            .field("number", &"<redacted>")
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// An HTTP answer: its status and the variables it set (or the error body's fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAnswer {
    pub status: u16,
    pub vars: HashMap<String, String>,
}

impl NodeAnswer {
    pub fn var(&self, name: &str) -> &str {
        self.vars.get(name).map(String::as_str).unwrap_or("")
    }
}

impl Ivr {
    /// Nodes calling `base` (e.g. `http://127.0.0.1:8080`) with the switchboard's bearer token.
    pub fn new(base: &str, token: &str) -> Result<Ivr, reqwest::Error> {
        let builder = reqwest::Client::builder();
        let builder = match crate::pbx::ari::tls::client_config() {
            Ok(tls) => builder.tls_backend_preconfigured((*tls).clone()),
            Err(_) => builder,
        };
        Ok(Ivr {
            http: builder.build()?,
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        })
    }

    /// The HTTP client the nodes use (for requests a node would not make).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The HTTP request node after "save keypad input": a form POST, answered as a form.
    pub async fn start(&self, t: &Typed<'_>) -> Result<NodeAnswer, reqwest::Error> {
        let attempt = t.attempt.to_string();
        let form = [
            ("call_id", t.call_id),
            ("queue", t.queue),
            ("number", t.number),
            ("caller", t.caller),
            ("attempt", attempt.as_str()),
        ];
        let r = self
            .http
            .post(format!("{}/switchboard/v1/verifications", self.base))
            .bearer_auth(&self.token)
            .header(reqwest::header::ACCEPT, "application/x-www-form-urlencoded")
            .form(&form)
            .send()
            .await?;
        answer(r).await
    }

    /// The loop node: one long-poll of up to `wait` seconds.
    pub async fn status(
        &self,
        id: &str,
        wait: u64,
        until_final: bool,
    ) -> Result<NodeAnswer, reqwest::Error> {
        let until = if until_final { "final" } else { "change" };
        let r = self
            .http
            .get(format!(
                "{}/switchboard/v1/verifications/{id}?wait={wait}&until={until}&format=form",
                self.base
            ))
            .bearer_auth(&self.token)
            .send()
            .await?;
        answer(r).await
    }

    /// The node the switchboard runs when the caller hangs up.
    pub async fn cancel(&self, id: &str) -> Result<NodeAnswer, reqwest::Error> {
        let r = self
            .http
            .post(format!(
                "{}/switchboard/v1/verifications/{id}/cancel?format=form",
                self.base
            ))
            .bearer_auth(&self.token)
            .send()
            .await?;
        answer(r).await
    }

    /// The whole flow: start, then loop on status until it is final (at most `rounds` polls).
    pub async fn verify(&self, t: &Typed<'_>, rounds: u32) -> Result<NodeAnswer, reqwest::Error> {
        let mut a = self.start(t).await?;
        let id = a.var("callgate_ref").to_owned();
        let mut n = 0;
        while a.status == 200 && a.var("callgate_status") == "pending" && n < rounds {
            a = self.status(&id, 20, true).await?;
            n += 1;
        }
        Ok(a)
    }
}

async fn answer(r: reqwest::Response) -> Result<NodeAnswer, reqwest::Error> {
    let status = r.status().as_u16();
    let form = r
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let body = r.bytes().await?;
    let vars = if form {
        form_urlencoded::parse(&body).into_owned().collect()
    } else {
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(serde_json::Value::Object(m)) => m
                .into_iter()
                .map(|(k, v)| (k, v.as_str().map(str::to_owned).unwrap_or_default()))
                .collect(),
            _ => HashMap::new(),
        }
    };
    Ok(NodeAnswer { status, vars })
}
