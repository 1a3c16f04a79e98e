//! Binary cache keys and signatures, in Nix's `name:base64` forms.
//!
//! A signature covers a path's [`fingerprint`], never the narinfo text, so fields such as URL
//! and Compression can change without re-signing.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer};

use super::hash::Sha256Hash;
use super::store_path::StorePath;
use crate::error::{Error, Result};

/// The string a narinfo signature signs:
/// `1;<path>;sha256:<nixbase32>;<nar size>;<references, comma-separated>`.
///
/// Paths are absolute. References are sorted and deduplicated, as Nix keeps them in a set,
/// so the order in a narinfo does not change the fingerprint.
pub fn fingerprint(
    store_dir: &str,
    store_path: &StorePath,
    nar_hash: &Sha256Hash,
    nar_size: u64,
    references: &[StorePath],
) -> String {
    let mut refs: Vec<String> = references.iter().map(|r| r.to_absolute(store_dir)).collect();
    refs.sort();
    refs.dedup();
    format!(
        "1;{};{};{};{}",
        store_path.to_absolute(store_dir),
        nar_hash.to_nix_base32(),
        nar_size,
        refs.join(",")
    )
}

/// Key names end up in `name:...` strings and in whitespace-separated trusted-key lists.
fn check_key_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid("key name is empty"));
    }
    if name.contains(':') || name.chars().any(char::is_whitespace) {
        return Err(Error::invalid(format!(
            "key name {name:?} must not contain ':' or whitespace"
        )));
    }
    Ok(())
}

/// Checks that `sig` is a well-formed signature, `name:base64(64 bytes)`, without verifying it:
/// for signatures by keys the server does not know, which it keeps as they were sent.
pub fn check_signature(sig: &str) -> Result<()> {
    if sig.trim() != sig {
        return Err(Error::invalid(format!("signature {sig:?} has surrounding whitespace")));
    }
    split_key::<64>(sig, "signature").map(|_| ())
}

/// Splits `name:base64` and decodes the base64 half into exactly `N` bytes.
fn split_key<const N: usize>(s: &str, what: &str) -> Result<(String, [u8; N])> {
    let s = s.trim();
    let (name, b64) = s
        .split_once(':')
        .ok_or_else(|| Error::invalid(format!("{what} must look like 'name:base64'")))?;
    check_key_name(name).map_err(|e| e.context(what))?;
    let bytes = STANDARD
        .decode(b64)
        .map_err(|e| Error::invalid(format!("{what} {name:?} has invalid base64: {e}")))?;
    let len = bytes.len();
    let arr: [u8; N] = bytes.try_into().map_err(|_| {
        Error::invalid(format!("{what} {name:?} is {len} bytes long, expected {N}"))
    })?;
    Ok((name.to_string(), arr))
}

/// A named ed25519 secret key, as made by `nix-store --generate-binary-cache-key`.
#[derive(Clone)]
pub struct SigningKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl SigningKey {
    /// Generates a new key from the operating system's random source.
    pub fn generate(name: &str) -> Result<Self> {
        check_key_name(name)?;
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        Ok(SigningKey { name: name.to_string(), key })
    }

    /// Parses `name:base64(32-byte seed || 32-byte public key)`, the secret key file format.
    ///
    /// Surrounding whitespace, such as a trailing newline in a key file, is ignored.
    pub fn parse(s: &str) -> Result<Self> {
        let (name, bytes) = split_key::<64>(s, "secret key")?;
        // Nix stores libsodium's 64-byte form; a public half that does not belong to the seed
        // means a corrupted or hand-edited file, and would make signatures fail to verify.
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&bytes).map_err(|_| {
            Error::invalid(format!(
                "secret key {name:?}: its public half does not match its secret half"
            ))
        })?;
        Ok(SigningKey { name, key })
    }

    /// The secret key file form, `name:base64(64 bytes)`.
    pub fn to_nix_string(&self) -> String {
        format!("{}:{}", self.name, STANDARD.encode(self.key.to_keypair_bytes()))
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The matching public key, with the same name.
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey { name: self.name.clone(), key: self.key.verifying_key() }
    }

    /// Signs `message`, returning `name:base64(64-byte signature)`.
    pub fn sign(&self, message: &str) -> String {
        let sig = self.key.sign(message.as_bytes());
        format!("{}:{}", self.name, STANDARD.encode(sig.to_bytes()))
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("name", &self.name)
            .field("public", &STANDARD.encode(self.key.verifying_key().as_bytes()))
            .finish_non_exhaustive()
    }
}

