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
#[error("Secret {name:?} key {key:?} {}: {}", reason(source), path.display())]
pub struct SecretError {
    /// Name of the Secret.
    pub name: String,
    /// Key within it.
    pub key: String,
    /// The file searched.
    pub path: PathBuf,
    /// Why it could not be read (file not found, permission denied).
    #[source]
    pub source: std::io::Error,
}

fn reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "not found".to_string(),
        _ => format!("unreadable ({e})"),
    }
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

    /// The file holding one key of one secret.
    pub fn path(&self, name: &str, key: &str) -> PathBuf {
        self.dir.join(name).join(key)
    }

    /// Reads one key of one secret. Names and keys are checked with the config (Secret names
    /// and keys cannot contain `/` or be `..`); one that could leave the directory is refused
    /// here too.
    pub fn read(&self, name: &str, key: &str) -> Result<SecretBytes, SecretError> {
        let path = self.path(name, key);
        let err = |source| SecretError { name: name.to_string(), key: key.to_string(), path: path.clone(), source };
        let plain = |s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\', '\0']);
        if !plain(name) || !plain(key) {
            return Err(err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a plain Secret name and key")));
        }
        std::fs::read(&path).map(SecretBytes).map_err(err)
    }

    /// Every Secret key of `uses` that cannot be read, each as `path: Secret "name" key "key"
    /// not found: <file searched>`, required ones and optional ones apart.
    pub fn unreadable(&self, uses: &[fieldgate_crds::SecretUse]) -> (Vec<String>, Vec<String>) {
        let (mut required, mut optional) = (Vec::new(), Vec::new());
        for u in uses {
            if let Err(e) = self.read(&u.name, &u.key) {
                let line = format!("{}: {e}", u.path);
                if u.required { required.push(line) } else { optional.push(line) }
            }
        }
        (required, optional)
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
        let file = dir.path().join("cloud/username");
        assert_eq!(err, format!("Secret \"cloud\" key \"username\" not found: {}", file.display()));
    }

    #[test]
    fn every_unreadable_secret_is_named_with_its_file_and_only_uplinks_need_theirs() {
        let cfg = fieldgate_crds::GatewayConfig::from_yaml(
            r#"
apiVersion: fieldgate.io/v1alpha1
kind: GatewayConfig
devices:
- name: th-1
  connection: {tcp: {tokenSecretRef: {name: th-1-token}}}
  points: [{name: temp, type: float64}]
uplinks:
- name: cloud
  mqtt: {url: "mqtts://broker:8883", auth: {secretRef: {name: creds}}, tls: {caSecretRef: {name: ca}}}
"#,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("creds")).unwrap();
        std::fs::write(dir.path().join("creds/username"), "gw").unwrap();
        let (required, optional) = SecretStore::new(dir.path()).unreadable(&cfg.secret_uses());
        let file = |p: &str| dir.path().join(p).display().to_string();
        assert_eq!(
            required,
            [
                format!(
                    "uplinks[0].mqtt.auth.secretRef: Secret \"creds\" key \"password\" not found: {}",
                    file("creds/password")
                ),
                format!(
                    "uplinks[0].mqtt.tls.caSecretRef: Secret \"ca\" key \"ca.crt\" not found: {}",
                    file("ca/ca.crt")
                ),
            ]
        );
        assert_eq!(
            optional,
            [format!(
                "devices[0].connection.tcp.tokenSecretRef: Secret \"th-1-token\" key \"token\" not found: {}",
                file("th-1-token/token")
            )]
        );
    }

    #[test]
    fn names_and_keys_that_leave_the_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("cloud")).unwrap();
        std::fs::write(dir.path().join("cloud/password"), "hunter2").unwrap();
        let store = SecretStore::new(dir.path().join("secrets"));
        for (name, key) in [("..", "cloud/password"), ("../cloud", "password"), ("x", ".."), ("", "k")] {
            let err = store.read(name, key).unwrap_err();
            assert_eq!(err.source.kind(), std::io::ErrorKind::InvalidInput, "{name} {key}");
        }
    }
}
