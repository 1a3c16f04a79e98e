//! Nix's HTTP binary cache protocol, per cache at `/{cache}/`: what `nix copy`, `nix-store -r`
//! and nix-daemon's substituter speak.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

use bytes::Bytes;
use flywheel_core::nix::{cache_info, store_path::parse_hash_part, NarInfo, NixCacheInfo, Sha256Hash, SigningKey, StorePath};
use flywheel_core::{Error, Result};
use futures::{StreamExt, TryStreamExt};
use tracing::instrument;

use super::{ApiBytes, ApiPath};
use super::publish::PathMetadata;
use super::{authorize, Access, Caller, Push};
use crate::error::ApiError;
use crate::chunk_reader::first_item_in;
use crate::ingest::Compression;
use crate::narinfo_cache::Answer;
use crate::state::AppState;
use crate::storage::{CacheRecord, PathRecord};

type ApiResult<T> = std::result::Result<T, ApiError>;

/// `GET /{cache}/nix-cache-info`.
pub async fn cache_info(State(state): State<AppState>, caller: Caller, ApiPath(cache): ApiPath<String>) -> ApiResult<Response> {
    let record = authorize(&state, &caller, &cache, "pull", |p| p.pull).await?;
    let info = NixCacheInfo { store_dir: record.store_dir, want_mass_query: true, priority: record.priority };
    Ok(([(header::CONTENT_TYPE, cache_info::CONTENT_TYPE)], info.render()).into_response())
}

/// `PUT /{cache}/nix-cache-info`: Nix sends it when it thinks the cache is new (a push-only
/// token cannot read it); the cache's own settings stay as they are.
///
/// The body is read although it is ignored: curl sends it only after `100 Continue`, or after
/// waiting a second for one. Answered before it, the connection was closed, or, depending on
/// timing, kept with the late body read as the start of the next request, which Nix then saw
/// fail with a 400. [`Access`] checks the token first, so only a pusher's body is read.
pub async fn put_cache_info(_access: Access<Push>, ApiBytes(_body): ApiBytes) -> ApiResult<StatusCode> {
    Ok(StatusCode::OK)
}

/// The record of a path, or 404.
pub(super) async fn path_record(state: &AppState, cache: &str, hash_part: &str) -> Result<Arc<PathRecord>> {
    parse_hash_part(hash_part)?;
    if let Some(record) = state.narinfos.record(cache, hash_part) {
        return Ok(record);
    }
    let ticket = state.narinfos.ticket();
    let record = Arc::new(
        state
            .storage
            .get_path(cache, hash_part)
            .await?
            .ok_or_else(|| Error::not_found(format!("{hash_part} is not in cache {cache:?}")))?,
    );
    state.narinfos.insert_record(cache, hash_part, ticket, record.clone());
    Ok(record)
}

/// The narinfo of a published path, signed with the cache's key.
pub fn render_narinfo(record: &PathRecord, cache: &CacheRecord) -> Result<String> {
    let store_dir = &cache.store_dir;
    let store_path = StorePath::from_base_name(&record.store_path)?;
    let mut info = NarInfo {
        url: format!("nar/{}.nar.zst", store_path.hash_part()),
        store_path,
        compression: Some("zstd".into()),
        file_hash: None,
        file_size: None,
        nar_hash: record.nar_hash,
        nar_size: record.nar_size,
        references: record.references.iter().map(|r| StorePath::from_base_name(r)).collect::<Result<_>>()?,
        deriver: record.deriver.as_deref().map(StorePath::from_base_name).transpose()?,
        system: record.system.clone(),
        sigs: record.sigs.clone(),
        ca: record.ca.clone(),
    };
    let key = SigningKey::parse(&cache.signing_key).map_err(|e| Error::internal(format!("cache signing key: {e}")))?;
    info.sign(&key, store_dir);
    Ok(info.render(store_dir))
}

