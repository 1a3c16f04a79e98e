//! OpenTofu and Terraform state, kept in the object store beside the Nix caches: one state per
//! stack, the versions it had, and a lock that holds across replicas.
//!
//! Layout (keys relative to the store's root, beside `chunks/` and `caches/`):
//! - `tfstate/{project}/{stack}/current`: the state as its last writer sent it;
//! - `tfstate/{project}/{stack}/versions/{version}`: each state written, kept until
//!   `keep-versions` newer ones exist; a version is `{ms since the epoch, 13 digits}-{8 hex}`,
//!   so that names sort by time and two writers in one millisecond differ;
//! - `tfstate/{project}/{stack}/lock`: the holder's LockInfo JSON, as the client sent it;
//! - `tfstate/{project}/{stack}/lock-claims/{claim}`: the same, on stores that ignore
//!   conditional writes (below); `claim` is named like a version.
//!
//! A write stores its version first and the current state second: a crash between the two
//! leaves a version that was never current (listed, harmless), never a current state without
//! its version.
//!
//! The lock is created with a conditional put (`PutMode::Create`: `If-None-Match: *` on S3,
//! a no-clobber link on a local directory), so of several replicas racing for one stack
//! exactly one wins. Unlocking reads the lock, compares the holder's ID and deletes it: object
//! stores have no conditional delete, but only the holder (or a forced unlock) deletes a lock,
//! and nobody else can create one meanwhile.
//!
//! Some S3 servers accept `If-None-Match: *` and ignore it, or check it apart from the write
//! (`s3s-fs` checks that the object exists, then writes), so that two replicas could both
//! win. With `locking = "auto"` (the default), the first lock request of a process probes the
//! store: it creates one object twice, conditionally, and where the second create is not
//! refused, locks use claims instead. A check that is not atomic passes that probe, so such a
//! store needs `locking = "claims"`. Claims need only that a listing shows every write that
//! finished before it (as S3 promises since 2020): a contender writes its claim, then lists
//! the stack's claims, and holds the lock only if its own is the only one. Two contenders
//! that both held it would each have listed before the other's claim was written, which their
//! own order of write-then-list rules out. A contender that sees an older claim withdraws its
//! own; one that sees only newer claims waits a moment for them to withdraw, and a claim that
//! stays is a holder's.
//!
//! State may hold secrets, so nothing here logs a state's content, nor a lock's.

use bytes::Bytes;
use flywheel_core::{Error, Result};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::config::StateLocking;
use crate::storage::Storage;

/// Longest lock description accepted (Terraform's LockInfo is a few hundred bytes).
pub const MAX_LOCK_INFO: usize = 64 * 1024;

/// Longest project or stack name.
const MAX_NAME_LEN: usize = 128;

/// Where the stacks live in the object store.
const ROOT: &str = "tfstate";

/// One stack's state: `{project}/{stack}`, each a name of letters, digits, `-`, `_` and `.`
/// (not starting with a dot), so that a name is always one object-store path segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StackId {
    project: String,
    stack: String,
}

impl StackId {
    /// Checks both names.
    pub fn new(project: &str, stack: &str) -> Result<Self> {
        for (what, name) in [("project", project), ("stack", stack)] {
            let ok = !name.is_empty()
                && name.len() <= MAX_NAME_LEN
                && !name.starts_with('.')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                return Err(Error::invalid(format!(
                    "invalid {what} name {name:?}: 1 to {MAX_NAME_LEN} letters, digits, '-', '_' and '.', not starting with '.'"
                )));
            }
        }
        Ok(StackId { project: project.to_string(), stack: stack.to_string() })
    }

    /// Parses `project/stack`.
    pub fn parse(text: &str) -> Result<Self> {
        let (project, stack) =
            text.split_once('/').ok_or_else(|| Error::invalid(format!("{text:?} is not of the form project/stack")))?;
        Self::new(project, stack)
    }

    /// The project's name.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// The stack's name.
    pub fn stack(&self) -> &str {
        &self.stack
    }

    fn prefix(&self) -> String {
        format!("{ROOT}/{}/{}", self.project, self.stack)
    }

    fn current_key(&self) -> Path {
        Path::from(format!("{}/current", self.prefix()))
    }

    fn lock_key(&self) -> Path {
        Path::from(format!("{}/lock", self.prefix()))
    }

    fn claims_prefix(&self) -> Path {
        Path::from(format!("{}/lock-claims", self.prefix()))
    }

    fn claim_key(&self, claim: &str) -> Path {
        Path::from(format!("{}/lock-claims/{claim}", self.prefix()))
    }

    fn versions_prefix(&self) -> Path {
        Path::from(format!("{}/versions", self.prefix()))
    }

    fn version_key(&self, version: &str) -> Path {
        Path::from(format!("{}/versions/{version}", self.prefix()))
    }
}

