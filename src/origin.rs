//! Verifiable origin: the node where an event enters the chain signs the
//! fields it set, so that nodes two or three hops away can check that a
//! relay changed none of them.
//!
//! Each field has a 16-byte salt and a digest, SHA-256(salt ‖ canonical
//! value); the origin signs the sorted list of field names and digests with
//! the key of its chain certificate. The origin sends the proof **compact**:
//! one 32-byte seed from which every salt derives (HMAC-SHA256(seed, name)),
//! the signed fields being exactly those the event carries. A relay that
//! withholds fields under its agreement **expands** it: every signed field
//! listed, present ones with their salt, withheld ones with their digest
//! only; the signature still covers the list, every field still present is
//! checked against it, and salts keep a withheld value from being guessed
//! from its digest. By design outside the proof: `customer_pseudonym`
//! (re-keyed per link) and `path` (appended per hop).
//!
//! A request of several events is signed **as a batch**: each event's
//! signed message (as above) is a leaf of a Merkle tree, the origin signs
//! the tree's root once, and each event's proof carries the signature and
//! its path to the root ([`BatchInclusion`]). A relay that forwards part of
//! a batch forwards proofs that still verify; a verifier that has checked
//! a root's signature remembers it, so a batch costs one signature to make
//! and one to check per hop instead of one per event.
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

/// What a batch signature signs first.
pub const BATCH_CONTEXT: &[u8] = b"chainsight-origin-batch-v1";

/// Most events one batch signature may cover.
pub const MAX_BATCH: u32 = 1 << 20;

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
    pub form: ProofForm,
    /// Set when the origin signed a batch: `signature` is over the batch's
    /// root, and this places the event's signed message in it. Unset: the
    /// signature is over the event's own signed message.
    pub batch: Option<BatchInclusion>,
}

/// Where an event's signed message sits in the Merkle tree of the batch
/// its origin signed at once.
///
/// The leaves are SHA-256(0x00 ‖ message) in the batch's order; a node is
/// SHA-256(0x01 ‖ left ‖ right); a level's last node without a right
/// sibling moves up unchanged. The signature is over
/// [`BATCH_CONTEXT`], the certificate's SHA-256, `signed_at`, `size` and
/// the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchInclusion {
    /// The event's leaf, from 0.
    pub index: u32,
    /// Leaves in the batch.
    pub size: u32,
    /// The sibling hashes from the leaf up (levels where the node moves up
    /// unchanged have none): [`path_len`] of them.
    pub path: Vec<[u8; 32]>,
}

/// How the salts travel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProofForm {
    /// Every salt derives from the seed; the signed fields are the ones the
    /// event carries.
    Compact { seed: [u8; 32] },
    /// Every signed field, sorted by name (after a relay withheld some).
    Expanded(Vec<FieldEntry>),
}

/// One signed field of an expanded proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldEntry {
    pub name: String,
    pub part: FieldPart,
}

/// What an expanded proof keeps of a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldPart {
    /// The field is present: its salt, to recompute the digest.
    Salt([u8; SALT_LEN]),
    /// The field was withheld: its digest only.
    Withheld([u8; 32]),
}

/// The fields of `ev` the proof covers, by name, in canonical form: only
/// those set (an empty string, a zero quantity, no score: not set).
pub fn canonical_fields(ev: &PreferenceEvent) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    for_each_canonical(ev, |start, rest, value| {
        fields.insert(format!("{start}{rest}"), value.to_string());
    });
    fields
}

/// The fields of `ev` the proof covers (see [`canonical_fields`]):
/// calls `f(name_start, name_rest, value)` for each, in name order, the
/// name being `name_start` followed by `name_rest` (`"attributes."` and
/// the key), numbers formatted on the stack. What signing each published
/// event needs, without a dozen allocations; the test
/// `streamed_fields_are_the_canonical_pairs` holds it to the form the
/// signed bytes were first defined by (`canonical_pairs` there).
fn for_each_canonical(ev: &PreferenceEvent, mut f: impl FnMut(&str, &str, &str)) {
    let mut put = |name: &str, value: &str| {
        if !value.is_empty() {
            f(name, "", value);
        }
    };
    let mut number = itoa::Buffer::new();
    // The fixed names' order; every "attributes.…" sorts after
    // "age_band" and before "channel".
    put("age_band", &ev.age_band);
    for (k, v) in &ev.attributes {
        if !v.is_empty() {
            f("attributes.", k, v);
        }
    }
    let mut put = |name: &str, value: &str| {
        if !value.is_empty() {
            f(name, "", value);
        }
    };
    put("channel", number.format(ev.channel.number()));
    put("event_id", &ev.event_id);
    put("kind", number.format(ev.kind.number()));
    put("occurred_at", number.format(ev.occurred_at.0));
    put("origin", &ev.origin);
    put("product.brand", &ev.product.brand);
    put("product.category", &ev.product.category);
    put("product.gtin", ev.product.gtin.as_str());
    if ev.quantity != 0 {
        put("quantity", number.format(ev.quantity));
    }
    put("region", &ev.region);
    if let Some(score) = ev.score {
        put("score", number.format(score));
    }
    put("stage", number.format(ev.stage.number()));
    put("text", &ev.text);
}

