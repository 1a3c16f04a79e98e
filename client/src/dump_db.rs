//! `flywheel dump-db`: the registration of a closure in the format `nix-store --load-db`
//! reads, taken from the server's narinfo files, so that lazily served paths become valid
//! for Nix without their bytes being read.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use flywheel_core::nix::{NarInfo, StorePath};
use flywheel_core::{Error, ErrorKind, Result};
use futures::StreamExt;

use crate::api::ApiClient;

/// narinfo requests in flight at once.
const PARALLEL: usize = 16;

/// The registration of the closure of `paths` (full store paths or base names) in the cache's
/// store dir, in `nix-store --load-db`'s format.
pub async fn dump(api: &ApiClient, paths: &[String]) -> Result<String> {
    let store_dir = api.store_dir().await?;
    let roots = paths.iter().map(|p| StorePath::from_arg(p, &store_dir)).collect::<Result<Vec<_>>>()?;
    let infos = closure(api, &roots, &store_dir).await?;
    Ok(render(&infos, &store_dir))
}

/// The narinfo of every path in the closure of `roots`, by path.
pub async fn closure(api: &ApiClient, roots: &[StorePath], store_dir: &str) -> Result<BTreeMap<StorePath, NarInfo>> {
    let mut done: BTreeMap<StorePath, NarInfo> = BTreeMap::new();
    let mut queued: BTreeSet<StorePath> = roots.iter().cloned().collect();
    let mut frontier: Vec<StorePath> = queued.iter().cloned().collect();
    while !frontier.is_empty() {
        let fetched: Vec<(StorePath, Result<NarInfo>)> = futures::stream::iter(frontier.drain(..))
            .map(|path| async move {
                let info = api.narinfo(&path.hash_part(), store_dir).await;
                (path, info)
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        for (path, info) in fetched {
            let info = info.map_err(|e| match e.kind() {
                ErrorKind::NotFound => Error::not_found(format!(
                    "{} is not in cache {:?}",
                    path.to_absolute(store_dir),
                    api.cache()
                )),
                _ => e,
            })?;
            if info.store_path != path {
                return Err(Error::corrupt(format!(
                    "the narinfo for {} describes {}",
                    path.to_absolute(store_dir),
                    info.store_path.to_absolute(store_dir)
                )));
            }
            for reference in &info.references {
                if queued.insert(reference.clone()) {
                    frontier.push(reference.clone());
                }
            }
            done.insert(path, info);
        }
    }
    Ok(done)
}

/// Renders registrations in `nix-store --load-db` format: per path its full path, the NAR
/// hash as bare base16, the NAR size, the deriver's full path or an empty line, the number of
/// references, and the references' full paths.
pub fn render(infos: &BTreeMap<StorePath, NarInfo>, store_dir: &str) -> String {
    let mut out = String::new();
    for info in infos.values() {
        let _ = writeln!(out, "{}", info.store_path.to_absolute(store_dir));
        let _ = writeln!(out, "{}", info.nar_hash.to_hex());
        let _ = writeln!(out, "{}", info.nar_size);
        let _ = writeln!(out, "{}", info.deriver.as_ref().map(|d| d.to_absolute(store_dir)).unwrap_or_default());
        let _ = writeln!(out, "{}", info.references.len());
        for reference in &info.references {
            let _ = writeln!(out, "{}", reference.to_absolute(store_dir));
        }
    }
    out
}
