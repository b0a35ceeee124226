//! Verifiable origin: the node where an event enters the chain signs the
//! fields it set, so that nodes two or three hops away can check that a
//! relay changed none of them.
//!
//! Each field gets a fresh 16-byte salt and a digest, SHA-256(salt ‖
//! canonical value); the origin signs the list of field names and digests
//! with the key of its chain certificate. A relay that withholds a field
//! under its agreement clears the value and the field's salt and keeps the
//! digest: the signature still covers the list, and every field still
//! present is checked against its digest. Salts keep a withheld field's
//! value from being guessed from its digest. By design outside the proof:
//! `customer_pseudonym` (re-keyed per link) and `path` (appended per hop).
//!
//! Verification needs the origin's certificate (it travels in forward
//! batches and is kept in the store) and the chain CA: the certificate must
//! have been valid, issued by the CA and for the origin's identity when the
//! event was signed.

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::RngCore;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use sha2::{Digest, Sha256};

use crate::domain::{PreferenceEvent, UnixNanos};

/// SHA-256 of a certificate's DER.
pub type Fingerprint = [u8; 32];

/// Bytes of a field salt.
pub const SALT_LEN: usize = 16;

const CONTEXT: &[u8] = b"chainsight-origin-v1";

/// Signature schemes a signing key may use, preferred first.
const SCHEMES: &[rustls::SignatureScheme] = &[
    rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
    rustls::SignatureScheme::ECDSA_NISTP384_SHA384,
    rustls::SignatureScheme::ED25519,
    rustls::SignatureScheme::RSA_PSS_SHA256,
];

/// An origin's signature over an event's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginProof {
    pub certificate: Fingerprint,
    /// TLS SignatureScheme number.
    pub scheme: u16,
    pub signature: Vec<u8>,
    pub signed_at: UnixNanos,
    /// Sorted by name.
    pub fields: Vec<FieldDigest>,
}

/// One signed field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDigest {
    pub name: String,
    pub digest: [u8; 32],
    /// `None` once a relay withheld the field.
    pub salt: Option<[u8; SALT_LEN]>,
}

/// The fields of `ev` the proof covers, by name, in canonical form: only
/// those set (an empty string, a zero quantity, no score: not set).
pub fn canonical_fields(ev: &PreferenceEvent) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut put = |name: &str, value: String| {
        if !value.is_empty() {
            out.insert(name.to_string(), value);
        }
    };
    put("event_id", ev.event_id.clone());
    put("origin", ev.origin.clone());
    put("kind", ev.kind.number().to_string());
    put("occurred_at", ev.occurred_at.0.to_string());
    put("product.gtin", ev.product.gtin.as_str().to_string());
    put("product.category", ev.product.category.clone());
    put("product.brand", ev.product.brand.clone());
    put("channel", ev.channel.number().to_string());
    put("stage", ev.stage.number().to_string());
    put("score", ev.score.map(|s| s.to_string()).unwrap_or_default());
    if ev.quantity != 0 {
        put("quantity", ev.quantity.to_string());
    }
    put("region", ev.region.clone());
    put("age_band", ev.age_band.clone());
    put("text", ev.text.clone());
    for (k, v) in &ev.attributes {
        put(&format!("attributes.{k}"), v.clone());
    }
    out
}

fn field_digest(salt: &[u8; SALT_LEN], value: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(value.as_bytes());
    h.finalize().into()
}

/// The bytes the origin signs.
fn signed_message(
    certificate: &Fingerprint,
    signed_at: UnixNanos,
    fields: &[FieldDigest],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(CONTEXT.len() + 40 + fields.len() * 56);
    m.extend_from_slice(CONTEXT);
    m.extend_from_slice(certificate);
    m.extend_from_slice(&signed_at.0.to_be_bytes());
    for f in fields {
        m.extend_from_slice(
            &u16::try_from(f.name.len())
                .unwrap_or(u16::MAX)
                .to_be_bytes(),
        );
        m.extend_from_slice(f.name.as_bytes());
        m.extend_from_slice(&f.digest);
    }
    m
}

/// SHA-256 of a certificate.
pub fn fingerprint(cert: &[u8]) -> Fingerprint {
    Sha256::digest(cert).into()
}

/// Errors of setting up signing or verification.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("the node's key cannot sign origin proofs: {0}")]
    Key(String),
    #[error("the chain CA cannot verify origin certificates: {0}")]
    Ca(String),
}