fn field_digest(salt: &[u8; SALT_LEN], value: &str) -> [u8; 32] {
    Midstate::INITIAL.finish(&[salt, value.as_bytes()])
}

/// A SHA-256 state after whole blocks: what hashing goes on from. The
/// salts and field digests (about 50 short hashes per event, signing and
/// at every hop verifying) are hashed from one with sha2's block function
/// directly: through `Hmac` and `Sha256` (a state copied per field, block
/// buffers moved at every finalize) the copies took a quarter of the
/// signing threads' time in `bench ingest` (perf). The results are the
/// same bytes (tests compare them with the `hmac` and `sha2` types).
#[derive(Clone, Copy)]
struct Midstate {
    state: [u32; 8],
    /// Bytes hashed into `state` (whole blocks).
    hashed: u64,
}

impl Midstate {
    /// SHA-256's initial state.
    const INITIAL: Midstate = Midstate {
        state: [
            0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
            0x5be0cd19,
        ],
        hashed: 0,
    };

    /// The state after one more block.
    fn after(mut self, block: &[u8; 64]) -> Midstate {
        sha2::compress256(
            &mut self.state,
            std::slice::from_ref(sha2::digest::generic_array::GenericArray::from_slice(block)),
        );
        self.hashed += 64;
        self
    }

    /// SHA-256 of what this state hashed followed by `parts`.
    fn finish(mut self, parts: &[&[u8]]) -> [u8; 32] {
        let mut block = [0u8; 64];
        let mut filled = 0;
        let mut total = self.hashed;
        for part in parts {
            total += part.len() as u64;
            let mut rest = *part;
            while !rest.is_empty() {
                let n = rest.len().min(64 - filled);
                block[filled..filled + n].copy_from_slice(&rest[..n]);
                filled += n;
                rest = &rest[n..];
                if filled == 64 {
                    self = self.after(&block);
                    filled = 0;
                }
            }
        }
        // Padding: 0x80, zeros, the length in bits (big-endian) at the
        // end of the last block.
        block[filled] = 0x80;
        block[filled + 1..].fill(0);
        if filled + 1 > 56 {
            self = self.after(&block);
            block = [0u8; 64];
        }
        block[56..].copy_from_slice(&(total * 8).to_be_bytes());
        self = self.after(&block);
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        out
    }
}

/// The salts of a compact proof's fields, derived from its seed:
/// HMAC-SHA256(seed, name), from the inner and outer states the seed
/// keys (made once per proof).
struct Salts {
    inner: Midstate,
    outer: Midstate,
}

impl Salts {
    fn new(seed: &[u8; 32]) -> Salts {
        // HMAC's key block: the seed (shorter than a block) padded with
        // zeros, XORed with ipad (0x36) and opad (0x5c).
        let mut ipad = [0x36u8; 64];
        let mut opad = [0x5cu8; 64];
        for (i, b) in seed.iter().enumerate() {
            ipad[i] ^= b;
            opad[i] ^= b;
        }
        Salts {
            inner: Midstate::INITIAL.after(&ipad),
            outer: Midstate::INITIAL.after(&opad),
        }
    }

    /// The salt of field `name`: HMAC-SHA256(seed, name), cut to its
    /// first `SALT_LEN` bytes.
    fn of(&self, name: &str) -> [u8; SALT_LEN] {
        self.of_parts(name, "")
    }

    /// [`Self::of`] the name `start` followed by `rest`.
    fn of_parts(&self, start: &str, rest: &str) -> [u8; SALT_LEN] {
        let inner = self.inner.finish(&[start.as_bytes(), rest.as_bytes()]);
        let full = self.outer.finish(&[&inner]);
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&full[..SALT_LEN]);
        salt
    }
}

/// The bytes the origin signs: names and digests, sorted by name.
fn signed_message<'a>(
    certificate: &Fingerprint,
    signed_at: UnixNanos,
    fields: impl IntoIterator<Item = (&'a str, [u8; 32])>,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(CONTEXT.len() + 40 + 16 * 48);
    message_head(certificate, signed_at, &mut m);
    for (name, digest) in fields {
        message_field(name, "", &digest, &mut m);
    }
    m
}

/// Where a signed message's bytes go: a buffer, or straight into the
/// hash of a batch's leaf.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl Sink for Sha256 {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

/// What a signed message starts with.
fn message_head(certificate: &Fingerprint, signed_at: UnixNanos, out: &mut impl Sink) {
    out.put(CONTEXT);
    out.put(certificate);
    out.put(&signed_at.0.to_be_bytes());
}

/// A field of a signed message: its name (`start` followed by `rest`)
/// and digest.
fn message_field(start: &str, rest: &str, digest: &[u8; 32], out: &mut impl Sink) {
    let len = u16::try_from(start.len() + rest.len()).unwrap_or(u16::MAX);
    out.put(&len.to_be_bytes());
    out.put(start.as_bytes());
    out.put(rest.as_bytes());
    out.put(digest);
}

/// SHA-256 of a certificate.
pub fn fingerprint(cert: &[u8]) -> Fingerprint {
    Sha256::digest(cert).into()
}

