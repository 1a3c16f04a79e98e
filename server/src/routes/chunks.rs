//! flywheel's chunk API under `/_flywheel/v1/{cache}/`: what runners use to move only the
//! chunks they lack. Wire types and framing are in `flywheel_core::api::v1::chunks`.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use flywheel_core::api::v1::chunks::{BaseChunks, ChunkList, ChunkRefList, CommitRequest, PathManifest, MAX_CHUNKS_PER_REQUEST};
use flywheel_core::chunk::ChunkHash;
use flywheel_core::manifest::ChunkRef;
use flywheel_core::nix::{Sha256Hash, StorePath};
use flywheel_core::Error;
use futures::{StreamExt, TryStreamExt};
use tracing::instrument;

use super::binary_cache::{path_record, render_narinfo};
use super::publish::PathMetadata;
use super::{authorize, ApiJson, Caller};
use crate::error::ApiError;
use crate::ingest::verified_chunks;
use crate::state::AppState;
use crate::storage::Reuse;

type ApiResult<T> = Result<T, ApiError>;

fn parse_chunk(hash: &str) -> Result<ChunkHash, Error> {
    hash.parse()
}

fn check_count(n: usize) -> Result<(), Error> {
    if n > MAX_CHUNKS_PER_REQUEST {
        return Err(Error::invalid(format!("at most {MAX_CHUNKS_PER_REQUEST} chunks per request")));
    }
    Ok(())
}

/// `GET manifest/{hash}`: a path's narinfo fields, chunks and file index.
#[instrument(skip_all, fields(cache = %cache, hash = %hash))]
pub async fn manifest(
    State(state): State<AppState>,
    caller: Caller,
    Path((cache, hash)): Path<(String, String)>,
) -> ApiResult<Response> {
    let record = authorize(&state, &caller, &cache, "pull", |p| p.pull).await?;
    let path = path_record(&state, &cache, &hash).await?;
    let manifest = state.manifest_of(&path).await?;
    state.record_access(&cache, &hash).await;
    // The signatures are those of the narinfo, including the cache's own.
    let narinfo = flywheel_core::nix::NarInfo::parse(&render_narinfo(&path, &record)?, &record.store_dir)?;
    let store_dir = &record.store_dir;
    let absolute = |base: &str| StorePath::from_base_name(base).map(|p| p.to_absolute(store_dir));
    Ok(state.manifest_response(PathManifest {
        store_path: absolute(&path.store_path)?,
        references: path.references.iter().map(|r| absolute(r)).collect::<Result<_, _>>()?,
        deriver: path.deriver.as_deref().map(absolute).transpose()?,
        sigs: narinfo.sigs,
        ca: path.ca,
        manifest,
    }).await?)
}

/// `GET base/{name}`: the chunk list of the path last published under the unversioned name of
/// `name` (a store path name), for a push of its next version to tell its chunks as changes to.
/// Pushers may ask, not only pullers: it shows chunk names, not contents.
#[instrument(skip_all, fields(cache = %cache, name = %name))]
pub async fn base(
    State(state): State<AppState>,
    caller: Caller,
    Path((cache, name)): Path<(String, String)>,
) -> ApiResult<Json<BaseChunks>> {
    let record = authorize(&state, &caller, &cache, "push or pull", |p| p.push || p.pull).await?;
    let unversioned = StorePath::new([0; 20], name.as_str())?.unversioned_name();
    let no_base = || Error::not_found(format!("no path named like {name:?} is published in {cache}"));
    let hash = state.storage.newest_of_name(&cache, &unversioned).await?.ok_or_else(no_base)?;
    // The newest may have been deleted since (garbage collection, retention).
    let path = state.storage.get_path(&cache, &hash).await?.ok_or_else(no_base)?;
    let manifest = state.manifest_of(&path).await?;
    Ok(Json(BaseChunks {
        store_path: StorePath::from_base_name(&path.store_path)?.to_absolute(&record.store_dir),
        chunks: manifest.chunks.clone(),
    }))
}