/// A named ed25519 public key, as listed in `trusted-public-keys`.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl VerifyingKey {
    /// Parses `name:base64(32 bytes)`.
    pub fn parse(s: &str) -> Result<Self> {
        let (name, bytes) = split_key::<32>(s, "public key")?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| {
            Error::invalid(format!("public key {name:?} is not a valid ed25519 point"))
        })?;
        Ok(VerifyingKey { name, key })
    }

    /// The `name:base64` form.
    pub fn to_nix_string(&self) -> String {
        format!("{}:{}", self.name, STANDARD.encode(self.key.as_bytes()))
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `sig` (`name:base64`) is this key's signature of `message`.
    ///
    /// False, never an error, for another key's name or a malformed signature: a narinfo may
    /// carry signatures by keys we do not know.
    pub fn verify(&self, message: &str, sig: &str) -> bool {
        let Some((name, b64)) = sig.split_once(':') else {
            return false;
        };
        if name != self.name {
            return false;
        }
        let Ok(bytes) = STANDARD.decode(b64) else {
            return false;
        };
        let Ok(bytes) = <[u8; 64]>::try_from(bytes) else {
            return false;
        };
        // Strict verification rejects small-order keys and malleable signatures, as
        // libsodium (which Nix uses) does.
        self.key.verify_strict(message.as_bytes(), &Signature::from_bytes(&bytes)).is_ok()
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey({})", self.to_nix_string())
    }
}

impl fmt::Display for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

/// Most keys one list may hold: a cache trusts a key per runner, and every upload is checked
/// against them, so the list stays small.
pub const MAX_TRUSTED_KEYS: usize = 256;

/// A list of trusted public keys, like Nix's `trusted-public-keys`: a path is trusted when one
/// of its signatures verifies under one of them.
///
/// Several keys may share a name (a runner whose key was generated again keeps its name while
/// both are listed, during a rotation); a signature is then checked against each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: Vec<VerifyingKey>,
}

impl TrustedKeys {
    /// Parses `name:base64` public keys, refusing a malformed one and more than
    /// [`MAX_TRUSTED_KEYS`].
    pub fn parse<S: AsRef<str>>(keys: &[S]) -> Result<Self> {
        if keys.len() > MAX_TRUSTED_KEYS {
            return Err(Error::invalid(format!("at most {MAX_TRUSTED_KEYS} trusted keys, not {}", keys.len())));
        }
        let keys = keys.iter().map(|k| VerifyingKey::parse(k.as_ref())).collect::<Result<Vec<_>>>()?;
        Ok(TrustedKeys { keys })
    }

    /// Whether no key is listed.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys, in `name:base64` form, as given.
    pub fn to_nix_strings(&self) -> Vec<String> {
        self.keys.iter().map(VerifyingKey::to_nix_string).collect()
    }

    /// The first key with a valid signature of `fingerprint` among `sigs`.
    pub fn signer(&self, fingerprint: &str, sigs: &[String]) -> Option<&VerifyingKey> {
        self.keys.iter().find(|key| sigs.iter().any(|sig| key.verify(fingerprint, sig)))
    }

