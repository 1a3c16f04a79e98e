//! `flywheel lazy`: makes closures valid in the local Nix database at once, from the server's
//! narinfo files, for a store whose bytes a `flywheel mount` serves on demand (the lower layer
//! of an overlay, or of Nix's `local-overlay` store). No NAR is downloaded: the job that then
//! uses the closure reads only what it needs, through the mount.
//!
//! Registration writes Nix's database, so it runs as root (or whoever owns the store). The
//! narinfo files must carry a signature by a trusted key: valid paths are what Nix builds on,
//! and the server is outside the runner.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use flywheel_client::{dump_db, ApiClient};
use flywheel_core::nix::{NarInfo, StorePath, VerifyingKey};
use flywheel_core::{Error, Result};

/// What to register, and where.
#[derive(Debug, Clone)]
pub struct LazyConfig {
    /// `nix-store` to run.
    pub nix_store: PathBuf,
    /// A `--store` for `nix-store`, when not the machine's own store.
    pub store: Option<String>,
    /// Keys whose signature makes a narinfo trusted; empty with `check_sigs` false only.
    pub trusted_keys: Vec<VerifyingKey>,
    /// Whether narinfo signatures are checked.
    pub check_sigs: bool,
}

/// What a registration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyReport {
    /// Paths of the closures.
    pub closure: usize,
    /// Paths that were valid already and left alone.
    pub already_valid: usize,
    /// Paths registered now.
    pub registered: usize,
}

/// Registers the closures of `roots` (store paths or base names) that the local store lacks.
pub async fn register(api: &ApiClient, roots: &[String], config: &LazyConfig) -> Result<LazyReport> {
    if config.check_sigs && config.trusted_keys.is_empty() {
        return Err(Error::invalid("no trusted public key to check the cache's signatures with"));
    }
    let store_dir = api.store_dir().await?;
    let roots = roots.iter().map(|p| flywheel_core::nix::StorePath::from_arg(p, &store_dir)).collect::<Result<Vec<_>>>()?;
    let infos = dump_db::closure(api, &roots, &store_dir).await?;
    if config.check_sigs {
        check_signatures(&infos, &config.trusted_keys, &store_dir)?;
    }
    let invalid = invalid_paths(config, infos.keys().map(|p| p.to_absolute(&store_dir)).collect())?;
    let wanted: BTreeMap<StorePath, NarInfo> =
        infos.iter().filter(|(path, _)| invalid.contains(&path.to_absolute(&store_dir))).map(|(p, i)| (p.clone(), i.clone())).collect();
    if !wanted.is_empty() {
        load_db(config, &dump_db::render(&wanted, &store_dir))?;
    }
    Ok(LazyReport { closure: infos.len(), already_valid: infos.len() - wanted.len(), registered: wanted.len() })
}

/// Refuses the whole closure when any narinfo lacks a signature by a trusted key.
fn check_signatures(infos: &BTreeMap<StorePath, NarInfo>, keys: &[VerifyingKey], store_dir: &str) -> Result<()> {
    for info in infos.values() {
        if !keys.iter().any(|key| info.verify(key, store_dir)) {
            return Err(Error::new(flywheel_core::ErrorKind::Forbidden, format!(
                "{} is not signed by a trusted key ({}); nothing was registered",
                info.store_path.to_absolute(store_dir),
                keys.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    Ok(())
}

fn nix_store(config: &LazyConfig) -> Command {
    let mut command = Command::new(&config.nix_store);
    if let Some(store) = &config.store {
        command.args(["--store", store]);
    }
    command
}

/// Which of `paths` the local store does not hold as valid.
fn invalid_paths(config: &LazyConfig, paths: Vec<String>) -> Result<std::collections::HashSet<String>> {
    let mut invalid = std::collections::HashSet::new();
    // Bounded argument lists: a closure may have thousands of paths.
    for group in paths.chunks(512) {
        let output = nix_store(config)
            .args(["--check-validity", "--print-invalid"])
            .args(group)
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| Error::unavailable(format!("running {}: {e}", config.nix_store.display())))?;
        if !output.status.success() {
            return Err(Error::unavailable(format!(
                "nix-store --check-validity failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        invalid.extend(String::from_utf8_lossy(&output.stdout).lines().map(str::to_string));
    }
    Ok(invalid)
}

fn load_db(config: &LazyConfig, registration: &str) -> Result<()> {
    let mut child = nix_store(config)
        .arg("--load-db")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::unavailable(format!("running {}: {e}", config.nix_store.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(registration.as_bytes())
            .map_err(|e| Error::unavailable(format!("writing to nix-store --load-db: {e}")))?;
    }
    let output = child.wait_with_output().map_err(|e| Error::unavailable(format!("waiting for nix-store --load-db: {e}")))?;
    if !output.status.success() {
        return Err(Error::unavailable(format!("nix-store --load-db failed: {}", String::from_utf8_lossy(&output.stderr).trim())));
    }
    Ok(())
}

/// The keys narinfo signatures are checked against: `explicit` (`name:base64` each) when
/// given, else those nix-daemon trusts (the `nix.conf` in `$NIX_CONF_DIR`, or `/etc/nix`).
/// Having none is an error: registering unchecked paths must be asked for.
pub fn trusted_keys(explicit: &[String]) -> Result<Vec<VerifyingKey>> {
    if !explicit.is_empty() {
        return explicit.iter().map(|k| VerifyingKey::parse(k).map_err(|e| e.context("--trusted-key"))).collect();
    }
    let conf_dir = std::env::var_os("NIX_CONF_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| "/etc/nix".into());
    let conf = conf_dir.join("nix.conf");
    let keys = keys_in_nix_conf(&std::fs::read_to_string(&conf).unwrap_or_default());
    if keys.is_empty() {
        return Err(Error::invalid(format!(
            "no trusted key: pass --trusted-key, list it in {}, or pass --no-check-sigs",
            conf.display()
        )));
    }
    Ok(keys)
}

/// The keys of `trusted-public-keys` and `extra-trusted-public-keys` in a `nix.conf`.
pub fn keys_in_nix_conf(text: &str) -> Vec<VerifyingKey> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .filter(|(name, _)| matches!(name.trim(), "trusted-public-keys" | "extra-trusted-public-keys"))
        .flat_map(|(_, value)| value.split_whitespace().filter_map(|k| VerifyingKey::parse(k).ok()).collect::<Vec<_>>())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_trusted_keys_from_nix_conf() {
        let key = flywheel_core::nix::SigningKey::generate("ci-1").unwrap().verifying_key().to_nix_string();
        let other = flywheel_core::nix::SigningKey::generate("ci-2").unwrap().verifying_key().to_nix_string();
        let conf = format!("substituters = x\ntrusted-public-keys = {key} bad:key\n# trusted-public-keys = {other}\nextra-trusted-public-keys =  {other}\n");
        let keys: Vec<String> = super::keys_in_nix_conf(&conf).iter().map(|k| k.to_nix_string()).collect();
        assert_eq!(keys, vec![key, other]);
    }
}
