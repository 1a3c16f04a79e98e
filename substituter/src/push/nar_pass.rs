//! The two passes over a path's NAR: the first cuts and hashes it, the second cuts it again
//! and compresses the chunks the server lacks.

use super::*;

/// A `Write` that hashes the NAR and cuts it into chunks.
pub(super) struct ChunkingSink<'a, F: FnMut(usize, Vec<u8>) -> std::io::Result<()>> {
    chunker: Option<Chunker>,
    sha: sha2::Sha256,
    size: u64,
    index: usize,
    emit: F,
    bar: Option<&'a indicatif::ProgressBar>,
}

impl<F: FnMut(usize, Vec<u8>) -> std::io::Result<()>> Write for ChunkingSink<'_, F> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sha.update(buf);
        self.size += buf.len() as u64;
        if let Some(bar) = self.bar {
            bar.inc(buf.len() as u64);
        }
        let (index, emit) = (&mut self.index, &mut self.emit);
        let chunker = self.chunker.as_mut().ok_or_else(|| std::io::Error::other("chunker finished"))?;
        chunker.push(buf, &mut |chunk: Vec<u8>| {
            let i = *index;
            *index += 1;
            emit(i, chunk)
        })?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<F: FnMut(usize, Vec<u8>) -> std::io::Result<()>> ChunkingSink<'_, F> {
    fn finish(mut self) -> std::io::Result<(Sha256Hash, u64)> {
        let (index, emit) = (&mut self.index, &mut self.emit);
        if let Some(chunker) = self.chunker.take() {
            chunker.finish(&mut |chunk: Vec<u8>| {
                let i = *index;
                *index += 1;
                emit(i, chunk)
            })?;
        }
        Ok((Sha256Hash(self.sha.finalize().into()), self.size))
    }
}

pub(super) fn io_error(path: &std::path::Path, err: std::io::Error) -> Error {
    let kind = if err.kind() == std::io::ErrorKind::NotFound { ErrorKind::NotFound } else { ErrorKind::Unavailable };
    Error::new(kind, format!("making the NAR of {}: {err}", path.display()))
}

/// Pass 1: the chunk list, NAR hash and size of the path at `physical`.
pub(super) fn chunk_nar(physical: &std::path::Path, params: ChunkParams, bar: &indicatif::ProgressBar) -> Result<(Vec<ChunkRef>, Sha256Hash, u64)> {
    let mut chunks = Vec::new();
    let mut sink = ChunkingSink {
        chunker: Some(Chunker::new(params)),
        sha: sha2::Sha256::new(),
        size: 0,
        index: 0,
        bar: Some(bar),
        emit: |_, chunk: Vec<u8>| {
            chunks.push(ChunkRef { hash: ChunkHash::of(&chunk), size: chunk.len() as u32 });
            Ok(())
        },
    };
    flywheel_core::nar::dump_path(physical, &mut sink).map_err(|e| io_error(physical, e))?;
    let (hash, size) = sink.finish().map_err(|e| io_error(physical, e))?;
    Ok((chunks, hash, size))
}

/// Pass 2: makes the NAR again, checks it cuts into the same chunks, and sends the missing
/// ones compressed to the uploader; stops once the last missing chunk is sent.
pub(super) fn compress_missing(
    physical: &std::path::Path,
    params: ChunkParams,
    level: i32,
    expected: &[ChunkRef],
    mut missing: HashSet<ChunkHash>,
    tx: tokio::sync::mpsc::Sender<(ChunkHash, usize, Vec<u8>)>,
) -> Result<()> {
    let mut failure: Option<Error> = None;
    let mut sink = ChunkingSink {
        chunker: Some(Chunker::new(params)),
        sha: sha2::Sha256::new(),
        size: 0,
        index: 0,
        bar: None,
        emit: |i: usize, chunk: Vec<u8>| {
            let hash = ChunkHash::of(&chunk);
            if expected.get(i).map(|c| c.hash) != Some(hash) {
                failure = Some(Error::corrupt(format!("{} changed while it was being pushed", physical.display())));
                return Err(std::io::Error::other(EarlyStop::Changed));
            }
            if missing.remove(&hash) {
                let frame = compress(&chunk, level).map_err(std::io::Error::other)?;
                if tx.blocking_send((hash, chunk.len(), frame)).is_err() {
                    return Err(std::io::Error::other(EarlyStop::UploaderStopped));
                }
                if missing.is_empty() {
                    return Err(std::io::Error::other(EarlyStop::AllSent));
                }
            }
            Ok(())
        },
    };
    let dumped = flywheel_core::nar::dump_path(physical, &mut sink).and_then(|_| sink.finish().map(|_| ()));
    if let Some(err) = failure {
        return Err(err);
    }
    match dumped {
        Ok(()) => Ok(()),
        Err(err) => match err.get_ref().and_then(|inner| inner.downcast_ref::<EarlyStop>()) {
            Some(EarlyStop::AllSent | EarlyStop::UploaderStopped) => Ok(()),
            Some(EarlyStop::Changed) | None => Err(io_error(physical, err)),
        },
    }
}

/// Why pass 2 ended the NAR walk early. It travels as the NAR writer's `io::Error` and is
/// read back by type: only a real I/O error is reported as one.
#[derive(Debug)]
pub(super) enum EarlyStop {
    /// Every missing chunk was sent: the rest of the NAR is not needed.
    AllSent,
    /// The uploader stopped (an upload failed); its error is the one reported.
    UploaderStopped,
    /// The path no longer cuts into the chunks of pass 1 (reported through `failure`).
    Changed,
}

impl std::fmt::Display for EarlyStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EarlyStop::AllSent => "all missing chunks sent",
            EarlyStop::UploaderStopped => "the uploader stopped",
            EarlyStop::Changed => "the path changed while it was read",
        })
    }
}

impl std::error::Error for EarlyStop {}