    /// Refuses, as [`ErrorKind::Forbidden`], a path (`store_path`, absolute, with its
    /// [`fingerprint`]) that carries no valid signature by one of these keys. The message
    /// names the trusted keys and what is wrong with each signature the path does carry, so
    /// that whoever pushed it can tell an unsigned build from a key the cache does not list.
    ///
    /// [`ErrorKind::Forbidden`]: crate::ErrorKind::Forbidden
    pub fn require_signature(&self, store_path: &str, fingerprint: &str, sigs: &[String]) -> Result<()> {
        if self.signer(fingerprint, sigs).is_some() {
            return Ok(());
        }
        let mut names: Vec<&str> = self.keys.iter().map(VerifyingKey::name).collect();
        names.sort_unstable();
        names.dedup();
        let trusted = if names.is_empty() { "none is listed".to_string() } else { names.join(", ") };
        let found = if sigs.is_empty() {
            "it carries no signature".to_string()
        } else {
            let each: Vec<String> = sigs
                .iter()
                .map(|sig| {
                    let name = sig.split_once(':').map_or(sig.as_str(), |(name, _)| name);
                    if self.keys.iter().any(|key| key.name() == name) {
                        format!("{name} (does not verify)")
                    } else {
                        format!("{name} (not a trusted uploader key)")
                    }
                })
                .collect();
            format!("its signatures are by {}", each.join(", "))
        };
        Err(Error::new(
            crate::ErrorKind::Forbidden,
            format!(
                "this cache requires uploads signed by one of its trusted uploader keys ({trusted}), and {store_path} \
                 has no valid signature by one: {found}; sign it with a trusted key (`nix store sign --key-file`, \
                 or `secret-key-files` where it is built) or add the builder's public key to the cache"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::nix::DEFAULT_STORE_DIR;

    // Made by `nix-store --generate-binary-cache-key test-key-1 sec pub` (Nix 2.8).
    const SECRET: &str = "test-key-1:9RAoO1HCyX60ZsDusS3ol+R5yM2pg7alVUjVxjDW5J6KB4GN5DdBpz69jBmbs7Zbtt6oLJJ5qmMWeYUv0dTZ+g==";
    const PUBLIC: &str = "test-key-1:igeBjeQ3Qac+vYwZm7O2W7beqCySeapjFnmFL9HU2fo=";

    // From the narinfo `nix copy --to file://...?secret-key=sec` wrote for this path.
    const SIG: &str = "test-key-1:kGK/p65/gPTxVBffg2zMKPmq0ACE4mR9/LH4h7JXAtceE2zfhGABvupulZJb9QZzn8icFN+UkFm2poQ366mYBw==";

    fn nix_fingerprint() -> String {
        let path = StorePath::from_base_name("kznx6z0g1warfx4z4ahb5n062jmx5qqs-b.txt").unwrap();
        let hash =
            Sha256Hash::parse("sha256:1g6syx5pq5fhbix3j0ymn6dyxsipm4lj7ql0vxcs87a2aibkwy3x").unwrap();
        // Given out of order on purpose.
        let refs = [
            StorePath::from_base_name("wzflyq5q9kjg4p27yck2nnispnblxsnh-a.txt").unwrap(),
            StorePath::from_base_name("rkvkm0asz2zpsik1x8nwwdq0xkq1417n-c.txt").unwrap(),
        ];
        fingerprint(DEFAULT_STORE_DIR, &path, &hash, 216, &refs)
    }

    #[test]
    fn fingerprint_format() {
        assert_eq!(
            nix_fingerprint(),
            "1;/nix/store/kznx6z0g1warfx4z4ahb5n062jmx5qqs-b.txt;\
             sha256:1g6syx5pq5fhbix3j0ymn6dyxsipm4lj7ql0vxcs87a2aibkwy3x;216;\
             /nix/store/rkvkm0asz2zpsik1x8nwwdq0xkq1417n-c.txt,\
             /nix/store/wzflyq5q9kjg4p27yck2nnispnblxsnh-a.txt"
        );
        let p = StorePath::from_base_name("rkvkm0asz2zpsik1x8nwwdq0xkq1417n-c.txt").unwrap();
        let h = Sha256Hash::digest(b"");
        assert_eq!(
            fingerprint("/s", &p, &h, 5, &[]),
            format!("1;/s/{p};{h};5;")
        );
    }

    #[test]
    fn real_nix_keys_and_signature() {
        let sk = SigningKey::parse(SECRET).unwrap();
        let pk = VerifyingKey::parse(PUBLIC).unwrap();
        assert_eq!(sk.name(), "test-key-1");
        assert_eq!(sk.to_nix_string(), SECRET);
        assert_eq!(pk.to_nix_string(), PUBLIC);
        assert_eq!(sk.verifying_key(), pk);
        let fp = nix_fingerprint();
        assert!(pk.verify(&fp, SIG));
        // ed25519 is deterministic, so we reproduce Nix's signature exactly.
        assert_eq!(sk.sign(&fp), SIG);
        assert!(!pk.verify(&fp.replace("216", "217"), SIG));
        assert!(SigningKey::parse(&format!("{SECRET}\n")).is_ok());
    }

    #[test]
    fn generated_keys_work() {
        let sk = SigningKey::generate("cache.example.org-1").unwrap();
        let again = SigningKey::parse(&sk.to_nix_string()).unwrap();
        let pk = VerifyingKey::parse(&again.verifying_key().to_nix_string()).unwrap();
        let sig = sk.sign("hello");
        assert!(sig.starts_with("cache.example.org-1:"));
        assert!(pk.verify("hello", &sig));
        assert!(!pk.verify("hellO", &sig));
        let other = SigningKey::generate("cache.example.org-1").unwrap();
        assert!(!other.verifying_key().verify("hello", &sig));
        for bad in ["", "a:b", "a b", "a\tb"] {
            assert_eq!(SigningKey::generate(bad).unwrap_err().kind(), ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn debug_hides_secret() {
        let sk = SigningKey::parse(SECRET).unwrap();
        let dbg = format!("{sk:?}");
        assert!(dbg.contains("test-key-1"));
        assert!(!dbg.contains(&SECRET[11..30]), "{dbg}");
        let seed_b64 = STANDARD.encode(sk.key.to_bytes());
        assert!(!dbg.contains(&seed_b64[..20]));
    }

    #[test]
    fn rejects_bad_keys() {
        let (name, b64) = SECRET.split_once(':').unwrap();
        let mut bytes = STANDARD.decode(b64).unwrap();
        bytes[40] ^= 1;
        let mismatched = format!("{name}:{}", STANDARD.encode(&bytes));
        let bad_secrets = [
            "".to_string(),
            "no-colon".to_string(),
            format!(":{b64}"),
            format!("{name}:{}", &b64[..b64.len() - 4]), // truncated base64
            format!("{name}:{}", &b64[..b64.len() - 1]), // padding cut off
            format!("{name}:{}", STANDARD.encode([0u8; 32])), // public-key length
            format!("{name}:{b64}!"),
            mismatched,
            PUBLIC.to_string(),
        ];
        for s in bad_secrets {
            let err = SigningKey::parse(&s).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{s}");
        }
        let bad_publics = [
            "".to_string(),
            "test-key-1".to_string(),
            SECRET.to_string(),
            PUBLIC[..PUBLIC.len() - 2].to_string(),
            "a b:igeBjeQ3Qac+vYwZm7O2W7beqCySeapjFnmFL9HU2fo=".to_string(),
        ];
        for s in bad_publics {
            let err = VerifyingKey::parse(&s).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{s}");
        }
    }

    #[test]
    fn trusted_keys_find_a_valid_signature_or_say_why_not() {
        let fp = nix_fingerprint();
        let other = SigningKey::generate("other-1").unwrap();
        let keys = TrustedKeys::parse(&[other.verifying_key().to_nix_string(), PUBLIC.to_string()]).unwrap();
        assert_eq!(keys.to_nix_strings()[1], PUBLIC);
        assert_eq!(keys.signer(&fp, &[SIG.to_string()]).map(|k| k.name()), Some("test-key-1"));
        keys.require_signature("/nix/store/x", &fp, &["junk:AAAA".into(), SIG.to_string()]).unwrap();

        let refused = |sigs: &[String]| {
            let err = keys.require_signature("/nix/store/kznx-b.txt", &fp, sigs).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Forbidden);
            assert!(err.message().contains("/nix/store/kznx-b.txt"), "{err}");
            assert!(err.message().contains("(other-1, test-key-1)"), "{err}");
            err.message().to_string()
        };
        assert!(refused(&[]).contains("it carries no signature"));
        let unlisted = SigningKey::generate("runner-9").unwrap().sign(&fp);
        assert!(refused(&[unlisted]).contains("runner-9 (not a trusted uploader key)"));
        // A listed name with bytes that do not verify: a signature of another path.
        let wrong = SigningKey::parse(SECRET).unwrap().sign("1;/nix/store/other;sha256:0;1;");
        assert!(refused(&[wrong]).contains("test-key-1 (does not verify)"));
        // The same name with another key's bytes.
        let impostor = SigningKey::generate("test-key-1").unwrap().sign(&fp);
        assert!(refused(&[impostor]).contains("test-key-1 (does not verify)"));

        // Two keys of one name (a rotation): either verifies.
        let rotated = SigningKey::generate("test-key-1").unwrap();
        let both = TrustedKeys::parse(&[PUBLIC.to_string(), rotated.verifying_key().to_nix_string()]).unwrap();
        both.require_signature("/nix/store/x", &fp, &[rotated.sign(&fp)]).unwrap();
        both.require_signature("/nix/store/x", &fp, &[SIG.to_string()]).unwrap();

        assert!(TrustedKeys::parse(&[SECRET]).is_err());
        assert!(TrustedKeys::parse(&vec![PUBLIC; MAX_TRUSTED_KEYS + 1]).is_err());
        let none = TrustedKeys::parse::<&str>(&[]).unwrap();
        assert!(none.is_empty());
        assert!(none.require_signature("/nix/store/x", &fp, &[SIG.to_string()]).unwrap_err().message().contains("none is listed"));
    }

    #[test]
    fn malformed_signatures_are_false() {
        let pk = VerifyingKey::parse(PUBLIC).unwrap();
        let fp = nix_fingerprint();
        let (_, b64) = SIG.split_once(':').unwrap();
        let cases = [
            String::new(),
            b64.to_string(),
            format!("other-key:{b64}"),
            format!("test-key-1:{}", &b64[..40]),
            format!("test-key-1:{}", STANDARD.encode([0u8; 63])),
            format!("test-key-1:{}", STANDARD.encode([0u8; 64])),
            format!("test-key-1:{}", STANDARD.encode([0xffu8; 64])),
            "test-key-1:".to_string(),
            "test-key-1:%%%".to_string(),
        ];
        for sig in cases {
            assert!(!pk.verify(&fp, &sig), "{sig}");
        }
    }
}