/// `GET chunk/{hash}`: one verified chunk as its zstd frame.
pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path((cache, hash)): Path<(String, String)>,
) -> ApiResult<Response> {
    authorize(&state, &caller, &cache, "pull", |p| p.pull).await?;
    let hash = parse_chunk(&hash)?;
    if state.storage.chunk_size(&hash).await?.is_none() {
        return Err(Error::not_found(format!("chunk {hash} is not stored")).into());
    }
    let frame = state.storage.get_chunk(&hash).await?;
    let checked = frame.clone();
    let max = state.config.chunking.max_size as usize;
    tokio::task::spawn_blocking(move || {
        let data = zstd::bulk::decompress(&checked, max).map_err(|e| Error::corrupt(format!("chunk {hash}: {e}")))?;
        if ChunkHash::of(&data) != hash {
            return Err(Error::corrupt(format!("stored chunk {hash} does not match its name")));
        }
        Ok(())
    })
    .await
    .map_err(|e| Error::internal(e.to_string()))??;
    state.metrics.chunks_fetched.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    state.metrics.bytes_out.fetch_add(frame.len() as u64, std::sync::atomic::Ordering::Relaxed);
    Ok(([(header::CONTENT_TYPE, "application/zstd")], frame).into_response())
}

/// `POST chunks`: many verified chunks, each framed as an 8-byte little-endian length and the
/// zstd frame, in request order.
pub async fn get_many(
    State(state): State<AppState>,
    caller: Caller,
    Path(cache): Path<String>,
    ApiJson(request): ApiJson<ChunkRefList>,
) -> ApiResult<Response> {
    authorize(&state, &caller, &cache, "pull", |p| p.pull).await?;
    check_count(request.chunks.len())?;
    let metrics = state.metrics.clone();
    let stream = verified_chunks(
        state.storage.clone(),
        request.chunks,
        state.config.chunk_parallelism,
        state.chunk_reads.clone(),
        metrics.clone(),
    )
        .map_ok(move |(frame, _)| {
            metrics.bytes_out.fetch_add(8 + frame.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let mut framed = Vec::with_capacity(8 + frame.len());
            framed.extend_from_slice(&(frame.len() as u64).to_le_bytes());
            framed.extend_from_slice(&frame);
            Bytes::from(framed)
        })
        .map_err(std::io::Error::other);
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], Body::from_stream(stream)).into_response())
}

/// `POST missing-chunks`: which of these chunks are not stored.
pub async fn missing(
    State(state): State<AppState>,
    caller: Caller,
    Path(cache): Path<String>,
    ApiJson(request): ApiJson<ChunkList>,
) -> ApiResult<Json<ChunkList>> {
    authorize(&state, &caller, &cache, "push", |p| p.push).await?;
    check_count(request.chunks.len())?;
    // Stale chunks count as missing: the uploader sends them again, which makes them young.
    let reusable_after = state.reuse_window().reusable_after();
    let present =
        state.storage.chunks_reusable(request.chunks.clone(), reusable_after, state.config.chunk_parallelism).await?;
    let chunks = request.chunks.iter().zip(present).filter(|(_, present)| !present).map(|(h, _)| *h).collect();
    let query = state.remember_chunk_query(&cache, request.chunks);
    Ok(Json(ChunkList { chunks, query }))
}

/// `PUT chunk/{hash}`: stores one chunk given as a zstd frame, after checking it decompresses to
/// bytes with that name.
pub async fn put_one(
    State(state): State<AppState>,
    caller: Caller,
    Path((cache, hash)): Path<(String, String)>,
    frame: Bytes,
) -> ApiResult<StatusCode> {
    authorize(&state, &caller, &cache, "push", |p| p.push).await?;
    let hash = parse_chunk(&hash)?;
    let max = state.config.chunking.max_size as usize;
    let checked = frame.clone();
    tokio::task::spawn_blocking(move || check_uploaded(&checked, &hash, max))
        .await
        .map_err(|e| Error::internal(e.to_string()))??;
    state.metrics.chunks_received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // A stale copy is written again, so that garbage collection counts it as young.
    let reusable_after = state.reuse_window().reusable_after();
    if state.storage.chunk_reusable(&hash, reusable_after).await? != Reuse::Fresh {
        state.storage.put_chunk(&hash, frame).await?;
    }
    Ok(StatusCode::OK)
}

