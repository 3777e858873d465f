//! A small W3C WebDriver client over reqwest and serde_json, for driving headless Chromium through
//! `chromedriver` on 127.0.0.1: start the driver, open a session, navigate, find elements by CSS
//! selector, click, type, read text, run a script, take a screenshot, end the session.
//!
//! The driver is a child process killed on drop; a session not ended by `quit` is ended on drop (a
//! blocking request, so the browser does not outlive a failed test). Waits on page state are bounded
//! polls (`Session::wait`).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// Where Debian's `chromium` package puts the browser.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// The W3C name of an element reference in JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long one WebDriver command may take (starting a browser on a loaded machine is the slowest).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// The bound of every wait on page state.
pub const WAIT: Duration = Duration::from_secs(20);

/// `chromedriver` on the `PATH`, if any.
pub fn chromedriver() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("chromedriver"))
            .find(|p| p.is_file())
    })
}

/// Why the browser tests cannot run here, if they cannot.
pub fn missing() -> Option<String> {
    if !Path::new(CHROMIUM).is_file() {
        return Some(format!("{CHROMIUM} is missing (apt-get install chromium)"));
    }
    if chromedriver().is_none() {
        return Some("chromedriver is missing (apt-get install chromium-driver)".into());
    }
    None
}

/// A running `chromedriver`.
pub struct Driver {
    addr: SocketAddr,
    http: reqwest::Client,
    _child: Child,
}

impl Driver {
    /// Starts `chromedriver` on a port it picks itself (`--port=0`) and reads the port from its
    /// first lines.
    pub async fn start() -> Driver {
        let program = chromedriver().expect("chromedriver on the PATH");
        let mut child = Command::new(program)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let port = tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await.expect("chromedriver's output") {
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    return rest.trim_end_matches('.').trim().parse::<u16>().ok();
                }
            }
            None
        })
        .await
        .expect("chromedriver did not say its port in time")
        .expect("chromedriver ended without saying its port");
        // Keep draining its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(COMMAND_TIMEOUT)
            .no_proxy()
            .build()
            .unwrap();
        let driver = Driver {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            http,
            _child: child,
        };
        driver.until_ready().await;
        driver
    }

    async fn until_ready(&self) {
        let url = format!("http://{}/status", self.addr);
        let ready = async {
            loop {
                if let Ok(r) = self.http.get(&url).send().await {
                    if let Ok(v) = r.json::<Value>().await {
                        if v["value"]["ready"] == true {
                            return;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(WAIT, ready)
            .await
            .expect("chromedriver never became ready");
    }

    /// A new headless Chromium session with a fresh profile in `profile` (created, and removed when
    /// the session ends), preferring the language `lang` (`en-US`, `sv-SE`).
    pub async fn session(&self, profile: &Path, lang: &str) -> Session {
        std::fs::create_dir_all(profile).unwrap();
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--window-size=900,760".to_owned(),
            format!("--lang={lang}"),
            format!("--user-data-dir={}", profile.display()),
        ];
        let capabilities = json!({
            "capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": args,
                    "prefs": {"intl.accept_languages": lang},
                },
            }}
        });
        let value = command(
            &self.http,
            reqwest::Method::POST,
            &format!("http://{}/session", self.addr),
            Some(capabilities),
        )
        .await
        .unwrap_or_else(|e| panic!("new session: {e}"));
        let id = value["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        Session {
            base: format!("http://{}/session/{id}", self.addr),
            addr: self.addr,
            id,
            http: self.http.clone(),
            profile: profile.to_owned(),
            open: true,
        }
    }
}

/// One WebDriver command: the answer's `value`, or the WebDriver error as text.
async fn command(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let mut request = http.request(method, url);
    // POST commands always carry a JSON object, even an empty one.
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    let mut value: Value = response.json().await.map_err(|e| e.to_string())?;
    let value = value["value"].take();
    if status.is_success() {
        Ok(value)
    } else {
        Err(format!(
            "{status} {}: {}",
            value["error"].as_str().unwrap_or("?"),
            value["message"].as_str().unwrap_or("")
        ))
    }
}

/// A reference to an element of the current page.
#[derive(Debug, Clone)]
pub struct Element(String);

