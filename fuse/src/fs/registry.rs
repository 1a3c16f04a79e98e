//! Store paths appearing in the mount: registered on lookup from the server's manifest, or
//! from the local cache for a listing of the root.

use super::*;

/// The shared outcome of one lookup of a hash part on the server.
#[derive(Default)]
pub(crate) struct Lookup {
    outcome: tokio::sync::OnceCell<std::result::Result<(), (ErrorKind, String)>>,
}

/// A lookup's place in the map of lookups under way. Clones of the entry are made and dropped
/// only under the map's lock, so the last one out sees itself alone and takes the entry away,
/// whether its lookup finished, failed or was cancelled: the next lookup asks again.
struct LookupTurn<'a> {
    map: &'a Mutex<HashMap<String, Arc<Lookup>>>,
    key: &'a str,
    lookup: Option<Arc<Lookup>>,
}

impl<'a> LookupTurn<'a> {
    fn join(map: &'a Mutex<HashMap<String, Arc<Lookup>>>, key: &'a str) -> Self {
        let lookup = map.lock().entry(key.to_string()).or_default().clone();
        LookupTurn { map, key, lookup: Some(lookup) }
    }
}

impl std::ops::Deref for LookupTurn<'_> {
    type Target = Lookup;

    fn deref(&self) -> &Lookup {
        self.lookup.as_deref().expect("a turn holds its lookup until dropped")
    }
}

impl Drop for LookupTurn<'_> {
    fn drop(&mut self) {
        let mut map = self.map.lock();
        drop(self.lookup.take());
        if map.get(self.key).is_some_and(|entry| Arc::strong_count(entry) == 1) {
            map.remove(self.key);
        }
    }
}

impl Inner {
    pub(super) fn registered(&self, hash_part: &str) -> Option<(usize, Arc<PathTree>)> {
        let index = *self.by_hash.read().get(hash_part)?;
        Some((index, self.paths.read()[index].clone()))
    }

    /// Makes a path known to the mount; idempotent.
    pub(super) fn register(&self, hash_part: &str, base_name: String, manifest: &flywheel_core::api::v1::chunks::PathManifest) -> (usize, Arc<PathTree>) {
        let mut by_hash = self.by_hash.write();
        if let Some(&index) = by_hash.get(hash_part) {
            return (index, self.paths.read()[index].clone());
        }
        let tree = PathTree::build(base_name, manifest);
        let mut paths = self.paths.write();
        paths.push(tree.clone());
        by_hash.insert(hash_part.to_string(), paths.len() - 1);
        self.root_changed();
        (paths.len() - 1, tree)
    }

    /// Drops the kernel's cached listing and attributes of the root after a path appeared.
    /// Sent from the blocking pool: the kernel may hold the root while it waits for the lookup
    /// that registered the path.
    pub(super) fn root_changed(&self) {
        if let Some(notifier) = self.notifier.get().cloned() {
            self.runtime.spawn_blocking(move || {
                if let Err(err) = notifier.inval_inode(INodeNo::ROOT, 0, 0) {
                    debug!("invalidating the root's listing failed: {err}");
                }
            });
        }
    }

    /// Finds a store path by base name: already registered, in the local cache, or on the
    /// server. `NotFound` when the server does not have it (or has it under another name).
    pub(super) async fn resolve(&self, base_name: &str) -> Result<(usize, Arc<PathTree>)> {
        let path = StorePath::from_base_name(base_name)?;
        let hash_part = path.hash_part();
        if let Some(found) = self.registered_as(&hash_part, base_name) {
            return found;
        }
        // Keyed by the whole name: a lookup under another name of the hash part (not found,
        // unless it is the served one) must not share this one's outcome.
        let lookup = LookupTurn::join(&self.resolving, base_name);
        let outcome = lookup
            .outcome
            .get_or_init(|| async {
                match self.registered_as(&hash_part, base_name) {
                    Some(found) => found.map(|_| ()),
                    None => self.fetch_and_register(&hash_part, base_name).await.map(|_| ()),
                }
                .map_err(|err| (err.kind(), err.message().to_string()))
            })
            .await
            .clone();
        drop(lookup);
        match outcome {
            Ok(()) => self.registered_as(&hash_part, base_name).unwrap_or_else(|| Err(Error::not_found(base_name))),
            Err((kind, message)) => Err(Error::new(kind, message)),
        }
    }

    /// The registered path of `hash_part`, when there is one: found if its name is
    /// `base_name`, else not found.
    fn registered_as(&self, hash_part: &str, base_name: &str) -> Option<Result<(usize, Arc<PathTree>)>> {
        let (index, tree) = self.registered(hash_part)?;
        Some(if tree.base_name == base_name { Ok((index, tree)) } else { Err(Error::not_found(base_name)) })
    }

    /// Registers `base_name` from the manifest the local cache holds, or else the server's.
    async fn fetch_and_register(&self, hash_part: &str, base_name: &str) -> Result<(usize, Arc<PathTree>)> {
        let manifest = match self.store.cache().get_manifest(hash_part) {
            Some(manifest) => manifest,
            None => {
                let fetched = tokio::time::timeout(self.config.offline_timeout, self.store.source().manifest(hash_part))
                    .await
                    .map_err(|_| Error::unavailable("the server did not answer within the offline timeout"))??;
                self.store.cache().put_manifest(hash_part, &fetched);
                fetched
            }
        };
        let served_name = manifest.store_path.rsplit('/').next().unwrap_or_default();
        if served_name != base_name {
            return Err(Error::not_found(format!("{base_name} is not in the cache (its hash names {served_name})")));
        }
        Ok(self.register(hash_part, base_name.to_string(), &manifest))
    }

    /// Registers every path whose manifest the local cache holds, for a listing of the root.
    pub(super) fn register_cached(&self) {
        for hash_part in self.store.cache().manifest_hashes() {
            if self.by_hash.read().contains_key(&hash_part) {
                continue;
            }
            if let Some(manifest) = self.store.cache().get_manifest(&hash_part) {
                if let Some(base_name) = manifest.store_path.rsplit('/').next() {
                    self.register(&hash_part, base_name.to_string(), &manifest);
                }
            }
        }
    }
}