/// Signs events with the node's chain certificate key.
pub struct Signer {
    certificate: Vec<u8>,
    fingerprint: Fingerprint,
    signer: Box<dyn rustls::sign::Signer>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("scheme", &self.signer.scheme())
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer with the key of `certificate` (DER, the node's leaf).
    pub fn new(
        certificate: CertificateDer<'static>,
        key: &rustls::pki_types::PrivateKeyDer<'static>,
    ) -> Result<Signer, SetupError> {
        let key = crate::tls::provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| SetupError::Key(e.to_string()))?;
        let signer = key
            .choose_scheme(SCHEMES)
            .ok_or_else(|| SetupError::Key("no supported signature scheme".into()))?;
        Ok(Signer {
            fingerprint: fingerprint(certificate.as_ref()),
            certificate: certificate.as_ref().to_vec(),
            signer,
        })
    }

    /// The node's certificate (DER), which verifiers need.
    pub fn certificate(&self) -> &[u8] {
        &self.certificate
    }

    /// The proof for `ev` as it is now (its origin must be this node).
    pub fn sign(&self, ev: &PreferenceEvent) -> Result<OriginProof, String> {
        let mut rng = rand::rng();
        let fields: Vec<FieldDigest> = canonical_fields(ev)
            .into_iter()
            .map(|(name, value)| {
                let mut salt = [0u8; SALT_LEN];
                rng.fill_bytes(&mut salt);
                FieldDigest {
                    digest: field_digest(&salt, &value),
                    name,
                    salt: Some(salt),
                }
            })
            .collect();
        let signed_at = UnixNanos::now();
        let signature = self
            .signer
            .sign(&signed_message(&self.fingerprint, signed_at, &fields))
            .map_err(|e| e.to_string())?;
        Ok(OriginProof {
            certificate: self.fingerprint,
            scheme: u16::from(self.signer.scheme()),
            signature,
            signed_at,
            fields,
        })
    }
}

/// Clears the salts of the fields `ev` no longer carries (withheld by this
/// relay's agreement), so the proof stays consistent with the event.
pub fn withhold_missing(ev: &mut PreferenceEvent) {
    let present = canonical_fields(ev);
    if let Some(proof) = ev.proof.as_mut() {
        for f in &mut proof.fields {
            if !present.contains_key(&f.name) {
                f.salt = None;
            }
        }
    }
}

/// Why an event failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("the event carries no origin proof")]
    Unsigned,
    #[error("the origin's certificate is not known here")]
    UnknownCertificate,
    #[error("the origin's certificate does not verify against the chain CA: {0}")]
    Certificate(String),
    #[error("the origin's certificate is for {found:?}, the event claims origin {claimed:?}")]
    WrongOrigin { claimed: String, found: String },
    #[error("the signature does not verify: {0}")]
    Signature(String),
    #[error("field {0} does not match what the origin signed")]
    Altered(String),
    #[error("field {0} was not set by the origin (added on the way)")]
    Added(String),
}

/// What a verified proof says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Fields the origin set that relays withheld.
    pub withheld: Vec<String>,
}