/// `GET|HEAD /{cache}/{hash}.narinfo` and `/{cache}/{hash}.ls`.
#[instrument(skip_all, fields(cache = %cache, file = %file))]
pub async fn get_file(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((cache, file)): ApiPath<(String, String)>,
) -> ApiResult<Response> {
    let record = authorize(&state, &caller, &cache, "pull", |p| p.pull).await?;
    if let Some(hash_part) = file.strip_suffix(".narinfo") {
        parse_hash_part(hash_part)?;
        let answer = match state.narinfos.get(&cache, hash_part) {
            Some(answer) => answer,
            None => {
                let ticket = state.narinfos.ticket();
                let answer = match state.storage.get_path(&cache, hash_part).await? {
                    Some(path) => {
                        let text = render_narinfo(&path, &record)?;
                        // Nix asks for the NAR next: its download need not read the record again.
                        state.narinfos.insert_record(&cache, hash_part, ticket, Arc::new(path));
                        Answer::Found(Bytes::from(text))
                    }
                    None => Answer::Missing,
                };
                state.narinfos.insert(&cache, hash_part, ticket, answer.clone());
                answer
            }
        };
        let Answer::Found(text) = answer else {
            return Err(Error::not_found(format!("{hash_part} is not in cache {cache:?}")).into());
        };
        state.record_access(&cache, hash_part).await;
        return Ok(([(header::CONTENT_TYPE, "text/x-nix-narinfo")], text).into_response());
    }
    if let Some(hash_part) = file.strip_suffix(".ls") {
        let path = path_record(&state, &cache, hash_part).await?;
        let listing = state.listing_of(&path).await?;
        return Ok(([(header::CONTENT_TYPE, "application/json")], listing).into_response());
    }
    Err(Error::not_found(format!("no such file {file:?}")).into())
}

/// `PUT /{cache}/{hash}.narinfo` (publishes the NAR PUT just before), `PUT /{cache}/{hash}.ls`
/// (accepted and ignored: listings are made from the manifest).
#[instrument(skip_all, fields(cache = %access.name, file = %file))]
pub async fn put_file(
    State(state): State<AppState>,
    access: Access<Push>,
    ApiPath((_, file)): ApiPath<(String, String)>,
    ApiBytes(body): ApiBytes,
) -> ApiResult<StatusCode> {
    let (cache, record) = (access.name, access.record);
    if file.ends_with(".ls") {
        parse_hash_part(file.trim_end_matches(".ls"))?;
        return Ok(StatusCode::OK);
    }
    let Some(hash_part) = file.strip_suffix(".narinfo") else {
        return Err(Error::invalid(format!("cannot upload {file:?}: only .narinfo, .ls and nar/ files")).into());
    };
    let text = std::str::from_utf8(&body).map_err(|_| Error::invalid("narinfo is not UTF-8"))?;
    let info = NarInfo::parse(text, &record.store_dir)?;
    if info.store_path.hash_part() != hash_part {
        return Err(Error::invalid(format!(
            "narinfo for {} uploaded as {file:?}",
            info.store_path.base_name()
        ))
        .into());
    }
    let manifest = match state.storage.get_manifest(&info.nar_hash).await? {
        Some(m) if state.storage.has_pending(&cache, &info.nar_hash).await? => m,
        _ => {
            return Err(Error::invalid(format!(
                "the NAR with hash {} has not been uploaded to cache {cache:?}; PUT it under nar/ first",
                info.nar_hash
            ))
            .into())
        }
    };
    if manifest.nar_size != info.nar_size {
        return Err(Error::invalid(format!(
            "NarSize {} does not match the uploaded NAR's {} bytes",
            info.nar_size, manifest.nar_size
        ))
        .into());
    }
    let references: Vec<String> = info.references.iter().map(|r| r.base_name()).collect();
    let deriver = info.deriver.as_ref().map(|d| d.base_name());
    let (_, path) = PathMetadata {
        store_path: &info.store_path.base_name(),
        cache: &record,
        nar_hash: info.nar_hash,
        nar_size: info.nar_size,
        references: &references,
        deriver: deriver.as_deref(),
        system: info.system.as_deref(),
        sigs: &info.sigs,
        ca: info.ca.as_deref(),
    }
    .into_record(state.storage.clock().now_secs())?;
    // A cache that requires uploader signatures holds the NAR's chunks only from here, once
    // the signed narinfo is accepted (see `put_nar`): a refused upload leaves it holding
    // nothing new.
    if record.require_uploader_signature {
        grant_nar(&state, &cache, &manifest).await?;
    }
    let mut path = path;
    // Nix keeps this narinfo and will ask for its URL: serve the NAR there too.
    if let Some(file) = info.url.strip_prefix("nar/").filter(|file| is_uploaders_nar_file(file)) {
        state.storage.put_nar_file(&cache, file, hash_part).await?;
        path.nar_file = Some(file.to_string());
    }
    state.publish_path(&cache, &path).await?;
    // The staging marker stays until garbage collection finds it older than the grace
    // period: another client (or replica) may be publishing the same NAR at this moment.
    tracing::info!(store_path = %path.store_path, "published through narinfo PUT");
    Ok(StatusCode::OK)
}

