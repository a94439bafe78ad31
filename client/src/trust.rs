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
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
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

/// What to do instead when pinning cannot work, named in every refusal.
const FIXES: &str =
    "pass a writable --known-relays file, --relay-ca with the relay's certificate, or --insecure";

/// A TLS client configuration (for both transports) verifying `relay` (HOST:PORT)
/// under `policy`, and the slot where a refusal's explanation lands. A known_relays
/// file that cannot be read or parsed is refused here, before any connection: it
/// might hold a pin that would refuse the relay.
pub fn client_config(
    policy: &TrustPolicy,
    relay: &str,
) -> Result<(Arc<rustls::ClientConfig>, TrustFailure), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (roots, trusted_as_is, pin) = match policy {
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
            (roots, certs, None)
        }
        TrustPolicy::PinOnFirstUse { known_relays } => {
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            (roots, Vec::new(), load_pin(known_relays, relay)?)
        }
        TrustPolicy::Insecure => (RootCertStore::empty(), Vec::new(), None),
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
        trusted_as_is,
        pin: Mutex::new(pin),
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
    Ok((Arc::new(tls), failure))
}

/// The QUIC form of a TLS client configuration from [`client_config`].
pub fn quic_config(tls: Arc<rustls::ClientConfig>) -> Result<quinn::ClientConfig, String> {
    let crypto = QuicClientConfig::try_from(tls).map_err(|error| error.to_string())?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(localup_protocol::quic::transport_config(
        localup_protocol::quic::Role::Client,
    ));
    Ok(config)
}

pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = Sha256::digest(cert.as_ref());
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("SHA256:{hex}")
}

/// The fingerprint pinned for `relay`, strictly: a missing file means no pin yet, but
/// a file that cannot be read or holds a malformed line is an error.
fn load_pin(known_relays: &Path, relay: &str) -> Result<Option<String>, String> {
    let bytes = match std::fs::read(known_relays) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(format!(
                "cannot read the pinned relay certificates in {}: {error}; make it readable, or {FIXES}",
                known_relays.display()
            ));
        }
    };
    let text = String::from_utf8(bytes).map_err(|_| {
        format!(
            "{} is not a known_relays file (not UTF-8 text); fix or remove it, or {FIXES}",
            known_relays.display()
        )
    })?;
    let mut pinned = None;
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parsed = line
            .split_once(' ')
            .map(|(host, fingerprint)| (host, fingerprint.trim()))
            .filter(|(_, fingerprint)| is_fingerprint(fingerprint));
        let Some((host, fingerprint)) = parsed else {
            return Err(format!(
                "line {} of {} is not `HOST:PORT SHA256:<64 hex digits>`; fix or delete it, or {FIXES}",
                number + 1,
                known_relays.display()
            ));
        };
        if host == relay {
            pinned = Some(fingerprint.to_owned());
        }
    }
    Ok(pinned)
}

