//! The runner-side companions of nix-daemon.
//!
//! - [`serve`]: `flywheel substitute`, a local HTTP binary cache that nix-daemon lists first
//!   in `substituters`. It answers narinfo from the server (signatures kept), rebuilds NARs
//!   from the local chunk cache plus the missing chunks only, and answers a miss or an outage
//!   with a fast 404 so Nix moves on to its next substituter. Its cache dir can be shared with
//!   a running `flywheel mount` (see `flywheel_client::share`).
//! - [`push`]: `flywheel push`, which chunks NARs on the client and uploads only the chunks
//!   the server lacks, then commits each path.
//! - [`daemon`]: the post-build hook mode: a push daemon, the hook that hands it built paths
//!   over a unix socket and returns at once, and `flush`.
//! - [`local_store`]: the local Nix store, read through Nix's own tools.
//! - [`lazy`]: `flywheel lazy`, which makes closures valid at once for a lazy mount.
//! - [`status`]: `flywheel status`, the runner's state in one report.
#![warn(missing_docs)]

pub mod daemon;
pub mod lazy;
pub mod local_store;
pub mod push;
pub mod retry;
pub mod serve;
pub mod status;

pub use local_store::LocalStore;
pub use push::{PushConfig, PushReport, Pusher};
pub use serve::{SubstituteConfig, Substituter};
