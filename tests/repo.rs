//! Checks of the repository as a whole: the core's dependency rule, the prompt files, the shipped
//! configs and the dialplan they point at.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use callgate::prompts::{Language, PromptId};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The sans-IO core (dialog, verify, pnr, outcome, policy, prompts) imports no I/O or async crate.
#[test]
fn the_core_has_no_io_dependencies() {
    let src = root().join("src");
    let mut files = Vec::new();
    for module in ["dialog", "verify", "pnr"] {
        rust_files(&src.join(module), &mut files);
    }
    for file in ["outcome.rs", "policy.rs", "prompts.rs"] {
        files.push(src.join(file));
    }
    let forbidden = [
        "tokio",
        "reqwest",
        "axum",
        "tungstenite",
        "dashmap",
        "hyper",
        "crate::calls",
        "crate::pbx",
        "crate::idp",
        "crate::api",
        "crate::app",
        "crate::config",
        "Instant::now",
        "SystemTime::now",
    ];
    let mut problems = Vec::new();
    for file in &files {
        let text = fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in forbidden {
                // The test harnesses may read the clock once to get a base instant.
                let test_clock = word.ends_with("::now") && file.ends_with("tests.rs");
                if code.contains(word) && !test_clock {
                    problems.push(format!("{}:{}: {word}", file.display(), n + 1));
                }
            }
        }
    }
    assert!(problems.is_empty(), "core imports I/O: {problems:#?}");
    assert!(files.len() >= 6, "did the layout change? {files:?}");
}

/// Every prompt the dialogue can play has its text in the table and a sound file in every language.
#[test]
fn every_prompt_has_text_and_audio_in_every_language() {
    let table = fs::read_to_string(root().join("deploy/prompts/prompts.tsv")).unwrap();
    let rows: HashMap<(String, String), String> = table
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut parts = l.splitn(3, '\t');
            let id = parts.next().unwrap().to_owned();
            let lang = parts.next().unwrap().to_owned();
            let text = parts.next().unwrap().to_owned();
            ((id, lang), text)
        })
        .collect();
    assert_eq!(rows.len(), PromptId::ALL.len() * Language::ALL.len());
    for p in PromptId::ALL {
        for l in Language::ALL {
            let text = rows
                .get(&(p.code().to_owned(), l.code().to_owned()))
                .unwrap_or_else(|| panic!("{} {} missing from prompts.tsv", p.code(), l.code()));
            assert_eq!(
                text,
                p.text(l),
                "prompts.tsv is stale for {} {}",
                p.code(),
                l.code()
            );
            let wav = root()
                .join("deploy/sounds")
                .join(l.code())
                .join("callgate")
                .join(format!("{}.wav", p.code()));
            let bytes = fs::read(&wav).unwrap_or_else(|_| panic!("missing {}", wav.display()));
            // RIFF/WAVE, PCM, mono, 8 kHz, 16 bit: what Asterisk plays without transcoding.
            assert_eq!(&bytes[0..4], b"RIFF", "{}", wav.display());
            assert_eq!(&bytes[8..12], b"WAVE", "{}", wav.display());
            let channels = u16::from_le_bytes([bytes[22], bytes[23]]);
            let rate = u32::from_le_bytes([bytes[24], bytes[25], bytes[26], bytes[27]]);
            let bits = u16::from_le_bytes([bytes[34], bytes[35]]);
            assert_eq!((channels, rate, bits), (1, 8000, 16), "{}", wav.display());
            assert!(
                bytes.len() > 8000,
                "{} is too short to be speech",
                wav.display()
            );
        }
    }
}

