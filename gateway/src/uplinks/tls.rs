//! The TLS client configuration of an uplink (MQTT or HTTP): rustls with the ring provider,
//! trusting the CA of a Secret (or the system's roots), with a client certificate from a
//! Secret when one is set.

use std::sync::Arc;

use fieldgate_crds::MqttTls;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::{SettingsError, settings_err};
use crate::secrets::SecretStore;

/// The client configuration of `tls` (absent: the system's roots, no client certificate);
/// `path` is the settings' field path (`uplinks[0].http.tls`), for errors.
pub fn client_config(
    tls: Option<&MqttTls>,
    secrets: &SecretStore,
    path: &str,
) -> Result<rustls::ClientConfig, SettingsError> {
    let tls = tls.cloned().unwrap_or_default();
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_secret_ref {
        Some(r) => {
            let at = format!("{path}.caSecretRef");
            let key = r.key();
            let pem = secrets.read(&r.name, key).map_err(|e| settings_err(at.clone(), e.to_string()))?;
            let mut n = 0;
            for cert in CertificateDer::pem_slice_iter(pem.expose()) {
                let cert = cert.map_err(|e| settings_err(at.clone(), format!("bad PEM in key {key:?}: {e}")))?;
                roots.add(cert).map_err(|e| settings_err(at.clone(), format!("bad CA certificate: {e}")))?;
                n += 1;
            }
            if n == 0 {
                return Err(settings_err(at, format!("no certificate in key {key:?}")));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // Unparseable system certificates are skipped, as every TLS client does.
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| settings_err(path.to_string(), e.to_string()))?
        .with_root_certificates(roots);
    match &tls.client_cert_secret_ref {
        None => Ok(builder.with_no_client_auth()),
        Some(r) => {
            let at = format!("{path}.clientCertSecretRef");
            let crt = secrets.read(&r.name, "tls.crt").map_err(|e| settings_err(at.clone(), e.to_string()))?;
            let key = secrets.read(&r.name, "tls.key").map_err(|e| settings_err(at.clone(), e.to_string()))?;
            let chain = CertificateDer::pem_slice_iter(crt.expose())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| settings_err(at.clone(), format!("bad PEM in tls.crt: {e}")))?;
            let key = PrivateKeyDer::from_pem_slice(key.expose())
                .map_err(|e| settings_err(at.clone(), format!("bad PEM in tls.key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| settings_err(at, format!("client certificate refused: {e}")))
        }
    }
}
