//! Rendered narinfos, recent 404s, and the records of paths read lately, kept in memory.
//!
//! A published path's record does not change until a delete or a garbage collection, and Nix
//! asks for the same narinfos over and over (every runner, every job). Reading the record from
//! the object store and signing it for each request was most of a narinfo's cost on S3, so a
//! replica keeps what it answered for a short time. The same goes for the records that NAR
//! downloads and chunk reads check: a lazy mount's every miss names its path, and on S3 reading
//! the record again was one GET more in front of the chunk's own.
//!
//! Staleness: what this replica itself publishes or deletes is seen by its next request
//! ([`NarinfoCache::forget`]). A delete, a garbage collection or a publish made through
//! another replica is seen here within [`NARINFO_TTL`] (an answer, 200 or 404, is never served
//! from memory once older than that). A cache's settings changed here (signing key, store
//! dir) drop all its entries; changed elsewhere, they are seen within the same bound.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::clock::SharedClock;
use crate::storage::PathRecord;

/// How long an answer is served from memory: the bound on how stale a replica's narinfo, or
/// 404, can be after another replica changed the path. Short, because a Nix client that was
/// told "missing" after a push on another replica waits this long before it sees the path (on
/// top of its own `narinfo-cache-negative-ttl`); long enough that a CI fleet asking for the same
/// narinfos many times a second reads each from storage once per period.
pub const NARINFO_TTL: std::time::Duration = std::time::Duration::from_secs(2);

/// Bytes of rendered narinfos kept, at most (about 8,000 typical narinfos); path records have
/// a budget of the same size.
const MAX_BYTES: usize = 8 << 20;

/// A narinfo larger than this (a path with thousands of references) is not kept: a few of them
/// would push out thousands of ordinary ones. The same bound holds for a record.
const MAX_ENTRY_BYTES: usize = 64 << 10;

/// Bytes counted for an entry on top of its text: its key and the LRU's bookkeeping.
const ENTRY_OVERHEAD: usize = 128;

/// What a request for one narinfo was answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The signed narinfo.
    Found(Bytes),
    /// 404: the cache does not hold the path.
    Missing,
}

/// Bytes an entry is counted for against [`MAX_BYTES`].
trait Cost {
    fn cost(&self) -> usize;
}

impl Cost for Answer {
    fn cost(&self) -> usize {
        ENTRY_OVERHEAD + if let Answer::Found(text) = self { text.len() } else { 0 }
    }
}

impl Cost for Arc<PathRecord> {
    fn cost(&self) -> usize {
        let optional = [&self.deriver, &self.system, &self.ca].into_iter().flatten().map(String::len).sum::<usize>();
        // A string of a list is counted with its own bookkeeping.
        let listed = self.references.iter().chain(&self.sigs).map(|s| s.len() + 24).sum::<usize>();
        ENTRY_OVERHEAD + self.store_path.len() + optional + listed
    }
}

/// A ticket taken before reading storage, so that an answer read before a change on this
/// replica is not kept after it (see [`NarinfoCache::insert`]).
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

/// Narinfo answers and path records by cache and hash part, least recently used first out,
/// bounded in bytes.
#[derive(Debug)]
pub struct NarinfoCache {
    clock: SharedClock,
    entries: Mutex<Entries>,
    /// Bumped by every change on this replica: an answer read from storage under an older
    /// generation may predate the change and is not kept.
    generation: AtomicU64,
}

#[derive(Debug)]
struct Entries {
    answers: Kept<Answer>,
    /// Path records read for NAR downloads, manifests and chunk reads.
    records: Kept<Arc<PathRecord>>,
}

/// Entries by (cache, hash part), each with the time it was read from storage.
#[derive(Debug)]
struct Kept<V> {
    by_key: lru::LruCache<(String, String), (u64, V)>,
    bytes: usize,
}

impl<V: Cost + Clone> Kept<V> {
    fn new() -> Self {
        Kept { by_key: lru::LruCache::unbounded(), bytes: 0 }
    }

    /// The entry for `key` if it was read less than [`NARINFO_TTL`] before `now`; an older
    /// one is dropped.
    fn fresh(&mut self, key: &(String, String), now: u64) -> Option<V> {
        let (at, value) = self.by_key.get(key)?;
        if now.saturating_sub(*at) < NARINFO_TTL.as_millis() as u64 {
            return Some(value.clone());
        }
        self.remove(key);
        None
    }

