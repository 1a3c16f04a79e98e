//! The lazy mount against substituting first, on synthetic trees.

use super::*;

/// The lazy runner set-ups of issue 18 with Nix 2.30: overlayfs over the mount plus
/// `nix-store --load-db` into the runner's database, against Nix's `local-overlay` store
/// (the mount as the lower store, registered in the lower store's own database); Nix 2.8's
/// overlayfs set-up beside them; the reference is substituting the path first, as runners do
/// today. The job reads 200 of the std docs' HTML files through a derivation.
pub(crate) fn lazy_section(report: &mut Report, work: &Path) {
    use common_fuse::{local_overlay_url, mount_lower_store, mount_overlay, register_lazily, NixVersion, Setup, Unmount, CACHE};
    const JOB_FILES: usize = 200;
    let sysroot = Command::new("rustc").args(["--print", "sysroot"]).output().unwrap();
    let docs_dir = PathBuf::from(String::from_utf8(sysroot.stdout).unwrap().trim()).join("share/doc/rust/html/std");
    let job = |nix: &common::Nix, store: &str, docs: &str, run: usize| -> f64 {
        let expr = format!(
            "derivation {{ name = \"job-{run}-{}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
             args = [ \"-c\" \"/bin/busybox find ${{builtins.storePath \"{docs}\"}} -name '*.html' | /bin/busybox sort | \
             /bin/busybox head -n {JOB_FILES} | /bin/busybox xargs /bin/busybox cat | /bin/busybox wc -c > $out\" ]; }}",
            common::unique_seed("j")
        );
        time_cmd(nix.cmd("nix-build").args(["--store", store, "--no-out-link", "-E", &expr]).stdout(Stdio::null()))
    };
    // (set-up, job) medians per way, plus the docs' size.
    let mut rows: Vec<(&str, f64, f64)> = Vec::new();
    let mut docs_mb = 0.0;
    for (way, version) in [
        ("Nix 2.30, overlayfs + `--load-db`", NixVersion::V2_30),
        ("Nix 2.30, `local-overlay` store", NixVersion::V2_30),
        ("Nix 2.8, overlayfs + `--load-db`", NixVersion::V2_8),
        ("Nix 2.30, substitute first (`nix copy --from`)", NixVersion::V2_30),
    ] {
        let setup = Setup::of(version);
        let docs = setup.nix.run(setup.nix.cmd("nix-store").args(["--store", &setup.store_root, "--add"]).arg(&docs_dir)).trim().to_string();
        docs_mb = setup.nix.path_info(&setup.store_root, &docs).nar_size as f64 / MB;
        let netrc = setup.server.netrc(&setup.token);
        let out = setup.nix.copy_to(&setup.store_root, &format!("{}/{CACHE}?compression=zstd", setup.server.url), &netrc, std::slice::from_ref(&docs));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let (mut setups, mut jobs) = (Vec::new(), Vec::new());
        for run in 0..RUNS {
            let dir = tempfile::tempdir_in(work).unwrap();
            let cache_dir = dir.path().join("cache");
            std::fs::create_dir_all(&cache_dir).unwrap();
            drop_caches();
            let mut mounts: Vec<Unmount> = Vec::new();
            let mut fuse = None;
            let (store, set_up) = if way.contains("substitute") {
                let store = format!("local?root={}", dir.path().join("root").display());
                let t = time_cmd(
                    setup.nix.cmd("nix").args(["copy", "--no-check-sigs", "--from", &format!("{}/{CACHE}", setup.server.url), "--to", &store, "--option", "netrc-file"]).arg(&netrc).arg(&docs),
                );
                (store, t)
            } else if way.contains("local-overlay") {
                let mount = fuse.insert(setup.mount(&setup.server.url, &cache_dir, &[]));
                let started = Instant::now();
                let lower = dir.path().join("lower");
                std::fs::create_dir_all(lower.join("nix/store")).unwrap();
                register_lazily(&setup, &format!("local?root={}", lower.display()), std::slice::from_ref(&docs));
                mounts.push(mount_lower_store(&mount.mountpoint, &dir.path().join("stub"), &lower.join("nix/store")));
                let merged = dir.path().join("merged");
                let upper = dir.path().join("upper");
                // The same layers as the lower store's directory, not that overlay itself: see
                // tests/fuse_store.rs on the kernel's stacking limit.
                let layers = PathBuf::from(format!("{}:{}", dir.path().join("stub").display(), mount.mountpoint.display()));
                mounts.push(mount_overlay(&layers, &upper, &dir.path().join("work"), &merged.join("nix/store")));
                let store = local_overlay_url(&lower, &merged, &upper);
                (store, started.elapsed().as_secs_f64())
            } else {
                let mount = fuse.insert(setup.mount(&setup.server.url, &cache_dir, &[]));
                let started = Instant::now();
                let root = dir.path().join("root");
                mounts.push(mount_overlay(&mount.mountpoint, &dir.path().join("upper"), &dir.path().join("work"), &root.join("nix/store")));
                let store = format!("local?root={}", root.display());
                register_lazily(&setup, &store, std::slice::from_ref(&docs));
                (store, started.elapsed().as_secs_f64())
            };
            setups.push(set_up);
            jobs.push(job(&setup.nix, &store, &docs, run));
            // Overlays first, then the mount under them.
            while let Some(m) = mounts.pop() {
                drop(m);
            }
            drop(fuse);
        }
        rows.push((way, median(setups), median(jobs)));
    }
    let (_, sub_setup, sub_job) = rows[3];
    report.section(
        "Lazy runner set-ups, by Nix version",
        &format!(
            "The std docs of this machine's Rust toolchain ({docs_mb:.0} MB of NAR, thousands of files) pushed to a server on local \
             storage; a job (a derivation) then reads {JOB_FILES} of its HTML files. Each of {RUNS} runs starts from a fresh \
             `flywheel mount` with an empty chunk cache and an empty page cache. Set-up is everything between the mount being up \
             and the job starting: registering the path (`flywheel dump-db | nix-store --load-db`) and the overlay mounts, or, \
             for the reference, `nix copy --from` of the whole path into a fresh store. Server and runner share this machine.",
        ),
    );
    for &(way, set_up, job_s) in &rows[..3] {
        report.row(
            way,
            format!("set-up {:.2} s; job {:.2} s; total {:.2} s", set_up, job_s, set_up + job_s),
            format!("substitute first: set-up {:.2} s; job {:.2} s; total {:.2} s", sub_setup, sub_job, sub_setup + sub_job),
            format!("{} total", ratio((sub_setup + sub_job) / (set_up + job_s))),
            "",
        );
    }
}
