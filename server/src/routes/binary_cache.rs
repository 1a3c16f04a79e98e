//! Nix's HTTP binary cache protocol, per cache at `/{cache}/`: what `nix copy`, `nix-store -r`
//! and nix-daemon's substituter speak.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use flywheel_core::nix::{store_path::parse_hash_part, NarInfo, SigningKey, StorePath};
use flywheel_core::{Error, Result};
use futures::{StreamExt, TryStreamExt};
use tracing::instrument;

use super::publish::PathMetadata;
use super::{authorize, Caller};
use crate::error::ApiError;
use crate::ingest::{verified_chunks, Compression};
use crate::state::AppState;
use crate::storage::{CacheRecord, PathRecord};

type ApiResult<T> = std::result::Result<T, ApiError>;

/// `GET /{cache}/nix-cache-info`.
pub async fn cache_info(State(state): State<AppState>, caller: Caller, Path(cache): Path<String>) -> ApiResult<Response> {
    let record = authorize(&state, &caller, &cache, "pull", |p| p.pull).await?;
    let body = format!("StoreDir: {}\nWantMassQuery: 1\nPriority: {}\n", record.store_dir, record.priority);
    Ok(([(header::CONTENT_TYPE, "text/x-nix-cache-info")], body).into_response())
}

/// `PUT /{cache}/nix-cache-info`: Nix sends it when it thinks the cache is new; the cache's own
/// settings stay as they are.
pub async fn put_cache_info(State(state): State<AppState>, caller: Caller, Path(cache): Path<String>) -> ApiResult<StatusCode> {
    authorize(&state, &caller, &cache, "push", |p| p.push).await?;
    Ok(StatusCode::OK)
}

