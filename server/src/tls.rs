//! Transport security: the server's TLS settings, the participant identity
//! carried by a client certificate, and the generation of a federation's
//! certificates.
//!
//! With mutual TLS every participant presents a certificate signed by the
//! federation's CA, and its subject common name is its participant
//! identifier. The server serves a request for participant `p` only over a
//! connection whose client certificate names `p`, so one participant cannot
//! upload or download as another.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use thiserror::Error;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Time a client has to finish the TLS handshake. A peer that stalls
/// mid-handshake is dropped after it; other handshakes run concurrently.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Error in the TLS settings or in generating certificates.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("failed to read the {what} {path}: {error}")]
    Read {
        /// Kind of file, for example "client CA file".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// A file holds no PEM block of the expected kind.
    #[error(
        "the {what} {path} holds no PEM {kind} block; expected a file that contains \"-----BEGIN {kind}\""
    )]
    NotPem {
        /// Kind of file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The expected PEM label, for example "CERTIFICATE".
        kind: &'static str,
    },
    /// Only one of a client certificate and its key was given.
    #[error(
        "a client certificate and its key go together, but only {path} was given; set both --tls-cert and --tls-key"
    )]
    Incomplete {
        /// The one file given.
        path: PathBuf,
    },
    /// A certificate could not be generated or written.
    #[error("failed to generate {what}: {detail}")]
    Generate {
        /// The item being generated.
        what: String,
        /// rcgen's or the file system's error.
        detail: String,
    },
}

/// Paths of the server's TLS files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain of the server.
    pub cert: PathBuf,
    /// PEM private key of the server.
    pub key: PathBuf,
    /// PEM CA certificates that sign participants' certificates. When set,
    /// every client must present a certificate signed by one of them.
    pub client_ca: Option<PathBuf>,
}

/// Reads `path`, which must hold a PEM block labelled `kind`.
fn read_pem(what: &'static str, path: &Path, kind: &'static str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|error| TlsError::Read {
        what,
        path: path.to_path_buf(),
        error,
    })?;
    let marker = format!("-----BEGIN {kind}");
    let text = String::from_utf8_lossy(&bytes);
    let found = match kind {
        // A key file may hold a PKCS#8, an RSA or an EC key.
        "PRIVATE KEY" => text
            .lines()
            .any(|line| line.starts_with("-----BEGIN") && line.contains("PRIVATE KEY")),
        _ => text.contains(&marker),
    };
    if !found {
        return Err(TlsError::NotPem {
            what,
            path: path.to_path_buf(),
            kind,
        });
    }
    Ok(bytes)
}

/// Builds tonic's server TLS settings from `files`. Missing, empty or
/// non-PEM files are rejected here, so a server configured to require
/// client certificates never starts without a CA.
pub fn server_config(files: &TlsFiles) -> Result<ServerTlsConfig, TlsError> {
    let cert = read_pem("server certificate", &files.cert, "CERTIFICATE")?;
    let key = read_pem("server key", &files.key, "PRIVATE KEY")?;
    let mut config = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(path) = &files.client_ca {
        let ca = read_pem("client CA file", path, "CERTIFICATE")?;
        config = config
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(false);
    }
    Ok(config)
}

/// Client-side TLS files: the CA that signed the server's certificate and,
/// for mutual TLS, the client's own certificate and key.
#[derive(Clone, Debug, Default)]
pub struct ClientTlsFiles {
    /// PEM CA certificates that the server's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// PEM certificate of this client (the participant).
    pub cert: Option<PathBuf>,
    /// PEM private key of this client.
    pub key: Option<PathBuf>,
    /// Name to verify the server's certificate against, when it differs
    /// from the host in the address (for example when connecting by IP).
    pub domain: Option<String>,
}

impl ClientTlsFiles {
    /// Returns whether any TLS file or setting is given.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some() || self.domain.is_some()
    }
}

/// Builds tonic's client TLS settings from `files`. The certificate and the
/// key must be given together.
pub fn client_config(files: &ClientTlsFiles) -> Result<ClientTlsConfig, TlsError> {
    let mut config = ClientTlsConfig::new();
    if let Some(path) = &files.ca {
        let ca = read_pem("CA file", path, "CERTIFICATE")?;
        config = config.ca_certificate(Certificate::from_pem(ca));
    }
    match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            let cert = read_pem("client certificate", cert, "CERTIFICATE")?;
            let key = read_pem("client key", key, "PRIVATE KEY")?;
            config = config.identity(Identity::from_pem(cert, key));
        }
        (None, None) => {}
        (Some(path), None) | (None, Some(path)) => {
            return Err(TlsError::Incomplete { path: path.clone() });
        }
    }
    if let Some(domain) = &files.domain {
        config = config.domain_name(domain.clone());
    }
    Ok(config)
}