/// Checks origin proofs against the chain CA.
#[derive(Clone)]
pub struct Verifier {
    chain: Arc<dyn ClientCertVerifier>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier trusting the CA certificates `ca`.
    pub fn new(ca: Vec<CertificateDer<'static>>) -> Result<Verifier, SetupError> {
        let provider = crate::tls::provider();
        let mut roots = rustls::RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|e| SetupError::Ca(e.to_string()))?;
        }
        let chain = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| SetupError::Ca(e.to_string()))?;
        Ok(Verifier {
            chain,
            algorithms: provider.signature_verification_algorithms,
        })
    }

    /// Checks `certificate` (DER) as an origin certificate: issued by the
    /// CA, valid now. Its identity, or why not.
    pub fn check_certificate(&self, certificate: &[u8]) -> Result<String, Failure> {
        self.check_certificate_at(certificate, UnixNanos::now())
    }

    fn check_certificate_at(&self, certificate: &[u8], at: UnixNanos) -> Result<String, Failure> {
        let der = CertificateDer::from(certificate);
        let secs = u64::try_from(at.0.div_euclid(1_000_000_000)).unwrap_or(0);
        self.chain
            .verify_client_cert(
                &der,
                &[],
                UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs)),
            )
            .map_err(|e| Failure::Certificate(e.to_string()))?;
        crate::tls::identity_of(&der)
            .ok_or_else(|| Failure::Certificate("no identity (DNS name) in the certificate".into()))
    }

    /// Checks `ev` against its proof, with the origin certificate found
    /// by `certificate` (by fingerprint).
    pub fn verify(
        &self,
        ev: &PreferenceEvent,
        certificate: impl FnOnce(&Fingerprint) -> Option<Vec<u8>>,
    ) -> Result<Verified, Failure> {
        let proof = ev.proof.as_ref().ok_or(Failure::Unsigned)?;
        let der = certificate(&proof.certificate).ok_or(Failure::UnknownCertificate)?;
        if fingerprint(&der) != proof.certificate {
            return Err(Failure::UnknownCertificate);
        }
        // Valid when signed (a later expiry does not void old events).
        let identity = self.check_certificate_at(&der, proof.signed_at)?;
        if identity != ev.origin {
            return Err(Failure::WrongOrigin {
                claimed: ev.origin.clone(),
                found: identity,
            });
        }
        let scheme = rustls::SignatureScheme::from(proof.scheme);
        let algorithms = self
            .algorithms
            .mapping
            .iter()
            .find(|(s, _)| *s == scheme)
            .map(|(_, algs)| *algs)
            .ok_or_else(|| Failure::Signature(format!("unsupported scheme {scheme:?}")))?;
        let cert_der = CertificateDer::from(der.as_slice());
        let cert = webpki::EndEntityCert::try_from(&cert_der)
            .map_err(|e| Failure::Certificate(e.to_string()))?;
        let message = signed_message(&proof.certificate, proof.signed_at, &proof.fields);
        // The scheme's algorithms for each key type: the one of the
        // certificate's key decides.
        if !algorithms.iter().any(|alg| {
            cert.verify_signature(*alg, &message, &proof.signature)
                .is_ok()
        }) {
            return Err(Failure::Signature(format!(
                "{scheme:?} signature does not match the origin's key"
            )));
        }
        let mut present = canonical_fields(ev);
        let mut withheld = Vec::new();
        for f in &proof.fields {
            match (present.remove(&f.name), f.salt) {
                (Some(value), Some(salt)) => {
                    if field_digest(&salt, &value) != f.digest {
                        return Err(Failure::Altered(f.name.clone()));
                    }
                }
                // A value without its salt cannot be checked.
                (Some(_), None) => return Err(Failure::Altered(f.name.clone())),
                (None, _) => withheld.push(f.name.clone()),
            }
        }
        if let Some(name) = present.into_keys().next() {
            return Err(Failure::Added(name));
        }
        Ok(Verified { withheld })
    }
}

/// What `chainsight verify` found in a store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreCheck {
    pub verified: u64,
    /// Events stored without a proof.
    pub unsigned: u64,
    pub failed: u64,
    /// The first failures: event id and why.
    pub failures: Vec<(String, Failure)>,
}

/// Failures [`check_store`] lists (all are counted).
const LISTED_FAILURES: usize = 20;

