use std::sync::Mutex;

use time::macros::datetime;

use super::*;

struct TestClock(Arc<Mutex<OffsetDateTime>>);

impl TestClock {
    fn new(at: OffsetDateTime) -> TestClock {
        TestClock(Arc::new(Mutex::new(at)))
    }
    fn set(&self, at: OffsetDateTime) {
        *self.0.lock().unwrap() = at;
    }
    fn clock(&self) -> Clock {
        let now = Arc::clone(&self.0);
        Arc::new(move || *now.lock().unwrap())
    }
}

fn key() -> PseudonymKey {
    PseudonymKey::new(b"a test key of at least sixteen bytes".to_vec())
}

fn open(data: &Path, clock: &TestClock, retention_days: u32) -> Audit {
    Audit::open(
        data,
        Settings {
            retention_days,
            key: Some(key()),
            clock: clock.clock(),
        },
    )
    .unwrap()
}

fn verification(reference: &str, person: &str) -> Event {
    Event::Verification(Entry {
        reference: reference.into(),
        call_id: format!("chan-{reference}"),
        queue: "support".into(),
        status: "verified",
        reason: "",
        method: "bankid_phone".into(),
        started_by: "gate".into(),
        person: person.into(),
        evidence: "ab".repeat(32),
        stages: vec!["waiting", "done"],
        destination: "queues,support,1".into(),
        duration_ms: 1200,
    })
}

fn started(reference: &str) -> Event {
    Event::CheckStarted {
        reference: reference.into(),
        call_id: format!("chan-{reference}"),
        queue: "desk".into(),
        by: "api:alice".into(),
        method: "keypad".into(),
    }
}

