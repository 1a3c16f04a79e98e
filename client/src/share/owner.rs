//! The owning process's side of a shared cache: it holds the database and answers the other
//! processes on the socket, one thread per connection.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use flywheel_core::Result;

use super::protocol::{read_message, write_message, Reply, Request};
use super::SOCKET_NAME;
use crate::cache::{LocalCache, LocalCacheConfig};

/// The database, held by this process, and the socket it answers on.
pub(super) struct Owner {
    pub(super) cache: Arc<LocalCache>,
    socket: PathBuf,
}

impl Drop for Owner {
    fn drop(&mut self) {
        // The accept loop holds only a weak reference and stops once the cache is gone.
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Opens the database as its owner and starts answering clients on the socket.
pub(super) fn open_owner(config: &LocalCacheConfig) -> Result<Owner> {
    let cache = Arc::new(LocalCache::open(config)?);
    let socket = config.dir.join(SOCKET_NAME);
    // A socket file left by an owner that died; we hold the lock, so it is stale.
    let _ = std::fs::remove_file(&socket);
    // Sharing is a bonus: an owner that cannot listen (a full disk, say) still serves itself.
    let listening = UnixListener::bind(&socket).and_then(|listener| {
        listener.set_nonblocking(true)?;
        let weak = Arc::downgrade(&cache);
        std::thread::Builder::new().name("cache-share".into()).spawn(move || accept_loop(listener, weak))?;
        Ok(())
    });
    if let Err(err) = listening {
        tracing::warn!(socket = %socket.display(), "cannot listen for processes sharing the cache; others cannot open it while this one runs: {err}");
    }
    Ok(Owner { cache, socket })
}

fn accept_loop(listener: UnixListener, cache: Weak<LocalCache>) {
    loop {
        if cache.strong_count() == 0 {
            return;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let cache = cache.clone();
                let _ = stream.set_nonblocking(false);
                let _ = std::thread::Builder::new().name("cache-share-conn".into()).spawn(move || serve_conn(stream, cache));
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
            Err(err) => {
                tracing::debug!("accepting a cache client failed: {err}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Answers one client's requests until it hangs up or the cache is closed.
fn serve_conn(mut stream: UnixStream, cache: Weak<LocalCache>) {
    loop {
        let Ok((op, body)) = read_message(&mut stream) else { return };
        let Some(cache) = cache.upgrade() else { return };
        let (status, reply) = answer_message(&cache, op, &body).encode();
        drop(cache);
        if write_message(&mut stream, status, &reply).is_err() {
            return;
        }
    }
}

/// The reply to one message; a message that does not parse changes nothing.
pub(super) fn answer_message(cache: &LocalCache, op: u8, body: &[u8]) -> Reply {
    match Request::decode(op, body) {
        Ok(request) => answer(cache, request),
        Err(_) => Reply::malformed(),
    }
}

fn answer(cache: &LocalCache, request: Request) -> Reply {
    match request {
        // Verified by the owner; the client checks the hash again.
        Request::Get(chunk) => Reply::Chunk(cache.get(&chunk)),
        Request::Insert(hash, frame) => {
            cache.insert(&hash, frame);
            Reply::Done
        }
        Request::InsertMany(frames) => {
            cache.insert_many(&frames);
            Reply::Done
        }
        Request::Contains(hash) => Reply::Present(cache.contains(&hash)),
        Request::GetManifest(hash_part) => Reply::Manifest(cache.get_manifest(&hash_part)),
        Request::PutManifest(hash_part, manifest) => {
            cache.put_manifest(&hash_part, &manifest);
            Reply::Done
        }
        Request::ManifestHashes => Reply::ManifestHashes(cache.manifest_hashes()),
        Request::Usage => Reply::Usage { quota: cache.quota(), used: cache.used_bytes() },
        Request::Stats => Reply::Stats(cache.stats()),
        Request::Flush => match cache.flush() {
            Ok(()) => Reply::Done,
            Err(err) => Reply::Failed(err.to_string()),
        },
    }
}
