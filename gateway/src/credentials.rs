//! This node's credentials, from the operator's credentials endpoint.
//!
//! Gateways cannot read Secrets: each asks the operator (`GET` [`CREDENTIALS_PATH`] over
//! HTTPS) with its pod's projected ServiceAccount token, and gets its own node's copy
//! ([`NodeCredentials`]). The token file is re-read as the kubelet rotates it, and so is the
//! CA file. Spoken through a kube client: the endpoint answers like an API server (errors are
//! `Status` objects), and the client brings TLS, token refresh and timeouts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fieldgate_crds::node_objects::{CREDENTIALS_PATH, NodeCredentials};

/// Longest time one request for credentials may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the credentials come from.
#[derive(Clone, Debug)]
pub struct CredentialSettings {
    /// `https://<operator service>:<port>`.
    pub url: String,
    /// CA certificate (PEM) that signed the endpoint's certificate.
    pub ca_file: PathBuf,
    /// The projected ServiceAccount token (audience of the endpoint).
    pub token_file: PathBuf,
}

/// Why credentials could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The settings are unusable (URL, CA file).
    #[error("credentials endpoint {url}: {message}")]
    Settings {
        /// The endpoint.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The endpoint refused or failed the request, or could not be reached.
    #[error("credentials endpoint: {0}")]
    Request(#[from] kube::Error),
    /// No answer within [`FETCH_TIMEOUT`].
    #[error("credentials endpoint: no answer within {0:?}")]
    Timeout(Duration),
}

impl CredentialError {
    /// Metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            CredentialError::Settings { .. } => "settings",
            CredentialError::Request(_) => "request",
            CredentialError::Timeout(_) => "timeout",
        }
    }
}

/// A client of the credentials endpoint.
#[derive(Clone)]
pub struct CredentialSource {
    client: kube::Client,
}

impl CredentialSource {
    /// A client for `settings`; reads the CA file now (and again as it changes).
    pub fn new(settings: &CredentialSettings) -> Result<Self, CredentialError> {
        let bad = |message: String| CredentialError::Settings { url: settings.url.clone(), message };
        let url: http::Uri = settings.url.parse().map_err(|e| bad(format!("not a URL: {e}")))?;
        let ca = read_certs(&settings.ca_file).map_err(bad)?;
        let mut config = kube::Config::new(url);
        config.root_cert = Some(ca);
        config.root_cert_file = Some(settings.ca_file.clone());
        config.auth_info.token_file = Some(settings.token_file.display().to_string());
        config.connect_timeout = Some(Duration::from_secs(10));
        config.read_timeout = Some(FETCH_TIMEOUT);
        config.reset_reader_on_write = true;
        config.write_timeout = Some(Duration::from_secs(10));
        let client = kube::Client::try_from(config)?;
        Ok(Self { client })
    }

    /// A source speaking through `client` (which carries the endpoint's address, TLS and
    /// token).
    pub fn from_client(client: kube::Client) -> Self {
        Self { client }
    }

    /// This node's credentials, as the operator knows them now.
    pub async fn fetch(&self) -> Result<NodeCredentials, CredentialError> {
        let request = http::Request::get(CREDENTIALS_PATH).body(Vec::new()).map_err(kube::Error::HttpError)?;
        match tokio::time::timeout(FETCH_TIMEOUT, self.client.request::<NodeCredentials>(request)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(CredentialError::Timeout(FETCH_TIMEOUT)),
        }
    }
}

/// The certificates (DER) of a PEM file.
fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<Vec<u8>> = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.map(|c| c.map(|c| c.to_vec())).collect())
        .map_err(|e| format!("CA file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("CA file {}: no certificate", path.display()));
    }
    Ok(certs)
}
