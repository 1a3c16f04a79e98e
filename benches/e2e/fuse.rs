//! The FUSE mount against native disk.

use super::*;

pub(crate) fn fuse_section(report: &mut Report, work: &Path) {
    use common_fuse::{Setup, CACHE};
    let setup = Setup::new();
    let sysroot = Command::new("rustc").args(["--print", "sysroot"]).output().unwrap();
    let sysroot = PathBuf::from(String::from_utf8(sysroot.stdout).unwrap().trim());
    let add = |dir: &Path| -> String {
        let out = setup.nix.run(setup.nix.cmd("nix-store").args(["--store", &setup.store_root, "--add"]).arg(dir));
        out.trim().to_string()
    };
    let docs = add(&sysroot.join("share/doc/rust/html/std"));
    let lib = add(&sysroot.join("lib"));
    let netrc = setup.server.netrc(&setup.token);
    let url = format!("{}/{CACHE}?compression=zstd", setup.server.url);
    let out = setup.nix.copy_to(&setup.store_root, &url, &netrc, &[docs.clone(), lib.clone()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stored = setup.server.chunk_bytes();
    let native_docs = setup.physical(&docs);
    let native_lib = setup.physical(&lib);
    let docs_files = files_below(&native_docs).len();
    let lib_bytes: u64 = files_below(&native_lib).iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
    let small = native_docs.join("index.html");
    assert!(small.is_file(), "the docs path lacks index.html");
    let fresh_mount = || {
        let cache_dir = tempfile::tempdir_in(work).unwrap();
        let mount = setup.mount(&setup.server.url, cache_dir.path(), &[]);
        (mount, cache_dir)
    };

    // Cold first read of a small file: fresh mount, fresh cache, empty page cache.
    let mut cold_small = Vec::new();
    let mut native_small = Vec::new();
    for _ in 0..RUNS {
        let (mount, _cache) = fresh_mount();
        drop_caches();
        cold_small.push(timed(|| read_file(&mount.path(&docs).join("index.html"))).0);
        drop_caches();
        native_small.push(timed(|| read_file(&small)).0);
    }
    let (cold_small, native_small) = (median(cold_small), median(native_small));

    // Cold read of a whole path against `nix copy --from` of it.
    let mut cold_path = Vec::new();
    let mut copy_from = Vec::new();
    for i in 0..RUNS {
        let (mount, _cache) = fresh_mount();
        drop_caches();
        cold_path.push(timed(|| read_tree(&mount.path(&docs))).0);
        let store = setup.nix.store(&format!("copy-from-{i}"));
        let url = format!("{}/{CACHE}", setup.server.url);
        let mut cmd = setup.nix.cmd("nix");
        cmd.args(["copy", "--store", &store, "--from", &url, "--option", "netrc-file"]).arg(&netrc).args(["--no-check-sigs", &docs]);
        copy_from.push(time_cmd(&mut cmd));
    }
    let (cold_path, copy_from) = (median(cold_path), median(copy_from));

    // Warm (chunks in the local cache, page cache dropped), hot (page cache), metadata walk.
    let (mount, cache_dir) = fresh_mount();
    let (cold_lib, _) = timed(|| read_tree(&mount.path(&lib)));
    let mut warm = Vec::new();
    let mut native_warm = Vec::new();
    let mut hot = Vec::new();
    let mut native_hot = Vec::new();
    for _ in 0..RUNS {
        drop_caches();
        warm.push(timed(|| read_tree(&mount.path(&lib))).0);
        hot.push(timed(|| read_tree(&mount.path(&lib))).0);
        drop_caches();
        native_warm.push(timed(|| read_tree(&native_lib)).0);
        native_hot.push(timed(|| read_tree(&native_lib)).0);
    }
    // A hot pass takes well under a second, so take more of them, alternating, for a steadier
    // median.
    // The last native warm pass dropped the page cache: fill it again first.
    read_tree(&mount.path(&lib));
    read_tree(&native_lib);
    // One pass of `lib` from the page cache takes about 0.1 s, short enough for a scheduler
    // hiccup to move it by half: each of these samples is the mean of HOT_PASSES passes.
    let passes = |dir: &Path| {
        let (seconds, _) = timed(|| {
            for _ in 0..HOT_PASSES {
                read_tree(dir);
            }
        });
        seconds / HOT_PASSES as f64
    };
    for _ in 0..HOT_RUNS {
        hot.push(passes(&mount.path(&lib)));
        native_hot.push(passes(&native_lib));
    }
    eprintln!("hot runs (s): flywheel {hot:.3?}, native {native_hot:.3?}");
    let (warm, native_warm, hot, native_hot) = (median(warm), median(native_warm), median(hot), median(native_hot));
    walk_stat(&mount.path(&docs));
    walk_stat(&native_docs);
    let walk = median((0..5).map(|_| timed(|| walk_stat(&mount.path(&docs))).0).collect());
    let native_walk = median((0..5).map(|_| timed(|| walk_stat(&native_docs)).0).collect());
    let entries = walk_stat(&native_docs);
    let rss = mount.pid().map(|pid| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024.0
    });
    drop(mount);
    drop(cache_dir);

    // A job that reads every tenth file of the closure, on a fresh cache.
    let (mount, cache_dir) = fresh_mount();
    let mut all: Vec<PathBuf> = files_below(&native_docs).into_iter().chain(files_below(&native_lib)).collect();
    all.sort();
    let closure_bytes: u64 = all.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
    // Spread over the closure: a file is read when that keeps the bytes read so far at or under
    // a tenth of the bytes passed so far.
    let mut read_bytes = 0;
    let mut passed = 0;
    let mut chosen = Vec::new();
    for file in &all {
        let size = std::fs::metadata(file).unwrap().len();
        passed += size;
        if (read_bytes + size) * 10 <= passed {
            read_bytes += size;
            chosen.push(file.clone());
        }
    }
    read_bytes = 0;
    for file in chosen.iter() {
        let logical = format!("/{}", file.strip_prefix(&setup.store_root).unwrap().to_string_lossy());
        read_bytes += read_file(&mount.path(&logical));
    }
    let fetched = common_fuse::dir_size(&cache_dir.path().join("packs"));
    drop(mount);

    let mb = |bytes: f64| bytes / MB;
    report.section(
        "Lazy FUSE store",
        &format!(
            "`flywheel mount` on a fresh cache dir against a local server holding two paths pushed with `nix copy`: the \
             toolchain's `std` HTML docs ({docs_files} files) and its `lib` directory ({:.0} MB). Native is the same tree \
             in the local Nix store on this disk; the page cache is dropped (`/proc/sys/vm/drop_caches`) where it says \
             cold or warm. Single-threaded reads with 1 MiB buffers. {RUNS} runs each (hot reads: {} runs, the last {HOT_RUNS} of \
             them {HOT_PASSES} passes each), medians. \
             Files read whole once are then served by FUSE passthrough from their copies under the cache dir.",
            mb(lib_bytes as f64),
            RUNS + HOT_RUNS
        ),
    );
    // Times beside their references: (figure, ours, reference, its time, what the ratio is to,
    // target); times below a second in ms.
    let time = |seconds: f64| if seconds < 1.0 { format!("{:.2} ms", seconds * 1e3) } else { format!("{seconds:.2} s") };
    for (figure, ours, reference, theirs, versus, target) in [
        ("cold first read of a small file".to_string(), cold_small, "native, cold", native_small, "native", ""),
        ("cold read of a whole path (`std` docs)".to_string(), cold_path, "`nix copy --from` the same server", copy_from, "nix copy", ""),
        (format!("`find` + `stat` of {entries} entries, after first access"), walk, "native", native_walk, "native", "<= 2x native"),
    ] {
        report.row(&figure, time(ours), format!("{reference}: {}", time(theirs)), format!("{:.2}x {versus}", ours / theirs), target);
    }
    report.row(
        "cold read of `lib` (first access)",
        format!("{:.0} MB/s", mb(lib_bytes as f64) / cold_lib),
        String::new(),
        String::new(),
        "",
    );
    // Reads of all of `lib` beside the same reads of the native copy.
    let mut read_row = |figure: &str, seconds: f64, native: &str, native_seconds: f64, target: &str| {
        report.row(
            figure,
            format!("{:.0} MB/s", mb(lib_bytes as f64) / seconds),
            format!("{native}: {:.0} MB/s", mb(lib_bytes as f64) / native_seconds),
            format!("{:.0}% of native", 100.0 * native_seconds / seconds),
            target,
        )
    };
    read_row("warm read (chunks cached, page cache dropped)", warm, "native, cold", native_warm, ">= 50% of native");
    read_row("hot read (page cache)", hot, "native, hot", native_hot, ">= 90% of native");
    report.row(
        "mount daemon peak RSS",
        rss.map(|r| format!("{:.0} MiB", r / 1048576.0)).unwrap_or_default(),
        String::new(),
        String::new(),
        "<= 128 MiB",
    );
    report.row(
        "bytes fetched by a job reading a tenth of the closure",
        format!("{:.1} MB ({:.1}% of the {:.1} MB stored)", mb(fetched as f64), 100.0 * fetched as f64 / stored as f64, mb(stored as f64)),
        format!("the job read {:.1}% of the closure's {:.0} MB", 100.0 * read_bytes as f64 / closure_bytes as f64, mb(closure_bytes as f64)),
        String::new(),
        "<= 15% of stored size",
    );
}
