//! Subcommands for the operator of the cache host: `fsck`, `gc`, `compact` and `state`.

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
    println!(
        "checked {} paths, {} Bazel blobs, {} chunks and {} packs",
        report.paths, report.blobs, report.chunks_checked, report.packs_checked
    );
    for hash in &report.missing {
        println!("missing chunk {hash}");
    }
    for hash in &report.corrupt {
        println!("corrupt chunk {hash}");
    }
    for id in &report.damaged_packs {
        println!("damaged pack {id}");
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
    for (cache, sha256) in &report.damaged_blobs {
        println!("{verb}: {cache} Bazel blob {sha256}");
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
    println!("{verb} {} packs ({} bytes); kept {} packs", report.packs_deleted, report.pack_bytes_freed, report.packs_kept);
    println!(
        "{verb} {} chunk grants, {} uploaded NAR file names, {} logs and debug info records, {} realisations, {} access traces, {} Bazel records",
        report.grants_deleted,
        report.nar_files_deleted,
        report.logs_deleted,
        report.realisations_deleted,
        report.traces_deleted,
        report.bazel_records_deleted
    );
    Ok(())
}

#[derive(Args)]
pub struct CompactArgs {
    /// The server's config file (its storage and `[compaction]` settings).
    #[arg(long, short)]
    config: PathBuf,
    /// Report what would be packed; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Treat paths as cold once not read or published for this many seconds, overriding
    /// `compaction.cold-after`.
    #[arg(long)]
    cold_after: Option<u64>,
}

/// Packs the chunks of cold paths (see `flywheel_server::compact`).
pub fn compact(args: CompactArgs) -> anyhow::Result<()> {
    let (mut config, storage, runtime) = open_storage(&args.config)?;
    if let Some(cold_after) = args.cold_after {
        config.compaction.cold_after = cold_after;
    }
    let report = runtime
        .block_on(flywheel_server::compact::compact(&storage, &config.compaction, args.dry_run))
        .context("compacting storage")?;
    for problem in &report.problems {
        println!("problem: {problem}");
    }
    println!("{} cold NARs looked over, {} hot ones left alone", report.cold_nars, report.hot_nars);
    let verb = if report.dry_run { "would write" } else { "wrote" };
    println!("{verb} {} mostly dead packs anew, moving {} chunks", report.packs_rewritten, report.chunks_repacked);
    if report.dry_run {
        println!("would pack {} chunks ({} bytes of frames)", report.chunks_packed, report.frame_bytes);
    } else {
        println!(
            "packed {} chunks ({} bytes of frames) into {} packs ({} bytes with their pointers)",
            report.chunks_packed, report.frame_bytes, report.packs_written, report.pack_bytes
        );
    }
    Ok(())
}

/// What an operator does to OpenTofu/Terraform states, straight on the server's storage.
#[derive(clap::Subcommand)]
pub enum StateCommand {
    /// List the stacks that have a state, versions or a lock.
    List(StateArgs),
    /// List a stack's stored versions, oldest first.
    Versions(StackArgs),
    /// Print a stack's current state, or one version of it, to stdout.
    Get(StateGetArgs),
    /// Make an earlier version current again (the rollback is itself a new version).
    Rollback(StateRollbackArgs),
    /// Break a stack's lock, whoever holds it (a job that died holding it).
    Unlock(StackArgs),
}

#[derive(Args)]
pub struct StateArgs {
    /// The server's config file (its storage and `[tfstate]` settings).
    #[arg(long, short)]
    config: PathBuf,
}

#[derive(Args)]
pub struct StackArgs {
    #[command(flatten)]
    common: StateArgs,
    /// The stack, as `project/stack`.
    stack: String,
}

#[derive(Args)]
pub struct StateGetArgs {
    #[command(flatten)]
    stack: StackArgs,
    /// A stored version instead of the current state.
    #[arg(long)]
    version: Option<String>,
}

#[derive(Args)]
pub struct StateRollbackArgs {
    #[command(flatten)]
    stack: StackArgs,
    /// The version to make current (see `flywheel state versions`).
    version: String,
}

/// Runs one `flywheel state` command.
pub fn state(command: StateCommand) -> anyhow::Result<()> {
    use flywheel_server::tfstate::{StackId, StateStore, UnlockOutcome, WriteOutcome};
    let config_path = match &command {
        StateCommand::List(args) => &args.config,
        StateCommand::Versions(args) | StateCommand::Unlock(args) => &args.common.config,
        StateCommand::Get(args) => &args.stack.common.config,
        StateCommand::Rollback(args) => &args.stack.common.config,
    };
    let (config, storage, runtime) = open_storage(config_path)?;
    let states = StateStore::for_config(storage, &config.tfstate);
    let stack = |name: &str| StackId::parse(name).context("naming the stack");
    runtime.block_on(async {
        match &command {
            StateCommand::List(_) => {
                for id in states.stacks().await.context("listing stacks")? {
                    println!("{id}");
                }
            }
            StateCommand::Versions(args) => {
                let id = stack(&args.stack)?;
                for v in states.versions(&id).await.context("listing versions")? {
                    println!("{}\t{} bytes", v.version, v.size);
                }
            }
            StateCommand::Get(args) => {
                let id = stack(&args.stack.stack)?;
                let bytes = match &args.version {
                    Some(version) => states.version(&id, version).await?,
                    None => states.get(&id).await?,
                };
                let bytes = bytes.with_context(|| format!("{id} has no such state"))?;
                use std::io::Write;
                std::io::stdout().write_all(&bytes)?;
            }
            StateCommand::Rollback(args) => {
                let id = stack(&args.stack.stack)?;
                // An operator's rollback goes through the lock like any write: a rollback
                // under a running apply would be overwritten by it.
                match states.rollback(&id, &args.version, None).await? {
                    None => anyhow::bail!("{id} has no version {}", args.version),
                    Some(WriteOutcome::Done(new)) => {
                        println!("{id} is at version {} again (stored as {})", args.version, new.unwrap_or_default())
                    }
                    Some(WriteOutcome::Locked(holder)) => anyhow::bail!(
                        "{id} is locked by {}: wait for it, or break the lock with `flywheel state unlock`",
                        String::from_utf8_lossy(&holder)
                    ),
                    Some(WriteOutcome::LockNotHeld) => anyhow::bail!("{id}: unexpected lock answer"),
                }
            }
            StateCommand::Unlock(args) => {
                let id = stack(&args.stack)?;
                match states.unlock(&id, None).await? {
                    UnlockOutcome::Released => println!("{id}: lock broken"),
                    UnlockOutcome::NotLocked => println!("{id} was not locked"),
                    UnlockOutcome::HeldByOther(_) => anyhow::bail!("{id}: unexpected unlock answer"),
                }
            }
        }
        Ok(())
    })
}
