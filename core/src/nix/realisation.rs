//! Realisations of content-addressed derivations: which store path an output of a derivation
//! was built into, as binary caches keep them for `ca-derivations`.
//!
//! The output path of a floating content-addressed derivation is only known once it is built,
//! so a cache that serves it also serves this mapping. Nix has written it in two layouts:
//! - up to 2.34, `realisations/<drv output id>.doi`, the id being `sha256:<hex>!<output>` (the
//!   hash is the derivation's hash modulo its inputs), holding a [`Realisation`] with its id;
//! - from 2.35, `build-trace-v2/<drv base name>/<output>.doi`, holding only a
//!   [`BuildTraceValue`]: the derivation and output are its [`BuildTraceKey`], named by the URL.
//!
//! Signatures sign a fingerprint: the entry as JSON without its signatures, keys in sorted
//! order, no whitespace (how Nix's JSON library prints an object). Every string in it has been
//! checked to hold only characters JSON writes as they are, so the fingerprint is
//! byte-for-byte Nix's.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::hash::Sha256Hash;
use super::signing::{self, SigningKey, VerifyingKey};
use super::store_path::{self, StorePath};
use crate::error::{Error, Result};

/// Checks the name of a derivation output (`out`, `dev`, ...). Nix puts it into the name of
/// the output's store path (`<name>-<output>`), so it must be a valid store path name, which
/// also keeps it a plain file name.
pub fn check_output_name(name: &str) -> Result<()> {
    store_path::check_name(name).map_err(|e| Error::invalid(format!("output name {name:?}: {}", e.message())))
}

/// A derivation output as Nix up to 2.34 names it: `sha256:<hash>!<output>`, the hash being
/// the derivation's hash modulo its fixed inputs.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct DrvOutputId {
    /// The derivation's hash.
    pub drv_hash: Sha256Hash,
    /// The output's name.
    pub output: String,
}

impl DrvOutputId {
    /// Parses `sha256:<64 lowercase hex or 52 nixbase32>!<output name>`. Nix writes hex; other
    /// forms of the hash that its parser would take are refused, as no Nix writes them.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::invalid(format!("derivation output id {s:?}: {why}; expected sha256:<hash>!<output>"));
        let (hash, output) = s.split_once('!').ok_or_else(|| bad("no '!'"))?;
        let digits = hash.strip_prefix("sha256:").ok_or_else(|| bad("the hash must start with 'sha256:'"))?;
        let hex_ok = digits.len() == 64 && digits.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_ok && digits.len() != 52 {
            return Err(bad("the hash must be 64 lowercase hex digits or 52 nixbase32 digits"));
        }
        let drv_hash = Sha256Hash::parse(hash).map_err(|e| bad(e.message()))?;
        check_output_name(output).map_err(|e| bad(e.message()))?;
        Ok(DrvOutputId { drv_hash, output: output.to_string() })
    }

    /// The id as Nix writes it, with the hash in hex.
    pub fn to_nix_string(&self) -> String {
        format!("sha256:{}!{}", self.drv_hash.to_hex(), self.output)
    }
}

impl fmt::Display for DrvOutputId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

/// A realisation as Nix 2.8 to 2.34 upload it to `realisations/<id>.doi`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Realisation {
    /// The derivation output it realises.
    pub id: DrvOutputId,
    /// The store path the output was built into.
    pub out_path: StorePath,
    /// Signatures, `name:base64`, in the order they were sent.
    pub signatures: Vec<String>,
    /// The realisations of the derivation's inputs that the build used (Nix up to 2.33 fills
    /// it in; 2.34 writes it empty and ignores it).
    pub dependent_realisations: BTreeMap<DrvOutputId, StorePath>,
}

/// The JSON of a [`Realisation`] as read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RealisationJson {
    #[serde(default, deserialize_with = "entries")]
    dependent_realisations: Vec<(String, String)>,
    id: String,
    out_path: String,
    #[serde(default)]
    signatures: Vec<String>,
}

/// An object's entries in order, duplicates kept, so that a repeated key is refused rather
/// than silently resolved.
fn entries<'de, D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Vec<(String, String)>, D::Error> {
    struct Entries;
    impl<'de> serde::de::Visitor<'de> for Entries {
        type Value = Vec<(String, String)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object of derivation output ids to store paths")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(entry) = map.next_entry()? {
                out.push(entry);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_map(Entries)
}