/// A browser session.
pub struct Session {
    base: String,
    addr: SocketAddr,
    id: String,
    http: reqwest::Client,
    profile: PathBuf,
    open: bool,
}

impl Session {
    async fn post(&self, path: &str, body: Value) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        command(&self.http, reqwest::Method::POST, &url, Some(body)).await
    }

    async fn get(&self, path: &str) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        command(&self.http, reqwest::Method::GET, &url, None).await
    }

    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url }))
            .await
            .unwrap_or_else(|e| panic!("navigate to {url}: {e}"));
    }

    /// The first element matching a CSS selector, if there is one now.
    pub async fn find(&self, css: &str) -> Option<Element> {
        let value = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await
            .ok()?;
        value[ELEMENT].as_str().map(|id| Element(id.to_owned()))
    }

    /// Waits (bounded) for an element matching `css` to exist.
    pub async fn element(&self, css: &str) -> Element {
        let found = async {
            loop {
                if let Some(e) = self.find(css).await {
                    return e;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        match tokio::time::timeout(WAIT, found).await {
            Ok(e) => e,
            Err(_) => panic!("no element {css}; page: {}", self.page_text().await),
        }
    }

    pub async fn click(&self, e: &Element) {
        self.post(&format!("/element/{}/click", e.0), json!({}))
            .await
            .unwrap_or_else(|err| panic!("click: {err}"));
    }

    /// Types `text` into an element (keys as the W3C key table has them; `\u{E007}` is Enter).
    pub async fn send_keys(&self, e: &Element, text: &str) {
        self.post(&format!("/element/{}/value", e.0), json!({ "text": text }))
            .await
            .unwrap_or_else(|err| panic!("send keys: {err}"));
    }

    /// An element's rendered text.
    pub async fn text(&self, e: &Element) -> String {
        self.get(&format!("/element/{}/text", e.0))
            .await
            .unwrap_or_else(|err| panic!("text: {err}"))
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Runs a script in the page (its `return` value comes back); `args` are its `arguments`.
    pub async fn execute(&self, script: &str, args: Value) -> Value {
        self.post("/execute/sync", json!({ "script": script, "args": args }))
            .await
            .unwrap_or_else(|err| panic!("script failed: {err}\n{script}"))
    }

    /// Polls `script` until it returns something truthy (not null, false, 0 or ""), at most
    /// [`WAIT`]; returns that value. A timeout panics with `what` and the page's text.
    pub async fn wait(&self, what: &str, script: &str, args: Value) -> Value {
        let poll = async {
            loop {
                let v = self.execute(script, args.clone()).await;
                let truthy = match &v {
                    Value::Null | Value::Bool(false) => false,
                    Value::String(s) => !s.is_empty(),
                    Value::Number(n) => n.as_f64() != Some(0.0),
                    _ => true,
                };
                if truthy {
                    return v;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        };
        match tokio::time::timeout(WAIT, poll).await {
            Ok(v) => v,
            Err(_) => panic!(
                "timed out waiting for {what}; page: {}",
                self.page_text().await
            ),
        }
    }

    /// The page's visible text, for failure messages.
    pub async fn page_text(&self) -> String {
        self.post(
            "/execute/sync",
            json!({"script": "return document.body ? document.body.innerText : ''", "args": []}),
        )
        .await
        .map(|v| v.as_str().unwrap_or_default().to_owned())
        .unwrap_or_else(|e| format!("(unreadable: {e})"))
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Vec<u8> {
        let value = self
            .get("/screenshot")
            .await
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        base64::engine::general_purpose::STANDARD
            .decode(value.as_str().expect("base64 PNG"))
            .expect("a base64 screenshot")
    }

    /// Ends the session (the browser quits) and removes its profile.
    pub async fn quit(mut self) {
        let url = self.base.clone();
        let _ = command(&self.http, reqwest::Method::DELETE, &url, None).await;
        self.open = false;
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Drop for Session {
    /// A session a failed test left open: end it with a plain blocking request, so the browser
    /// does not outlive the test binary.
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        if let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let request = format!(
                "DELETE /session/{} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.id, self.addr
            );
            if s.write_all(request.as_bytes()).is_ok() {
                let mut answer = Vec::new();
                let _ = s.read_to_end(&mut answer);
            }
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
