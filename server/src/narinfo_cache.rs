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

use bytes::Bytes;
use parking_lot::Mutex;

use crate::clock::SharedClock;
use crate::storage::PathRecord;
use std::sync::Arc;

/// How long an answer is served from memory: the bound on how stale a replica's narinfo, or
/// 404, can be after another replica changed the path. Short, because a Nix client that was
/// told "missing" after a push on another replica waits this long before it sees the path (on
/// top of its own `narinfo-cache-negative-ttl`); long enough that a CI fleet asking for the same
/// narinfos many times a second reads each from storage once per period.
pub const NARINFO_TTL: std::time::Duration = std::time::Duration::from_secs(2);

/// Bytes of rendered narinfos kept, at most (about 8,000 typical narinfos).
const MAX_BYTES: usize = 8 << 20;

/// A narinfo larger than this (a path with thousands of references) is not kept: a few of them
/// would push out thousands of ordinary ones.
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

impl Answer {
    fn cost(&self) -> usize {
        ENTRY_OVERHEAD + if let Answer::Found(text) = self { text.len() } else { 0 }
    }
}

/// A ticket taken before reading storage, so that an answer read before a change on this
/// replica is not kept after it (see [`NarinfoCache::insert`]).
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

/// Narinfo answers by cache and hash part, least recently used first out, bounded in bytes.
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
    by_key: lru::LruCache<(String, String), (u64, Answer)>,
    bytes: usize,
    /// Path records read for NAR downloads and chunk reads, with the time each was read.
    records: lru::LruCache<(String, String), (u64, Arc<PathRecord>)>,
    record_bytes: usize,
}

/// Bytes counted for a kept path record: its strings, and the same overhead as an answer.
fn record_cost(record: &PathRecord) -> usize {
    ENTRY_OVERHEAD
        + record.store_path.len()
        + record.references.iter().chain(&record.sigs).map(|s| s.len() + 24).sum::<usize>()
        + record.deriver.as_ref().map_or(0, String::len)
        + record.system.as_ref().map_or(0, String::len)
        + record.ca.as_ref().map_or(0, String::len)
}

impl NarinfoCache {
    /// An empty cache whose entries age on `clock` (the storage's).
    pub fn new(clock: SharedClock) -> Self {
        NarinfoCache {
            clock,
            entries: Mutex::new(Entries {
                by_key: lru::LruCache::unbounded(),
                bytes: 0,
                records: lru::LruCache::unbounded(),
                record_bytes: 0,
            }),
            generation: AtomicU64::new(0),
        }
    }

    /// The answer kept for `hash_part` in `cache`, if it is younger than [`NARINFO_TTL`].
    pub fn get(&self, cache: &str, hash_part: &str) -> Option<Answer> {
        let now = self.clock.now_ms();
        let mut entries = self.entries.lock();
        let key = (cache.to_string(), hash_part.to_string());
        let (at, answer) = entries.by_key.get(&key)?;
        if now.saturating_sub(*at) < NARINFO_TTL.as_millis() as u64 {
            return Some(answer.clone());
        }
        if let Some((_, old)) = entries.by_key.pop(&key) {
            entries.bytes -= old.cost();
        }
        None
    }

    /// Taken before reading a path from storage, for [`NarinfoCache::insert`].
    pub fn ticket(&self) -> Ticket {
        Ticket(self.generation.load(Ordering::Acquire))
    }

    /// Keeps what storage answered, unless this replica changed a path since `ticket` was taken
    /// (the answer may then describe the path as it was before).
    pub fn insert(&self, cache: &str, hash_part: &str, ticket: Ticket, answer: Answer) {
        if answer.cost() > MAX_ENTRY_BYTES {
            return;
        }
        let now = self.clock.now_ms();
        let mut entries = self.entries.lock();
        // Checked under the lock that `forget` takes too, so no change slips in between.
        if self.generation.load(Ordering::Acquire) != ticket.0 {
            return;
        }
        entries.bytes += answer.cost();
        if let Some((_, old)) = entries.by_key.put((cache.to_string(), hash_part.to_string()), (now, answer)) {
            entries.bytes -= old.cost();
        }
        while entries.bytes > MAX_BYTES {
            let Some((_, (_, old))) = entries.by_key.pop_lru() else { break };
            entries.bytes -= old.cost();
        }
    }

