//! The server: uploads and reads against nginx serving the same files, and Attic's figures.

use super::*;

pub(crate) fn server_section(report: &mut Report, work: &Path) {
    let nar = nar_of_sysroot_lib(work);
    let nar_size = std::fs::metadata(&nar).unwrap().len();
    let out = Command::new("sha256sum").arg(&nar).output().unwrap();
    let nar_hash_hex = String::from_utf8(out.stdout).unwrap()[..64].to_string();
    let size_mb = nar_size as f64 / MB;
    eprintln!("NAR of the toolchain's lib: {size_mb:.1} MB");

    // CLI references over the same bytes.
    let sha_cli = median((0..RUNS).map(|_| time_cmd(Command::new("sha256sum").arg(&nar))).collect());
    let zstd_cli = median(
        (0..RUNS).map(|_| time_cmd(Command::new("zstd").args(["-3", "-T1", "-q", "-c"]).arg(&nar))).collect(),
    );

    // Ingest through upload-path, each run on fresh storage.
    let mut ingest = Vec::new();
    let mut rss = Vec::new();
    let mut stored = 0u64;
    // Every server is kept until all runs are done: deleting one run's 6000 chunk files just
    // before the next run makes ext4 scan for recently freed inodes on every file it creates.
    let mut servers = Vec::new();
    for _ in 0..SERVER_RUNS {
        let server = Server::start(Backend::Local);
        server.create_cache("bench", false);
        let token = server.admin_token();
        // No writeback of the previous run's chunks during this one.
        let _ = Command::new("sync").status();
        ingest.push(upload_path(&server, &token, &nar, &nar_hash_hex, nar_size));
        rss.push(server.peak_rss() as f64);
        stored = server.chunk_bytes();
        servers.push((server, token));
    }
    let ingest_s = median(ingest);
    let rss_mb = median(rss) / MB;
    let (server, token) = servers.pop().unwrap();
    drop(servers);

    // Downloads from flywheel and from nginx serving the same NAR as files.
    let hash = "0".repeat(32);
    let dl = |suffix: &str| {
        let url = format!("{}/bench/nar/{hash}{suffix}", server.url);
        median((0..2 * SERVER_RUNS).map(|_| curl_get(&url, Some(&token)).0).collect())
    };
    let dl_zst = dl(".nar.zst");
    let dl_nar = dl(".nar");
    let static_root = work.join("static");
    std::fs::create_dir_all(&static_root).unwrap();
    std::fs::rename(&nar, static_root.join("lib.nar")).unwrap();
    let zst = std::fs::File::create(static_root.join("lib.nar.zst")).unwrap();
    assert!(Command::new("zstd").args(["-3", "-T0", "-q", "-c"]).arg(static_root.join("lib.nar")).stdout(zst).status().unwrap().success());
    let nginx = Nginx::start(&static_root, work);
    let ng = |name: &str| {
        let url = format!("http://127.0.0.1:{}/{name}", nginx.port);
        median((0..2 * SERVER_RUNS).map(|_| curl_get(&url, None).0).collect())
    };
    let ng_zst = ng("lib.nar.zst");
    let ng_nar = ng("lib.nar");
    drop(nginx);

    report.section(
        "Server: ingest and download of one NAR",
        &format!(
            "The NAR of this machine's Rust toolchain `lib` directory ({size_mb:.1} MB; Attic's reference NAR was 540 MB), \
             uploaded with `curl -T` through `PUT /_api/v1/upload-path` to a server on local storage, {SERVER_RUNS} runs on \
             fresh storage, each after a `sync`; downloaded with `curl -o /dev/null`, {} runs. Throughput is NAR bytes per second. It stored {:.1} MB of \
             zstd chunks. Attic's figures come from ../shared/DESIGN.md (measured on this kind of machine, not in this run).",
            2 * SERVER_RUNS,
            stored as f64 / MB
        ),
    );
    report.row(
        "ingest (upload-path)",
        format!("{:.0} MB/s", size_mb / ingest_s),
        format!("Attic 21.8 MB/s; `zstd -3 -T1` {:.0} MB/s; `sha256sum` {:.0} MB/s", size_mb / zstd_cli, size_mb / sha_cli),
        format!("{:.1}x Attic; {:.2}x zstd CLI", size_mb / ingest_s / 21.8, zstd_cli / ingest_s),
        ">= 218 MB/s (10x Attic)",
    );
    report.row(
        "download, `.nar.zst` (stored frames)",
        format!("{:.0} MB/s", size_mb / dl_zst),
        format!("Attic 95 MB/s; nginx, same NAR as `.nar.zst` file: {:.0} MB/s", size_mb / ng_zst),
        format!("{:.1}x Attic; {:.2}x nginx", size_mb / dl_zst / 95.0, ng_zst / dl_zst),
        ">= 950 MB/s (10x Attic)",
    );
    report.row(
        "download, `.nar` (decompressed)",
        format!("{:.0} MB/s", size_mb / dl_nar),
        format!("nginx, plain `.nar` file: {:.0} MB/s", size_mb / ng_nar),
        format!("{:.2}x nginx", ng_nar / dl_nar),
        "",
    );
    report.row(
        "server peak RSS during ingest",
        format!("{rss_mb:.0} MB"),
        "Attic 176 MB".into(),
        format!("{:.2}x Attic", rss_mb / 176.0),
        "< 100 MB",
    );
}