fn is_fingerprint(text: &str) -> bool {
    text.strip_prefix("SHA256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|byte| byte.is_ascii_hexdigit()))
}

#[derive(Debug)]
struct RelayVerifier {
    policy: TrustPolicy,
    relay: String,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    /// Certificates trusted as they are (a self-signed relay's own certificate given
    /// as its CA), whatever names they carry.
    trusted_as_is: Vec<CertificateDer<'static>>,
    /// The fingerprint pinned for this relay, kept for the life of the process so
    /// reconnects check against it whatever happens to the file.
    pin: Mutex<Option<String>>,
    algorithms: WebPkiSupportedAlgorithms,
    failure: TrustFailure,
}

impl RelayVerifier {
    fn refuse(&self, message: String) -> rustls::Error {
        *self.failure.lock().unwrap() = Some(message.clone());
        rustls::Error::General(message)
    }

    /// Checks the certificate against the pin for this relay; on first use, records
    /// it in the file, and refuses when it cannot (the next run would trust any
    /// certificate again).
    fn check_pin(
        &self,
        known_relays: &Path,
        cert: &CertificateDer<'_>,
    ) -> Result<(), rustls::Error> {
        let presented = fingerprint(cert);
        let mut pin = self.pin.lock().unwrap();
        match pin.as_deref() {
            Some(pinned) if pinned == presented => Ok(()),
            Some(pinned) => Err(self.refuse(format!(
                "the relay's certificate for {relay} has changed (pinned {pinned}, now {presented}). \
                 If the relay's certificate was replaced on purpose, delete the line for {relay} from {file}; \
                 otherwise someone may be intercepting the connection",
                relay = self.relay,
                file = known_relays.display(),
            ))),
            None => match save_pin(known_relays, &self.relay, &presented) {
                Ok(()) => {
                    tracing::info!(
                        relay = %self.relay, fingerprint = %presented, file = %known_relays.display(),
                        "first connection to this relay: trusting its certificate from now on"
                    );
                    *pin = Some(presented);
                    Ok(())
                }
                Err(error) => Err(self.refuse(format!(
                    "cannot pin the relay's certificate ({presented}) in {}: {error}; {FIXES}",
                    known_relays.display()
                ))),
            },
        }
    }
}

fn save_pin(known_relays: &Path, relay: &str, fingerprint: &str) -> std::io::Result<()> {
    if let Some(dir) = known_relays.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(known_relays)?;
    writeln!(file, "{relay} {fingerprint}")?;
    file.sync_all()
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
        if self.trusted_as_is.iter().any(|cert| cert == end_entity) {
            return Ok(ServerCertVerified::assertion());
        }
        let chain_error = match &self.webpki {
            Some(webpki) => match webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ) {
                Ok(verified) => return Ok(verified),
                Err(error) => error,
            },
            None => rustls::Error::General("no trusted roots".into()),
        };
        match &self.policy {
            TrustPolicy::CaFile(path) => Err(self.refuse(format!(
                "the relay's certificate is not trusted by --relay-ca {}: {chain_error}",
                path.display()
            ))),
            // A chain a CA vouches for, but for another name: that is not a
            // self-signed relay to pin, it is the wrong server (or the wrong name).
            TrustPolicy::PinOnFirstUse { .. } if is_wrong_name(&chain_error) => {
                Err(self.refuse(format!(
                    "the relay's certificate is signed by a trusted CA but not for the name in --relay {}: {chain_error}; \
                     connect by the name the certificate carries, or pass --relay-ca",
                    self.relay
                )))
            }
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

fn is_wrong_name(error: &rustls::Error) -> bool {
    matches!(
        error,
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "localup-trust-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const PIN: &str = "SHA256:0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn pins_are_read_strictly() {
        let dir = scratch("read");
        let file = dir.join("known_relays");
        assert_eq!(load_pin(&file, "relay:1").unwrap(), None, "no file, no pin");
        std::fs::write(&file, format!("# comment\nrelay:1 {PIN}\nother:2 {PIN}\n")).unwrap();
        assert_eq!(load_pin(&file, "relay:1").unwrap().as_deref(), Some(PIN));
        std::fs::write(&file, "relay:1 not-a-fingerprint\n").unwrap();
        let error = load_pin(&file, "relay:1").unwrap_err();
        assert!(
            error.contains("line 1") && error.contains("--insecure"),
            "{error}"
        );
        std::fs::write(&file, [0xff, 0xfe, 0x00]).unwrap();
        let error = load_pin(&file, "relay:1").unwrap_err();
        assert!(error.contains("not UTF-8"), "{error}");
        let error = load_pin(&dir, "relay:1").unwrap_err();
        assert!(
            error.contains("cannot read") && error.contains("--relay-ca"),
            "{error}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_unwritable_pin_file_refuses_the_first_use() {
        let dir = scratch("save");
        // A directory where the file should be: nothing can be appended to it.
        let known_relays = dir.join("known_relays");
        std::fs::create_dir_all(&known_relays).unwrap();
        let verifier = RelayVerifier {
            policy: TrustPolicy::PinOnFirstUse {
                known_relays: known_relays.clone(),
            },
            relay: "relay:1".into(),
            webpki: None,
            trusted_as_is: Vec::new(),
            pin: Mutex::new(None),
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
            failure: TrustFailure::default(),
        };
        let cert = CertificateDer::from(vec![1, 2, 3]);
        assert!(verifier.check_pin(&known_relays, &cert).is_err());
        let reason = verifier.failure.lock().unwrap().clone().unwrap();
        assert!(
            reason.contains("cannot pin") && reason.contains("--known-relays"),
            "{reason}"
        );
        // Pinned in memory, a later connection is checked against it without the file.
        *verifier.pin.lock().unwrap() = Some(fingerprint(&cert));
        assert!(verifier.check_pin(&known_relays, &cert).is_ok());
        let other = CertificateDer::from(vec![4, 5, 6]);
        assert!(verifier.check_pin(&known_relays, &other).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