    /// The record of `hash_part` in `cache` as read within [`NARINFO_TTL`], if kept.
    pub fn record(&self, cache: &str, hash_part: &str) -> Option<Arc<PathRecord>> {
        let now = self.clock.now_ms();
        let mut entries = self.entries.lock();
        let key = (cache.to_string(), hash_part.to_string());
        let (at, record) = entries.records.get(&key)?;
        if now.saturating_sub(*at) < NARINFO_TTL.as_millis() as u64 {
            return Some(record.clone());
        }
        if let Some((_, old)) = entries.records.pop(&key) {
            entries.record_bytes -= record_cost(&old);
        }
        None
    }

    /// Keeps a record read from storage, on the terms of [`NarinfoCache::insert`].
    pub fn insert_record(&self, cache: &str, hash_part: &str, ticket: Ticket, record: Arc<PathRecord>) {
        let cost = record_cost(&record);
        if cost > MAX_ENTRY_BYTES {
            return;
        }
        let now = self.clock.now_ms();
        let mut entries = self.entries.lock();
        if self.generation.load(Ordering::Acquire) != ticket.0 {
            return;
        }
        entries.record_bytes += cost;
        if let Some((_, old)) = entries.records.put((cache.to_string(), hash_part.to_string()), (now, record)) {
            entries.record_bytes -= record_cost(&old);
        }
        while entries.record_bytes > MAX_BYTES {
            let Some((_, (_, old))) = entries.records.pop_lru() else { break };
            entries.record_bytes -= record_cost(&old);
        }
    }

    /// Drops what is kept for one path: called when this replica publishes or deletes it.
    pub fn forget(&self, cache: &str, hash_part: &str) {
        let mut entries = self.entries.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        let key = (cache.to_string(), hash_part.to_string());
        if let Some((_, old)) = entries.by_key.pop(&key) {
            entries.bytes -= old.cost();
        }
        if let Some((_, old)) = entries.records.pop(&key) {
            entries.record_bytes -= record_cost(&old);
        }
    }

    /// Drops everything kept for `cache`: its settings (signing key, store dir) changed, or it
    /// was destroyed.
    pub fn forget_cache(&self, cache: &str) {
        let mut entries = self.entries.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        let keys: Vec<(String, String)> = entries.by_key.iter().filter(|((c, _), _)| c == cache).map(|(k, _)| k.clone()).collect();
        for key in keys {
            if let Some((_, old)) = entries.by_key.pop(&key) {
                entries.bytes -= old.cost();
            }
        }
        let keys: Vec<(String, String)> = entries.records.iter().filter(|((c, _), _)| c == cache).map(|(k, _)| k.clone()).collect();
        for key in keys {
            if let Some((_, old)) = entries.records.pop(&key) {
                entries.record_bytes -= record_cost(&old);
            }
        }
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
        assert_eq!(cache.entries.lock().bytes, 0);
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
        assert!(entries.record_bytes <= MAX_BYTES, "{}", entries.record_bytes);
        assert!(entries.records.len() < 100_000);
        assert_eq!(entries.record_bytes, entries.records.iter().map(|(_, (_, r))| record_cost(r)).sum::<usize>());
    }

    #[test]
    fn bytes_stay_bounded() {
        let cache = NarinfoCache::new(crate::clock::SystemClock::shared());
        let text = "x".repeat(4096);
        for i in 0..10_000 {
            cache.insert("main", &i.to_string(), cache.ticket(), found(&text));
        }
        let entries = cache.entries.lock();
        assert!(entries.bytes <= MAX_BYTES, "{}", entries.bytes);
        assert!(entries.by_key.len() < 10_000);
        drop(entries);
        assert_eq!(cache.get("main", "9999"), Some(found(&text)), "the newest stay");
        cache.insert("main", "huge", cache.ticket(), found(&"x".repeat(MAX_ENTRY_BYTES + 1)));
        assert_eq!(cache.get("main", "huge"), None, "an outsized narinfo is not kept");
    }
}
