//! `PUT /_api/v1/upload-path`: a plain NAR with its metadata in a header or a body preamble.

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use bytes::{Bytes, BytesMut};
use flywheel_core::api::v1::upload_path::{
    UploadPathNarInfo, UploadPathResult, UploadPathResultKind, MAX_NAR_INFO_SIZE, NAR_INFO_HEADER,
    NAR_INFO_PREAMBLE_SIZE_HEADER,
};
use flywheel_core::nix::Sha256Hash;
use flywheel_core::Error;
use futures::{StreamExt, TryStreamExt};
use tracing::instrument;

use super::publish::PathMetadata;
use super::{authorize, Caller, Need, Push};
use crate::error::ApiError;
use crate::ingest::Compression;
use crate::state::AppState;

/// Ingests the NAR, checks it against the metadata, and publishes the path.
///
/// The body is always read whole, even when the NAR is stored already: reading it is the proof
/// that the uploader has the contents, so nobody can publish another cache's NAR by its hash.
#[instrument(skip_all, fields(store_path))]
pub async fn handle(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<UploadPathResult>, ApiError> {
    // The cache is named in the body's preamble: a caller who may push nowhere is refused
    // before any of it is read.
    caller.require_anywhere("push", Push::granted)?;
    let mut stream = body.into_data_stream().map_err(std::io::Error::other).boxed();
    let (info_json, leftover) = if let Some(size) = headers.get(NAR_INFO_PREAMBLE_SIZE_HEADER) {
        let size: usize = size
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| Error::invalid(format!("{NAR_INFO_PREAMBLE_SIZE_HEADER} is not a number")))?;
        if size > MAX_NAR_INFO_SIZE {
            return Err(Error::invalid(format!("upload info of {size} bytes is over the limit of {MAX_NAR_INFO_SIZE}")).into());
        }
        let mut preamble = BytesMut::with_capacity(size);
        let mut leftover = Bytes::new();
        while preamble.len() < size {
            let Some(piece) = stream.next().await else {
                return Err(Error::invalid("body ended inside the upload info preamble").into());
            };
            let mut piece = piece.map_err(|e| Error::invalid(format!("reading the body: {e}")))?;
            let take = (size - preamble.len()).min(piece.len());
            preamble.extend_from_slice(&piece.split_to(take));
            leftover = piece;
        }
        (preamble.freeze(), leftover)
    } else if let Some(value) = headers.get(NAR_INFO_HEADER) {
        if value.len() > MAX_NAR_INFO_SIZE {
            return Err(Error::invalid(format!("{NAR_INFO_HEADER} is over the limit of {MAX_NAR_INFO_SIZE} bytes")).into());
        }
        (Bytes::copy_from_slice(value.as_bytes()), Bytes::new())
    } else {
        return Err(Error::invalid(format!("set {NAR_INFO_HEADER} or {NAR_INFO_PREAMBLE_SIZE_HEADER}")).into());
    };
    let info: UploadPathNarInfo = serde_json::from_slice(&info_json)
        .map_err(|e| Error::invalid(format!("upload info is not valid JSON: {e}")))?;
    tracing::Span::current().record("store_path", info.store_path.as_str());
    let cache = authorize(&state, &caller, &info.cache, "push", |p| p.push).await?;
    let nar_hash = Sha256Hash::parse(&info.nar_hash)?;
    let (store_path, record) = PathMetadata {
        store_path: &info.store_path,
        cache: &cache,
        nar_hash,
        nar_size: info.nar_size,
        references: &info.references,
        deriver: info.deriver.as_deref(),
        system: info.system.as_deref(),
        sigs: &info.sigs,
        ca: info.ca.as_deref(),
    }
    .into_record(state.storage.clock().now_secs())?;
    if store_path.hash_part() != info.store_path_hash {
        return Err(Error::invalid(format!(
            "store_path_hash {:?} does not match store_path {:?}",
            info.store_path_hash, info.store_path
        ))
        .into());
    }

    let nar = futures::stream::iter((!leftover.is_empty()).then_some(Ok(leftover))).chain(stream);
    let ingested = state.ingester.ingest(nar, Compression::None).await?;
    let got = (ingested.manifest.nar_hash, ingested.manifest.nar_size);
    if got != (nar_hash, info.nar_size) {
        return Err(Error::invalid(format!(
            "the NAR does not match its upload info: it has hash {} and size {}, the info says {} and {}",
            got.0, got.1, nar_hash, info.nar_size
        ))
        .into());
    }
    let (manifest, stats) = ingested.commit().await?;
    let held_before = super::binary_cache::grant_nar(&state, &info.cache, &manifest).await?;
    state.publish_path(&info.cache, &record).await?;
    tracing::info!(new_chunks = stats.new_chunks, chunks = stats.chunks, "published through upload-path");
    // What the uploader learns is relative to this cache alone: whether other caches store
    // these chunks is theirs to know.
    let kind =
        if held_before == manifest.nar_size { UploadPathResultKind::Deduplicated } else { UploadPathResultKind::Uploaded };
    Ok(Json(UploadPathResult {
        kind,
        file_size: None,
        frac_deduplicated: Some(held_before as f64 / manifest.nar_size.max(1) as f64),
    }))
}
