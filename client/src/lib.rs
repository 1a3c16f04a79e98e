//! The runner side of flywheel's chunk API.
//!
//! - [`ApiClient`] talks to a flywheel server: it fetches path manifests, narinfo files and
//!   chunks (one per `GET`, or many per `POST chunks`), and verifies every chunk against its
//!   BLAKE3 name before handing it out.
//! - [`ChunkCache`] is the local chunk cache on the runner's persistent volume: zstd frames as
//!   files, indexed by a sled database, with a byte quota and LRU eviction. Entries are verified on every read, so a
//!   corrupted entry is dropped and fetched again rather than served. The database also keeps
//!   the manifests of paths seen before, so a restarted mount knows them without the server.
//! - [`ChunkStore`] puts the two together: chunks come from the cache when present and from the
//!   server otherwise, concurrent requests for the same chunk share one fetch, and fetched
//!   chunks are cached.
//!
//! The FUSE mount and the local substituter both build on [`ChunkStore`]; [`dump_db`] renders a
//! closure's registration for `nix-store --load-db`.
//!
//! Several processes can share one cache directory: the first to open it owns the sled
//! database and answers the others over a unix socket in the directory (see [`share`]); when
//! the owner exits, another process takes over.
#![warn(missing_docs)]

pub mod api;
pub mod cache;
pub mod dump_db;
pub mod metrics;
pub mod share;
pub mod source;
pub mod store;

pub use api::{ApiClient, ClientConfig, FetchedChunk};
pub use cache::{LocalCacheConfig, CacheStats, ChunkCache};
pub use source::{ChunkSource, MemorySource};
pub use store::ChunkStore;