/// Whether `file` is a NAR file name as Nix makes them for its uploads: the nixbase32 SHA-256 of
/// the file, then `.nar` and the compression's extension.
fn is_uploaders_nar_file(file: &str) -> bool {
    let Some((stem, _)) = file.split_once(".nar") else { return false };
    Compression::from_file_name(file).is_ok() && Sha256Hash::parse(&format!("sha256:{stem}")).is_ok() && stem.len() == 52
}

/// `DELETE /{cache}/{hash}.narinfo`: takes one path out of the cache (Attic has no such
/// call). Its chunks stay until garbage collection finds nothing else uses them.
#[instrument(skip_all, fields(cache = %cache, file = %file))]
pub async fn delete_file(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((cache, file)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    authorize(&state, &caller, &cache, "delete", |p| p.delete).await?;
    let Some(hash_part) = file.strip_suffix(".narinfo") else {
        return Err(Error::invalid(format!("cannot delete {file:?}: name a path as {{hash}}.narinfo")).into());
    };
    // From storage, not memory: a path deleted through another replica a moment ago is a 404.
    parse_hash_part(hash_part)?;
    if !state.storage.has_path(&cache, hash_part).await? {
        return Err(Error::not_found(format!("{hash_part} is not in cache {cache:?}")).into());
    }
    state.delete_path(&cache, hash_part).await?;
    tracing::info!(hash = hash_part, "path deleted");
    Ok(StatusCode::OK)
}

/// `GET|HEAD /{cache}/nar/{hash}.nar.zst` (stored zstd frames as they are) and
/// `/{cache}/nar/{hash}.nar` (decompressed); and `nar/{file}` for the file an uploader's
/// narinfo named (`<filehash>.nar.xz`, ...), in the compression its name says (see
/// [`send_encoded`]). Every chunk is checked before the status line (see [`crate::preflight`]),
/// so a missing or corrupt chunk is a 5xx, never a 200 cut short; and every chunk is verified
/// again as it is sent.
#[instrument(skip_all, fields(cache = %cache, file = %file))]
pub async fn get_nar(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((cache, file)): ApiPath<(String, String)>,
) -> ApiResult<Response> {
    authorize(&state, &caller, &cache, "pull", |p| p.pull).await?;
    let no_such = || Error::not_found(format!("no such NAR {file:?}"));
    let compression = Compression::from_file_name(&file).map_err(|_| no_such())?;
    let stem = file.split_once(".nar").map(|(stem, _)| stem).unwrap_or_default();
    let path = match (stem.len(), compression) {
        (32, Compression::None | Compression::Zstd) => path_record(&state, &cache, stem).await?,
        // A name Nix chose when it uploaded: the narinfo it kept still points here.
        (52, _) => {
            let hash_part = state.storage.nar_file_path(&cache, &file).await?.ok_or_else(no_such)?;
            let path = path_record(&state, &cache, &hash_part).await?;
            if path.nar_file.as_deref() != Some(file.as_str()) {
                return Err(no_such().into());
            }
            path
        }
        _ => return Err(no_such().into()),
    };
    let hash_part = path.store_path.get(..32).unwrap_or_default().to_string();
    let manifest = state.manifest_of(&path).await?;
    state.record_access(&cache, &hash_part).await;
    state.verified.check(&state.storage, &manifest.nar_hash, &manifest.chunks, state.config.chunk_parallelism).await?;
    let metrics = state.metrics.clone();
    let counted = move |piece: Bytes| {
        metrics.bytes_out.fetch_add(piece.len() as u64, std::sync::atomic::Ordering::Relaxed);
        piece
    };
    let (reader, refs) = (state.chunk_reader(), manifest.chunks.clone());
    let cut = |err: Error| {
        tracing::error!(error = %err, "NAR stream failed after its start");
        std::io::Error::other(err)
    };
    let (body, content_type) = if compression == Compression::Zstd {
        // The stored frames as they are, whole pack frames included: checked by digest,
        // decompressed only when unknown.
        let frames = first_item_in(reader.nar_frames(refs)).await?;
        (Body::from_stream(frames.map_ok(counted).map_err(cut)), "application/zstd")
    } else {
        let data = first_item_in(reader.chunks(refs)).await?;
        let data = data.map_err(cut);
        match compression {
            Compression::None => (Body::from_stream(data.map_ok(counted)), "application/x-nix-nar"),
            other => (Body::from_stream(send_encoded(data, other).map_ok(counted)), "application/octet-stream"),
        }
    };
    let mut response = Response::new(body);
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    if compression == Compression::None {
        response.headers_mut().insert(header::CONTENT_LENGTH, header::HeaderValue::from(manifest.nar_size));
    }
    Ok(response)
}

/// A NAR's bytes in a compression the store does not keep, for a client whose narinfo names it:
/// - xz (Nix's default): stored LZMA2 chunks ([`flywheel_core::xz::XzStored`]), at the speed of
///   a copy: an xz encoder would run at a few MB/s, and the narinfo's file hash and size are
///   not checked by Nix (the NAR hash is);
/// - bzip2 and brotli: their encoders at their fastest settings, on a blocking thread, since
///   neither format has a stored mode that its decoders all read.
fn send_encoded(
    data: impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    compression: Compression,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::spawn(async move {
        let mut data = std::pin::pin!(data);
        if compression == Compression::Xz {
            let mut xz = flywheel_core::xz::XzStored::new();
            let mut ok = tx.send(Ok(Bytes::from(xz.header()))).await.is_ok();
            while ok {
                match data.next().await {
                    Some(Ok(piece)) => ok = tx.send(Ok(Bytes::from(xz.encode(&piece)))).await.is_ok(),
                    Some(Err(err)) => {
                        let _ = tx.send(Err(err)).await;
                        return;
                    }
                    None => {
                        let _ = tx.send(Ok(Bytes::from(xz.finish()))).await;
                        return;
                    }
                }
            }
            return;
        }
        // The encoder runs on its own thread, fed through a small queue.
        let (feed, pieces) = std::sync::mpsc::sync_channel::<Bytes>(4);
        let out = tx.clone();
        let encoder = tokio::task::spawn_blocking(move || encode_blocking(pieces, compression, out));
        while let Some(piece) = data.next().await {
            match piece {
                Ok(piece) => {
                    let feed = feed.clone();
                    // The encoder is slower than the chunks: wait for room off the runtime.
                    match tokio::task::spawn_blocking(move || feed.send(piece)).await {
                        Ok(Ok(())) => {}
                        _ => return,
                    }
                }
                Err(err) => {
                    drop(feed);
                    let _ = encoder.await;
                    let _ = tx.send(Err(err)).await;
                    return;
                }
            }
        }
        drop(feed);
        if let Ok(Err(err)) = encoder.await {
            let _ = tx.send(Err(err)).await;
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}

/// Compresses the pieces that arrive with bzip2 or brotli, sending what comes out.
fn encode_blocking(
    pieces: std::sync::mpsc::Receiver<Bytes>,
    compression: Compression,
    out: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) -> std::io::Result<()> {
    use std::io::Write;
    /// Hands every write on to the response as it is made.
    struct Sending(tokio::sync::mpsc::Sender<std::io::Result<Bytes>>);
    impl Write for Sending {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .blocking_send(Ok(Bytes::copy_from_slice(buf)))
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away"))?;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = std::io::BufWriter::with_capacity(256 * 1024, Sending(out));
    let mut encoder: Box<dyn Write> = match compression {
        Compression::Bzip2 => Box::new(bzip2::write::BzEncoder::new(sink, bzip2::Compression::fast())),
        _ => Box::new(brotli::CompressorWriter::new(sink, 256 * 1024, 1, 22)),
    };
    for piece in pieces {
        encoder.write_all(&piece)?;
    }
    // Dropping an encoder finishes its stream; flushing the boxed writer first surfaces errors.
    encoder.flush()?;
    drop(encoder);
    Ok(())
}

/// `PUT /{cache}/nar/{name}.nar[.xz|.zst|.bz2|.br]`: the NAR of a `nix copy --to http://`, which
/// its narinfo PUT publishes.
#[instrument(skip_all, fields(cache = %cache, file = %file))]
pub async fn put_nar(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((cache, file)): ApiPath<(String, String)>,
    body: Body,
) -> ApiResult<StatusCode> {
    let record = authorize(&state, &caller, &cache, "push", |p| p.push).await?;
    let compression = Compression::from_file_name(&file)?;
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let ingested = state.ingester.ingest(stream, compression).await?;
    let nar_hash = ingested.manifest.nar_hash;
    let (manifest, stats) = ingested.commit().await?;
    // The narinfo, which carries the signatures, comes after the NAR. Where signatures are
    // required, the chunks are granted when it is accepted, so that an unsigned upload leaves
    // the cache holding nothing new (its chunks and manifest are left to garbage collection,
    // as those of any failed upload).
    if !record.require_uploader_signature {
        grant_nar(&state, &cache, &manifest).await?;
    }
    state.storage.put_pending(&cache, &nar_hash).await?;
    tracing::info!(nar_hash = %nar_hash, new_chunks = stats.new_chunks, chunks = stats.chunks, "NAR staged");
    Ok(StatusCode::OK)
}

/// Grants a NAR's chunks to the cache its bytes were uploaded to (see
/// [`crate::storage::Storage::grant_chunks`]); returns the bytes of the NAR that the cache held
/// already, the only deduplication an uploader is told of.
pub(super) async fn grant_nar(state: &AppState, cache: &str, manifest: &flywheel_core::manifest::Manifest) -> Result<u64> {
    let mut distinct: Vec<flywheel_core::manifest::ChunkRef> = manifest.chunks.clone();
    distinct.sort_unstable_by_key(|c| c.hash);
    distinct.dedup();
    let hashes: Vec<_> = distinct.iter().map(|c| c.hash).collect();
    let held = state.storage.grant_chunks(cache, &hashes, state.config.chunk_parallelism).await?;
    let held_before: std::collections::HashSet<_> = hashes.iter().zip(held).filter(|(_, held)| *held).map(|(h, _)| *h).collect();
    Ok(manifest.chunks.iter().filter(|c| held_before.contains(&c.hash)).map(|c| u64::from(c.size)).sum())
}
