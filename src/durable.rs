//! Small helpers for callgate's own files in the data directory (the order journal, the audit trail,
//! the webhook outbox): private keys created once, and files replaced atomically.
//!
//! Invariant: what these write is private to the service user (mode 0600 on Unix) and on disk
//! (synced, the rename too) before they return `Ok`.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::Path;

use crate::pnr::PseudonymKey;

/// Opens a new or truncated file for writing, private to the service user.
fn create_private(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options.open(path)
}

/// A key of 32 random bytes kept in `path`: read, or created once (mode 0600). `what` names it in
/// errors.
pub fn load_or_create_key(path: &Path, what: &str) -> std::io::Result<PseudonymKey> {
    match std::fs::read(path) {
        Ok(bytes) if bytes.len() >= 32 => return Ok(PseudonymKey::new(bytes)),
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is shorter than 32 bytes", path.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| std::io::Error::other(format!("no system randomness for the {what}")))?;
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    Ok(PseudonymKey::new(bytes.to_vec()))
}

/// Replaces `path` with `contents` atomically: written to a private temporary file beside it,
/// synced, renamed over it, and the rename synced.
pub fn replace(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    // A leftover from a crash may have other permissions; the new file is created private.
    let _ = std::fs::remove_file(&tmp);
    {
        let mut file = create_private(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        // The rename itself must survive a crash.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_created_once_and_files_are_replaced_privately() {
        let dir = std::env::temp_dir().join(format!("callgate-durable-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("k.key");
        load_or_create_key(&key, "test key").unwrap();
        let first = std::fs::read(&key).unwrap();
        load_or_create_key(&key, "test key").unwrap();
        assert_eq!(first.len(), 32);
        assert_eq!(
            std::fs::read(&key).unwrap(),
            first,
            "created once, then read"
        );
        std::fs::write(dir.join("short.key"), b"short").unwrap();
        assert!(load_or_create_key(&dir.join("short.key"), "test key").is_err());
        let file = dir.join("f.journal");
        replace(&file, b"one\n").unwrap();
        replace(&file, b"two\n").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"two\n");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            for p in [&key, &file] {
                assert_eq!(
                    std::fs::metadata(p).unwrap().permissions().mode() & 0o777,
                    0o600
                );
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