/// `POST upload-chunks`: stores several chunks in one request (fewer requests, and headers,
/// for a push of a few new chunks). The body is a sequence of records: the chunk's 32-byte
/// BLAKE3 hash, an 8-byte little-endian frame length and the zstd frame. Every frame is
/// checked like `PUT chunk/{hash}` before anything is stored; one bad record refuses the
/// request.
#[instrument(skip_all, fields(cache = %cache, bytes = body.len()))]
pub async fn upload_many(
    State(state): State<AppState>,
    caller: Caller,
    Path(cache): Path<String>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    authorize(&state, &caller, &cache, "push", |p| p.push).await?;
    let records = parse_upload_records(&body)?;
    check_count(records.len())?;
    let max = state.config.chunking.max_size as usize;
    let checked: Vec<(ChunkHash, std::ops::Range<usize>)> = records.clone();
    let body_for_check = body.clone();
    tokio::task::spawn_blocking(move || {
        checked.iter().try_for_each(|(hash, range)| check_uploaded(&body_for_check[range.clone()], hash, max))
    })
    .await
    .map_err(|e| Error::internal(e.to_string()))??;
    state.metrics.chunks_received.fetch_add(records.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let reusable_after = state.reuse_window().reusable_after();
    futures::stream::iter(records)
        .map(|(hash, range)| {
            let (storage, frame) = (state.storage.clone(), body.slice(range));
            async move {
                if storage.chunk_reusable(&hash, reusable_after).await? != Reuse::Fresh {
                    storage.put_chunk(&hash, frame).await?;
                }
                Ok::<(), Error>(())
            }
        })
        .buffer_unordered(state.config.chunk_parallelism)
        .try_collect::<()>()
        .await?;
    Ok(StatusCode::OK)
}

/// The chunk list of a commit that names a `missing-chunks` question: `order` indexes the
/// question's list (the list itself when absent), `sizes` gives each chunk's size.
fn chunks_from_query(asked: &[ChunkHash], order: Option<Vec<u32>>, sizes: Vec<u32>) -> Result<Vec<ChunkRef>, Error> {
    let order: Vec<usize> = match order {
        Some(order) => order.into_iter().map(|i| i as usize).collect(),
        None => (0..asked.len()).collect(),
    };
    if order.len() != sizes.len() {
        return Err(Error::invalid(format!("{} chunks in chunkOrder but {} chunkSizes", order.len(), sizes.len())));
    }
    order
        .into_iter()
        .zip(sizes)
        .map(|(i, size)| {
            let hash = asked.get(i).ok_or_else(|| Error::invalid(format!("chunkOrder index {i} is past the {} chunks asked about", asked.len())))?;
            Ok(ChunkRef { hash: *hash, size })
        })
        .collect()
}

/// Checks an uploaded zstd frame: it decompresses to at most `max` bytes named `hash`.
fn check_uploaded(frame: &[u8], hash: &ChunkHash, max: usize) -> Result<(), Error> {
    let data = zstd::bulk::decompress(frame, max)
        .map_err(|e| Error::invalid(format!("chunk {hash} is not a zstd frame of at most {max} bytes: {e}")))?;
    if ChunkHash::of(&data) != *hash {
        return Err(Error::invalid(format!("chunk content does not hash to {hash}")));
    }
    Ok(())
}

/// Splits an `upload-chunks` body into (hash, frame range) records.
fn parse_upload_records(body: &[u8]) -> Result<Vec<(ChunkHash, std::ops::Range<usize>)>, Error> {
    let mut records = Vec::new();
    let mut at = 0usize;
    while at < body.len() {
        let head = body
            .get(at..at + 40)
            .ok_or_else(|| Error::invalid(format!("upload-chunks body is truncated at byte {at}: a record needs 40 header bytes")))?;
        let hash = ChunkHash(head[..32].try_into().map_err(|_| Error::invalid("bad hash"))?);
        let len = u64::from_le_bytes(head[32..40].try_into().map_err(|_| Error::invalid("bad length"))?);
        let start = at + 40;
        let end = usize::try_from(len).ok().and_then(|len| start.checked_add(len)).filter(|&end| end <= body.len()).ok_or_else(|| {
            Error::invalid(format!("upload-chunks record of chunk {hash} claims {len} bytes, more than the body holds"))
        })?;
        records.push((hash, start..end));
        at = end;
    }
    if records.is_empty() {
        return Err(Error::invalid("upload-chunks body holds no chunks"));
    }
    Ok(records)
}

/// `POST commit`: publishes a path from stored chunks, after rebuilding its NAR from them and
/// checking hash, size and structure.
#[instrument(skip_all, fields(cache = %cache))]
pub async fn commit(
    State(state): State<AppState>,
    caller: Caller,
    Path(cache): Path<String>,
    ApiJson(request): ApiJson<CommitRequest>,
) -> ApiResult<StatusCode> {
    let record = authorize(&state, &caller, &cache, "push", |p| p.push).await?;
    let mut request = request;
    if let Some(delta) = request.chunks_delta.take() {
        if !request.chunks.is_empty() || request.chunks_query.is_some() {
            return Err(Error::invalid("give one of chunks, chunksQuery and chunksDelta").into());
        }
        flywheel_core::nix::store_path::parse_hash_part(&delta.base)?;
        let base = state.storage.get_path(&cache, &delta.base).await?.ok_or_else(|| {
            Error::not_found(format!("base path {} of chunksDelta is not published in {cache}: send the chunks", delta.base))
        })?;
        let base_chunks = state.manifest_of(&base).await?.chunks.clone();
        request.chunks = delta.expand(&base_chunks, MAX_CHUNKS_PER_REQUEST)?;
    }
    if let Some(name) = request.chunks_query.take() {
        if !request.chunks.is_empty() {
            return Err(Error::invalid("give chunks or chunksQuery, not both").into());
        }
        let query = state.chunk_query(&cache, &name).ok_or_else(|| {
            Error::not_found(format!("unknown chunk query {name:?} (expired, or asked of another server): send the chunks"))
        })?;
        request.chunks = chunks_from_query(&query.chunks, request.chunk_order.take(), std::mem::take(&mut request.chunk_sizes))?;
    }
    check_count(request.chunks.len())?;
    let nar_hash = Sha256Hash::parse(&request.nar_hash)?;
    let (_, path) = PathMetadata {
        store_path: &request.store_path,
        store_dir: &record.store_dir,
        nar_hash,
        nar_size: request.nar_size,
        references: &request.references,
        deriver: request.deriver.as_deref(),
        system: None,
        sigs: &request.sigs,
        ca: request.ca.as_deref(),
    }
    .into_record()?;
    let max = state.config.chunking.max_size;
    if request.chunks.iter().any(|c| c.size == 0 || c.size > max) {
        return Err(Error::invalid(format!("chunk sizes must be between 1 and {max}")).into());
    }
    let total: u64 = request.chunks.iter().map(|c| u64::from(c.size)).sum();
    if total != request.nar_size {
        return Err(Error::invalid(format!("chunks add up to {total} bytes, not narSize {}", request.nar_size)).into());
    }
    let window = state.reuse_window();
    let started = std::time::Instant::now();
    let reusable_after = window.reusable_after();
    let mut unique: Vec<ChunkHash> = request.chunks.iter().map(|c| c.hash).collect();
    unique.sort_unstable();
    unique.dedup();
    let reuse: Vec<(ChunkHash, Reuse)> = futures::stream::iter(unique)
        .map(|hash| {
            let storage = state.storage.clone();
            async move { storage.chunk_reusable(&hash, reusable_after).await.map(|r| (hash, r)) }
        })
        .buffered(state.config.chunk_parallelism)
        .try_collect()
        .await?;
    let missing: Vec<String> = reuse.iter().filter(|(_, r)| *r == Reuse::Missing).map(|(h, _)| h.to_string()).collect();
    if !missing.is_empty() {
        return Err(Error::invalid(format!(
            "{} chunks are not stored; upload them first (first: {})",
            missing.len(),
            missing[0]
        ))
        .into());
    }
    let manifest = state.ingester.verify_chunks(request.chunks).await.map_err(|err| match err.kind() {
        flywheel_core::ErrorKind::Corrupt => err,
        _ => Error::invalid(format!("the chunks do not make a valid NAR: {err}")),
    })?;
    if (manifest.nar_hash, manifest.nar_size) != (nar_hash, request.nar_size) {
        return Err(Error::invalid(format!(
            "the chunks make a NAR with hash {} and size {}, not {} and {}",
            manifest.nar_hash, manifest.nar_size, nar_hash, request.nar_size
        ))
        .into());
    }
    // Chunks stored but too old to count on (a collection may be about to sweep them) are
    // written again, which makes them young; they were just read and verified.
    let stale: Vec<ChunkHash> = reuse.iter().filter(|(_, r)| *r == Reuse::Stale).map(|(h, _)| *h).collect();
    for hash in &stale {
        let frame = state.storage.get_chunk(hash).await?;
        state.storage.put_chunk(hash, frame).await?;
    }
    state.storage.put_upload_manifest(&manifest, started, window, &stale, "commit").await?;
    state.storage.put_path(&cache, &path).await?;
    tracing::info!(store_path = %path.store_path, "published through chunk commit");
    Ok(StatusCode::OK)
}
