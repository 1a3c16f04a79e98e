//! Nix's own formats: nixbase32, SHA-256 hashes, store paths, narinfo files, realisations of
//! content-addressed derivations, and the ed25519 keys and signatures of binary caches.
//!
//! Everything here matches what Nix 2.8 reads and writes, so that flywheel can serve a binary
//! cache that an unmodified `nix` client trusts.

pub mod base32;
pub mod cache_info;
pub mod hash;
pub mod narinfo;
pub mod realisation;
pub mod signing;
pub mod store_path;

pub use cache_info::NixCacheInfo;
pub use hash::Sha256Hash;
pub use narinfo::NarInfo;
pub use realisation::{BuildTraceKey, BuildTraceValue, DrvOutputId, Realisation};
pub use signing::{fingerprint, SigningKey, TrustedKeys, VerifyingKey};
pub use store_path::{StorePath, DEFAULT_STORE_DIR};
