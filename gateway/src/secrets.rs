//! Credentials, read from a directory laid out like mounted Kubernetes Secrets:
//! `<dir>/<secret name>/<key>`. Values never appear in `Debug` output or logs.

use std::fmt;
use std::path::{Path, PathBuf};

/// A secret value. Its `Debug` form is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    /// The raw bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The value as UTF-8 text without a trailing newline.
    pub fn expose_str(&self) -> Result<&str, std::str::Utf8Error> {
        std::str::from_utf8(&self.0).map(|s| s.trim_end_matches(['\r', '\n']))
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBytes(<redacted>)")
    }
}

/// A secret could not be read.
#[derive(Debug, thiserror::Error)]
#[error("secret {name:?} key {key:?}: {source}")]
pub struct SecretError {
    /// Name of the Secret.
    pub name: String,
    /// Key within it.
    pub key: String,
    /// Why it could not be read (file not found, permission denied).
    #[source]
    pub source: std::io::Error,
}

/// Reads secrets from a directory.
#[derive(Clone, Debug)]
pub struct SecretStore {
    dir: PathBuf,
}

impl SecretStore {
    /// A store rooted at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The root directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads one key of one secret.
    pub fn read(&self, name: &str, key: &str) -> Result<SecretBytes, SecretError> {
        // Names are DNS subdomains and keys come from our own code: no path traversal.
        std::fs::read(self.dir.join(name).join(key)).map(SecretBytes).map_err(|source| SecretError {
            name: name.to_string(),
            key: key.to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_read_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("cloud")).unwrap();
        std::fs::write(dir.path().join("cloud/password"), "hunter2\n").unwrap();
        let store = SecretStore::new(dir.path());
        let v = store.read("cloud", "password").unwrap();
        assert_eq!(v.expose_str().unwrap(), "hunter2");
        assert!(!format!("{v:?}").contains("hunter2"));
        let err = store.read("cloud", "username").unwrap_err().to_string();
        assert!(err.contains("\"cloud\"") && err.contains("\"username\""), "{err}");
    }
}
