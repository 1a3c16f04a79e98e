//! Turning client-supplied metadata into a path record, shared by every upload route, and the
//! cache's uploader-signature rule, which every path passes on its way to a record.

use flywheel_core::nix::{fingerprint, Sha256Hash, StorePath, TrustedKeys};
use flywheel_core::{Error, Result};

use crate::storage::{CacheRecord, PathRecord};

/// Most references a path may have.
const MAX_REFERENCES: usize = 10_000;
/// Most signatures kept per path.
const MAX_SIGS: usize = 64;
/// Longest signature or CA string kept.
const MAX_FIELD_LEN: usize = 4096;

/// Metadata of a path as a client sent it, before checks.
pub struct PathMetadata<'a> {
    /// The store path, a base name or a full path in the cache's store dir.
    pub store_path: &'a str,
    /// The cache it is published to: its store dir, and its rule on uploader signatures.
    pub cache: &'a CacheRecord,
    /// The NAR's SHA-256, which the route checks the NAR against.
    pub nar_hash: Sha256Hash,
    /// The NAR's size.
    pub nar_size: u64,
    /// References, base names or full paths.
    pub references: &'a [String],
    /// The deriver; empty or `unknown-deriver` means none.
    pub deriver: Option<&'a str>,
    /// The system it was built for.
    pub system: Option<&'a str>,
    /// Signatures, `name:base64`.
    pub sigs: &'a [String],
    /// Content address.
    pub ca: Option<&'a str>,
}

/// A store path given as a base name or as a full path in `store_dir`.
pub fn parse_store_path(s: &str, store_dir: &str) -> Result<StorePath> {
    if s.starts_with('/') {
        StorePath::from_absolute(s, store_dir)
    } else {
        StorePath::from_base_name(s)
    }
}

impl PathMetadata<'_> {
    /// Checks every field, and the signatures when the cache requires an uploader's (see
    /// [`check_uploader_signature`]), and builds the record. Routes call it before they write
    /// anything for the path, so a refused path leaves storage as it was.
    pub fn into_record(self, published_at: u64) -> Result<(StorePath, PathRecord)> {
        let store_dir = self.cache.store_dir.as_str();
        let store_path = parse_store_path(self.store_path, store_dir)?;
        if self.references.len() > MAX_REFERENCES {
            return Err(Error::invalid(format!("more than {MAX_REFERENCES} references")));
        }
        let mut references = self
            .references
            .iter()
            .map(|r| parse_store_path(r, store_dir).map(|p| p.base_name()))
            .collect::<Result<Vec<_>>>()?;
        references.sort();
        references.dedup();
        let deriver = match self.deriver {
            None | Some("") | Some("unknown-deriver") => None,
            Some(d) => Some(parse_store_path(d, store_dir)?.base_name()),
        };
        if self.sigs.len() > MAX_SIGS {
            return Err(Error::invalid(format!("more than {MAX_SIGS} signatures")));
        }
        for sig in self.sigs {
            let well_formed = sig.len() <= MAX_FIELD_LEN
                && sig.split_once(':').is_some_and(|(name, value)| !name.is_empty() && !value.is_empty())
                && !sig.contains(char::is_whitespace);
            if !well_formed {
                return Err(Error::invalid(format!("malformed signature {sig:?}")));
            }
        }
        for (field, value) in [("CA", self.ca), ("System", self.system)] {
            if let Some(value) = value {
                if value.len() > MAX_FIELD_LEN || value.contains(['\n', '\r']) {
                    return Err(Error::invalid(format!("malformed {field} field")));
                }
            }
        }
        if self.nar_size == 0 {
            return Err(Error::invalid("NarSize must not be 0"));
        }
        let record = PathRecord {
            store_path: store_path.base_name(),
            nar_hash: self.nar_hash,
            nar_size: self.nar_size,
            references,
            deriver,
            system: self.system.map(str::to_string),
            sigs: self.sigs.to_vec(),
            ca: self.ca.filter(|c| !c.is_empty()).map(str::to_string),
            created_at: published_at,
            nar_file: None,
        };
        check_uploader_signature(self.cache, &store_path, &record)?;
        Ok((store_path, record))
    }
}