impl std::fmt::Display for StackId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.project, self.stack)
    }
}

/// A version's name: 13 digits of milliseconds, `-`, 8 lowercase hex digits.
pub fn validate_version(version: &str) -> Result<()> {
    let ok = version.len() == 22
        && version.as_bytes()[13] == b'-'
        && version[..13].bytes().all(|b| b.is_ascii_digit())
        && version[14..].bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !ok {
        return Err(Error::invalid(format!("invalid state version {version:?}")));
    }
    Ok(())
}

/// A stored version of a stack's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateVersion {
    /// Its name, which sorts by time.
    pub version: String,
    /// Bytes.
    pub size: u64,
    /// When it was written, milliseconds since the epoch.
    pub written_ms: u64,
}

/// The part of a lock description this server reads: who holds it. The rest is kept as the
/// client sent it and handed back to whoever finds the stack locked.
#[derive(Deserialize)]
struct LockHolder {
    #[serde(rename = "ID")]
    id: String,
}

/// Reads the holder's ID from a lock description (Terraform's and OpenTofu's LockInfo JSON).
pub fn lock_id_of(info: &[u8]) -> Result<String> {
    if info.len() > MAX_LOCK_INFO {
        return Err(Error::invalid(format!("the lock description is larger than {MAX_LOCK_INFO} bytes")));
    }
    let holder: LockHolder = serde_json::from_slice(info)
        .map_err(|e| Error::invalid(format!("the lock description is not LockInfo JSON with an \"ID\": {e}")))?;
    if holder.id.is_empty() || holder.id.len() > 256 {
        return Err(Error::invalid("the lock description's ID must be 1 to 256 bytes"));
    }
    Ok(holder.id)
}

/// How a lock request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockOutcome {
    /// The caller holds the lock now.
    Acquired,
    /// Someone else does: their lock description.
    Held(Bytes),
}

/// How an unlock request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnlockOutcome {
    /// The lock is gone.
    Released,
    /// There was no lock.
    NotLocked,
    /// The lock is someone else's: their lock description.
    HeldByOther(Bytes),
}

/// How a write (or a delete, or a rollback) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Done; for a write, the version it stored.
    Done(Option<String>),
    /// The stack is locked by someone the request did not name: their lock description.
    Locked(Bytes),
    /// The request named a lock that is not held (it was broken, or never taken).
    LockNotHeld,
}

/// The stacks' states over the server's object store.
#[derive(Clone)]
pub struct StateStore {
    storage: Storage,
    keep_versions: usize,
    /// The time part of the last version this process named: each new one is later, so that
    /// two writes within a millisecond still sort in the order they were made.
    last_version_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// How locks are made exclusive on this store, once probed.
    lock_mode: std::sync::Arc<tokio::sync::OnceCell<LockMode>>,
    /// Writes of each stack since its versions were last pruned (see `prune_due`), for the
    /// stacks written lately.
    writes_since_prune: std::sync::Arc<parking_lot::Mutex<lru::LruCache<StackId, u32>>>,
}

/// Stacks whose count of writes since the last prune is kept; a stack pushed out starts
/// counting again, which only delays its next prune.
const PRUNE_COUNTERS: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(4096) {
    Some(n) => n,
    None => unreachable!(),
};

/// How a store makes a lock exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// The store refuses to create an object that exists: one `lock` object.
    Conditional,
    /// The store overwrites anyway: claim objects and a listing.
    Claims,
}

/// Rounds a contender whose claim is the oldest waits for newer claims to be withdrawn
/// before it takes them for a holder's.
const CLAIM_ROUNDS: usize = 20;

/// Pause between those rounds: a contender withdraws within one listing and one delete.
const CLAIM_PAUSE: std::time::Duration = std::time::Duration::from_millis(25);