fn at() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn value(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap()
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("callgate-audit-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A trail of `n` verifications in one day's file; the file's path.
async fn trail(data: &Path, n: usize) -> PathBuf {
    let clock = TestClock::new(datetime!(2026-11-29 10:00 UTC));
    let audit = open(data, &clock, 365);
    for i in 0..n {
        assert!(
            audit
                .record(at(), verification(&format!("r{i}"), "p"))
                .await
        );
    }
    data.join("audit/audit-2026-11-29.jsonl")
}

#[tokio::test]
async fn every_record_links_to_the_one_before() {
    let data = tempdir();
    let clock = TestClock::new(datetime!(2026-11-29 10:00 UTC));
    let audit = open(&data, &clock, 365);
    assert!(audit.record(at(), verification("r1", "p1")).await);
    audit.note(started("r2"));
    assert!(audit.flush().await);
    let file = data.join("audit/audit-2026-11-29.jsonl");
    let lines = lines(&file);
    assert_eq!(lines.len(), 2);
    let (first, second) = (value(&lines[0]), value(&lines[1]));
    assert_eq!(first["seq"], 1);
    assert_eq!(first["prev"], GENESIS);
    assert_eq!(first["kind"], "verification");
    assert_eq!(first["reference"], "r1");
    assert_eq!(first["at"], "2027-01-15T08:00:00Z");
    assert_eq!(second["seq"], 2);
    assert_eq!(second["prev"], chain::hash(lines[0].as_bytes()));
    assert_eq!(second["kind"], "check_started");
    // A note is dated by the writer's clock.
    assert_eq!(second["at"], "2026-11-29T10:00:00Z");
    let intact = chain::verify(&data.join("audit")).unwrap();
    assert_eq!(intact.records, 2);
    assert_eq!(intact.head, chain::hash(lines[1].as_bytes()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0);
    }
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn files_roll_at_midnight_utc_and_the_chain_crosses_them() {
    let data = tempdir();
    let clock = TestClock::new(datetime!(2026-11-29 23:59:59.999 UTC));
    let audit = open(&data, &clock, 365);
    assert!(audit.record(at(), verification("r1", "p")).await);
    assert!(audit.record(at(), verification("r2", "p")).await);
    clock.set(datetime!(2026-11-30 00:00 UTC));
    assert!(audit.record(at(), verification("r3", "p")).await);
    let day1 = lines(&data.join("audit/audit-2026-11-29.jsonl"));
    let day2 = lines(&data.join("audit/audit-2026-11-30.jsonl"));
    assert_eq!((day1.len(), day2.len()), (2, 1));
    let first_of_day2 = value(&day2[0]);
    assert_eq!(first_of_day2["seq"], 3);
    assert_eq!(first_of_day2["prev"], chain::hash(day1[1].as_bytes()));
    let intact = chain::verify(&data.join("audit")).unwrap();
    assert_eq!((intact.records, intact.files), (3, 2));
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn a_restart_continues_the_chain_and_cuts_a_torn_record() {
    let data = tempdir();
    let file = trail(&data, 2).await;
    // A crash in the middle of a write (never acknowledged) leaves a torn line.
    let mut f = OpenOptions::new().append(true).open(&file).unwrap();
    f.write_all(b"{\"seq\":3,\"prev\":\"ab").unwrap();
    drop(f);
    let clock = TestClock::new(datetime!(2026-11-29 11:00 UTC));
    let audit = open(&data, &clock, 365);
    assert!(audit.record(at(), verification("after", "p")).await);
    let lines = lines(&file);
    assert_eq!(lines.len(), 3);
    let third = value(&lines[2]);
    assert_eq!(third["seq"], 3);
    assert_eq!(third["prev"], chain::hash(lines[1].as_bytes()));
    assert_eq!(chain::verify(&data.join("audit")).unwrap().records, 3);
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn retention_deletes_only_files_older_than_the_kept_days() {
    let data = tempdir();
    let dir = data.join("audit");
    std::fs::create_dir_all(&dir).unwrap();
    for name in [
        "audit-2025-11-28.jsonl", // 366 days before 2026-11-29: deleted
        "audit-2025-11-29.jsonl", // 365 days: kept
        "audit-2026-11-28.jsonl",
        "notes.txt",
        "audit.jsonl",
    ] {
        std::fs::write(dir.join(name), b"").unwrap();
    }
    let clock = TestClock::new(datetime!(2026-11-29 12:00 UTC));
    let audit = open(&data, &clock, 365);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != KEY_FILE)
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "audit-2025-11-29.jsonl",
            "audit-2026-11-28.jsonl",
            "audit.jsonl",
            "notes.txt"
        ]
    );
    // The daily roll applies retention again: a day later, the 365-day-old file goes too.
    assert!(audit.record(at(), verification("r1", "p")).await);
    clock.set(datetime!(2026-11-30 00:00:01 UTC));
    assert!(audit.record(at(), verification("r2", "p")).await);
    assert!(!dir.join("audit-2025-11-29.jsonl").exists());
    assert!(dir.join("audit-2026-11-28.jsonl").exists());
    assert!(dir.join("audit-2026-11-29.jsonl").exists());
    // And so does a sweep without records, days later.
    clock.set(datetime!(2027-11-30 00:00:01 UTC));
    audit.sweep();
    assert!(audit.flush().await);
    assert!(!dir.join("audit-2026-11-28.jsonl").exists());
    assert!(dir.join("audit-2026-11-30.jsonl").exists());
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn records_that_queue_up_share_one_fsync_and_are_acknowledged_after_it() {
    let data = tempdir();
    let clock = TestClock::new(datetime!(2026-11-29 10:00 UTC));
    let audit = open(&data, &clock, 365);
    assert!(audit.record(at(), verification("r0", "p")).await);
    let before = audit.syncs();
    let release = audit.hold();
    let pending: Vec<_> = (1..=20)
        .map(|i| audit.record(at(), verification(&format!("r{i}"), "p")))
        .collect();
    release.send(()).unwrap();
    for acknowledged in futures_util::future::join_all(pending).await {
        assert!(acknowledged);
    }
    // One batch, one fsync, and every record on disk once acknowledged.
    assert_eq!(audit.syncs(), before + 1);
    assert_eq!(lines(&data.join("audit/audit-2026-11-29.jsonl")).len(), 21);
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn a_stalled_writer_does_not_hold_the_caller_beyond_the_wait() {
    let data = tempdir();
    let clock = TestClock::new(datetime!(2026-11-29 10:00 UTC));
    let audit = open(&data, &clock, 365);
    let release = audit.hold();
    tokio::time::pause();
    // With time paused, the bounded wait runs out at once once nothing else can happen.
    assert!(!audit.record(at(), verification("r1", "p")).await);
    tokio::time::resume();
    release.send(()).unwrap();
    assert!(audit.flush().await);
    assert_eq!(lines(&data.join("audit/audit-2026-11-29.jsonl")).len(), 1);
    let _ = std::fs::remove_dir_all(&data);
}

fn rewrite(file: &Path, f: impl FnOnce(&mut Vec<String>)) {
    let mut l = lines(file);
    f(&mut l);
    std::fs::write(file, l.join("\n") + "\n").unwrap();
}

#[tokio::test]
async fn verify_names_a_changed_record() {
    let data = tempdir();
    let file = trail(&data, 5).await;
    // One character of the third record.
    rewrite(&file, |l| l[2] = l[2].replacen("\"r2\"", "\"r7\"", 1));
    let broken = chain::verify(&data.join("audit")).unwrap_err();
    assert_eq!(broken.at.file, "audit-2026-11-29.jsonl");
    assert_eq!(broken.at.line, 3);
    assert_eq!(broken.seq, Some(3));
    assert!(broken.why.starts_with("changed"), "{broken}");
    let mut out = Vec::new();
    assert_eq!(cli::verify(&data.join("audit"), &mut out), cli::EXIT_BROKEN);
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.starts_with("broken: audit-2026-11-29.jsonl line 3 (seq 3): changed"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn verify_names_a_record_whose_prev_was_changed() {
    let data = tempdir();
    let file = trail(&data, 5).await;
    rewrite(&file, |l| {
        let mut v = value(&l[1]);
        v["prev"] = serde_json::Value::String("0".repeat(64));
        l[1] = serde_json::to_string(&v).unwrap();
    });
    let broken = chain::verify(&data.join("audit")).unwrap_err();
    assert_eq!((broken.at.line, broken.seq), (2, Some(2)), "{broken}");
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn verify_notices_a_deleted_record() {
    let data = tempdir();
    let file = trail(&data, 5).await;
    rewrite(&file, |l| {
        l.remove(2);
    });
    let broken = chain::verify(&data.join("audit")).unwrap_err();
    assert_eq!((broken.at.line, broken.seq), (3, Some(4)), "{broken}");
    assert!(broken.why.contains("missing"), "{broken}");
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn verify_notices_reordered_records() {
    let data = tempdir();
    let file = trail(&data, 5).await;
    rewrite(&file, |l| l.swap(1, 2));
    let broken = chain::verify(&data.join("audit")).unwrap_err();
    assert_eq!((broken.at.line, broken.seq), (2, Some(3)), "{broken}");
    assert!(broken.why.contains("out of order"), "{broken}");
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn verify_passes_an_intact_trail_and_one_cut_by_retention() {
    let data = tempdir();
    let file = trail(&data, 4).await;
    let mut out = Vec::new();
    assert_eq!(cli::verify(&data.join("audit"), &mut out), 0);
    assert!(String::from_utf8(out)
        .unwrap()
        .starts_with("intact: 4 records in 1 files (seq 1 to 4)"));
    // Retention removes whole old files: the oldest record kept anchors the chain.
    rewrite(&file, |l| {
        l.remove(0);
    });
    let intact = chain::verify(&data.join("audit")).unwrap();
    assert_eq!((intact.records, intact.first_seq), (3, 2));
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn export_finds_a_person_by_the_number_on_standard_input() {
    let data = tempdir();
    let clock = TestClock::new(datetime!(2026-11-29 10:00 UTC));
    let audit = open(&data, &clock, 365);
    let number = PersonalNumber::parse_swedish_12("199908072391").unwrap();
    let other = PersonalNumber::parse_swedish_12("198112189876").unwrap();
    audit.note(started("mine"));
    assert!(
        audit
            .record(at(), verification("mine", &audit.person(&number)))
            .await
    );
    assert!(
        audit
            .record(at(), verification("theirs", &audit.person(&other)))
            .await
    );
    audit.note(Event::IdentityViewed {
        reference: "mine".into(),
        call_id: "chan-mine".into(),
        by: "api:alice".into(),
        fields: vec!["name".into()],
    });
    assert!(audit.flush().await);
    let loc = cli::Location {
        dir: data.join("audit"),
        key: Some(key()),
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let n = cli::export(&loc, "19990807-2391\n", &mut out, &mut err).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(n, 3, "{out}");
    let kinds: Vec<String> = out
        .lines()
        .map(|l| value(l)["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["check_started", "verification", "identity_viewed"]);
    assert!(!out.contains("theirs"));
    assert!(!out.contains("9908072391"));
    // Not a number: nothing is exported.
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(
        cli::export(&loc, "hello", &mut out, &mut err),
        Err(cli::EXIT_USAGE)
    );
    assert!(out.is_empty());
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn tail_prints_the_last_records_across_files() {
    let data = tempdir();
    let clock = TestClock::new(datetime!(2026-11-29 23:00 UTC));
    let audit = open(&data, &clock, 365);
    assert!(audit.record(at(), verification("r1", "p")).await);
    assert!(audit.record(at(), verification("r2", "p")).await);
    clock.set(datetime!(2026-11-30 01:00 UTC));
    assert!(audit.record(at(), verification("r3", "p")).await);
    let mut out = Vec::new();
    cli::tail(&data.join("audit"), 2, &mut out).unwrap();
    let refs: Vec<String> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| value(l)["reference"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(refs, ["r2", "r3"]);
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn a_damaged_last_record_does_not_stop_the_start_and_verify_names_it() {
    let data = tempdir();
    let file = trail(&data, 3).await;
    rewrite(&file, |l| l[2] = "garbage".into());
    let clock = TestClock::new(datetime!(2026-11-29 11:00 UTC));
    let audit = open(&data, &clock, 365);
    assert!(audit.record(at(), verification("after", "p")).await);
    let lines = lines(&file);
    let fourth = value(&lines[3]);
    assert_eq!(fourth["seq"], 4);
    assert_eq!(fourth["prev"], chain::hash(b"garbage"));
    let broken = chain::verify(&data.join("audit")).unwrap_err();
    assert_eq!(
        (broken.at.line, broken.why.as_str()),
        (3, "not a JSON record")
    );
    let _ = std::fs::remove_dir_all(&data);
}
