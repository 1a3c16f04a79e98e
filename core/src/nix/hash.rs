//! SHA-256 hashes in the textual forms Nix uses.


use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha256};

use super::base32;
use crate::error::{Error, Result};

/// A SHA-256 digest, the only hash type narinfo files and fingerprints use.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Hash(pub [u8; 32]);

impl Sha256Hash {
    /// Hashes `data`.
    pub fn digest(data: &[u8]) -> Self {
        Sha256Hash(Sha256::digest(data).into())
    }

    /// Parses `sha256:<nixbase32>`, `sha256:<hex>`, `sha256:<base64>` or SRI `sha256-<base64>`.
    ///
    /// The encoding after `sha256:` is told apart by length, as Nix does.
    pub fn parse(s: &str) -> Result<Self> {
        let bytes = if let Some(rest) = s.strip_prefix("sha256:") {
            match rest.len() {
                52 => base32::decode(rest)?,
                64 => hex::decode(rest)
                    .map_err(|e| Error::invalid(format!("invalid hex in hash {s:?}: {e}")))?,
                44 => decode_base64(rest, s)?,
                n => {
                    return Err(Error::invalid(format!(
                        "hash {s:?} has {n} characters after 'sha256:', expected 52 (nixbase32), 64 (hex) or 44 (base64)"
                    )))
                }
            }
        } else if let Some(rest) = s.strip_prefix("sha256-") {
            decode_base64(rest, s)?
        } else {
            return Err(Error::invalid(format!(
                "hash {s:?} must start with 'sha256:' or 'sha256-'"
            )));
        };
        let arr: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            Error::invalid(format!("hash {s:?} decodes to {} bytes, expected 32", b.len()))
        })?;
        Ok(Sha256Hash(arr))
    }

    /// `sha256:` followed by nixbase32, the form narinfo files use.
    pub fn to_nix_base32(&self) -> String {
        format!("sha256:{}", self.to_base32_bare())
    }

    /// The 52 nixbase32 characters without a prefix, as in NAR file names.
    pub fn to_base32_bare(&self) -> String {
        base32::encode(&self.0)
    }

    /// 64 lowercase hex digits without a prefix.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

fn decode_base64(b64: &str, whole: &str) -> Result<Vec<u8>> {
    STANDARD
        .decode(b64)
        .map_err(|e| Error::invalid(format!("invalid base64 in hash {whole:?}: {e}")))
}

crate::text_form::text_form!(Sha256Hash, to_nix_base32, parse);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    // sha256("hello"), and its forms as printed by `nix hash to-base32` / `to-sri` of Nix 2.8.
    const HEX: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
    const B32: &str = "094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic";
    const SRI: &str = "sha256-LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=";

    #[test]
    fn all_forms_agree() {
        let h = Sha256Hash::digest(b"hello");
        assert_eq!(h.to_hex(), HEX);
        assert_eq!(h.to_base32_bare(), B32);
        assert_eq!(h.to_nix_base32(), format!("sha256:{B32}"));
        assert_eq!(h.to_string(), format!("sha256:{B32}"));
        assert_eq!(Sha256Hash::parse(&format!("sha256:{B32}")).unwrap(), h);
        assert_eq!(Sha256Hash::parse(&format!("sha256:{HEX}")).unwrap(), h);
        assert_eq!(Sha256Hash::parse(&format!("sha256:{}", &SRI[7..])).unwrap(), h);
        assert_eq!(Sha256Hash::parse(SRI).unwrap(), h);
        assert_eq!(format!("{h:?}"), format!("Sha256Hash(sha256:{B32})"));
    }

    #[test]
    fn serde_uses_nix_form_and_accepts_all() {
        let h = Sha256Hash::digest(b"hello");
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"sha256:{B32}\""));
        for form in [json.clone(), format!("\"{SRI}\""), format!("\"sha256:{HEX}\"")] {
            assert_eq!(serde_json::from_str::<Sha256Hash>(&form).unwrap(), h);
        }
        assert!(serde_json::from_str::<Sha256Hash>("\"md5:abc\"").is_err());
        assert!(serde_json::from_str::<Sha256Hash>("42").is_err());
    }

    #[test]
    fn rejects_bad_hashes() {
        let bad = [
            String::new(),
            B32.to_string(),                               // no prefix
            format!("sha1:{B32}"),                         // other algorithm
            format!("sha256:{}", &B32[1..]),               // 51 chars
            format!("sha256:{}e", &B32[1..]),              // 'e' is not a digit
            format!("sha256:{}", &HEX[..63]),              // 63 hex
            format!("sha256:{}g", &HEX[..63]),             // bad hex
            "sha256-LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmC".to_string(), // truncated base64
            "sha256-aGVsbG8=".to_string(),                 // valid base64, 5 bytes
            "sha256-!!!!".to_string(),
            format!("SHA256:{B32}"),
        ];
        for s in bad {
            let err = Sha256Hash::parse(&s).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{s}");
        }
    }
}