    fn put(&mut self, key: (String, String), now: u64, value: V) {
        self.bytes += value.cost();
        if let Some((_, old)) = self.by_key.put(key, (now, value)) {
            self.bytes -= old.cost();
        }
        while self.bytes > MAX_BYTES {
            let Some((_, (_, old))) = self.by_key.pop_lru() else { break };
            self.bytes -= old.cost();
        }
    }

    fn remove(&mut self, key: &(String, String)) {
        if let Some((_, old)) = self.by_key.pop(key) {
            self.bytes -= old.cost();
        }
    }

    fn remove_cache(&mut self, cache: &str) {
        let keys: Vec<(String, String)> = self.by_key.iter().filter(|((c, _), _)| c == cache).map(|(k, _)| k.clone()).collect();
        for key in keys {
            self.remove(&key);
        }
    }
}

fn key(cache: &str, hash_part: &str) -> (String, String) {
    (cache.to_string(), hash_part.to_string())
}

impl NarinfoCache {
    /// An empty cache whose entries age on `clock` (the storage's).
    pub fn new(clock: SharedClock) -> Self {
        NarinfoCache {
            clock,
            entries: Mutex::new(Entries { answers: Kept::new(), records: Kept::new() }),
            generation: AtomicU64::new(0),
        }
    }

    /// The answer kept for `hash_part` in `cache`, if it is younger than [`NARINFO_TTL`].
    pub fn get(&self, cache: &str, hash_part: &str) -> Option<Answer> {
        let now = self.clock.now_ms();
        self.entries.lock().answers.fresh(&key(cache, hash_part), now)
    }

    /// The record of `hash_part` in `cache` as read within [`NARINFO_TTL`], if kept.
    pub fn record(&self, cache: &str, hash_part: &str) -> Option<Arc<PathRecord>> {
        let now = self.clock.now_ms();
        self.entries.lock().records.fresh(&key(cache, hash_part), now)
    }

    /// Taken before reading a path from storage, for [`NarinfoCache::insert`].
    pub fn ticket(&self) -> Ticket {
        Ticket(self.generation.load(Ordering::Acquire))
    }

    /// Keeps what storage answered, unless this replica changed a path since `ticket` was taken
    /// (the answer may then describe the path as it was before).
    pub fn insert(&self, cache: &str, hash_part: &str, ticket: Ticket, answer: Answer) {
        self.keep(ticket, answer.cost(), |entries, now| entries.answers.put(key(cache, hash_part), now, answer));
    }

    /// Keeps a record read from storage, on the terms of [`NarinfoCache::insert`].
    pub fn insert_record(&self, cache: &str, hash_part: &str, ticket: Ticket, record: Arc<PathRecord>) {
        self.keep(ticket, record.cost(), |entries, now| entries.records.put(key(cache, hash_part), now, record));
    }

    fn keep(&self, ticket: Ticket, cost: usize, put: impl FnOnce(&mut Entries, u64)) {
        if cost > MAX_ENTRY_BYTES {
            return;
        }
        let now = self.clock.now_ms();
        let mut entries = self.entries.lock();
        // Checked under the lock that `forget` takes too, so no change slips in between.
        if self.generation.load(Ordering::Acquire) != ticket.0 {
            return;
        }
        put(&mut entries, now);
    }

    /// Drops what is kept for one path: called when this replica publishes or deletes it.
    pub fn forget(&self, cache: &str, hash_part: &str) {
        let mut entries = self.entries.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        let key = key(cache, hash_part);
        entries.answers.remove(&key);
        entries.records.remove(&key);
    }