fn leaf_hash(message: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(message);
    h.finalize().into()
}

fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// How many sibling hashes the path of leaf `index` in a batch of `size`
/// holds; `None` when `index` is not below `size`.
pub fn path_len(index: u32, size: u32) -> Option<usize> {
    if index >= size {
        return None;
    }
    let (mut i, mut n, mut len) = (index, size, 0);
    while n > 1 {
        if i % 2 == 1 || i + 1 < n {
            len += 1;
        }
        i /= 2;
        n = n.div_ceil(2);
    }
    Some(len)
}

/// The root that `leaf` and its inclusion lead to; `None` when the path's
/// length does not fit its place.
fn root_of(leaf: [u8; 32], at: &BatchInclusion) -> Option<[u8; 32]> {
    if at.index >= at.size {
        return None;
    }
    let (mut h, mut i, mut n) = (leaf, at.index, at.size);
    let mut path = at.path.iter();
    while n > 1 {
        if i % 2 == 1 {
            h = node_hash(path.next()?, &h);
        } else if i + 1 < n {
            h = node_hash(&h, path.next()?);
        }
        i /= 2;
        n = n.div_ceil(2);
    }
    path.next().is_none().then_some(h)
}

/// The Merkle root over `leaves` and each leaf's path to it.
fn merkle(leaves: &[[u8; 32]]) -> ([u8; 32], Vec<Vec<[u8; 32]>>) {
    let mut paths = vec![Vec::new(); leaves.len()];
    let mut level = leaves.to_vec();
    let mut shift = 0;
    while level.len() > 1 {
        for (leaf, path) in paths.iter_mut().enumerate() {
            let sibling = (leaf >> shift) ^ 1;
            if let Some(h) = level.get(sibling) {
                path.push(*h);
            }
        }
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [left, right] => node_hash(left, right),
                [alone] => *alone,
                _ => unreachable!("chunks of two"),
            })
            .collect();
        shift += 1;
    }
    (level[0], paths)
}

/// The bytes a batch signature is over.
fn batch_message(
    certificate: &Fingerprint,
    signed_at: UnixNanos,
    size: u32,
    root: &[u8; 32],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(BATCH_CONTEXT.len() + 32 + 8 + 4 + 32);
    m.extend_from_slice(BATCH_CONTEXT);
    m.extend_from_slice(certificate);
    m.extend_from_slice(&signed_at.0.to_be_bytes());
    m.extend_from_slice(&size.to_be_bytes());
    m.extend_from_slice(root);
    m
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

    /// The proof for `ev` as it is now (its origin must be this node), in
    /// compact form, signed on its own.
    pub fn sign(&self, ev: &PreferenceEvent) -> Result<OriginProof, String> {
        let signed_at = UnixNanos::now();
        let (seed, message) = self.message(ev, signed_at);
        let signature = self.signer.sign(&message).map_err(|e| e.to_string())?;
        Ok(self.proof(signature, signed_at, seed, None))
    }

    /// Signs `events` (their origin must be this node) with one signature
    /// over their Merkle root and sets each one's proof, in compact form.
    /// A single event is signed on its own, as [`Self::sign`] does.
    pub fn sign_batch(&self, events: &mut [&mut PreferenceEvent]) -> Result<(), String> {
        let size = u32::try_from(events.len())
            .ok()
            .filter(|n| *n <= MAX_BATCH)
            .ok_or_else(|| format!("a batch signature covers at most {MAX_BATCH} events"))?;
        match events {
            [] => return Ok(()),
            [ev] => {
                ev.proof = Some(self.sign(ev)?);
                return Ok(());
            }
            _ => {}
        }
        let signed_at = UnixNanos::now();
        let (seeds, leaves): (Vec<[u8; 32]>, Vec<[u8; 32]>) = events
            .iter()
            .map(|ev| {
                let seed = fresh_seed();
                let mut leaf = Sha256::new();
                leaf.update([0u8]);
                self.write_message(ev, signed_at, &seed, &mut leaf);
                let leaf: [u8; 32] = leaf.finalize().into();
                (seed, leaf)
            })
            .unzip();
        let (root, paths) = merkle(&leaves);
        let signature = self
            .signer
            .sign(&batch_message(&self.fingerprint, signed_at, size, &root))
            .map_err(|e| e.to_string())?;
        for (index, ((ev, seed), path)) in events.iter_mut().zip(seeds).zip(paths).enumerate() {
            let at = BatchInclusion {
                index: index as u32,
                size,
                path,
            };
            ev.proof = Some(self.proof(signature.clone(), signed_at, seed, Some(at)));
        }
        Ok(())
    }

    /// A fresh salt seed and the message `ev`'s fields give under it.
    fn message(&self, ev: &PreferenceEvent, signed_at: UnixNanos) -> ([u8; 32], Vec<u8>) {
        let seed = fresh_seed();
        let mut message = Vec::with_capacity(CONTEXT.len() + 40 + 16 * 48);
        self.write_message(ev, signed_at, &seed, &mut message);
        (seed, message)
    }

    /// The message `ev`'s fields give under `seed`, into `out`: what
    /// [`signed_message`] makes of [`canonical_pairs`], streamed.
    fn write_message(
        &self,
        ev: &PreferenceEvent,
        signed_at: UnixNanos,
        seed: &[u8; 32],
        out: &mut impl Sink,
    ) {
        let salts = Salts::new(seed);
        message_head(&self.fingerprint, signed_at, out);
        for_each_canonical(ev, |start, rest, value| {
            let digest = field_digest(&salts.of_parts(start, rest), value);
            message_field(start, rest, &digest, out);
        });
    }

    fn proof(
        &self,
        signature: Vec<u8>,
        signed_at: UnixNanos,
        seed: [u8; 32],
        batch: Option<BatchInclusion>,
    ) -> OriginProof {
        OriginProof {
            certificate: self.fingerprint,
            scheme: u16::from(self.signer.scheme()),
            signature,
            signed_at,
            form: ProofForm::Compact { seed },
            batch,
        }
    }
}