/// The record of a path, or 404.
pub(super) async fn path_record(state: &AppState, cache: &str, hash_part: &str) -> Result<PathRecord> {
    parse_hash_part(hash_part)?;
    state
        .storage
        .get_path(cache, hash_part)
        .await?
        .ok_or_else(|| Error::not_found(format!("{hash_part} is not in cache {cache:?}")))
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
    Path((cache, file)): Path<(String, String)>,
) -> ApiResult<Response> {
    let record = authorize(&state, &caller, &cache, "pull", |p| p.pull).await?;
    if let Some(hash_part) = file.strip_suffix(".narinfo") {
        let path = path_record(&state, &cache, hash_part).await?;
        let text = render_narinfo(&path, &record)?;
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
#[instrument(skip_all, fields(cache = %cache, file = %file))]
pub async fn put_file(
    State(state): State<AppState>,
    caller: Caller,
    Path((cache, file)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let record = authorize(&state, &caller, &cache, "push", |p| p.push).await?;
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
        store_dir: &record.store_dir,
        nar_hash: info.nar_hash,
        nar_size: info.nar_size,
        references: &references,
        deriver: deriver.as_deref(),
        system: info.system.as_deref(),
        sigs: &info.sigs,
        ca: info.ca.as_deref(),
    }
    .into_record()?;
    state.storage.put_path(&cache, &path).await?;
    // The staging marker stays until garbage collection finds it older than the grace
    // period: another client (or replica) may be publishing the same NAR at this moment.
    tracing::info!(store_path = %path.store_path, "published through narinfo PUT");
    Ok(StatusCode::OK)
}

/// `DELETE /{cache}/{hash}.narinfo`: takes one path out of the cache (Attic has no such
/// call). Its chunks stay until garbage collection finds nothing else uses them.
#[instrument(skip_all, fields(cache = %cache, file = %file))]
pub async fn delete_file(
    State(state): State<AppState>,
    caller: Caller,
    Path((cache, file)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    authorize(&state, &caller, &cache, "delete", |p| p.delete).await?;
    let Some(hash_part) = file.strip_suffix(".narinfo") else {
        return Err(Error::invalid(format!("cannot delete {file:?}: name a path as {{hash}}.narinfo")).into());
    };
    path_record(&state, &cache, hash_part).await?;
    state.storage.delete_path(&cache, hash_part).await?;
    tracing::info!(hash = hash_part, "path deleted");
    Ok(StatusCode::OK)
}

/// `GET|HEAD /{cache}/nar/{hash}.nar.zst` (stored zstd frames as they are) and
/// `/{cache}/nar/{hash}.nar` (decompressed). Every chunk is checked before the status line (see
/// [`crate::preflight`]), so a missing or corrupt chunk is a 5xx, never a 200 cut short; and every
/// chunk is verified again as it is sent.
#[instrument(skip_all, fields(cache = %cache, file = %file))]
pub async fn get_nar(
    State(state): State<AppState>,
    caller: Caller,
    Path((cache, file)): Path<(String, String)>,
) -> ApiResult<Response> {
    authorize(&state, &caller, &cache, "pull", |p| p.pull).await?;
    let (hash_part, compressed) = if let Some(h) = file.strip_suffix(".nar.zst") {
        (h, true)
    } else if let Some(h) = file.strip_suffix(".nar") {
        (h, false)
    } else {
        return Err(Error::not_found(format!("no such NAR {file:?}")).into());
    };
    // Nix asks for nar/<filehash>.nar.xz before uploading; those names are never ours.
    if hash_part.len() != 32 {
        return Err(Error::not_found(format!("no such NAR {file:?}")).into());
    }
    let path = path_record(&state, &cache, hash_part).await?;
    let manifest = state.manifest_of(&path).await?;
    state.record_access(&cache, hash_part).await;
    state.verified.check(&state.storage, &manifest.nar_hash, &manifest.chunks, state.config.chunk_parallelism).await?;
    let mut chunks = Box::pin(verified_chunks(
        state.storage.clone(),
        manifest.chunks.clone(),
        state.config.chunk_parallelism,
        state.chunk_reads.clone(),
        state.metrics.clone(),
    ));
    let first = chunks.next().await.transpose()?;
    let metrics = state.metrics.clone();
    let pick = move |(frame, data): (Bytes, Bytes)| {
        let piece = if compressed { frame } else { data };
        metrics.bytes_out.fetch_add(piece.len() as u64, std::sync::atomic::Ordering::Relaxed);
        piece
    };
    let first_pick = pick.clone();
    let rest = chunks.map_ok(pick).map_err(|err| {
        tracing::error!(error = %err, "NAR stream failed after its start");
        std::io::Error::other(err)
    });
    let stream = futures::stream::iter(first.map(|c| Ok(first_pick(c)))).chain(rest);
    let mut response = Response::new(Body::from_stream(stream));
    let content_type = if compressed { "application/zstd" } else { "application/x-nix-nar" };
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    if !compressed {
        response.headers_mut().insert(header::CONTENT_LENGTH, header::HeaderValue::from(manifest.nar_size));
    }
    Ok(response)
}

/// `PUT /{cache}/nar/{name}.nar[.xz|.zst|.bz2|.br]`: the NAR of a `nix copy --to http://`, which
/// its narinfo PUT publishes.
#[instrument(skip_all, fields(cache = %cache, file = %file))]
pub async fn put_nar(
    State(state): State<AppState>,
    caller: Caller,
    Path((cache, file)): Path<(String, String)>,
    body: Body,
) -> ApiResult<StatusCode> {
    authorize(&state, &caller, &cache, "push", |p| p.push).await?;
    let compression = Compression::from_file_name(&file)?;
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let ingested = state.ingester.ingest(stream, compression).await?;
    let nar_hash = ingested.manifest.nar_hash;
    let (_, stats) = ingested.commit().await?;
    state.storage.put_pending(&cache, &nar_hash).await?;
    tracing::info!(nar_hash = %nar_hash, new_chunks = stats.new_chunks, chunks = stats.chunks, "NAR staged");
    Ok(StatusCode::OK)
}