/// Formats `error` followed by the messages of its sources, which for
/// tonic's transport errors hold the actual cause (the top message is only
/// "transport error"). A source whose message is already included is
/// skipped.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut detail = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !detail.contains(&text) {
            detail.push_str(": ");
            detail.push_str(&text);
        }
        source = cause.source();
    }
    detail
}

/// Returns the subject common name of a DER certificate, or `None` when the
/// certificate cannot be parsed or has no common name.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = certificate
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(name)
}

/// Files written by [`generate_federation`].
#[derive(Clone, Debug)]
pub struct GeneratedFiles {
    /// The CA certificate, which both sides trust.
    pub ca_cert: PathBuf,
    /// The CA's private key, needed only to sign more certificates.
    pub ca_key: PathBuf,
    /// The server's certificate and key.
    pub server: (PathBuf, PathBuf),
    /// Whether this run wrote the server's certificate (it keeps an
    /// existing one when no server names are given).
    pub server_written: bool,
    /// Each participant's identifier, certificate and key.
    pub participants: Vec<(String, PathBuf, PathBuf)>,
}

/// Generates a CA, a server certificate valid for `server_names` (DNS
/// names or IP addresses) and for `localhost` and `127.0.0.1`, and one
/// client certificate per participant
/// identifier, valid for `days` days, and writes them as PEM files into
/// `dir`: `ca.pem`, `ca.key`, `server.pem`, `server.key`, and `ID.pem`,
/// `ID.key` for each participant. Private keys are written with mode 0600.
/// An existing CA in `dir` is reused, so participants can be added later.
pub fn generate_federation(
    dir: &Path,
    server_names: Option<&[String]>,
    participants: &[String],
    days: u32,
) -> Result<GeneratedFiles, TlsError> {
    let failed = |what: &str, detail: &dyn std::fmt::Display| TlsError::Generate {
        what: what.to_string(),
        detail: detail.to_string(),
    };
    if let Some(names) = server_names {
        for name in names {
            check_server_name(name)?;
        }
    }
    if dir.exists() && !dir.is_dir() {
        return Err(failed(
            &format!("certificates in {}", dir.display()),
            &"the path exists but is not a directory; pass a directory to --out",
        ));
    }
    std::fs::create_dir_all(dir).map_err(|error| {
        failed(
            &format!("the certificate directory {}", dir.display()),
            &error,
        )
    })?;
    let now = time::OffsetDateTime::now_utc();
    let not_before = now - time::Duration::days(1);
    let not_after = now + time::Duration::days(i64::from(days));

    let ca_cert_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    let issuer = if ca_cert_path.exists() && ca_key_path.exists() {
        let cert = std::fs::read_to_string(&ca_cert_path)
            .map_err(|error| failed("the CA (reading ca.pem)", &error))?;
        let key = std::fs::read_to_string(&ca_key_path)
            .map_err(|error| failed("the CA (reading ca.key)", &error))?;
        let key = KeyPair::from_pem(&key).map_err(|error| failed("the CA (ca.key)", &error))?;
        Issuer::from_ca_cert_pem(&cert, key).map_err(|error| failed("the CA (ca.pem)", &error))?
    } else {
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|error| failed("the CA", &error))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(DnType::CommonName, "dssgd federation CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().map_err(|error| failed("the CA key", &error))?;
        let cert = params
            .self_signed(&key)
            .map_err(|error| failed("the CA", &error))?;
        write_file(&ca_cert_path, cert.pem().as_bytes(), false)?;
        write_file(&ca_key_path, key.serialize_pem().as_bytes(), true)?;
        Issuer::new(params, key)
    };

    let leaf = |names: Vec<String>, common_name: &str, usages: &[ExtendedKeyUsagePurpose]| {
        let mut params =
            CertificateParams::new(names).map_err(|error| failed(common_name, &error))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages.to_vec();
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().map_err(|error| failed(common_name, &error))?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|error| failed(common_name, &error))?;
        Ok::<_, TlsError>((cert.pem(), key.serialize_pem()))
    };

    let server = (dir.join("server.pem"), dir.join("server.key"));
    let keep_server = server_names.is_none() && server.0.exists() && server.1.exists();
    let default_names = ["localhost".to_string(), "127.0.0.1".to_string()];
    let server_names = server_names.unwrap_or(&default_names);
    let server_cn = server_names
        .first()
        .cloned()
        .unwrap_or_else(|| "dssgd-server".into());
    // The local names let a health probe on the server's host verify it.
    let mut names = server_names.to_vec();
    for local in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|name| name == local) {
            names.push(local.into());
        }
    }
    // Client authentication too, so that the server's own health probe can
    // present this certificate to a server that requires one.
    // Without server names, an existing server certificate is kept, so a
    // second run that only adds participants keeps the server's names.
    if !keep_server {
        let (cert, key) = leaf(
            names,
            &server_cn,
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )?;
        write_file(&server.0, cert.as_bytes(), false)?;
        write_file(&server.1, key.as_bytes(), true)?;
    }

    let mut unique = participants.to_vec();
    unique.sort();
    unique.dedup();
    let mut written = Vec::with_capacity(unique.len());
    for id in &unique {
        let (cert, key) = leaf(Vec::new(), id, &[ExtendedKeyUsagePurpose::ClientAuth])?;
        let paths = (dir.join(format!("{id}.pem")), dir.join(format!("{id}.key")));
        write_file(&paths.0, cert.as_bytes(), false)?;
        write_file(&paths.1, key.as_bytes(), true)?;
        written.push((id.clone(), paths.0, paths.1));
    }
    Ok(GeneratedFiles {
        ca_cert: ca_cert_path,
        ca_key: ca_key_path,
        server,
        server_written: !keep_server,
        participants: written,
    })
}

