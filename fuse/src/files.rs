//! Whole files kept decompressed on the runner's disk, for FUSE passthrough: once a file has
//! been read to its end through the mount, it is written out here, and later opens hand the
//! kernel this file, which it then reads directly (page cache, readahead, mmap) without a round
//! trip to the mount. That is what makes hot reads run at the speed of the disk's own files.
//!
//! A file is named `<NAR hash>-<NAR offset>.<BLAKE3 of the contents>`: the first part says
//! which file of which NAR it is, the second is checked the first time this process opens it,
//! so a file damaged on disk is dropped and served through chunks instead. Writes go to a
//! temporary name first, so a crash leaves no partial file under a real name. The directory
//! has a byte budget; the least recently opened files go first.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flywheel_core::nix::Sha256Hash;
use parking_lot::Mutex;

/// Files smaller than this are not worth a backing file: the page cache through FUSE serves
/// them well, and each backing file costs a file descriptor and an inode on disk.
pub(crate) const MIN_FILE_SIZE: u64 = 256 * 1024;

/// The directory of materialized files.
pub(crate) struct MaterializedFiles {
    dir: PathBuf,
    budget: u64,
    state: Mutex<State>,
}

struct State {
    /// Key to (file name, size), least recently opened first.
    lru: lru::LruCache<String, (String, u64)>,
    used: u64,
    /// Keys whose contents this process has checked (or written).
    verified: HashSet<String>,
    /// Keys being written now.
    writing: HashSet<String>,
}

/// Identifies a regular file of a NAR.
pub(crate) fn key(nar_hash: &Sha256Hash, nar_offset: u64) -> String {
    format!("{}-{nar_offset}", nar_hash.to_hex())
}

impl MaterializedFiles {
    /// Opens (creating) `dir`, drops temporary files a crash left, and indexes what is there,
    /// oldest first.
    pub fn open(dir: &Path, budget: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut found: Vec<(std::time::SystemTime, String, String, u64)> = Vec::new();
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else { continue };
            match name.split_once('.') {
                Some((key, hash)) if !name.starts_with('.') && hash.len() == 64 && meta.is_file() => {
                    let when = meta.accessed().or_else(|_| meta.modified()).unwrap_or(std::time::UNIX_EPOCH);
                    found.push((when, key.to_string(), name.clone(), meta.len()));
                }
                _ => {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        found.sort();
        let mut state = State {
            lru: lru::LruCache::unbounded(),
            used: 0,
            verified: HashSet::new(),
            writing: HashSet::new(),
        };
        for (_, key, name, size) in found {
            state.used += size;
            if let Some((old, old_size)) = state.lru.put(key, (name, size)) {
                state.used -= old_size;
                let _ = std::fs::remove_file(dir.join(old));
            }
        }
        let files = MaterializedFiles { dir: dir.to_path_buf(), budget, state: Mutex::new(state) };
        files.evict_until(0);
        Ok(files)
    }

    /// The materialized copy of a file, checked against its name the first time this process
    /// opens it; `None` (and the copy dropped) when it is missing or damaged.
    pub fn get(&self, key: &str, size: u64) -> Option<std::fs::File> {
        let (name, verified) = {
            let mut state = self.state.lock();
            let (name, stored_size) = state.lru.get(key)?.clone();
            if stored_size != size {
                drop(state);
                self.remove(key);
                return None;
            }
            let verified = state.verified.contains(key);
            (name, verified)
        };
        let path = self.dir.join(&name);
        let mut file = std::fs::File::open(&path).ok();
        if let (Some(f), false) = (&mut file, verified) {
            let expected = name.split_once('.').map(|(_, h)| h.to_string()).unwrap_or_default();
            match blake3_of(f) {
                Ok(hash) if hash == expected => {
                    self.state.lock().verified.insert(key.to_string());
                }
                result => {
                    tracing::warn!(file = %path.display(), "dropping a damaged materialized file: {:?}", result.err());
                    file = None;
                }
            }
        }
        if file.is_none() {
            self.remove(key);
        }
        file
    }

    /// Whether `key` should be written: not stored, not being written, and small enough for
    /// the budget. Claims it for writing when it should.
    pub fn claim(&self, key: &str, size: u64) -> bool {
        if size < MIN_FILE_SIZE || size > self.budget / 2 {
            return false;
        }
        let mut state = self.state.lock();
        if state.lru.contains(key) || state.writing.contains(key) {
            return false;
        }
        state.writing.insert(key.to_string());
        true
    }

    /// Gives a claim up without writing.
    pub fn release_claim(&self, key: &str) {
        self.state.lock().writing.remove(key);
    }

    /// A writer for a claimed key; [`Writer::finish`] puts the file in place.
    pub fn writer(&self, key: &str) -> std::io::Result<Writer<'_>> {
        let tmp = self.dir.join(format!(".tmp-{}-{key}", std::process::id()));
        let file = match std::fs::File::create(&tmp) {
            Ok(file) => file,
            Err(err) => {
                self.release_claim(key);
                return Err(err);
            }
        };
        Ok(Writer { files: self, key: key.to_string(), tmp, file, hasher: blake3::Hasher::new(), written: 0 })
    }

    fn remove(&self, key: &str) {
        let mut state = self.state.lock();
        if let Some((name, size)) = state.lru.pop(key) {
            state.used -= size;
            state.verified.remove(key);
            let _ = std::fs::remove_file(self.dir.join(name));
        }
    }

    /// Drops the least recently opened files until `incoming` more bytes fit the budget.
    fn evict_until(&self, incoming: u64) {
        let mut state = self.state.lock();
        while state.used + incoming > self.budget {
            let Some((key, (name, size))) = state.lru.pop_lru() else { break };
            state.used -= size;
            state.verified.remove(&key);
            // An open backing file keeps its inode until it is closed.
            let _ = std::fs::remove_file(self.dir.join(name));
        }
    }

    /// Bytes of materialized files.
    pub fn used_bytes(&self) -> u64 {
        self.state.lock().used
    }
}

/// Writes one materialized file.
pub(crate) struct Writer<'a> {
    files: &'a MaterializedFiles,
    key: String,
    tmp: PathBuf,
    file: std::fs::File,
    hasher: blake3::Hasher,
    written: u64,
}