/// Verifies every stored event's origin proof with the certificates the
/// store keeps; `progress` gets the number of events checked so far.
pub fn check_store(
    store: &crate::store::Store,
    verifier: &Verifier,
    mut progress: impl FnMut(u64),
) -> crate::store::Result<StoreCheck> {
    let mut check = StoreCheck::default();
    let mut certs: std::collections::HashMap<Fingerprint, Option<Vec<u8>>> = Default::default();
    for (n, item) in store.scan_after(0).enumerate() {
        let (_, ev) = item?;
        if let Some(proof) = &ev.proof {
            if let std::collections::hash_map::Entry::Vacant(e) = certs.entry(proof.certificate) {
                e.insert(store.certificate(&proof.certificate)?);
            }
        }
        match verifier.verify(&ev, |fp| certs.get(fp).cloned().flatten()) {
            Ok(_) => check.verified += 1,
            Err(Failure::Unsigned) => check.unsigned += 1,
            Err(failure) => {
                check.failed += 1;
                if check.failures.len() < LISTED_FAILURES {
                    check.failures.push((ev.event_id.clone(), failure));
                }
            }
        }
        if n % 1024 == 0 {
            progress(n as u64);
        }
    }
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{ChainCa, LeafOptions};

    struct Party {
        signer: Signer,
        der: Vec<u8>,
    }

    fn party(ca: &ChainCa, name: &str) -> Party {
        use rustls::pki_types::pem::PemObject;
        let issued = ca.issue(name, &LeafOptions::default()).expect("issue");
        let cert = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).expect("cert");
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())
            .expect("key");
        let der = cert.as_ref().to_vec();
        Party {
            signer: Signer::new(cert, &key).expect("signer"),
            der,
        }
    }

    fn verifier(ca: &ChainCa) -> Verifier {
        use rustls::pki_types::pem::PemObject;
        let ca = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("ca");
        Verifier::new(vec![ca]).expect("verifier")
    }

    fn signed(p: &Party) -> PreferenceEvent {
        let mut ev = PreferenceEvent::example();
        ev.origin = "retailer".into();
        ev.text = "fits well".into();
        ev.score = Some(4);
        ev.attributes = [("size".to_string(), "M".to_string())].into();
        ev.proof = Some(p.signer.sign(&ev).expect("sign"));
        ev
    }

    #[test]
    fn withheld_fields_keep_the_rest_verifiable_and_changes_are_caught() {
        let ca = ChainCa::generate("test chain CA").expect("ca");
        let retailer = party(&ca, "retailer");
        let v = verifier(&ca);
        let certs = |der: &Vec<u8>| {
            let der = der.clone();
            move |_: &Fingerprint| Some(der.clone())
        };
        let ev = signed(&retailer);
        assert_eq!(
            v.verify(&ev, certs(&retailer.der)),
            Ok(Verified { withheld: vec![] })
        );

        // A relay withholds fields and re-keys the pseudonym: still verifies.
        let mut relayed = ev.clone();
        relayed.text.clear();
        relayed.region.clear();
        relayed.attributes.clear();
        relayed.customer_pseudonym = "rekeyed".into();
        relayed.path.push("distributor".into());
        withhold_missing(&mut relayed);
        let verified = v.verify(&relayed, certs(&retailer.der)).expect("withheld");
        assert_eq!(verified.withheld, ["attributes.size", "region", "text"]);
        assert!(relayed
            .proof
            .as_ref()
            .unwrap()
            .fields
            .iter()
            .filter(|f| f.salt.is_none())
            .all(|f| ["attributes.size", "region", "text"].contains(&f.name.as_str())));

        // A changed field, an added field, a changed signature.
        let mut altered = ev.clone();
        altered.product.category = "cheese".into();
        assert_eq!(
            v.verify(&altered, certs(&retailer.der)),
            Err(Failure::Altered("product.category".into()))
        );
        let mut added = relayed.clone();
        added.age_band.clear();
        added.attributes.insert("colour".into(), "red".into());
        assert_eq!(
            v.verify(&added, certs(&retailer.der)),
            Err(Failure::Added("attributes.colour".into()))
        );
        let mut forged = ev.clone();
        forged.proof.as_mut().unwrap().fields[0].digest[0] ^= 1;
        assert!(matches!(
            v.verify(&forged, certs(&retailer.der)),
            Err(Failure::Signature(_))
        ));
        let mut unsigned = ev.clone();
        unsigned.proof = None;
        assert_eq!(
            v.verify(&unsigned, certs(&retailer.der)),
            Err(Failure::Unsigned)
        );
        assert_eq!(v.verify(&ev, |_| None), Err(Failure::UnknownCertificate));
    }

    #[test]
    fn the_certificate_must_be_the_origins_and_from_the_chain_ca() {
        let ca = ChainCa::generate("test chain CA").expect("ca");
        let v = verifier(&ca);
        // Signed by another member of the chain, claiming to be the retailer.
        let other = party(&ca, "distributor");
        let ev = signed(&other);
        let der = other.der.clone();
        assert_eq!(
            v.verify(&ev, move |_| Some(der.clone())),
            Err(Failure::WrongOrigin {
                claimed: "retailer".into(),
                found: "distributor".into()
            })
        );
        // A certificate from another CA.
        let rogue_ca = ChainCa::generate("rogue CA").expect("rogue ca");
        let rogue = party(&rogue_ca, "retailer");
        let ev = signed(&rogue);
        let der = rogue.der.clone();
        assert!(matches!(
            v.verify(&ev, move |_| Some(der.clone())),
            Err(Failure::Certificate(_))
        ));
    }
}
