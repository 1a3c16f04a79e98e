use std::str::FromStr;

use crate::error::{Error, Result};

/// The BLAKE3 hash of a chunk's uncompressed bytes: its name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// Hashes chunk contents.
    pub fn of(data: &[u8]) -> Self {
        ChunkHash(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for ChunkHash {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let mut bytes = [0u8; 32];
        if s.len() != 64 || hex::decode_to_slice(s, &mut bytes).is_err() || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(Error::invalid(format!("invalid chunk hash {s:?}: expected 64 lower-case hex digits")));
        }
        Ok(ChunkHash(bytes))
    }
}

crate::text_form::text_form!(ChunkHash, to_hex);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_roundtrip_and_rejects() {
        let hash = ChunkHash::of(b"abc");
        // BLAKE3("abc") from the reference test vectors.
        assert_eq!(hash.to_hex(), "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85");
        assert_eq!(hash.to_hex().parse::<ChunkHash>().unwrap(), hash);
        assert!("abc".parse::<ChunkHash>().is_err());
        assert!(hash.to_hex().to_uppercase().parse::<ChunkHash>().is_err());
        assert!(format!("{}zz", &hash.to_hex()[..62]).parse::<ChunkHash>().is_err());
    }
}
