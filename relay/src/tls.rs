//! The relay's certificate: the operator's (`--tls-cert/--tls-key`), or a self-signed
//! one generated once and kept in the state directory, so that clients which pinned
//! it on first use keep trusting the relay across restarts. QUIC and the TCP fallback
//! serve the same one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use localup_protocol::quic::{Role, transport_config};
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const CERT_FILE: &str = "relay-cert.pem";
const KEY_FILE: &str = "relay-key.pem";

pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    pub fn from_files(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| {
                format!(
                    "cannot read certificates from --tls-cert {}",
                    cert.display()
                )
            })?;
        anyhow::ensure!(
            !chain.is_empty(),
            "--tls-cert {} holds no PEM certificate",
            cert.display()
        );
        let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
            format!("cannot read a private key from --tls-key {}", key.display())
        })?;
        Ok(Self { chain, key })
    }

    /// Reuses the certificate saved in `state_dir`, or generates and saves one. When
    /// the directory cannot be written the certificate lives only as long as the
    /// process, and clients that pinned it will refuse the next one: say so.
    pub fn self_signed(state_dir: Option<&Path>, domain: &str) -> anyhow::Result<Self> {
        let dir = state_dir.map(Path::to_path_buf).or_else(default_state_dir);
        if let Some(dir) = &dir {
            let (cert, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
            if cert.exists() && key.exists() {
                return Self::from_files(&cert, &key);
            }
        }
        let names = vec![
            domain.to_owned(),
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ];
        let generated = rcgen::generate_simple_self_signed(names)
            .context("cannot generate a self-signed certificate")?;
        let (cert_pem, key_pem) = (generated.cert.pem(), generated.signing_key.serialize_pem());
        match dir.as_deref().map(|dir| save(dir, &cert_pem, &key_pem)) {
            Some(Ok(())) => tracing::info!(
                dir = %dir.as_deref().unwrap().display(),
                "generated a self-signed certificate; clients pin it on first use"
            ),
            Some(Err(error)) => tracing::warn!(
                %error,
                "cannot save the self-signed certificate; clients that pinned it will refuse the relay after a restart (set --state-dir or --tls-cert)"
            ),
            None => tracing::warn!(
                "no state directory (no HOME): the self-signed certificate changes on every restart"
            ),
        }
        Ok(Self {
            chain: vec![generated.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into()),
        })
    }

    /// The TLS configuration both transports serve: TLS 1.3 only, the protocol's ALPN.
    pub fn server_config(self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(self.chain, self.key)
            .context("the TLS certificate and key do not form a usable pair")?;
        tls.alpn_protocols = vec![localup_protocol::ALPN.to_vec()];
        Ok(Arc::new(tls))
    }
}

/// The QUIC form of [`Identity::server_config`].
pub fn quic_server_config(tls: Arc<rustls::ServerConfig>) -> anyhow::Result<quinn::ServerConfig> {
    let crypto = QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config(Role::Relay));
    Ok(config)
}

fn default_state_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".local/share")))
        .map(|base| base.join("localup"))
}

fn save(dir: &Path, cert_pem: &str, key_pem: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(CERT_FILE), cert_pem)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join(KEY_FILE))?
        .write_all(key_pem.as_bytes())
}
