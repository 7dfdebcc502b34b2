//! This agent's own signing key (its gossip identity), kept in `data_dir/node.key` so that a
//! restart keeps it: the registry already lists it, and the other agents go on believing this
//! node's gossip also while the registry is down. Made on first start (owner-only file); a
//! file that cannot be read stops the start; one that cannot be written leaves the agent with
//! a key for this run only (logged), so a full or read-only disk does not stop it.

use std::io::Write;
use std::path::{Path, PathBuf};

use signpost_shared::gossip_sign::NodeSigningKey;

/// The key file in `data_dir`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("node.key")
}

/// Why the key file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("node key file {path}: {reason}")]
pub struct KeyFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

/// Reads the key from `data_dir`, or makes one and writes it there.
pub fn load_or_create(data_dir: &Path) -> Result<NodeSigningKey, KeyFileError> {
    let file = path(data_dir);
    let error = |reason: String| KeyFileError { path: file.clone(), reason };
    match std::fs::read_to_string(&file) {
        Ok(text) => NodeSigningKey::from_base64(&text)
            .map_err(|e| error(format!("{e}; remove the file to make a new key (peers learn it at the next announcement)"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = NodeSigningKey::generate();
            match write_new(&file, &key) {
                Ok(()) => tracing::info!(file = %file.display(), public = %key.public(), "made this node's gossip signing key"),
                Err(e) => tracing::warn!(
                    file = %file.display(),
                    error = %e,
                    "cannot save this node's gossip signing key; using one for this run only (a restart makes a new one)"
                ),
            }
            Ok(key)
        }
        Err(e) => Err(error(e.to_string())),
    }
}

/// Writes `key` to a new file readable by its owner only (a temporary file renamed into
/// place, so a crash never leaves half a key).
fn write_new(file: &Path, key: &NodeSigningKey) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let temp = file.with_extension("key.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options.open(&temp).and_then(|mut out| {
        out.write_all(key.to_base64().as_bytes())?;
        out.write_all(b"\n")?;
        out.sync_all()
    });
    match written.and_then(|()| std::fs::rename(&temp, file)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_made_once_kept_private_and_a_broken_file_stops_the_start() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let data = dir.path().join("data");
        let first = load_or_create(&data).expect("made");
        let again = load_or_create(&data).expect("read back");
        assert_eq!(first.public(), again.public(), "a restart keeps the key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path(&data)).expect("the file").permissions().mode();
            assert_eq!(mode & 0o077, 0, "only the owner may read it: {mode:o}");
        }
        std::fs::write(path(&data), "not a key").expect("write");
        let error = load_or_create(&data).expect_err("a broken key file");
        assert!(error.to_string().contains("node.key"), "{error}");
    }
}