impl Realisation {
    /// Parses the JSON Nix uploads, strictly: only its four fields, a well-formed id, store
    /// paths as base names, and well-formed signatures (which are not verified: the keys that
    /// made them are the uploader's).
    pub fn parse_json(json: &[u8]) -> Result<Self> {
        let raw: RealisationJson =
            serde_json::from_slice(json).map_err(|e| Error::invalid(format!("not a realisation's JSON: {e}")))?;
        let id = DrvOutputId::parse(&raw.id)?;
        let out_path = StorePath::from_base_name(&raw.out_path).map_err(|e| e.context("outPath"))?;
        for sig in &raw.signatures {
            signing::check_signature(sig).map_err(|e| e.context("realisation signature"))?;
        }
        let mut dependent_realisations = BTreeMap::new();
        for (dep, path) in raw.dependent_realisations {
            let dep = DrvOutputId::parse(&dep).map_err(|e| e.context("dependentRealisations"))?;
            let path = StorePath::from_base_name(&path).map_err(|e| e.context("dependentRealisations"))?;
            if dependent_realisations.insert(dep.clone(), path).is_some() {
                return Err(Error::invalid(format!("dependentRealisations names {dep} twice")));
            }
        }
        Ok(Realisation { id, out_path, signatures: raw.signatures, dependent_realisations })
    }

    fn json(&self, with_signatures: bool) -> RealisationJson {
        RealisationJson {
            dependent_realisations: self
                .dependent_realisations
                .iter()
                .map(|(dep, path)| (dep.to_nix_string(), path.base_name()))
                .collect(),
            id: self.id.to_nix_string(),
            out_path: self.out_path.base_name(),
            signatures: if with_signatures { self.signatures.clone() } else { Vec::new() },
        }
    }

    /// The JSON as Nix writes it (hashes in hex), signatures included.
    pub fn to_json(&self) -> Vec<u8> {
        let json = self.json(true);
        let deps: serde_json::Map<String, serde_json::Value> =
            json.dependent_realisations.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect();
        let value = serde_json::json!({
            "dependentRealisations": deps,
            "id": json.id,
            "outPath": json.out_path,
            "signatures": json.signatures,
        });
        value.to_string().into_bytes()
    }

    /// What a signature signs: `{"dependentRealisations":{...},"id":...,"outPath":...}`.
    pub fn fingerprint(&self) -> String {
        let json = self.json(false);
        // The ids sort as their strings do: equal-length hex, then '!' and the output name.
        let deps: Vec<String> = json
            .dependent_realisations
            .iter()
            .map(|(dep, path)| format!("{}:{}", quote(dep), quote(path)))
            .collect();
        format!(
            "{{\"dependentRealisations\":{{{}}},\"id\":{},\"outPath\":{}}}",
            deps.join(","),
            quote(&json.id),
            quote(&json.out_path)
        )
    }

    /// Adds a signature by `key`, replacing any by a key of the same name.
    pub fn sign(&mut self, key: &SigningKey) {
        let sig = key.sign(&self.fingerprint());
        let prefix = format!("{}:", key.name());
        self.signatures.retain(|s| !s.starts_with(&prefix));
        self.signatures.push(sig);
    }

    /// Whether a signature by `key` verifies.
    pub fn verify(&self, key: &VerifyingKey) -> bool {
        let fingerprint = self.fingerprint();
        self.signatures.iter().any(|sig| key.verify(&fingerprint, sig))
    }
}

/// A JSON string. The strings of fingerprints are checked names, which JSON writes as they are.
fn quote(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// The key of a build trace entry (Nix 2.35 and later): a derivation and one of its outputs,
/// the URL `build-trace-v2/<drv base name>/<output>.doi` names.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct BuildTraceKey {
    /// The derivation.
    pub drv_path: StorePath,
    /// The output's name.
    pub output: String,
}

impl BuildTraceKey {
    /// Checks both parts: a store path base name ending in `.drv`, and an output name.
    pub fn new(drv: &str, output: &str) -> Result<Self> {
        let drv_path = StorePath::from_base_name(drv)?;
        if !drv_path.name.ends_with(".drv") {
            return Err(Error::invalid(format!("{drv:?} is not a derivation (.drv)")));
        }
        check_output_name(output)?;
        Ok(BuildTraceKey { drv_path, output: output.to_string() })
    }
}

/// A signature in a build trace entry: Nix 2.35 writes an object and reads the older
/// `name:base64` text as well.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TraceSignature {
    /// `name:base64`.
    Text(String),
    /// `{"keyName": name, "sig": base64}`.
    Object(SignatureObject),
}

/// The object form of a [`TraceSignature`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SignatureObject {
    /// The name of the key.
    pub key_name: String,
    /// The signature, base64.
    pub sig: String,
}

