//! Certificates for a chain: a chain CA and, per name, a key and a
//! certificate usable as both TLS server and client (`chainsight certs init`).
//! Tests use the same code to make expired, foreign or otherwise bad
//! certificates. How a real chain would issue them instead: certs/README.md.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Certificate generation errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0:?} is not a valid identity (letters, digits, '-', '.', '_'; at most 64)")]
    BadName(String),
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// What kind of leaf certificate to issue.
#[derive(Debug, Clone)]
pub struct LeafOptions {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// serverAuth EKU.
    pub server_auth: bool,
    /// clientAuth EKU.
    pub client_auth: bool,
}

impl Default for LeafOptions {
    /// Valid from an hour ago for two years, server and client.
    fn default() -> Self {
        let now = OffsetDateTime::now_utc();
        LeafOptions {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(730),
            server_auth: true,
            client_auth: true,
        }
    }
}

/// A chain CA that can issue node and client certificates.
pub struct ChainCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl ChainCa {
    /// A new CA with its own key; `common_name` names it in issued certificates.
    pub fn generate(common_name: &str) -> Result<Self, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "chainsight");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(ChainCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads an existing CA from `ca.pem` and `ca.key` in `dir`.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| Error::Io { path, source })
        };
        let cert_pem = read("ca.pem")?;
        let key_pem = read("ca.key")?;
        let key = KeyPair::from_pem(&key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(ChainCa {
            issuer,
            cert_pem,
            key_pem,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for identity `name`: SANs DNS:name, DNS:localhost,
    /// IP:127.0.0.1, CN=name.
    pub fn issue(&self, name: &str, opts: &LeafOptions) -> Result<Issued, Error> {
        if !crate::config::is_identity(name) {
            return Err(Error::BadName(name.to_string()));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_string(), "localhost".to_string()])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "chainsight");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = [
            (opts.server_auth, ExtendedKeyUsagePurpose::ServerAuth),
            (opts.client_auth, ExtendedKeyUsagePurpose::ClientAuth),
        ]
        .into_iter()
        .filter_map(|(on, eku)| on.then_some(eku))
        .collect();
        params.not_before = opts.not_before;
        params.not_after = opts.not_after;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `ca.pem` and `ca.key` (0600) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        write_pair(dir, "ca", &self.cert_pem, &self.key_pem)
    }
}

/// The file `chainsight certs revoke` writes in the certificates directory.
pub const CRL_FILE: &str = "crl.pem";

impl ChainCa {
    /// A certificate revocation list signed by this CA, listing `revoked`
    /// (serial number, revocation time), numbered `number`, valid for 30
    /// days.
    pub fn revocation_list(
        &self,
        revoked: &[(Vec<u8>, OffsetDateTime)],
        number: u64,
    ) -> Result<String, Error> {
        let now = OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(30),
            crl_number: rcgen::SerialNumber::from(number.to_be_bytes().to_vec()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|(serial, at)| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(serial.clone()),
                    revocation_time: *at,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

/// `chainsight certs revoke`: adds the certificates `DIR/NAME.pem` of
/// `names` to `DIR/crl.pem` (keeping the entries it already lists), signed
/// by the CA in `dir`; returns the CRL's path. Nodes with the CRL in
/// `[tls] crls` refuse those certificates at the handshake from their next
/// reload (SIGHUP or `chainsight admin reload`).
pub fn revoke(dir: &Path, names: &[String]) -> Result<PathBuf, Error> {
    let ca = ChainCa::load(dir)?;
    let crl_path = dir.join(CRL_FILE);
    let parse_err = |path: &Path, reason: String| Error::Parse {
        path: path.to_path_buf(),
        reason,
    };
    let (mut revoked, number) = if crl_path.exists() {
        let pem = std::fs::read(&crl_path).map_err(|source| Error::Io {
            path: crl_path.clone(),
            source,
        })?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem)
            .map_err(|e| parse_err(&crl_path, e.to_string()))?;
        use x509_parser::prelude::FromDer;
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&pem.contents)
                .map_err(|e| parse_err(&crl_path, e.to_string()))?;
        let listed: Vec<(Vec<u8>, OffsetDateTime)> = crl
            .iter_revoked_certificates()
            .map(|r| (r.raw_serial().to_vec(), r.revocation_date.to_datetime()))
            .collect();
        let number = crl
            .crl_number()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0);
        (listed, number)
    } else {
        (Vec::new(), 0)
    };
    let now = OffsetDateTime::now_utc();
    for name in names {
        if !crate::config::is_identity(name) {
            return Err(Error::BadName(name.clone()));
        }
        let path = dir.join(format!("{name}.pem"));
        let pem = std::fs::read(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let (_, pem) =
            x509_parser::pem::parse_x509_pem(&pem).map_err(|e| parse_err(&path, e.to_string()))?;
        let cert = pem
            .parse_x509()
            .map_err(|e| parse_err(&path, e.to_string()))?;
        let serial = cert.raw_serial().to_vec();
        if !revoked.iter().any(|(s, _)| *s == serial) {
            revoked.push((serial, now));
        }
    }
    let pem = ca.revocation_list(&revoked, number + 1)?;
    // Whole or not at all: a node reloading meanwhile reads the old list
    // or the new one.
    let tmp = dir.join(format!(".{CRL_FILE}.tmp"));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::write(&tmp, pem).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &crl_path).map_err(io(&crl_path))?;
    Ok(crl_path)
}

/// Writes `NAME.pem` and `NAME.key` (0600) into `dir`.
pub fn write_pair(dir: &Path, name: &str, cert_pem: &str, key_pem: &str) -> Result<(), Error> {
    let io = |path: PathBuf| move |source| Error::Io { path, source };
    std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    let cert = dir.join(format!("{name}.pem"));
    std::fs::write(&cert, cert_pem).map_err(io(cert.clone()))?;
    let key = dir.join(format!("{name}.key"));
    crate::secret::write_private(&key, key_pem.as_bytes()).map_err(io(key.clone()))?;
    Ok(())
}

/// `chainsight certs init`: uses the CA in `dir` if there is one, otherwise
/// creates it, then issues a certificate per name. Returns the files written.
pub fn init(dir: &Path, names: &[String]) -> Result<Vec<PathBuf>, Error> {
    let mut written = Vec::new();
    let ca = if dir.join("ca.pem").exists() && dir.join("ca.key").exists() {
        ChainCa::load(dir)?
    } else {
        let ca = ChainCa::generate("chainsight chain CA")?;
        ca.write(dir)?;
        written.extend([dir.join("ca.pem"), dir.join("ca.key")]);
        ca
    };
    for name in names {
        let issued = ca.issue(name, &LeafOptions::default())?;
        write_pair(dir, name, &issued.cert_pem, &issued.key_pem)?;
        written.extend([
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        ]);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificate_has_identity_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &["retailer".into()]).unwrap();
        let certs = crate::tls::load_certs(&dir.path().join("retailer.pem")).unwrap();
        assert_eq!(
            crate::tls::identity_of(&certs[0]).as_deref(),
            Some("retailer")
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in ["ca.key", "retailer.key"] {
                let mode = std::fs::metadata(dir.path().join(f))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }
        // A second init reuses the CA.
        let ca_before = std::fs::read(dir.path().join("ca.pem")).unwrap();
        init(dir.path(), &["distributor".into()]).unwrap();
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
    }
}