/// Refuses (403) a path without a valid signature by one of the cache's trusted uploader keys,
/// when the cache requires one. The signature covers Nix's fingerprint of the path (store
/// path, NAR hash and size, references), and each route checks the NAR against that hash and
/// size, so a signed path cannot be published with other contents.
pub fn check_uploader_signature(cache: &CacheRecord, store_path: &StorePath, record: &PathRecord) -> Result<()> {
    if !cache.require_uploader_signature {
        return Ok(());
    }
    // The keys were checked when they were configured: a failure here is damage.
    let keys = TrustedKeys::parse(&cache.trusted_uploader_keys)
        .map_err(|e| Error::internal(format!("trusted uploader keys of cache {}: {e}", cache.name)))?;
    let references = record.references.iter().map(|r| StorePath::from_base_name(r)).collect::<Result<Vec<_>>>()?;
    let fingerprint = fingerprint(&cache.store_dir, store_path, &record.nar_hash, record.nar_size, &references);
    keys.require_signature(&store_path.to_absolute(&cache.store_dir), &fingerprint, &record.sigs).inspect_err(|err| {
        tracing::warn!(cache = %cache.name, store_path = %record.store_path, "upload refused: {}", err.message());
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_core::ErrorKind;

    const A: &str = "0c0ckjhibxyvhrxdb55dp3iwzal15ppw-a";
    const B: &str = "1c0ckjhibxyvhrxdb55dp3iwzal15ppw-b";

    fn cache() -> CacheRecord {
        CacheRecord {
            name: "main".into(),
            signing_key: String::new(),
            is_public: true,
            store_dir: "/nix/store".into(),
            priority: 41,
            upstream_cache_key_names: Vec::new(),
            retention_period: None,
            trusted_uploader_keys: Vec::new(),
            require_uploader_signature: false,
        }
    }

    fn metadata<'a>(cache: &'a CacheRecord, references: &'a [String], sigs: &'a [String]) -> PathMetadata<'a> {
        PathMetadata {
            store_path: A,
            cache,
            nar_hash: Sha256Hash([7; 32]),
            nar_size: 100,
            references,
            deriver: Some("unknown-deriver"),
            system: Some("x86_64-linux"),
            sigs,
            ca: Some(""),
        }
    }

    #[test]
    fn records_are_normalized() {
        let cache = cache();
        let references = [format!("/nix/store/{B}"), A.to_string(), B.to_string()];
        let sigs = ["k:c2ln".to_string()];
        let (path, record) = metadata(&cache, &references, &sigs).into_record(1_800_000_000).unwrap();
        assert_eq!(path.base_name(), A);
        assert_eq!(record.references, [A, B], "full paths become base names, sorted, once each");
        assert_eq!(record.deriver, None);
        assert_eq!(record.ca, None, "an empty CA is no CA");
        assert_eq!(record.system.as_deref(), Some("x86_64-linux"));
    }

    #[test]
    fn bad_fields_are_refused() {
        let cache = cache();
        let none: [String; 0] = [];
        let outside = [format!("/opt/store/{B}")];
        assert_eq!(metadata(&cache, &outside, &none).into_record(1_800_000_000).unwrap_err().kind(), ErrorKind::InvalidInput);
        for sig in ["nocolon", "k:", ":v", "k:a b"] {
            let sigs = [sig.to_string()];
            assert!(metadata(&cache, &none, &sigs).into_record(1_800_000_000).is_err(), "{sig:?}");
        }
        let mut empty = metadata(&cache, &none, &none);
        empty.nar_size = 0;
        assert!(empty.into_record(1_800_000_000).unwrap_err().message().contains("NarSize"));
        let mut newline = metadata(&cache, &none, &none);
        newline.system = Some("x86_64-linux\nStorePath: /nix/store/evil");
        assert!(newline.into_record(1_800_000_000).is_err());
        let mut required = cache.clone();
        required.require_uploader_signature = true;
        required.trusted_uploader_keys = vec!["runner:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()];
        assert_eq!(metadata(&required, &none, &none).into_record(1_800_000_000).unwrap_err().kind(), ErrorKind::Forbidden);
    }
}