impl StateStore {
    /// Over `storage`, keeping the `keep_versions` newest versions of each stack (at least 1).
    pub fn new(storage: Storage, keep_versions: usize) -> Self {
        StateStore {
            storage,
            keep_versions: keep_versions.max(1),
            last_version_ms: Default::default(),
            lock_mode: Default::default(),
            writes_since_prune: std::sync::Arc::new(parking_lot::Mutex::new(lru::LruCache::new(PRUNE_COUNTERS))),
        }
    }

    /// Over `storage`, as `[tfstate]` configures it.
    pub fn for_config(storage: Storage, config: &crate::config::TfStateConfig) -> Self {
        let states = StateStore::new(storage, config.keep_versions);
        match config.locking {
            StateLocking::Auto => states,
            StateLocking::Conditional => states.with_lock_mode(LockMode::Conditional),
            StateLocking::Claims => states.with_lock_mode(LockMode::Claims),
        }
    }

    /// The same, with the lock mode fixed instead of probed.
    pub fn with_lock_mode(self, mode: LockMode) -> Self {
        StateStore { lock_mode: std::sync::Arc::new(tokio::sync::OnceCell::new_with(Some(mode))), ..self }
    }

    /// How locks are made exclusive here, probed on first use: an object created twice with
    /// `PutMode::Create`, whose second create must fail.
    pub async fn lock_mode(&self) -> Result<LockMode> {
        self.lock_mode
            .get_or_try_init(|| async {
                let probe = Path::from(format!("{ROOT}/.probe/{:016x}", rand::random::<u64>()));
                let create = || {
                    let options = PutOptions { mode: PutMode::Create, ..Default::default() };
                    self.store().put_opts(&probe, PutPayload::from_static(b"probe"), options)
                };
                let mode = match create().await {
                    Err(object_store::Error::NotImplemented { .. }) => LockMode::Claims,
                    Err(err) => return Err(Error::unavailable(format!("storage failed probing conditional writes: {err}"))),
                    Ok(_) => match create().await {
                        Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                            LockMode::Conditional
                        }
                        Ok(_) => LockMode::Claims,
                        Err(err) => {
                            return Err(Error::unavailable(format!("storage failed probing conditional writes: {err}")))
                        }
                    },
                };
                self.storage.delete_object(&probe).await?;
                match mode {
                    LockMode::Conditional => tracing::info!("state locks use conditional creates"),
                    LockMode::Claims => {
                        tracing::info!("the object store does not refuse a conditional create of an existing object; state locks use claims")
                    }
                }
                Ok(mode)
            })
            .await
            .copied()
    }

    fn store(&self) -> &std::sync::Arc<dyn ObjectStore> {
        self.storage.object_store()
    }

    async fn read(&self, key: &Path) -> Result<Option<Bytes>> {
        self.storage.get_object(key).await
    }

    /// The current state, if the stack has one.
    pub async fn get(&self, stack: &StackId) -> Result<Option<Bytes>> {
        self.read(&stack.current_key()).await
    }

    /// The lock description of the stack's holder, if it is locked.
    pub async fn lock_info(&self, stack: &StackId) -> Result<Option<Bytes>> {
        match self.lock_mode().await? {
            LockMode::Conditional => self.read(&stack.lock_key()).await,
            LockMode::Claims => {
                // A claim withdrawn between the listing and the read: list again.
                for _ in 0..4 {
                    let Some(oldest) = self.claims(stack).await?.into_iter().next() else { return Ok(None) };
                    if let Some(info) = self.read(&stack.claim_key(&oldest)).await? {
                        return Ok(Some(info));
                    }
                }
                Err(Error::unavailable(format!("the lock of {stack} kept changing hands; try again")))
            }
        }
    }

    /// The names of the stack's lock claims, oldest first.
    async fn claims(&self, stack: &StackId) -> Result<Vec<String>> {
        let mut claims: Vec<String> = self
            .storage
            .list_objects(stack.claims_prefix().as_ref())
            .await?
            .into_iter()
            .filter_map(|meta| Some(meta.location.filename()?.to_string()))
            .filter(|name| validate_version(name).is_ok())
            .collect();
        claims.sort();
        Ok(claims)
    }

    /// Whether a change by a caller naming `lock_id` may go ahead.
    async fn check_lock(&self, stack: &StackId, lock_id: Option<&str>) -> Result<Option<WriteOutcome>> {
        // Every lock description there is: one, or with claims, the holder's and those of
        // contenders about to withdraw. The named holder may write if its own is among them.
        let held: Vec<Bytes> = match self.lock_mode().await? {
            LockMode::Conditional => self.read(&stack.lock_key()).await?.into_iter().collect(),
            LockMode::Claims => {
                let mut held = Vec::new();
                for claim in self.claims(stack).await? {
                    held.extend(self.read(&stack.claim_key(&claim)).await?);
                }
                held
            }
        };
        let Some(first) = held.first().cloned() else {
            return Ok(lock_id.map(|_| WriteOutcome::LockNotHeld));
        };
        // An unreadable lock is still a lock: nobody's ID matches it until it is broken.
        let named_holds = lock_id.is_some_and(|id| held.iter().any(|info| lock_id_of(info).ok().as_deref() == Some(id)));
        Ok((!named_holds).then_some(WriteOutcome::Locked(first)))
    }

    /// Stores `state` as the stack's current state and as a new version, if the lock allows.
    pub async fn write(&self, stack: &StackId, lock_id: Option<&str>, state: Bytes) -> Result<WriteOutcome> {
        if let Some(refused) = self.check_lock(stack, lock_id).await? {
            return Ok(refused);
        }
        let version = format!("{:013}-{:08x}", self.next_version_ms(), rand::random::<u32>());
        let put = |key: Path, bytes: Bytes| async move {
            self.store().put(&key, PutPayload::from(bytes)).await.map_err(|e| {
                Error::unavailable(format!("storage failed writing the state of {stack}: {e}"))
            })
        };
        // Both at once: whichever a crash leaves out, the state before this write is a stored
        // version already, so nothing that was current is ever lost.
        futures::try_join!(put(stack.version_key(&version), state.clone()), put(stack.current_key(), state))?;
        if self.prune_due(stack) {
            self.prune(stack).await?;
        }
        Ok(WriteOutcome::Done(Some(version)))
    }

    /// Whether this write should prune the stack's versions: every `keep_versions / 4`-th write
    /// of a stack in this process (every write for small `keep_versions`), since a prune lists
    /// the versions, which costs a state write more than its two PUTs. A stack thus holds at
    /// most `keep_versions / 4` versions (per replica writing it) beyond `keep_versions`.
    fn prune_due(&self, stack: &StackId) -> bool {
        let every = (self.keep_versions / 4).max(1) as u32;
        let mut writes = self.writes_since_prune.lock();
        let count = writes.get_or_insert_mut(stack.clone(), || 0);
        *count += 1;
        if *count >= every {
            *count = 0;
            true
        } else {
            false
        }
    }

    fn next_version_ms(&self) -> u64 {
        let now = self.storage.clock().now_ms();
        let previous = self
            .last_version_ms
            .fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |last| Some(now.max(last + 1)))
            .unwrap_or(now);
        now.max(previous + 1)
    }

    /// Deletes the current state, if the lock allows. Its versions stay (until newer writes
    /// push them out), so that a deletion can be rolled back.
    pub async fn delete(&self, stack: &StackId, lock_id: Option<&str>) -> Result<WriteOutcome> {
        if let Some(refused) = self.check_lock(stack, lock_id).await? {
            return Ok(refused);
        }
        self.storage.delete_object(&stack.current_key()).await?;
        Ok(WriteOutcome::Done(None))
    }

    /// Writes an earlier version again as the current state (itself a new version), if the
    /// lock allows; `Ok(None)` if there is no such version.
    pub async fn rollback(&self, stack: &StackId, version: &str, lock_id: Option<&str>) -> Result<Option<WriteOutcome>> {
        let Some(state) = self.version(stack, version).await? else { return Ok(None) };
        self.write(stack, lock_id, state).await.map(Some)
    }

    /// The stored versions, oldest first.
    pub async fn versions(&self, stack: &StackId) -> Result<Vec<StateVersion>> {
        let prefix = stack.versions_prefix().to_string();
        let mut versions: Vec<StateVersion> = self
            .storage
            .list_objects(&prefix)
            .await?
            .into_iter()
            .filter_map(|meta| {
                let version = meta.location.filename()?.to_string();
                validate_version(&version).ok()?;
                Some(StateVersion { version, size: meta.size, written_ms: crate::storage::modified_ms(&meta) })
            })
            .collect();
        versions.sort_by(|a, b| a.version.cmp(&b.version));
        Ok(versions)
    }

    /// One stored version's state.
    pub async fn version(&self, stack: &StackId, version: &str) -> Result<Option<Bytes>> {
        validate_version(version)?;
        self.read(&stack.version_key(version)).await
    }

    /// Deletes the versions beyond the newest `keep_versions`. The current state's own version
    /// is always among the newest, so it is never the one deleted.
    async fn prune(&self, stack: &StackId) -> Result<()> {
        let versions = self.versions(stack).await?;
        let excess = versions.len().saturating_sub(self.keep_versions);
        for old in &versions[..excess] {
            self.storage.delete_object(&stack.version_key(&old.version)).await?;
        }
        Ok(())
    }

    /// Takes the stack's lock for the holder `info` describes (its `ID` is what later writes
    /// and the unlock must name). Taking a lock one already holds succeeds again, as a client
    /// retrying a lock request whose answer it lost would expect.
    pub async fn lock(&self, stack: &StackId, info: Bytes) -> Result<LockOutcome> {
        let id = lock_id_of(&info)?;
        match self.lock_mode().await? {
            LockMode::Conditional => self.lock_conditionally(stack, &id, info).await,
            LockMode::Claims => self.lock_by_claim(stack, &id, info).await,
        }
    }

    async fn lock_conditionally(&self, stack: &StackId, id: &str, info: Bytes) -> Result<LockOutcome> {
        // A lock released between our failed create and our read is retried; a few rounds
        // only, since each round means another holder came and went.
        for _ in 0..4 {
            let options = PutOptions { mode: PutMode::Create, ..Default::default() };
            match self.store().put_opts(&stack.lock_key(), PutPayload::from(info.clone()), options).await {
                Ok(_) => return Ok(LockOutcome::Acquired),
                Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {}
                Err(err) => return Err(Error::unavailable(format!("storage failed locking {stack}: {err}"))),
            }
            match self.read(&stack.lock_key()).await? {
                Some(held) if lock_id_of(&held).ok().as_deref() == Some(id) => return Ok(LockOutcome::Acquired),
                Some(held) => return Ok(LockOutcome::Held(held)),
                None => continue,
            }
        }
        Err(Error::unavailable(format!("the lock of {stack} kept changing hands; try again")))
    }

    async fn lock_by_claim(&self, stack: &StackId, id: &str, info: Bytes) -> Result<LockOutcome> {
        let claim = format!("{:013}-{:08x}", self.storage.clock().now_ms(), rand::random::<u32>());
        let key = stack.claim_key(&claim);
        self.store()
            .put(&key, PutPayload::from(info))
            .await
            .map_err(|e| Error::unavailable(format!("storage failed locking {stack}: {e}")))?;
        let settled = self.settle_claim(stack, id, &claim).await;
        let keep = matches!(settled, Ok((LockOutcome::Acquired, true)));
        if !keep {
            // Lost, failed, or the lock was ours already under another claim.
            if let Err(err) = self.storage.delete_object(&key).await {
                tracing::warn!(%stack, "withdrawing a lock claim: {err}");
            }
        }
        settled.map(|(outcome, _)| outcome)
    }

    /// Decides a claim just written, and whether it stays: acquired when it is alone (it stays,
    /// as the lock) or when the caller holds the lock under another claim (it goes); held by
    /// another when an older claim exists, or newer ones stay past [`CLAIM_ROUNDS`] (holders
    /// whose clocks run behind).
    async fn settle_claim(&self, stack: &StackId, id: &str, claim: &str) -> Result<(LockOutcome, bool)> {
        let changing_hands = || Error::unavailable(format!("the lock of {stack} kept changing hands; try again"));
        for _ in 0..CLAIM_ROUNDS {
            let claims = self.claims(stack).await?;
            let others: Vec<&String> = claims.iter().filter(|c| c.as_str() != claim).collect();
            if others.is_empty() {
                return Ok((LockOutcome::Acquired, true));
            }
            for other in &others {
                let Some(held) = self.read(&stack.claim_key(other)).await? else { continue };
                if lock_id_of(&held).ok().as_deref() == Some(id) {
                    return Ok((LockOutcome::Acquired, false));
                }
                if other.as_str() < claim {
                    return Ok((LockOutcome::Held(held), false));
                }
            }
            tokio::time::sleep(CLAIM_PAUSE).await;
        }
        let other = self.claims(stack).await?.into_iter().find(|c| c != claim).ok_or_else(changing_hands)?;
        let held = self.read(&stack.claim_key(&other)).await?.ok_or_else(changing_hands)?;
        Ok((LockOutcome::Held(held), false))
    }

    /// Releases the lock held by `lock_id`; with `None`, breaks whatever lock is held (what
    /// `force-unlock` and an operator do).
    pub async fn unlock(&self, stack: &StackId, lock_id: Option<&str>) -> Result<UnlockOutcome> {
        match self.lock_mode().await? {
            LockMode::Conditional => {
                let Some(held) = self.read(&stack.lock_key()).await? else { return Ok(UnlockOutcome::NotLocked) };
                if let Some(id) = lock_id {
                    if lock_id_of(&held).ok().as_deref() != Some(id) {
                        return Ok(UnlockOutcome::HeldByOther(held));
                    }
                }
                self.storage.delete_object(&stack.lock_key()).await?;
                Ok(UnlockOutcome::Released)
            }
            LockMode::Claims => {
                let mut released = false;
                let mut other = None;
                for claim in self.claims(stack).await? {
                    let key = stack.claim_key(&claim);
                    let Some(held) = self.read(&key).await? else { continue };
                    if lock_id.is_none() || lock_id_of(&held).ok().as_deref() == lock_id {
                        self.storage.delete_object(&key).await?;
                        released = true;
                    } else if other.is_none() {
                        other = Some(held);
                    }
                }
                Ok(match (released, other) {
                    (true, _) => UnlockOutcome::Released,
                    (false, Some(held)) => UnlockOutcome::HeldByOther(held),
                    (false, None) => UnlockOutcome::NotLocked,
                })
            }
        }
    }

    /// Every stack that has a state, versions or a lock, sorted.
    pub async fn stacks(&self) -> Result<Vec<StackId>> {
        let mut stacks: Vec<StackId> = self
            .storage
            .list_objects(ROOT)
            .await?
            .into_iter()
            .filter_map(|meta| {
                let mut parts = meta.location.parts();
                parts.next()?;
                let project = parts.next()?;
                let stack = parts.next()?;
                StackId::new(project.as_ref(), stack.as_ref()).ok()
            })
            .collect();
        stacks.sort_by(|a, b| (&a.project, &a.stack).cmp(&(&b.project, &b.stack)));
        stacks.dedup();
        Ok(stacks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn store(keep: usize) -> StateStore {
        StateStore::new(Storage::new(Arc::new(object_store::memory::InMemory::new())), keep)
    }

    fn info(id: &str) -> Bytes {
        Bytes::from(format!(r#"{{"ID":"{id}","Operation":"OperationTypeApply","Who":"ci@runner"}}"#))
    }

    #[test]
    fn names_are_checked() {
        assert!(StackId::new("infra", "prod.eu-1_a").is_ok());
        for (p, s) in [("", "x"), ("a/b", "x"), ("x", ".."), ("x", ".hidden"), ("x", "a b"), ("x", &"s".repeat(129))] {
            assert!(StackId::new(p, s).is_err(), "{p:?}/{s:?}");
        }
        assert_eq!(StackId::parse("infra/prod").unwrap().to_string(), "infra/prod");
        assert!(StackId::parse("infra").is_err());
        assert!(validate_version("0001700000000-0a1b2c3d").is_ok());
        for bad in ["", "../current", "0001700000000-0A1B2C3D", "0001700000000_0a1b2c3d", "1-2"] {
            assert!(validate_version(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn the_probe_finds_conditional_creates_in_memory() {
        assert_eq!(store(1).lock_mode().await.unwrap(), LockMode::Conditional);
    }

    #[tokio::test]
    async fn lock_write_unlock_conditional() {
        lock_write_unlock(store(10).with_lock_mode(LockMode::Conditional)).await;
    }

    #[tokio::test]
    async fn lock_write_unlock_claims() {
        lock_write_unlock(store(10).with_lock_mode(LockMode::Claims)).await;
    }

    /// Many contenders at once, in both modes: one winner each time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn contenders_get_one_winner() {
        for mode in [LockMode::Conditional, LockMode::Claims] {
            let states = store(10).with_lock_mode(mode);
            for round in 0..10 {
                let stack = StackId::new("race", &format!("r{round}")).unwrap();
                let tasks: Vec<_> = (0..8)
                    .map(|i| {
                        let states = states.clone();
                        let stack = stack.clone();
                        tokio::spawn(async move { states.lock(&stack, info(&format!("c{i}"))).await.unwrap() })
                    })
                    .collect();
                let mut winners = 0;
                for task in tasks {
                    if task.await.unwrap() == LockOutcome::Acquired {
                        winners += 1;
                    }
                }
                assert_eq!(winners, 1, "{mode:?} round {round}");
            }
        }
    }

    async fn lock_write_unlock(states: StateStore) {
        let stack = StackId::new("p", "s").unwrap();
        assert_eq!(states.lock(&stack, info("a")).await.unwrap(), LockOutcome::Acquired);
        // The holder may ask again; anyone else is told who holds it.
        assert_eq!(states.lock(&stack, info("a")).await.unwrap(), LockOutcome::Acquired);
        assert_eq!(states.lock(&stack, info("b")).await.unwrap(), LockOutcome::Held(info("a")));
        // Writes must name the holder.
        assert_eq!(states.write(&stack, None, Bytes::from("{}")).await.unwrap(), WriteOutcome::Locked(info("a")));
        assert_eq!(states.write(&stack, Some("b"), Bytes::from("{}")).await.unwrap(), WriteOutcome::Locked(info("a")));
        assert!(matches!(states.write(&stack, Some("a"), Bytes::from("{\"v\":1}")).await.unwrap(), WriteOutcome::Done(Some(_))));
        assert_eq!(states.get(&stack).await.unwrap().unwrap(), Bytes::from("{\"v\":1}"));
        assert_eq!(states.unlock(&stack, Some("b")).await.unwrap(), UnlockOutcome::HeldByOther(info("a")));
        assert_eq!(states.unlock(&stack, Some("a")).await.unwrap(), UnlockOutcome::Released);
        assert_eq!(states.unlock(&stack, Some("a")).await.unwrap(), UnlockOutcome::NotLocked);
        // A write naming a lock nobody holds is refused; one naming none goes ahead.
        assert_eq!(states.write(&stack, Some("a"), Bytes::from("{}")).await.unwrap(), WriteOutcome::LockNotHeld);
        assert!(matches!(states.write(&stack, None, Bytes::from("{}")).await.unwrap(), WriteOutcome::Done(_)));
        // A forced unlock breaks anyone's lock.
        states.lock(&stack, info("c")).await.unwrap();
        assert_eq!(states.unlock(&stack, None).await.unwrap(), UnlockOutcome::Released);
        assert!(states.lock(&stack, Bytes::from("not json")).await.is_err());
    }

    #[tokio::test]
    async fn versions_are_kept_pruned_and_rolled_back() {
        let states = store(3);
        let stack = StackId::new("p", "s").unwrap();
        for i in 0..5 {
            states.write(&stack, None, Bytes::from(format!("{{\"serial\":{i}}}"))).await.unwrap();
        }
        let versions = states.versions(&stack).await.unwrap();
        assert_eq!(versions.len(), 3);
        let oldest = &versions[0].version;
        assert_eq!(states.version(&stack, oldest).await.unwrap().unwrap(), Bytes::from("{\"serial\":2}"));
        states.rollback(&stack, oldest, None).await.unwrap().unwrap();
        assert_eq!(states.get(&stack).await.unwrap().unwrap(), Bytes::from("{\"serial\":2}"));
        assert_eq!(states.versions(&stack).await.unwrap().len(), 3);
        assert!(states.rollback(&stack, "0000000000000-00000000", None).await.unwrap().is_none());
        // Deleting keeps the versions, so the deletion can be undone.
        states.delete(&stack, None).await.unwrap();
        assert!(states.get(&stack).await.unwrap().is_none());
        let newest = states.versions(&stack).await.unwrap().pop().unwrap().version;
        states.rollback(&stack, &newest, None).await.unwrap().unwrap();
        assert_eq!(states.get(&stack).await.unwrap().unwrap(), Bytes::from("{\"serial\":2}"));
        assert_eq!(states.stacks().await.unwrap(), vec![stack]);
    }
}