/// The shipped configs pass validation (the production one with its secrets and files supplied).
#[test]
fn shipped_configs_validate() {
    let (report, code) =
        callgate::config::check_config(&root().join("deploy/callgate.example.toml"));
    assert_eq!(code, 0, "{report}");

    let dir = std::env::temp_dir().join(format!("callgate-repo-test-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let text = fs::read_to_string(root().join("deploy/asterisk/callgate.toml")).unwrap();
    let mut text = text.clone();
    for file in ["bankid-test-rp.p12", "bankid-test-root.pem"] {
        let path = dir.join(file);
        fs::write(&path, b"placeholder").unwrap();
        text = text.replace(&format!("/etc/callgate/{file}"), path.to_str().unwrap());
    }
    let env = HashMap::new();
    let lookup = |name: &str| match name {
        "ARI_PASSWORD" | "BANKID_P12_PASSWORD" => Some("secret".to_owned()),
        "CALLGATE_PSEUDONYM_KEY" => Some("0123456789abcdef0123456789abcdef".to_owned()),
        _ => None,
    };
    let cfg = callgate::config::load(&text, &env, &lookup);
    assert!(cfg.is_ok(), "{:#?}", cfg.err());
}

/// The two-site compose example: each callgate's `CALLGATE__…` environment, applied to the shipped
/// config, gives a valid config on Redis with its own instance id.
#[test]
fn the_sites_compose_example_runs_two_instances_on_redis() {
    let compose = fs::read_to_string(root().join("deploy/container/compose.sites.yaml")).unwrap();
    let mut envs: std::collections::BTreeMap<String, HashMap<String, String>> = Default::default();
    let mut service = String::new();
    for line in compose.lines() {
        if let Some(name) = line
            .strip_prefix("  ")
            .and_then(|l| l.strip_suffix(':'))
            .filter(|l| !l.starts_with(' '))
        {
            service = name.to_owned();
        } else if let Some((k, v)) = line
            .trim_start()
            .strip_prefix("- CALLGATE__")
            .and_then(|kv| kv.split_once('='))
        {
            envs.entry(service.clone())
                .or_default()
                .insert(format!("CALLGATE__{k}"), v.to_owned());
        }
    }
    assert_eq!(
        envs.keys().collect::<Vec<_>>(),
        ["callgate-a", "callgate-b"],
        "{envs:?}"
    );
    let dir = std::env::temp_dir().join(format!("callgate-repo-sites-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let mut text = fs::read_to_string(root().join("deploy/asterisk/callgate.toml")).unwrap();
    for file in ["bankid-test-rp.p12", "bankid-test-root.pem"] {
        let path = dir.join(file);
        fs::write(&path, b"placeholder").unwrap();
        text = text.replace(&format!("/etc/callgate/{file}"), path.to_str().unwrap());
    }
    let lookup = |name: &str| match name {
        "ARI_PASSWORD" | "BANKID_P12_PASSWORD" => Some("secret".to_owned()),
        "CALLGATE_PSEUDONYM_KEY" => Some("0123456789abcdef0123456789abcdef".to_owned()),
        _ => None,
    };
    let mut ids = Vec::new();
    for env in envs.values() {
        let cfg = callgate::config::load(&text, env, &lookup)
            .unwrap_or_else(|issues| panic!("{issues:#?}"));
        assert!(matches!(
            cfg.state.kind,
            callgate::config::StateKind::Redis(_)
        ));
        ids.push(cfg.state.instance_id.clone());
    }
    assert_eq!(ids, ["site-a", "site-b"]);
    let _ = fs::remove_dir_all(&dir);
}

/// Every route the Asterisk example config names exists in the shipped dialplan.
#[test]
fn config_routes_exist_in_the_dialplan() {
    let dialplan = fs::read_to_string(root().join("dialplans/asterisk/extensions.conf")).unwrap();
    let mut context = String::new();
    let mut exists = std::collections::HashSet::new();
    for line in dialplan.lines() {
        let line = line.split(';').next().unwrap_or("").trim();
        if line.starts_with('[') {
            context = line.trim_matches(|c| c == '[' || c == ']').to_owned();
            if let Some((name, _)) = context.split_once(']') {
                context = name.to_owned();
            }
        } else if let Some(rest) = line.strip_prefix("exten =>") {
            let mut parts = rest.split(',');
            let ext = parts.next().unwrap_or("").trim().to_owned();
            let pri = parts.next().unwrap_or("").trim().to_owned();
            exists.insert((context.clone(), ext, pri));
        }
    }
    let config = fs::read_to_string(root().join("deploy/asterisk/callgate.toml")).unwrap();
    let mut checked = 0;
    for line in config.lines() {
        let code = line.split('#').next().unwrap_or("");
        let Some((_, value)) = code.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        let parts: Vec<&str> = value.split(',').collect();
        if parts.len() == 3 && parts[2].parse::<u32>().is_ok() && !value.contains(' ') {
            let key = (
                parts[0].to_owned(),
                parts[1].to_owned(),
                parts[2].to_owned(),
            );
            assert!(
                exists.contains(&key),
                "route {value} is not in extensions.conf"
            );
            checked += 1;
        }
    }
    assert!(checked >= 6, "found only {checked} routes in the config");
}

// ---- dashboard and alerts ----

/// Every `callgate_…` name in a file, once each.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("callgate_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // `callgate_` inside a longer word (e.g. `mycallgate_x`) is not a metric.
        let word_start =
            at == 0 || !rest[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
        if word_start {
            out.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    out
}

/// The dashboard and the alert rules use only metrics callgate exports (the registry in
/// `telemetry::METRICS`), and only funnel steps it counts.
#[test]
fn dashboard_and_alerts_use_only_exported_metrics() {
    let exported = callgate::telemetry::exported_names();
    let steps: Vec<&str> = callgate::telemetry::FunnelStep::ALL
        .iter()
        .map(|s| s.code())
        .collect();
    for file in [
        "deploy/grafana/callgate.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let text = fs::read_to_string(root().join(file)).unwrap();
        let used = metric_names(&text);
        assert!(used.len() >= 4, "{file}: only {used:?}");
        for name in &used {
            assert!(
                exported.contains(name),
                "{file} uses {name}, which callgate does not export (exported: {exported:?})"
            );
        }
        for part in text
            .split("step=\\\"")
            .skip(1)
            .chain(text.split("step=\"").skip(1))
        {
            let step = part.split(['"', '\\']).next().unwrap();
            assert!(
                steps.contains(&step),
                "{file}: unknown funnel step {step:?}"
            );
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(root().join("deploy/grafana/callgate.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(dashboard["uid"], "callgate");
    // The funnel panel shows every step, in order.
    let funnel = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| {
            p["title"]
                .as_str()
                .unwrap()
                .starts_with("Verification funnel")
        })
        .unwrap();
    let shown: Vec<&str> = funnel["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["legendFormat"].as_str().unwrap())
        .collect();
    assert_eq!(shown, steps);
}

/// `promtool check rules` accepts the alert rules (skipped, with one line, without promtool; the
/// Debian package `prometheus` has it).
#[test]
fn alert_rules_pass_promtool() {
    let rules = root().join("deploy/prometheus/alerts.yml");
    let out = match std::process::Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "promtool check skipped: promtool not found (Debian package prometheus)"
            );
            return;
        }
        Err(e) => panic!("promtool: {e}"),
    };
    assert!(
        out.status.success(),
        "promtool check rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- the Debian package ----

fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have(tool: &str) -> bool {
    std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `deploy/debian/build-deb.sh` builds a package (here from the debug binary) with the binary, the
/// hardened unit pointing at it, the configs as conffiles, the prompts, and maintainer scripts that
/// create the user and start nothing; lintian (where installed) finds no error.
#[test]
fn the_debian_package_has_the_binary_unit_configs_and_prompts() {
    use std::io::Write as _;
    if !have("dpkg-deb") {
        let _ = writeln!(
            std::io::stderr(),
            "debian package test skipped: dpkg-deb not found"
        );
        return;
    }
    let out = std::env::temp_dir().join(format!("callgate-deb-{}", std::process::id()));
    let _ = fs::remove_dir_all(&out);
    let deb = run(std::process::Command::new("bash")
        .arg(root().join("deploy/debian/build-deb.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_callgate"), "--out"])
        .arg(&out)
        // Fast compression: the test checks contents, not size.
        .env("DEB_COMPRESSION", "gzip")
        .env("DEB_LEVEL", "1"));
    let deb = PathBuf::from(deb.trim());
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        deb.file_name().unwrap().to_str().unwrap(),
        format!("callgate_{version}_amd64.deb")
    );

    let field = |name: &str| {
        run(std::process::Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .arg(name))
        .trim()
        .to_owned()
    };
    assert_eq!(field("Package"), "callgate");
    assert_eq!(field("Version"), version);
    assert_eq!(field("Architecture"), "amd64");
    assert!(field("Depends").contains("adduser"), "{}", field("Depends"));

    // Contents: path → mode.
    let listing = run(std::process::Command::new("dpkg-deb").arg("-c").arg(&deb));
    let contents: HashMap<String, String> = listing
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            Some((
                cols.last()?.trim_start_matches('.').to_owned(),
                cols.first()?.to_string(),
            ))
        })
        .collect();
    for (path, mode) in [
        ("/usr/bin/callgate", "-rwxr-xr-x"),
        ("/lib/systemd/system/callgate.service", "-rw-r--r--"),
        ("/etc/callgate/callgate.toml", "-rw-r-----"),
        ("/etc/callgate/env", "-rw-------"),
    ] {
        assert_eq!(
            contents.get(path).map(String::as_str),
            Some(mode),
            "{path} in\n{listing}"
        );
    }
    for lang in Language::ALL {
        for prompt in PromptId::ALL {
            let path = format!(
                "/usr/share/callgate/sounds/{}/callgate/{}.wav",
                lang.code(),
                prompt.code()
            );
            assert!(contents.contains_key(&path), "{path} missing");
        }
    }

    // Control files and the unit, unpacked.
    let control = out.join("control");
    run(std::process::Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(&control));
    let conffiles = fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(
        conffiles,
        "/etc/callgate/callgate.toml\n/etc/callgate/env\n"
    );
    let postinst = fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("adduser --system --group"), "{postinst}");
    for script in ["postinst", "prerm", "postrm"] {
        let text = fs::read_to_string(control.join(script)).unwrap();
        run(std::process::Command::new("sh")
            .arg("-n")
            .arg(control.join(script)));
        // Commands only: what the scripts print or say in comments is advice to the operator.
        let text: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("echo") && !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        for starts in [
            "systemctl start",
            "systemctl enable",
            "systemctl restart",
            "invoke start",
            "invoke restart",
            "deb-systemd-helper enable",
        ] {
            assert!(!text.contains(starts), "{script} runs `{starts}`:\n{text}");
        }
    }
    let files = out.join("files");
    run(std::process::Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&files));
    let unit = fs::read_to_string(files.join("lib/systemd/system/callgate.service")).unwrap();
    let shipped = fs::read_to_string(root().join("deploy/systemd/callgate.service")).unwrap();
    // The shipped unit line by line (its hardening included), only with the packaged binary path.
    assert_eq!(
        unit,
        shipped.replace("/usr/local/bin/callgate", "/usr/bin/callgate")
    );
    for line in [
        "ExecStartPre=/usr/bin/callgate check-config /etc/callgate/callgate.toml",
        "ExecStart=/usr/bin/callgate serve --config /etc/callgate/callgate.toml",
        "EnvironmentFile=/etc/callgate/env",
        "User=callgate",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line}");
    }
    // Every file the unit names is in the package.
    for path in [
        "/usr/bin/callgate",
        "/etc/callgate/callgate.toml",
        "/etc/callgate/env",
    ] {
        assert!(contents.contains_key(path), "{path}");
    }
    let packaged = run(std::process::Command::new(files.join("usr/bin/callgate")).arg("--version"));
    assert!(packaged.contains(version), "{packaged}");

    if have("lintian") {
        // Exit status 0: no error-level tag (the package's overrides cover the deliberate ones).
        let report = run(std::process::Command::new("lintian").arg(&deb));
        assert!(!report.contains("E: "), "{report}");
    } else {
        let _ = writeln!(
            std::io::stderr(),
            "lintian check skipped: lintian not found"
        );
    }
    let _ = fs::remove_dir_all(&out);
}
