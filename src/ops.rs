//! Subcommands for the operator of the cache host: `fsck` and `gc`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use flywheel_server::storage::Storage;
use flywheel_server::ServerConfig;

/// The server's config, its storage, and a runtime to drive it: what an offline operation needs.
fn open_storage(config: &Path) -> anyhow::Result<(ServerConfig, Storage, tokio::runtime::Runtime)> {
    let config = ServerConfig::load(config)?;
    let storage = Storage::new(config.open_store().context("opening storage")?);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    Ok((config, storage, runtime))
}

#[derive(Args)]
pub struct FsckArgs {
    /// The server's config file (for its storage).
    #[arg(long, short)]
    config: PathBuf,
    /// Report only; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Chunks read at once.
    #[arg(long, default_value_t = 16)]
    parallelism: usize,
}

/// Checks every chunk of every published path; without `--dry-run`, takes damaged paths out of
/// service so that a re-push repairs them.
pub fn fsck(args: FsckArgs) -> anyhow::Result<()> {
    let (_, storage, runtime) = open_storage(&args.config)?;
    let report = runtime
        .block_on(flywheel_server::fsck::fsck(&storage, args.parallelism.max(1), !args.dry_run))
        .context("checking storage")?;
    println!("checked {} paths and {} chunks", report.paths, report.chunks_checked);
    for hash in &report.missing {
        println!("missing chunk {hash}");
    }
    for hash in &report.corrupt {
        println!("corrupt chunk {hash}");
    }
    for (cache, path) in &report.missing_manifests {
        println!("missing manifest for {cache}: {path}");
    }
    for (cache, path) in &report.unreadable_manifests {
        println!("unreadable manifest for {cache}: {path}");
    }
    for (cache, hash_part) in &report.unreadable_paths {
        println!("unreadable path record in {cache}: {hash_part}");
    }
    for problem in &report.problems {
        println!("problem (nothing concluded): {problem}");
    }
    let verb = if report.repaired { "taken out of service" } else { "damaged (dry run: left as is)" };
    for (cache, path) in &report.damaged_paths {
        println!("{verb}: {cache} /nix/store/{path}");
    }
    if report.repaired && !report.damaged_paths.is_empty() {
        println!("push the paths above again to repair them");
    }
    Ok(())
}

#[derive(Args)]
pub struct GcArgs {
    /// The server's config file (its storage and `[gc]` settings).
    #[arg(long, short)]
    config: PathBuf,
    /// Report only; delete nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Expires paths past their retention and sweeps unreferenced manifests and chunks.
pub fn gc(args: GcArgs) -> anyhow::Result<()> {
    let (config, storage, runtime) = open_storage(&args.config)?;
    let report = runtime
        .block_on(flywheel_server::gc::collect(&storage, &config.gc, args.dry_run))
        .context("collecting garbage")?;
    let verb = if report.dry_run { "would free" } else { "freed" };
    if let flywheel_server::config::StorageConfig::Local { path } = &config.storage {
        let grace = std::time::Duration::from_secs(config.gc.grace_period);
        let (files, bytes) = flywheel_server::gc::sweep_local_staging(path, grace, storage.clock().as_ref(), args.dry_run)
            .context("sweeping staging files left by crashes")?;
        if files > 0 {
            println!("{verb} {files} staging files left by crashes ({bytes} bytes)");
        }
    }
    for (cache, path) in &report.expired_paths {
        println!("expired: {cache} {path}");
    }
    for problem in &report.problems {
        println!("problem: {problem}");
    }
    if report.manifests_sweep_skipped {
        println!("kept every manifest: a path record or a listing could not be read");
    }
    if report.chunks_sweep_skipped {
        println!("kept every chunk: a manifest in use could not be read");
    }
    println!(
        "{verb} {} paths, {} manifests, {} chunks ({} bytes); kept {} chunks",
        report.expired_paths.len(),
        report.manifests_deleted,
        report.chunks_deleted,
        report.chunk_bytes_freed,
        report.chunks_kept
    );
    println!(
        "{verb} {} chunk grants, {} uploaded NAR file names, {} logs and debug info records, {} realisations, {} access traces",
        report.grants_deleted, report.nar_files_deleted, report.logs_deleted, report.realisations_deleted, report.traces_deleted
    );
    Ok(())
}