impl Writer<'_> {
    /// Appends verified file bytes.
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        self.file.write_all(bytes)
    }

    /// Puts the file in place under its name, within the budget.
    pub fn finish(self) -> std::io::Result<()> {
        let name = format!("{}.{}", self.key, self.hasher.finalize().to_hex());
        self.files.evict_until(self.written);
        std::fs::rename(&self.tmp, self.files.dir.join(&name))?;
        let mut state = self.files.state.lock();
        state.used += self.written;
        state.verified.insert(self.key.clone());
        state.lru.put(self.key.clone(), (name, self.written));
        Ok(())
    }
}

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        // After `finish` the temporary name is gone; otherwise this drops a partial file.
        let _ = std::fs::remove_file(&self.tmp);
        self.files.state.lock().writing.remove(&self.key);
    }
}

fn blake3_of(file: &mut std::fs::File) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(files: &MaterializedFiles, key: &str, data: &[u8]) {
        assert!(files.claim(key, data.len() as u64));
        let mut writer = files.writer(key).unwrap();
        writer.write(data).unwrap();
        writer.finish().unwrap();
    }

    #[test]
    fn written_files_come_back_damaged_ones_do_not_and_the_budget_holds() {
        let dir = tempfile::tempdir().unwrap();
        let size = MIN_FILE_SIZE as usize;
        let files = MaterializedFiles::open(dir.path(), 3 * size as u64).unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i * 7) as u8).collect();
        write(&files, "a-1", &data);
        assert!(!files.claim("a-1", size as u64), "claimed twice");
        let mut read = Vec::new();
        files.get("a-1", size as u64).unwrap().read_to_end(&mut read).unwrap();
        assert_eq!(read, data);

        // A new process checks what it finds; a damaged file is dropped.
        write(&files, "b-1", &data);
        drop(files);
        let name = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .find(|n| n.starts_with("b-1."))
            .unwrap();
        let mut damaged = data.clone();
        damaged[10] ^= 1;
        std::fs::write(dir.path().join(&name), &damaged).unwrap();
        std::fs::write(dir.path().join(".tmp-1-c-1"), b"partial").unwrap();
        let files = MaterializedFiles::open(dir.path(), 3 * size as u64).unwrap();
        assert!(!dir.path().join(".tmp-1-c-1").exists(), "a crash's temporary file survived");
        assert!(files.get("b-1", size as u64).is_none(), "a damaged file was served");
        assert!(!dir.path().join(&name).exists());

        // The budget: 3 files fit, a fourth evicts the least recently opened.
        write(&files, "c-1", &data);
        write(&files, "d-1", &data);
        assert!(files.get("a-1", size as u64).is_some());
        write(&files, "e-1", &data);
        assert!(files.used_bytes() <= 3 * size as u64);
        assert!(files.get("c-1", size as u64).is_none(), "the least recently opened file stayed");
        assert!(files.get("a-1", size as u64).is_some(), "a recently opened file was evicted");
        assert!(files.get("a-1", size as u64 + 1).is_none(), "a size mismatch is a miss");
        assert!(files.get("a-1", size as u64).is_none(), "a copy of the wrong size stays");
    }
}