/// Checks that `name` is an IP address or a DNS name: dot-separated labels
/// of 1 to 63 ASCII letters, digits or '-', 253 characters at most.
fn check_server_name(name: &str) -> Result<(), TlsError> {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let valid_label = |label: &str| {
        (1..=63).contains(&label.len())
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if name.len() <= 253 && name.split('.').all(valid_label) {
        Ok(())
    } else {
        Err(TlsError::Generate {
            what: format!("a server certificate for {name:?}"),
            detail:
                "a server name must be an IP address or a DNS name of letters, digits, '-' and '.'"
                    .into(),
        })
    }
}

/// Writes `bytes` to `path`, readable by the owner only when `private`.
fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |error: std::io::Error| TlsError::Generate {
        what: path.display().to_string(),
        detail: error.to_string(),
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(failed)?;
    file.write_all(bytes).map_err(failed)?;
    file.sync_all().map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_participant_certificate_names_participant() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["localhost".to_string(), "127.0.0.1".to_string()];
        let files = generate_federation(dir.path(), Some(&names), &["p001".into()], 30).unwrap();
        let (id, cert, _) = &files.participants[0];
        assert_eq!(id, "p001");
        let pem = std::fs::read_to_string(cert).unwrap();
        let der = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1;
        assert_eq!(common_name(&der.contents).as_deref(), Some("p001"));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&files.participants[0].2)
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "participant key mode");
    }

    #[test]
    fn existing_ca_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["myhost".to_string()];
        generate_federation(dir.path(), Some(&names), &["p1".into()], 30).unwrap();
        let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let server = std::fs::read(dir.path().join("server.pem")).unwrap();
        let again = generate_federation(dir.path(), None, &["p2".into()], 30).unwrap();
        assert!(
            !again.server_written,
            "the server certificate was rewritten"
        );
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca);
        assert_eq!(
            std::fs::read(dir.path().join("server.pem")).unwrap(),
            server
        );
        assert!(dir.path().join("p1.pem").exists());
        assert!(dir.path().join("p2.pem").exists());
    }

    #[test]
    fn empty_or_missing_client_ca_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate_federation(dir.path(), None, &[], 30).unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, b"").unwrap();
        for client_ca in [empty.clone(), dir.path().join("missing.pem")] {
            let settings = TlsFiles {
                cert: files.server.0.clone(),
                key: files.server.1.clone(),
                client_ca: Some(client_ca.clone()),
            };
            let error = server_config(&settings).unwrap_err();
            let text = error.to_string();
            assert!(text.contains("client CA file"), "{text}");
            assert!(text.contains(&client_ca.display().to_string()), "{text}");
        }
    }

    #[test]
    fn invalid_server_names_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["", "bad name!", "-x.example", "a..b"] {
            let names = [name.to_string()];
            let error = generate_federation(dir.path(), Some(&names), &[], 30).unwrap_err();
            assert!(
                error.to_string().contains("server name"),
                "{name:?}: {error}"
            );
        }
        for name in ["127.0.0.1", "::1", "dssgd.example.org", "server"] {
            assert!(check_server_name(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn garbage_certificate_has_no_common_name() {
        assert_eq!(common_name(b"not a certificate"), None);
        assert_eq!(common_name(&[]), None);
    }
}