/// A random salt seed.
fn fresh_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    seed
}

/// Keeps `after`'s proof valid when it lacks fields `before` carried (a
/// relay's agreement withheld them): the proof is expanded, withheld
/// fields keeping only their digest. Nothing to do when no field went.
pub fn withhold(before: &PreferenceEvent, after: &mut PreferenceEvent) {
    // Cheap check first (this runs per event and link): only droppable
    // fields can have gone.
    if after.proof.is_none() || droppable_set(before) == droppable_set(after) {
        return;
    }
    let had = canonical_fields(before);
    let has = canonical_fields(after);
    if had.keys().all(|k| has.contains_key(k)) {
        return;
    }
    let Some(proof) = after.proof.as_mut() else {
        return;
    };
    let entries: Vec<FieldEntry> = match &proof.form {
        ProofForm::Compact { seed } => {
            let salts = Salts::new(seed);
            had.iter()
                .map(|(name, value)| {
                    let salt = salts.of(name);
                    let part = if has.contains_key(name) {
                        FieldPart::Salt(salt)
                    } else {
                        FieldPart::Withheld(field_digest(&salt, value))
                    };
                    FieldEntry {
                        name: name.clone(),
                        part,
                    }
                })
                .collect()
        }
        ProofForm::Expanded(entries) => entries
            .iter()
            .map(|e| {
                let part = match (e.part, had.get(&e.name), has.contains_key(&e.name)) {
                    (FieldPart::Salt(salt), Some(value), false) => {
                        FieldPart::Withheld(field_digest(&salt, value))
                    }
                    (part, _, _) => part,
                };
                FieldEntry {
                    name: e.name.clone(),
                    part,
                }
            })
            .collect(),
    };
    proof.form = ProofForm::Expanded(entries);
}

/// Which droppable fields `ev` carries (as [`canonical_fields`] counts
/// them), and how many attributes.
fn droppable_set(ev: &PreferenceEvent) -> ([bool; 5], usize) {
    (
        [
            !ev.text.is_empty(),
            !ev.region.is_empty(),
            !ev.age_band.is_empty(),
            ev.score.is_some(),
            ev.quantity != 0,
        ],
        ev.attributes.values().filter(|v| !v.is_empty()).count(),
    )
}

/// Whether a link agreement may withhold field `name` of the proof
/// (`config::DROPPABLE_FIELDS`; the pseudonym is outside the proof).
fn withholdable(name: &str) -> bool {
    name.starts_with("attributes.")
        || crate::config::DROPPABLE_FIELDS
            .iter()
            .any(|f| *f == name && *f != "attributes")
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
    /// Certificates whose chain verified: identity and validity (Unix
    /// seconds), so that the events of one origin do not each verify the
    /// same chain again.
    checked: Arc<std::sync::Mutex<std::collections::HashMap<Fingerprint, CheckedCertificate>>>,
    /// Batch signatures that verified, by the SHA-256 of scheme, signature
    /// and signed bytes: the other events of a batch reach the same root,
    /// so their signature is not checked again.
    batches: Arc<std::sync::Mutex<std::collections::HashSet<[u8; 32]>>>,
}

#[derive(Debug, Clone)]
struct CheckedCertificate {
    identity: String,
    not_before: i64,
    not_after: i64,
}

/// Certificates [`Verifier`] remembers (origins are few; past it, it starts over).
const CHECKED_CERTIFICATES: usize = 1024;

