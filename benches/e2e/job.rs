//! CI jobs on a lazy mount against substituting first, with and without traces.

use super::*;

/// A CI job as a whole (set-up plus the job) on a fresh runner: substituting its closure
/// first, against the lazy mount with no trace (on-demand reads plus the background fill),
/// with a trace saved by an earlier job, and warm; on loopback and over 1 Gbit/s and
/// 100 Mbit/s links; for three shapes of job. Then the fill policies side by side.
pub(crate) fn job_section(report: &mut Report, work: &Path) {
    use common_fuse::{mount_overlay, register_lazily, NixVersion, Setup, Unmount, CACHE};
    const JOB_FILES: usize = 200;
    const JOB_RUNS: usize = 5;
    // The production layout: the server keeps its chunks in S3 (s3s-fs here).
    let setup = Setup::on(NixVersion::V2_8, Backend::S3);
    let netrc = setup.server.netrc(&setup.token);
    // Adds a directory of this machine to the store and pushes it: (store path, NAR MB).
    let push = |dir: &Path| -> (String, f64) {
        let path = setup.nix.run(setup.nix.cmd("nix-store").args(["--store", &setup.store_root, "--add"]).arg(dir)).trim().to_string();
        let nar_mb = setup.nix.path_info(&setup.store_root, &path).nar_size as f64 / MB;
        let out = setup.nix.copy_to(&setup.store_root, &format!("{}/{CACHE}?compression=zstd", setup.server.url), &netrc, std::slice::from_ref(&path));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (path, nar_mb)
    };
    let sysroot = Command::new("rustc").args(["--print", "sysroot"]).output().unwrap();
    let (docs, docs_mb) = push(&PathBuf::from(String::from_utf8(sysroot.stdout).unwrap().trim()).join("share/doc/rust/html/std"));
    // This machine's Python with its site-packages (boto3 among them): a tool environment of
    // the size CI jobs carry, of which one job uses a little. Its binary finds its prefix from
    // where it runs, and LD_LIBRARY_PATH points it at the store's libpython instead of the
    // RUNPATH into the original install.
    let python = Command::new("python3").args(["-c", "import sys, boto3; print(sys.base_prefix, '%d.%d' % sys.version_info[:2])"]).output().unwrap();
    assert!(python.status.success(), "python3 with boto3 is needed (pip install boto3): {}", String::from_utf8_lossy(&python.stderr));
    let python = String::from_utf8(python.stdout).unwrap();
    let (python_prefix, python_version) = python.trim().split_once(' ').unwrap();
    let (python_env, python_mb) = push(Path::new(python_prefix));
    // Three shapes: a walk reading files in NAR order (readahead's best case); a job that opens
    // files spread over the whole path one by one, a process each, which no readahead
    // foresees; and a Python job that imports boto3 and makes an S3 client. The policy
    // comparison runs on the first two (the Python path is larger than the fill's limit).
    struct Shape {
        name: &'static str,
        path: String,
        script: String,
        compare_policies: bool,
    }
    let shapes = [
        Shape {
            name: "walk",
            path: docs.clone(),
            script: format!("/bin/busybox find $p -name '*.html' | /bin/busybox sort | /bin/busybox head -n {JOB_FILES} | /bin/busybox xargs /bin/busybox cat | /bin/busybox wc -c"),
            compare_policies: true,
        },
        Shape {
            name: "scattered",
            path: docs.clone(),
            script: format!("/bin/busybox find $p -name '*.html' | /bin/busybox sort | /bin/busybox awk 'NR % 17 == 0' | /bin/busybox head -n {JOB_FILES} | while read f; do /bin/busybox sha256sum $f; done | /bin/busybox wc -l"),
            compare_policies: true,
        },
        Shape {
            name: "python",
            path: python_env.clone(),
            script: format!(
                "LD_LIBRARY_PATH=$p/lib PYTHONDONTWRITEBYTECODE=1 $p/bin/python{python_version} -c \"import boto3; \
                 print(type(boto3.session.Session().client('s3', region_name='us-east-1')).__name__)\""
            ),
            compare_policies: false,
        },
    ];
    // While tuning one shape: BENCH_JOB_SHAPES=python (a comma-separated list) runs only those.
    let only: Option<Vec<String>> = std::env::var("BENCH_JOB_SHAPES").ok().map(|v| v.split(',').map(str::to_string).collect());
    let shapes: Vec<Shape> = shapes.into_iter().filter(|s| only.as_ref().is_none_or(|only| only.iter().any(|o| o == s.name))).collect();
    // And BENCH_JOB_LINKS="100 Mbit/s" runs only those links; BENCH_JOB_TRACE_FLAGS adds mount
    // flags (space-separated) to the runs with a trace.
    let only_links: Option<Vec<String>> = std::env::var("BENCH_JOB_LINKS").ok().map(|v| v.split(',').map(str::to_string).collect());
    let trace_flags: Vec<String> = std::env::var("BENCH_JOB_TRACE_FLAGS").map(|v| v.split_whitespace().map(str::to_string).collect()).unwrap_or_default();
    let job = |shape: &Shape, store: &str| -> f64 {
        let expr = format!(
            "derivation {{ name = \"job-{}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
             args = [ \"-c\" ''p=${{builtins.storePath \"{}\"}}; {} > $out'' ]; }}",
            common::unique_seed("j"),
            shape.path,
            shape.script
        );
        // A build for a store under another root runs in a sandbox, which has only busybox from
        // the host; Python also needs the host's loader and C library.
        time_cmd(
            setup
                .nix
                .cmd("nix-build")
                .args(["--store", store, "--no-out-link", "--option", "extra-sandbox-paths", "/lib64=/usr/lib64 /lib=/usr/lib /usr/lib"])
                .args(["-E", &expr])
                .stdout(Stdio::null()),
        )
    };
    let metrics_port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // One lazy job on a fresh runner: (total, warm job, compressed bytes fetched, set-up).
    let lazy_run = |shape: &Shape, url: &str, extra: &[&str]| -> (f64, f64, f64, f64) {
        let dir = tempfile::tempdir_in(work).unwrap();
        let cache_dir = dir.path().join("cache");
        std::fs::create_dir_all(&cache_dir).unwrap();
        drop_caches();
        let port = metrics_port();
        let listen = format!("127.0.0.1:{port}");
        let mount = setup.mount(url, &cache_dir, &[extra, &["--metrics-listen", &listen]].concat());
        let started = Instant::now();
        let root = dir.path().join("root");
        let overlay: Unmount = mount_overlay(&mount.mountpoint, &dir.path().join("upper"), &dir.path().join("work"), &root.join("nix/store"));
        let store = format!("local?root={}", root.display());
        register_lazily(&setup, &store, std::slice::from_ref(&shape.path));
        let set_up = started.elapsed().as_secs_f64();
        job(shape, &store);
        let total = started.elapsed().as_secs_f64();
        let metrics = common::fetch_metrics(&format!("http://{listen}/metrics"));
        let fetched = common::metric_value(&metrics, "flywheel_runner_chunk_bytes_fetched_total");
        if only.is_some() {
            let lines: Vec<&str> = metrics
                .lines()
                .filter(|l| !l.starts_with('#') && (l.contains("fetch_seconds_sum") || l.contains("fetch_seconds_count") || l.contains("prefetched") || l.contains("chunks_fetched") || l.contains("reads_total") || l.contains("passthrough_opens")))
                .collect();
            eprintln!("JOBDEBUG {} {url} {extra:?} total {:.2} s: {}", shape.name, started.elapsed().as_secs_f64(), lines.join("; "));
        }
        drop_caches();
        let warm = job(shape, &store);
        drop(overlay);
        drop(mount);
        (total, warm, fetched, set_up)
    };
    let substitute_run = |shape: &Shape, url: &str| -> f64 {
        let dir = tempfile::tempdir_in(work).unwrap();
        drop_caches();
        let store = format!("local?root={}", dir.path().join("root").display());
        let started = Instant::now();
        let copied = setup
            .nix
            .cmd("nix")
            .args(["copy", "--no-check-sigs", "--from", &format!("{url}/{CACHE}"), "--to", &store, "--option", "netrc-file"])
            .arg(&netrc)
            .arg(&shape.path)
            .status()
            .unwrap();
        assert!(copied.success());
        job(shape, &store);
        started.elapsed().as_secs_f64()
    };
    let links: [(&str, Option<f64>); 3] = [("loopback", None), ("1 Gbit/s", Some(125e6)), ("100 Mbit/s", Some(12.5e6))];
    let link_urls: Vec<(&str, Option<Link>)> = links.iter().map(|(name, rate)| (*name, rate.map(|r| Link::start(&setup.server.url, r)))).collect();
    let url_of = |link: &Option<Link>| link.as_ref().map(Link::url).unwrap_or_else(|| setup.server.url.clone());
    let policies: [(&str, &[&str]); 4] = [
        ("no fill (default)", &[]),
        ("fill, NAR order", &["--fill-max-nar-size", "268435456"]),
        ("fill, NAR order, 1 request beside reads", &["--fill-max-nar-size", "268435456", "--fill-alongside-reads", "1"]),
        ("fill, small files first", &["--fill-max-nar-size", "268435456", "--fill-order", "small-files-first"]),
    ];
    let mut policy_rows: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut intro_bytes = Vec::new();
    let mut rows: Vec<(String, String, String, String, &str)> = Vec::new();
    for shape in &shapes {
        let key = format!("bench-{}", shape.name);
        // The trace: one job on a fresh runner records it and saves it at unmount.
        lazy_run(shape, &setup.server.url, &["--prefetch", &key, "--fill-max-nar-size", "0"]);
        // What the job reads, compressed: on-demand reads alone fetch only that (and readahead).
        let (_, _, read_bytes, _) = lazy_run(shape, &setup.server.url, &["--fill-max-nar-size", "0"]);
        intro_bytes.push(format!("{} {:.1} MB", shape.name, read_bytes / MB));
        // Jobs move by a tenth of a second when a neighbour of this shared machine wakes (the
        // warm Python job between 1.38 and 1.75 s within one run of three), so every shape gets
        // five runs; and the variants take turns within each round, so a noisy stretch falls
        // on all of them rather than on one.
        let runs = JOB_RUNS;
        let compared = if shape.compare_policies { &policies[..] } else { &policies[..1] };
        for (name, link) in &link_urls {
            if only_links.as_ref().is_some_and(|only| !only.iter().any(|o| o == name)) {
                continue;
            }
            let url = url_of(link);
            let mut references = Vec::new();
            let mut by_policy_runs: Vec<Vec<(f64, f64, f64, f64)>> = vec![Vec::new(); compared.len()];
            let mut traced: Vec<(f64, f64, f64, f64)> = Vec::new();
            for _ in 0..runs {
                references.push(substitute_run(shape, &url));
                for ((_, flags), runs) in compared.iter().zip(&mut by_policy_runs) {
                    runs.push(lazy_run(shape, &url, flags));
                }
                let flags: Vec<&str> = ["--prefetch", key.as_str()].into_iter().chain(trace_flags.iter().map(String::as_str)).collect();
                traced.push(lazy_run(shape, &url, &flags));
            }
            let reference = median(references);
            let by_policy: Vec<(f64, f64)> =
                by_policy_runs.iter().map(|runs| (median(runs.iter().map(|r| r.0).collect()), median(runs.iter().map(|r| r.2).collect()))).collect();
            if shape.compare_policies {
                policy_rows.push((format!("{}, {name} (substitute first: {reference:.2} s)", shape.name), by_policy.clone()));
            }
            let (cold, fill_bytes) = by_policy[0];
            let with_trace = median(traced.iter().map(|r| r.0).collect());
            let warm = median(traced.iter().map(|r| r.1).collect());
            let trace_bytes = median(traced.iter().map(|r| r.2).collect());
            let set_up = |runs: &[(f64, f64, f64, f64)]| median(runs.iter().map(|r| r.3).collect());
            let substitute = format!("substitute first: {reference:.2} s");
            let slow = *name == "100 Mbit/s";
            rows.push((
                format!("{}, {name}: cold lazy, no trace", shape.name),
                format!("{cold:.2} s (set-up {:.2} s; {:.1} MB fetched)", set_up(&by_policy_runs[0]), fill_bytes / MB),
                substitute.clone(),
                format!("{} faster", ratio(reference / cold)),
                if slow { ">= 2x faster" } else { ">= 1x" },
            ));
            // Where 4x is asked, what the warm job alone (no set-up, nothing to fetch) would
            // reach: for a short job, less than that.
            let warm_alone = if slow { format!("; the warm job alone {:.2}x", reference / warm) } else { String::new() };
            rows.push((
                format!("{}, {name}: cold lazy, with a trace", shape.name),
                format!(
                    "{with_trace:.2} s (set-up {:.2} s; {:.1} MB fetched, {:.2}x what the job reads)",
                    set_up(&traced),
                    trace_bytes / MB,
                    trace_bytes / read_bytes.max(1.0)
                ),
                substitute,
                format!("{} faster; {:.2}x the warm job{warm_alone}", ratio(reference / with_trace), with_trace / warm),
                match *name {
                    "loopback" => ">= 1.5x faster, <= 1.3x warm, <= 1.5x bytes",
                    "100 Mbit/s" => ">= 4x faster, <= 1.3x warm",
                    _ => "<= 1.3x warm",
                },
            ));
            rows.push((format!("{}, {name}: warm lazy", shape.name), format!("{warm:.2} s (job only)"), String::new(), String::new(), ""));
        }
    }
    report.section(
        "CI job, lazy against substituting first",
        &format!(
            "Jobs (derivations) on a fresh runner: empty chunk cache, empty page cache, and a store that does not have the \
             path. *walk* and *scattered* run over the std docs of this machine's Rust toolchain ({docs_mb:.0} MB of NAR): \
             *walk* lists every HTML file and reads {JOB_FILES} of them in name order (NAR order) with one `cat`; *scattered* \
             reads {JOB_FILES} files spread over the whole path (every 17th), one `sha256sum` process each. *python* runs \
             this machine's Python {python_version} environment from the store ({python_mb:.0} MB of NAR, its site-packages \
             included), importing boto3 and making an S3 client, as a deploy step does. Each figure \
             is set-up plus job, median of {JOB_RUNS} runs, the variants taking turns. The reference substitutes the path first (`nix copy --from` the server, \
             zstd NARs, into a fresh store). The lazy runs mount the cache, mount an overlay over it and register the path \
             (`dump-db | nix-store --load-db`), then run the job: with no trace (on-demand reads, the default), and with the trace an earlier job saved (`flywheel mount --prefetch KEY`, which starts fetching the traced \
             chunks at once). Warm is the same job again on that runner, page cache dropped. Links are the proxy of the \
             substituter section (shared bandwidth limit, no added latency). A lazy figure's set-up (the overlay, and \
             registering the path in a fresh store, the first use of Nix's binaries after the page cache was dropped) \
             is given beside it; the warm job is the job alone. Nix 2.8; the server keeps its chunks in S3 (s3s-fs on this machine, sharing \
             its cores), as in production, and the chunks its chunk API sent lately in memory (`hot-chunk-bytes`, 64 MiB \
             by default), so that after the first run a job's misses are answered from there, as for a fleet's runners \
             running the same jobs (the reference's NAR downloads neither use nor fill it). \
             On-demand reads alone fetch (compressed): {}.",
            intro_bytes.join(", ")
        ),
    );
    for (figure, ours, reference, ratio_text, target) in rows {
        report.row(&figure, ours, reference, ratio_text, target);
    }
    report.section(
        "Background fill policies",
        &format!(
            "The cold lazy jobs of the section above with no trace, under each fill policy (`--fill-max-nar-size 0`; the \
             default; `--fill-alongside-reads 1`; `--fill-order small-files-first`): set-up plus job, median of {JOB_RUNS} runs, \
             and the compressed bytes fetched by the job's end."
        ),
    );
    for (figure, by_policy) in policy_rows {
        let cells: Vec<String> = policies.iter().zip(&by_policy).map(|((name, _), (t, b))| format!("{name}: {t:.2} s, {:.1} MB", b / MB)).collect();
        report.row(&figure, cells[..2].join("; "), cells[2..].join("; "), String::new(), "");
    }
}