impl TraceSignature {
    /// The `name:base64` text of either form.
    pub fn to_text(&self) -> String {
        match self {
            TraceSignature::Text(text) => text.clone(),
            TraceSignature::Object(o) => format!("{}:{}", o.key_name, o.sig),
        }
    }

    /// The name of the key that made it.
    pub fn key_name(&self) -> &str {
        match self {
            TraceSignature::Text(text) => text.split_once(':').map_or(text.as_str(), |(name, _)| name),
            TraceSignature::Object(o) => &o.key_name,
        }
    }

    fn check(&self) -> Result<()> {
        signing::check_signature(&self.to_text())
    }
}

/// A build trace entry's value as Nix 2.35 and later upload it to
/// `build-trace-v2/<drv>/<output>.doi`: `{"outPath", "signatures"}`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BuildTraceValue {
    /// The store path the output was built into.
    #[serde(serialize_with = "base_name", deserialize_with = "store_path_field")]
    pub out_path: StorePath,
    /// Signatures, in the form and order they were sent.
    #[serde(default)]
    pub signatures: Vec<TraceSignature>,
}

fn base_name<S: serde::Serializer>(path: &StorePath, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&path.base_name())
}

fn store_path_field<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<StorePath, D::Error> {
    let s = String::deserialize(d)?;
    StorePath::from_base_name(&s).map_err(serde::de::Error::custom)
}

impl BuildTraceValue {
    /// Parses the JSON Nix uploads, strictly: only its two fields, the store path as a base
    /// name, and well-formed signatures (not verified).
    pub fn parse_json(json: &[u8]) -> Result<Self> {
        let value: BuildTraceValue =
            serde_json::from_slice(json).map_err(|e| Error::invalid(format!("not a build trace entry's JSON: {e}")))?;
        for sig in &value.signatures {
            sig.check().map_err(|e| e.context("build trace signature"))?;
        }
        Ok(value)
    }

