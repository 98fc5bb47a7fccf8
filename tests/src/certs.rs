//! A throwaway PKI for TLS tests: a CA, a broker certificate for `127.0.0.1`/`localhost`, and a
//! client certificate for the gateway, generated with rcgen.

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// PEM texts of a test CA and the certificates it signed.
#[derive(Clone, Debug)]
pub struct TestPki {
    /// The CA certificate (the `ca.crt` of a Secret).
    pub ca_cert: String,
    /// The broker's certificate, valid for `127.0.0.1` and `localhost`.
    pub server_cert: String,
    /// The broker's private key (PKCS#8).
    pub server_key: String,
    /// The gateway's client certificate (the `tls.crt` of a Secret).
    pub client_cert: String,
    /// The gateway's client key (the `tls.key` of a Secret, PKCS#8).
    pub client_key: String,
}

impl TestPki {
    /// Generates a fresh CA, broker and client certificate (ECDSA P-256).
    pub fn generate() -> Result<Self> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name.push(DnType::CommonName, "fieldgate test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let mut server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
        server.distinguished_name.push(DnType::CommonName, "fieldgate test broker");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let server_key = KeyPair::generate()?;
        let server_cert = server.signed_by(&server_key, &issuer)?;

        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client.distinguished_name.push(DnType::CommonName, "fieldgate-gateway");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let client_key = KeyPair::generate()?;
        let client_cert = client.signed_by(&client_key, &issuer)?;

        Ok(Self {
            ca_cert: ca_cert.pem(),
            server_cert: server_cert.pem(),
            server_key: server_key.serialize_pem(),
            client_cert: client_cert.pem(),
            client_key: client_key.serialize_pem(),
        })
    }
}