/// Batch signatures [`Verifier`] remembers (past it, it starts over).
const CHECKED_BATCHES: usize = 4096;

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
            checked: Default::default(),
            batches: Default::default(),
        })
    }

    /// Checks `certificate` (DER) as an origin certificate: issued by the
    /// CA, valid now. Its identity, or why not.
    pub fn check_certificate(&self, certificate: &[u8]) -> Result<String, Failure> {
        self.check_certificate_at(certificate, UnixNanos::now())
    }

    /// As [`Self::check_certificate`], valid at `at`.
    pub fn check_certificate_at(
        &self,
        certificate: &[u8],
        at: UnixNanos,
    ) -> Result<String, Failure> {
        let fp = fingerprint(certificate);
        let secs = at.0.div_euclid(1_000_000_000);
        let checked = || {
            self.checked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some(c) = checked().get(&fp) {
            if (c.not_before..=c.not_after).contains(&secs) {
                return Ok(c.identity.clone());
            }
        }
        let der = CertificateDer::from(certificate);
        self.chain
            .verify_client_cert(
                &der,
                &[],
                UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                    u64::try_from(secs).unwrap_or(0),
                )),
            )
            .map_err(|e| Failure::Certificate(e.to_string()))?;
        let identity = crate::tls::identity_of(&der).ok_or_else(|| {
            Failure::Certificate("no identity (DNS name) in the certificate".into())
        })?;
        if let Ok((_, parsed)) = x509_parser::parse_x509_certificate(certificate) {
            let mut cache = checked();
            if cache.len() >= CHECKED_CERTIFICATES {
                cache.clear();
            }
            cache.insert(
                fp,
                CheckedCertificate {
                    identity: identity.clone(),
                    not_before: parsed.validity().not_before.timestamp(),
                    not_after: parsed.validity().not_after.timestamp(),
                },
            );
        }
        Ok(identity)
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
        let present = canonical_fields(ev);
        let mut withheld = Vec::new();
        let digests: Vec<(&str, [u8; 32])> = match &proof.form {
            // The signed fields are exactly the present ones: a changed,
            // added or removed field shows as a signature that fails.
            ProofForm::Compact { seed } => {
                let salts = Salts::new(seed);
                present
                    .iter()
                    .map(|(name, value)| (name.as_str(), field_digest(&salts.of(name), value)))
                    .collect()
            }
            ProofForm::Expanded(entries) => {
                let mut out = Vec::with_capacity(entries.len());
                for e in entries {
                    match (e.part, present.get(&e.name)) {
                        (FieldPart::Salt(salt), Some(value)) => {
                            out.push((e.name.as_str(), field_digest(&salt, value)));
                        }
                        (FieldPart::Salt(_), None) => {
                            return Err(Failure::Altered(format!("{} (removed)", e.name)))
                        }
                        (FieldPart::Withheld(_), Some(_)) => {
                            return Err(Failure::Altered(format!(
                                "{} (withheld, yet present)",
                                e.name
                            )))
                        }
                        (FieldPart::Withheld(_), None) if !withholdable(&e.name) => {
                            return Err(Failure::Altered(format!(
                                "{} (blanked, but no agreement may withhold it)",
                                e.name
                            )))
                        }
                        (FieldPart::Withheld(digest), None) => {
                            withheld.push(e.name.clone());
                            out.push((e.name.as_str(), digest));
                        }
                    }
                }
                if let Some(name) = present.keys().find(|k| {
                    entries
                        .binary_search_by(|e| e.name.as_str().cmp(k))
                        .is_err()
                }) {
                    return Err(Failure::Added(name.clone()));
                }
                out
            }
        };
        let message = signed_message(&proof.certificate, proof.signed_at, digests);
        let message = match &proof.batch {
            None => message,
            Some(at) => {
                let root = root_of(leaf_hash(&message), at).ok_or_else(|| {
                    Failure::Signature(format!(
                        "its batch path holds {} hashes; leaf {} of {} needs {}",
                        at.path.len(),
                        at.index,
                        at.size,
                        path_len(at.index, at.size).unwrap_or(0)
                    ))
                })?;
                batch_message(&proof.certificate, proof.signed_at, at.size, &root)
            }
        };
        let seen = proof.batch.is_some().then(|| {
            let mut h = Sha256::new();
            h.update(proof.scheme.to_be_bytes());
            h.update(
                u32::try_from(proof.signature.len())
                    .unwrap_or(u32::MAX)
                    .to_be_bytes(),
            );
            h.update(&proof.signature);
            h.update(&message);
            <[u8; 32]>::from(h.finalize())
        });
        let batches = || {
            self.batches
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if seen.is_some_and(|key| batches().contains(&key)) {
            return Ok(Verified { withheld });
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
        if !algorithms.iter().any(|alg| {
            cert.verify_signature(*alg, &message, &proof.signature)
                .is_ok()
        }) {
            return Err(Failure::Signature(match (&proof.form, &proof.batch) {
                (_, Some(_)) => "it does not cover the event's fields as they are now with its batch path: a field was changed, added or removed on the way, or the path was changed".into(),
                (ProofForm::Compact { .. }, None) => "it does not cover the event's fields as they are now: a field was changed, added or removed on the way".into(),
                (ProofForm::Expanded(_), None) => "it does not cover the listed fields: a field was changed on the way".into(),
            }));
        }
        if let Some(key) = seen {
            let mut batches = batches();
            if batches.len() >= CHECKED_BATCHES {
                batches.clear();
            }
            batches.insert(key);
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

    /// The midstate hashing gives SHA-256 and HMAC-SHA256 exactly, for
    /// inputs of every length around the block and padding boundaries,
    /// split into parts anywhere.
    #[test]
    fn midstate_hashes_are_sha256_and_hmac_sha256() {
        use hmac::{Hmac, Mac};
        let bytes: Vec<u8> = (0..300u32).map(|i| (i * 31 + 7) as u8).collect();
        let seed: [u8; 32] = std::array::from_fn(|i| 200 - i as u8);
        let salts = Salts::new(&seed);
        for len in (0..=140).chain([191, 192, 200, 255, 256, 300]) {
            let data = &bytes[..len];
            let want: [u8; 32] = Sha256::digest(data).into();
            for cut in [0, len / 3, len / 2, len] {
                let (a, b) = data.split_at(cut);
                assert_eq!(
                    Midstate::INITIAL.finish(&[a, b]),
                    want,
                    "sha256 of {len} cut at {cut}"
                );
            }
            let text = String::from_utf8_lossy(data).into_owned();
            let mut mac = Hmac::<Sha256>::new_from_slice(&seed).unwrap();
            mac.update(text.as_bytes());
            let full = mac.finalize().into_bytes();
            assert_eq!(salts.of(&text), full[..SALT_LEN], "hmac of {len}");
            let salt: [u8; SALT_LEN] = std::array::from_fn(|i| i as u8);
            let mut h = Sha256::new();
            h.update(salt);
            h.update(text.as_bytes());
            let want: [u8; 32] = h.finalize().into();
            assert_eq!(field_digest(&salt, &text), want, "field digest of {len}");
        }
    }

    /// The salts are HMAC-SHA256(seed, name) as the contract says, whether
    /// the keyed state is made per field or copied (as `Salts` does).
    #[test]
    fn salts_are_the_hmac_of_the_field_name_under_the_seed() {
        use hmac::{Hmac, Mac};
        let seed: [u8; 32] = std::array::from_fn(|i| i as u8 * 7 + 1);
        let salts = Salts::new(&seed);
        for name in ["event_id", "product.gtin", "attributes.colour", ""] {
            let mut mac = Hmac::<Sha256>::new_from_slice(&seed).unwrap();
            mac.update(name.as_bytes());
            let full = mac.finalize().into_bytes();
            assert_eq!(salts.of(name), full[..SALT_LEN], "{name}");
        }
        // And a fixed value, so that a change of the derivation shows.
        assert_eq!(
            salts
                .of("event_id")
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            "270732551315fc27e26b1c6db1288b09"
        );
    }

    /// The canonical fields as signing first collected and sorted them: the
    /// reference that the streamed form must give the same bytes as
    /// (older nodes and stored proofs verify against them).
    fn canonical_pairs<'a>(
        ev: &'a PreferenceEvent,
    ) -> Vec<(std::borrow::Cow<'a, str>, std::borrow::Cow<'a, str>)> {
        use std::borrow::Cow;
        let mut out: Vec<(Cow<'a, str>, Cow<'a, str>)> =
            Vec::with_capacity(16 + ev.attributes.len());
        let mut put = |name: Cow<'a, str>, value: Cow<'a, str>| {
            if !value.is_empty() {
                out.push((name, value));
            }
        };
        put("event_id".into(), ev.event_id.as_str().into());
        put("origin".into(), ev.origin.as_str().into());
        put("kind".into(), Cow::Owned(ev.kind.number().to_string()));
        put(
            "occurred_at".into(),
            Cow::Owned(ev.occurred_at.0.to_string()),
        );
        put("product.gtin".into(), ev.product.gtin.as_str().into());
        put(
            "product.category".into(),
            ev.product.category.as_str().into(),
        );
        put("product.brand".into(), ev.product.brand.as_str().into());
        put(
            "channel".into(),
            Cow::Owned(ev.channel.number().to_string()),
        );
        put("stage".into(), Cow::Owned(ev.stage.number().to_string()));
        put(
            "score".into(),
            Cow::Owned(ev.score.map(|s| s.to_string()).unwrap_or_default()),
        );
        if ev.quantity != 0 {
            put("quantity".into(), Cow::Owned(ev.quantity.to_string()));
        }
        put("region".into(), ev.region.as_str().into());
        put("age_band".into(), ev.age_band.as_str().into());
        put("text".into(), ev.text.as_str().into());
        for (k, v) in &ev.attributes {
            put(Cow::Owned(format!("attributes.{k}")), v.as_str().into());
        }
        // Names are unique (attribute keys are, and carry their prefix).
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Events with every signed field set, empty or absent, in
    /// combinations: `i`'s bits pick which.
    fn variant(i: u32) -> PreferenceEvent {
        use crate::domain::{Channel, EventKind, JourneyStage};
        let bit = |n: u32| i & (1 << n) != 0;
        let mut ev = PreferenceEvent::example();
        if bit(0) {
            ev.attributes.insert("size".into(), "XL".into());
            ev.attributes.insert("a".into(), "first".into());
            ev.attributes.insert("z.z-9_".into(), "läst ✓".into());
            ev.attributes.insert("empty".into(), String::new());
        }
        if bit(1) {
            ev.score = Some(0);
            ev.quantity = 0;
            ev.kind = EventKind::Review;
        }
        if bit(2) {
            ev.score = Some(10);
            ev.quantity = 12_345;
            ev.channel = Channel::from_number(0).unwrap_or(ev.channel);
            ev.stage = JourneyStage::from_number(0).unwrap_or(ev.stage);
        }
        if bit(3) {
            ev.occurred_at = UnixNanos(-1_234_567_890_123);
            ev.text = "Ütles: väga hea\nteine rida".into();
        }
        if bit(4) {
            ev.region.clear();
            ev.age_band.clear();
            ev.product.brand.clear();
            ev.event_id.clear();
        }
        ev
    }

    /// The signing path streams the canonical fields and its message:
    /// the bytes must be the very ones `canonical_pairs` and
    /// `signed_message` give (what verifiers, older nodes among them,
    /// rebuild), and a batch's leaf their `leaf_hash`.
    #[test]
    fn streamed_fields_are_the_canonical_pairs() {
        let ca = ChainCa::generate("test chain CA").expect("ca");
        let signer = party(&ca, "retailer").signer;
        let seed: [u8; 32] = std::array::from_fn(|i| i as u8 ^ 0x5a);
        let at = UnixNanos(1_790_000_000_123_456_789);
        for i in 0..32 {
            let ev = variant(i);
            let pairs: Vec<(String, String)> = canonical_pairs(&ev)
                .into_iter()
                .map(|(n, v)| (n.into_owned(), v.into_owned()))
                .collect();
            let mut streamed = Vec::new();
            for_each_canonical(&ev, |start, rest, value| {
                streamed.push((format!("{start}{rest}"), value.to_string()));
            });
            assert_eq!(streamed, pairs, "variant {i}");
            assert_eq!(
                canonical_fields(&ev),
                pairs.iter().cloned().collect::<BTreeMap<_, _>>(),
                "variant {i}"
            );

            let salts = Salts::new(&seed);
            let message = signed_message(
                &signer.fingerprint,
                at,
                pairs
                    .iter()
                    .map(|(n, v)| (n.as_str(), field_digest(&salts.of(n), v))),
            );
            let mut written = Vec::new();
            signer.write_message(&ev, at, &seed, &mut written);
            assert_eq!(written, message, "variant {i}");
            let mut leaf = Sha256::new();
            leaf.update([0u8]);
            signer.write_message(&ev, at, &seed, &mut leaf);
            let leaf: [u8; 32] = leaf.finalize().into();
            assert_eq!(leaf, leaf_hash(&message), "variant {i}");
        }
    }

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
        withhold(&ev, &mut relayed);
        let verified = v.verify(&relayed, certs(&retailer.der)).expect("withheld");
        assert_eq!(verified.withheld, ["attributes.size", "region", "text"]);
        let ProofForm::Expanded(entries) = &relayed.proof.as_ref().unwrap().form else {
            panic!("withholding expands the proof");
        };
        let withheld: Vec<&str> = entries
            .iter()
            .filter(|e| matches!(e.part, FieldPart::Withheld(_)))
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(withheld, ["attributes.size", "region", "text"]);
        // A second relay withholds one more: still verifies.
        let mut further = relayed.clone();
        further.age_band.clear();
        withhold(&relayed, &mut further);
        let verified = v
            .verify(&further, certs(&retailer.der))
            .expect("withheld twice");
        assert_eq!(
            verified.withheld,
            ["age_band", "attributes.size", "region", "text"]
        );

        // Compact: any change fails the signature.
        let mut altered = ev.clone();
        altered.product.category = "cheese".into();
        assert!(matches!(
            v.verify(&altered, certs(&retailer.der)),
            Err(Failure::Signature(_))
        ));
        let mut added = ev.clone();
        added.attributes.insert("colour".into(), "red".into());
        assert!(matches!(
            v.verify(&added, certs(&retailer.der)),
            Err(Failure::Signature(_))
        ));
        // Expanded: a changed value, an added field, a withheld field that
        // is back, a field removed without withholding its digest.
        let mut altered = relayed.clone();
        altered.product.category = "cheese".into();
        assert!(matches!(
            v.verify(&altered, certs(&retailer.der)),
            Err(Failure::Signature(_))
        ));
        let mut added = relayed.clone();
        added.attributes.insert("colour".into(), "red".into());
        assert_eq!(
            v.verify(&added, certs(&retailer.der)),
            Err(Failure::Added("attributes.colour".into()))
        );
        let mut back = relayed.clone();
        back.region = "EE-37".into();
        assert!(matches!(
            v.verify(&back, certs(&retailer.der)),
            Err(Failure::Altered(_))
        ));
        let mut removed = relayed.clone();
        removed.age_band.clear();
        assert_eq!(
            v.verify(&removed, certs(&retailer.der)),
            Err(Failure::Altered("age_band (removed)".into()))
        );
        let mut forged = relayed.clone();
        if let Some(ProofForm::Expanded(entries)) = forged.proof.as_mut().map(|p| &mut p.form) {
            for e in entries.iter_mut() {
                if let FieldPart::Withheld(d) = &mut e.part {
                    d[0] ^= 1;
                }
            }
        }
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

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn batch_paths_lead_to_the_root_for_every_size() {
        // The contract's tree, against a value computed outside Rust
        // (Python's hashlib): leaves a, b, c; c moves up unchanged.
        let abc = [leaf_hash(b"a"), leaf_hash(b"b"), leaf_hash(b"c")];
        let (root, paths) = merkle(&abc);
        assert_eq!(
            hex(&root),
            "36642e73c2540ab121e3a6bf9545b0a24982cd830eb13d3cd19de3ce6c021ec1"
        );
        assert_eq!(paths[2], [node_hash(&abc[0], &abc[1])]);

        for size in 1..=33u32 {
            let leaves: Vec<[u8; 32]> = (0..size).map(|i| leaf_hash(&i.to_be_bytes())).collect();
            let (root, paths) = merkle(&leaves);
            for (index, path) in paths.iter().enumerate() {
                let at = BatchInclusion {
                    index: index as u32,
                    size,
                    path: path.clone(),
                };
                assert_eq!(
                    path.len(),
                    path_len(at.index, size).unwrap(),
                    "{index}/{size}"
                );
                assert_eq!(root_of(leaves[index], &at), Some(root), "{index}/{size}");
                // Another leaf, or this leaf at another place, does not
                // reach the root.
                let other = leaf_hash(b"another");
                assert_ne!(root_of(other, &at), Some(root));
                if size > 1 {
                    let moved = BatchInclusion {
                        index: (at.index + 1) % size,
                        ..at.clone()
                    };
                    assert_ne!(root_of(leaves[index], &moved), Some(root), "{index}/{size}");
                }
            }
            assert_eq!(path_len(size, size), None);
        }
    }

    #[test]
    fn one_signature_covers_a_batch_and_each_event_is_still_checked_on_its_own() {
        let ca = ChainCa::generate("test chain CA").expect("ca");
        let retailer = party(&ca, "retailer");
        let v = verifier(&ca);
        let der = retailer.der.clone();
        let certs = move |_: &Fingerprint| Some(der.clone());
        let mut batch: Vec<PreferenceEvent> = (0..5)
            .map(|i| {
                let mut ev = PreferenceEvent::example();
                ev.event_id = format!("ev-{i}");
                ev.origin = "retailer".into();
                ev.text = format!("comment {i}");
                ev
            })
            .collect();
        let mut refs: Vec<&mut PreferenceEvent> = batch.iter_mut().collect();
        retailer.signer.sign_batch(&mut refs).expect("sign");
        let signature = &batch[0].proof.as_ref().unwrap().signature;
        for (i, ev) in batch.iter().enumerate() {
            let proof = ev.proof.as_ref().unwrap();
            assert_eq!(&proof.signature, signature, "one signature for the batch");
            let at = proof.batch.as_ref().expect("batch inclusion");
            assert_eq!((at.index, at.size), (i as u32, 5));
            assert_eq!(v.verify(ev, &certs), Ok(Verified { withheld: vec![] }));
        }
        assert_eq!(
            v.batches.lock().unwrap().len(),
            1,
            "the root's signature checked once"
        );

        // With the root's signature remembered, a changed event of the
        // batch still fails: it no longer leads to that root.
        let mut altered = batch[2].clone();
        altered.product.category = "cheese".into();
        assert!(matches!(
            v.verify(&altered, &certs),
            Err(Failure::Signature(_))
        ));
        let mut added = batch[2].clone();
        added.attributes.insert("colour".into(), "red".into());
        assert!(matches!(
            v.verify(&added, &certs),
            Err(Failure::Signature(_))
        ));
        // A changed path, another place, or the batch taken away.
        let mut forged = batch[2].clone();
        forged.proof.as_mut().unwrap().batch.as_mut().unwrap().path[0][0] ^= 1;
        assert!(matches!(
            v.verify(&forged, &certs),
            Err(Failure::Signature(_))
        ));
        let mut moved = batch[2].clone();
        moved.proof.as_mut().unwrap().batch.as_mut().unwrap().index = 3;
        assert!(matches!(
            v.verify(&moved, &certs),
            Err(Failure::Signature(_))
        ));
        let mut short = batch[4].clone();
        short
            .proof
            .as_mut()
            .unwrap()
            .batch
            .as_mut()
            .unwrap()
            .path
            .pop();
        assert!(matches!(
            v.verify(&short, &certs),
            Err(Failure::Signature(_))
        ));
        let mut alone = batch[2].clone();
        alone.proof.as_mut().unwrap().batch = None;
        assert!(matches!(
            v.verify(&alone, &certs),
            Err(Failure::Signature(_))
        ));
        // Another signer's signature over the same root is not the one
        // remembered.
        let mut resigned = batch[2].clone();
        resigned.proof.as_mut().unwrap().signature[8] ^= 1;
        assert!(matches!(
            v.verify(&resigned, &certs),
            Err(Failure::Signature(_))
        ));

        // A relay withholds a field of one event: it still verifies.
        let mut relayed = batch[1].clone();
        relayed.text.clear();
        withhold(&batch[1], &mut relayed);
        let verified = v.verify(&relayed, &certs).expect("withheld");
        assert_eq!(verified.withheld, ["text"]);

        // One event is signed on its own, as before batches.
        let mut single = batch[0].clone();
        single.proof = None;
        retailer
            .signer
            .sign_batch(&mut [&mut single])
            .expect("sign one");
        assert_eq!(single.proof.as_ref().unwrap().batch, None);
        assert_eq!(v.verify(&single, &certs), Ok(Verified { withheld: vec![] }));
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