    /// The JSON as Nix writes it.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::internal(format!("serializing a build trace entry: {e}")))
    }

    /// What a signature signs:
    /// `{"key":{"drvPath":...,"outputName":...},"value":{"outPath":...}}`.
    pub fn fingerprint(&self, key: &BuildTraceKey) -> String {
        format!(
            "{{\"key\":{{\"drvPath\":{},\"outputName\":{}}},\"value\":{{\"outPath\":{}}}}}",
            quote(&key.drv_path.base_name()),
            quote(&key.output),
            quote(&self.out_path.base_name())
        )
    }

    /// Adds a signature by `signer` in the object form Nix 2.35 writes, replacing any by a key
    /// of the same name.
    pub fn sign(&mut self, key: &BuildTraceKey, signer: &SigningKey) {
        let text = signer.sign(&self.fingerprint(key));
        let sig = text.split_once(':').map_or("", |(_, sig)| sig).to_string();
        self.signatures.retain(|s| s.key_name() != signer.name());
        self.signatures.push(TraceSignature::Object(SignatureObject { key_name: signer.name().to_string(), sig }));
    }

    /// Whether a signature by `verifier` verifies.
    pub fn verify(&self, key: &BuildTraceKey, verifier: &VerifyingKey) -> bool {
        let fingerprint = self.fingerprint(key);
        self.signatures.iter().any(|sig| verifier.verify(&fingerprint, &sig.to_text()))
    }
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;

    use super::*;
    use crate::error::ErrorKind;

    const HEX: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
    const OUT: &str = "g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo";

    fn realisation_json(id: &str) -> String {
        format!(r#"{{"dependentRealisations":{{}},"id":"{id}","outPath":"{OUT}","signatures":[]}}"#)
    }

    #[test]
    fn ids_parse_strictly() {
        let id = DrvOutputId::parse(&format!("sha256:{HEX}!out")).unwrap();
        assert_eq!(id.output, "out");
        assert_eq!(id.to_nix_string(), format!("sha256:{HEX}!out"));
        // nixbase32 is read and written back as hex.
        let b32 = id.drv_hash.to_base32_bare();
        assert_eq!(DrvOutputId::parse(&format!("sha256:{b32}!out")).unwrap(), id);
        let bad = [
            String::new(),
            format!("sha256:{HEX}"),
            format!("sha256:{HEX}!"),
            format!("{HEX}!out"),
            format!("sha1:{HEX}!out"),
            format!("sha256:{}!out", HEX.to_uppercase()),
            format!("sha256:{}!out", &HEX[1..]),
            format!("sha256:{}!out", id.drv_hash.to_hex().replace('2', "g")),
            format!("sha256-{}!out", STANDARD.encode(id.drv_hash.0)),
            format!("sha256:{}!out", STANDARD.encode(id.drv_hash.0)),
            format!("sha256:{HEX}!out/x"),
            format!("sha256:{HEX}!.."),
            format!("sha256:{HEX}!a b"),
            format!("sha256:{HEX}!out!dev"),
        ];
        for s in bad {
            assert_eq!(DrvOutputId::parse(&s).unwrap_err().kind(), ErrorKind::InvalidInput, "{s}");
        }
    }

    #[test]
    fn realisations_round_trip_as_nix_writes_them() {
        let id = format!("sha256:{HEX}!out");
        let json = realisation_json(&id);
        let r = Realisation::parse_json(json.as_bytes()).unwrap();
        assert_eq!(r.out_path.base_name(), OUT);
        assert_eq!(String::from_utf8(r.to_json()).unwrap(), json);
        assert_eq!(r.fingerprint(), format!(r#"{{"dependentRealisations":{{}},"id":"{id}","outPath":"{OUT}"}}"#));
        // Fields Nix may leave out.
        let minimal = format!(r#"{{"id":"{id}","outPath":"{OUT}"}}"#);
        assert_eq!(Realisation::parse_json(minimal.as_bytes()).unwrap(), r);
    }

    #[test]
    fn dependencies_sort_like_nix_and_are_signed() {
        let other = "1".repeat(64);
        let json = format!(
            r#"{{"id":"sha256:{HEX}!out","outPath":"{OUT}","dependentRealisations":{{"sha256:{HEX}!dev":"{OUT}","sha256:{other}!out":"{OUT}"}}}}"#
        );
        let r = Realisation::parse_json(json.as_bytes()).unwrap();
        assert_eq!(
            r.fingerprint(),
            format!(
                r#"{{"dependentRealisations":{{"sha256:{other}!out":"{OUT}","sha256:{HEX}!dev":"{OUT}"}},"id":"sha256:{HEX}!out","outPath":"{OUT}"}}"#
            )
        );
        let mut signed = r.clone();
        let key = SigningKey::generate("cache-1").unwrap();
        signed.sign(&key);
        signed.sign(&key);
        assert_eq!(signed.signatures.len(), 1, "one signature per key name");
        assert!(signed.verify(&key.verifying_key()));
        let again = Realisation::parse_json(&signed.to_json()).unwrap();
        assert_eq!(again, signed);
        let mut moved = again;
        moved.out_path = StorePath::from_base_name("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar").unwrap();
        assert!(!moved.verify(&key.verifying_key()));
    }

    #[test]
    fn bad_realisations_are_refused() {
        let id = format!("sha256:{HEX}!out");
        let sig = format!("k:{}", STANDARD.encode([0u8; 64]));
        let bad = [
            "".to_string(),
            "[]".to_string(),
            "{}".to_string(),
            format!(r#"{{"id":"{id}"}}"#),
            format!(r#"{{"outPath":"{OUT}"}}"#),
            format!(r#"{{"id":"{id}","outPath":"/nix/store/{OUT}"}}"#),
            format!(r#"{{"id":"{id}","outPath":"{OUT}","extra":1}}"#),
            format!(r#"{{"id":"{id}","id":"{id}","outPath":"{OUT}"}}"#),
            format!(r#"{{"id":"{id}","outPath":"{OUT}","signatures":["nocolon"]}}"#),
            format!(r#"{{"id":"{id}","outPath":"{OUT}","signatures":["k:AAAA"]}}"#),
            format!(r#"{{"id":"{id}","outPath":"{OUT}","signatures":[" {sig}"]}}"#),
            format!(r#"{{"id":"{id}","outPath":"{OUT}","signatures":"{sig}"}}"#),
            format!(r#"{{"id":"{id}","outPath":"{OUT}","dependentRealisations":{{"x":"{OUT}"}}}}"#),
            format!(r#"{{"id":"{id}","outPath":"{OUT}","dependentRealisations":{{"{id}":"nope"}}}}"#),
            format!(r#"{{"id":"{id}","outPath":"{OUT}","dependentRealisations":{{"{id}":"{OUT}","{id}":"{OUT}"}}}}"#),
            format!(r#"{{"id":"{id}!","outPath":"{OUT}"}}"#),
        ];
        for json in bad {
            let err = Realisation::parse_json(json.as_bytes()).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{json}");
        }
        let good = format!(r#"{{"id":"{id}","outPath":"{OUT}","signatures":["{sig}"]}}"#);
        assert_eq!(Realisation::parse_json(good.as_bytes()).unwrap().signatures, vec![sig]);
    }

    // Nix's own test data (src/libstore-tests/data/realisation/ at 2.35): the key, the entry,
    // its fingerprint and the signature Nix made of it. ed25519 is deterministic, so ours must
    // be the same bytes.
    const NIX_TEST_KEY: &str =
        "test-key:tU7tTvLcScf8pmz/eTV0BEtLmRsPpZfKaRcd0nCN+pysBZPHSeg61/u2oc7mIOewfuAY1V1BiX32homTaDJ2Jw==";
    const NIX_FINGERPRINT: &str = r#"{"key":{"drvPath":"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv","outputName":"foo"},"value":{"outPath":"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo"}}"#;
    const NIX_SIG: &str = "WsjxK4/EI74COtzMDI+VCjQU9O4FydK0+YeY1CE5hUevogd+T+CPvNXza7oog3GTMS+ZlBwsC2S3ppwusKnJDg==";

    #[test]
    fn build_trace_entries_sign_like_nix() {
        let key = BuildTraceKey::new("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv", "foo").unwrap();
        let mut value = BuildTraceValue::parse_json(format!(r#"{{"outPath":"{OUT}","signatures":[]}}"#).as_bytes()).unwrap();
        assert_eq!(value.fingerprint(&key), NIX_FINGERPRINT);
        let signer = SigningKey::parse(NIX_TEST_KEY).unwrap();
        value.sign(&key, &signer);
        assert_eq!(
            value.signatures,
            vec![TraceSignature::Object(SignatureObject { key_name: "test-key".into(), sig: NIX_SIG.into() })]
        );
        assert!(value.verify(&key, &signer.verifying_key()));
        let other = BuildTraceKey::new("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv", "out").unwrap();
        assert!(!value.verify(&other, &signer.verifying_key()));
        assert_eq!(
            String::from_utf8(value.to_json().unwrap()).unwrap(),
            format!(r#"{{"outPath":"{OUT}","signatures":[{{"keyName":"test-key","sig":"{NIX_SIG}"}}]}}"#)
        );
    }

    #[test]
    fn build_trace_values_keep_both_signature_forms() {
        let zeros = STANDARD.encode([0u8; 64]);
        let json = format!(r#"{{"outPath":"{OUT}","signatures":["asdf:{zeros}",{{"keyName":"asdf","sig":"{zeros}"}}]}}"#);
        let value = BuildTraceValue::parse_json(json.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(value.to_json().unwrap()).unwrap(), json);
        assert!(value.signatures.iter().all(|s| s.key_name() == "asdf"));
        let minimal = BuildTraceValue::parse_json(format!(r#"{{"outPath":"{OUT}"}}"#).as_bytes()).unwrap();
        assert!(minimal.signatures.is_empty());
        let bad = [
            "{}".to_string(),
            "null".to_string(),
            format!(r#"{{"outPath":"/nix/store/{OUT}"}}"#),
            format!(r#"{{"outPath":"{OUT}","id":"x"}}"#),
            format!(r#"{{"outPath":"{OUT}","signatures":[{{"keyName":"a","sig":"{zeros}","x":1}}]}}"#),
            format!(r#"{{"outPath":"{OUT}","signatures":[{{"keyName":"a b","sig":"{zeros}"}}]}}"#),
            format!(r#"{{"outPath":"{OUT}","signatures":[{{"keyName":"a","sig":"AAAA"}}]}}"#),
            format!(r#"{{"outPath":"{OUT}","signatures":[{{"keyName":"a"}}]}}"#),
            format!(r#"{{"outPath":"{OUT}","signatures":[1]}}"#),
            format!(r#"{{"outPath":"{OUT}","signatures":["a:{zeros}="]}}"#),
        ];
        for json in bad {
            let err = BuildTraceValue::parse_json(json.as_bytes()).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{json}");
        }
    }

    #[test]
    fn build_trace_keys_name_a_derivation_and_an_output() {
        assert!(BuildTraceKey::new("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv", "out").is_ok());
        for (drv, output) in [
            ("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar", "out"),
            ("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv", ""),
            ("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv", ".."),
            ("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv", "a/b"),
            ("..", "out"),
            ("bar.drv", "out"),
        ] {
            assert_eq!(BuildTraceKey::new(drv, output).unwrap_err().kind(), ErrorKind::InvalidInput, "{drv} {output}");
        }
    }
}