    /// Drops everything kept for `cache`: its settings (signing key, store dir) changed, or it
    /// was destroyed.
    pub fn forget_cache(&self, cache: &str) {
        let mut entries = self.entries.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.answers.remove_cache(cache);
        entries.records.remove_cache(cache);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn found(text: &str) -> Answer {
        Answer::Found(Bytes::copy_from_slice(text.as_bytes()))
    }

    #[test]
    fn answers_expire_after_the_ttl() {
        let clock = ManualClock::starting_now();
        let cache = NarinfoCache::new(clock.clone());
        cache.insert("main", "a", cache.ticket(), found("StorePath: a"));
        cache.insert("main", "b", cache.ticket(), Answer::Missing);
        assert_eq!(cache.get("main", "a"), Some(found("StorePath: a")));
        assert_eq!(cache.get("main", "b"), Some(Answer::Missing));
        assert_eq!(cache.get("other", "a"), None, "entries are per cache");
        clock.advance(NARINFO_TTL);
        assert_eq!(cache.get("main", "a"), None, "a 200 older than the TTL is read again");
        assert_eq!(cache.get("main", "b"), None, "so is a 404");
        assert_eq!(cache.entries.lock().answers.bytes, 0);
    }

    #[test]
    fn changes_here_are_seen_at_once() {
        let cache = NarinfoCache::new(ManualClock::starting_now());
        cache.insert("main", "a", cache.ticket(), Answer::Missing);
        cache.forget("main", "a");
        assert_eq!(cache.get("main", "a"), None, "a publish here ends the 404");

        // A read of storage that began before a change here must not be kept after it.
        let before = cache.ticket();
        cache.forget("main", "a");
        cache.insert("main", "a", before, Answer::Missing);
        assert_eq!(cache.get("main", "a"), None);

        cache.insert("main", "a", cache.ticket(), found("x"));
        cache.insert("other", "a", cache.ticket(), found("y"));
        cache.forget_cache("main");
        assert_eq!(cache.get("main", "a"), None);
        assert_eq!(cache.get("other", "a"), Some(found("y")));
    }

    fn record(name: &str) -> Arc<PathRecord> {
        Arc::new(PathRecord {
            store_path: format!("{}-{name}", "a".repeat(32)),
            nar_hash: flywheel_core::nix::Sha256Hash::digest(name.as_bytes()),
            nar_size: 1,
            references: vec!["r".repeat(40); 4],
            deriver: None,
            system: None,
            sigs: Vec::new(),
            ca: None,
            created_at: 0,
            nar_file: None,
        })
    }

    #[test]
    fn records_expire_follow_changes_here_and_stay_bounded() {
        let clock = ManualClock::starting_now();
        let cache = NarinfoCache::new(clock.clone());
        cache.insert_record("main", "a", cache.ticket(), record("one"));
        assert_eq!(cache.record("main", "a").map(|r| r.store_path.clone()), Some(record("one").store_path.clone()));
        assert!(cache.record("other", "a").is_none(), "records are per cache");
        clock.advance(NARINFO_TTL);
        assert!(cache.record("main", "a").is_none(), "a record older than the TTL is read again");

        // A delete here drops it at once; a read that began before the delete is not kept.
        cache.insert_record("main", "a", cache.ticket(), record("one"));
        let before = cache.ticket();
        cache.forget("main", "a");
        assert!(cache.record("main", "a").is_none());
        cache.insert_record("main", "a", before, record("one"));
        assert!(cache.record("main", "a").is_none());
        cache.insert_record("main", "b", cache.ticket(), record("two"));
        cache.forget_cache("main");
        assert!(cache.record("main", "b").is_none());

        for i in 0..100_000 {
            cache.insert_record("main", &i.to_string(), cache.ticket(), record("many"));
        }
        let entries = cache.entries.lock();
        assert!(entries.records.bytes <= MAX_BYTES, "{}", entries.records.bytes);
        assert!(entries.records.by_key.len() < 100_000);
        assert_eq!(entries.records.bytes, entries.records.by_key.iter().map(|(_, (_, r))| r.cost()).sum::<usize>());
    }

    #[test]
    fn bytes_stay_bounded() {
        let cache = NarinfoCache::new(crate::clock::SystemClock::shared());
        let text = "x".repeat(4096);
        for i in 0..10_000 {
            cache.insert("main", &i.to_string(), cache.ticket(), found(&text));
        }
        let entries = cache.entries.lock();
        assert!(entries.answers.bytes <= MAX_BYTES, "{}", entries.answers.bytes);
        assert!(entries.answers.by_key.len() < 10_000);
        drop(entries);
        assert_eq!(cache.get("main", "9999"), Some(found(&text)), "the newest stay");
        cache.insert("main", "huge", cache.ticket(), found(&"x".repeat(MAX_ENTRY_BYTES + 1)));
        assert_eq!(cache.get("main", "huge"), None, "an outsized narinfo is not kept");
    }
}
