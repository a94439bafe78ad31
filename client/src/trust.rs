//! Verifying the relay's certificate. A relay with a certificate from a public or
//! given CA is verified the usual way. A relay with a self-signed certificate (the
//! default) is pinned on first use, as SSH does with known hosts: the first
//! connection records its fingerprint, later ones must match, and a changed
//! certificate is refused with a message saying what to do.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone)]
pub enum TrustPolicy {
    /// Chains to, or is, a certificate in this file; nothing else.
    CaFile(PathBuf),
    /// System roots, else the fingerprint pinned in this file (recorded on first use).
    PinOnFirstUse {
        known_relays: PathBuf,
    },
    Insecure,
}

impl TrustPolicy {
    pub fn default_known_relays() -> PathBuf {
        std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".config")))
            .unwrap_or_else(|| PathBuf::from("."))
            .join("localup/known_relays")
    }
}

/// Why the relay's certificate was refused, in words for the user.
pub type TrustFailure = Arc<Mutex<Option<String>>>;

/// A QUIC client configuration verifying `relay` (HOST:PORT) under `policy`, and the
/// slot where a refusal's explanation lands.
pub fn client_config(
    policy: &TrustPolicy,
    relay: &str,
) -> Result<(quinn::ClientConfig, TrustFailure), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (roots, pinned) = match policy {
        TrustPolicy::CaFile(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|error| format!("cannot read --relay-ca {}: {error}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "--relay-ca {} holds no PEM certificate",
                    path.display()
                ));
            }
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(certs.iter().cloned());
            (roots, certs)
        }
        TrustPolicy::PinOnFirstUse { .. } => {
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            (roots, Vec::new())
        }
        TrustPolicy::Insecure => (RootCertStore::empty(), Vec::new()),
    };
    let webpki = (!roots.is_empty())
        .then(|| {
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()
                .ok()
        })
        .flatten();
    let failure = TrustFailure::default();
    let verifier = Arc::new(RelayVerifier {
        policy: policy.clone(),
        relay: relay.to_owned(),
        webpki,
        pinned,
        algorithms: provider.signature_verification_algorithms,
        failure: Arc::clone(&failure),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| error.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![localup_protocol::ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|error| error.to_string())?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(localup_protocol::quic::transport_config(
        localup_protocol::quic::Role::Client,
    ));
    Ok((config, failure))
}

pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = Sha256::digest(cert.as_ref());
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("SHA256:{hex}")
}

#[derive(Debug)]
struct RelayVerifier {
    policy: TrustPolicy,
    relay: String,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    /// Certificates trusted as they are (a self-signed relay's own certificate given
    /// as its CA), whatever names they carry.
    pinned: Vec<CertificateDer<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
    failure: TrustFailure,
}

impl RelayVerifier {
    fn refuse(&self, message: String) -> rustls::Error {
        *self.failure.lock().unwrap() = Some(message.clone());
        rustls::Error::General(message)
    }

    /// Checks the certificate against the pin for this relay, recording it if there
    /// is none yet.
    fn check_pin(
        &self,
        known_relays: &Path,
        cert: &CertificateDer<'_>,
    ) -> Result<(), rustls::Error> {
        let presented = fingerprint(cert);
        let known = std::fs::read_to_string(known_relays).unwrap_or_default();
        let pinned = known.lines().find_map(|line| {
            let (relay, fingerprint) = line.split_once(' ')?;
            (relay == self.relay).then(|| fingerprint.trim().to_owned())
        });
        match pinned {
            Some(pinned) if pinned == presented => Ok(()),
            Some(pinned) => Err(self.refuse(format!(
                "the relay's certificate for {relay} has changed (pinned {pinned}, now {presented}). \
                 If the relay's certificate was replaced on purpose, delete the line for {relay} from {file}; \
                 otherwise someone may be intercepting the connection",
                relay = self.relay,
                file = known_relays.display(),
            ))),
            None => {
                match pin(known_relays, &self.relay, &presented) {
                    Ok(()) => tracing::info!(
                        relay = %self.relay, fingerprint = %presented, file = %known_relays.display(),
                        "first connection to this relay: trusting its certificate from now on"
                    ),
                    Err(error) => tracing::warn!(
                        relay = %self.relay, fingerprint = %presented, %error,
                        "trusting the relay's certificate for this run only: cannot save the pin"
                    ),
                }
                Ok(())
            }
        }
    }
}

fn pin(known_relays: &Path, relay: &str, fingerprint: &str) -> std::io::Result<()> {
    if let Some(dir) = known_relays.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(known_relays)?;
    writeln!(file, "{relay} {fingerprint}")
}

impl ServerCertVerifier for RelayVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if matches!(self.policy, TrustPolicy::Insecure) {
            return Ok(ServerCertVerified::assertion());
        }
        if self.pinned.iter().any(|cert| cert == end_entity) {
            return Ok(ServerCertVerified::assertion());
        }
        let chain_error = match &self.webpki {
            Some(webpki) => {
                match webpki.verify_server_cert(
                    end_entity,
                    intermediates,
                    server_name,
                    ocsp_response,
                    now,
                ) {
                    Ok(verified) => return Ok(verified),
                    Err(error) => error.to_string(),
                }
            }
            None => "no trusted roots".to_owned(),
        };
        match &self.policy {
            TrustPolicy::CaFile(path) => Err(self.refuse(format!(
                "the relay's certificate is not trusted by --relay-ca {}: {chain_error}",
                path.display()
            ))),
            TrustPolicy::PinOnFirstUse { known_relays } => self
                .check_pin(known_relays, end_entity)
                .map(|()| ServerCertVerified::assertion()),
            TrustPolicy::Insecure => unreachable!("handled above"),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
