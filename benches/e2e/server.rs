//! The server: uploads and reads against nginx serving the same files, and against Attic's
//! server built from its repository, in the same run.

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
    let mut first_downloads = Vec::new();
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
        // Written back first, for Attic too: the figure is the server's, not the disk's.
        let _ = Command::new("sync").status();
        first_downloads.push(curl_get(&format!("{}/bench/nar/{}.nar.zst", server.url, "0".repeat(32)), Some(&token)).0);
        stored = server.chunk_bytes();
        servers.push((server, token));
    }
    let ingest_s = median(ingest);
    let rss_mb = median(rss) / MB;
    let (server, token) = servers.pop().unwrap();
    drop(servers);

    // The trade-off a cheaper ingest level would make (compaction recompresses cold chunks at
    // its own level; hot chunks stay as ingested and go out as stored in `.nar.zst`).
    let mut ingest_level1 = Vec::new();
    let mut stored_level1 = 0u64;
    let mut level1_servers = Vec::new();
    for _ in 0..SERVER_RUNS {
        let server = Server::start_with(Backend::Local, "zstd-level = 1");
        server.create_cache("bench", false);
        let token = server.admin_token();
        let _ = Command::new("sync").status();
        ingest_level1.push(upload_path(&server, &token, &nar, &nar_hash_hex, nar_size));
        stored_level1 = server.chunk_bytes();
        level1_servers.push(server);
    }
    drop(level1_servers);
    let ingest_level1_s = median(ingest_level1);

    // The same upload and downloads against atticd, when scripts/attic.sh could build it.
    let attic = Attic::available().then(|| {
        let mut ingest = Vec::new();
        let mut rss = Vec::new();
        let mut attics = Vec::new();
        for _ in 0..SERVER_RUNS {
            let attic = Attic::start();
            let _ = Command::new("sync").status();
            ingest.push(upload_path_to(&attic.url, &attic.token, &nar, &nar_hash_hex, nar_size));
            rss.push(attic.peak_rss() as f64);
            attics.push(attic);
        }
        let attic = attics.pop().unwrap();
        drop(attics);
        let url = attic.nar_url(&"0".repeat(32));
        let _ = Command::new("sync").status();
        let downloads: Vec<(f64, u64)> = (0..2 * SERVER_RUNS).map(|_| curl_get(&url, Some(&attic.token))).collect();
        // Attic sends its zstd chunks as they are stored (its narinfo says `Compression: zstd`):
        // checked once, untimed, that they decompress to the NAR.
        let check = Command::new("sh")
            .arg("-c")
            .arg(format!("curl -sf -H 'Authorization: Bearer {}' '{url}' | zstd -dc | sha256sum", attic.token))
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&check.stdout).starts_with(&nar_hash_hex), "Attic's download is not the NAR");
        assert!(downloads.iter().all(|(_, bytes)| *bytes == downloads[0].1), "Attic's downloads differ in size: {downloads:?}");
        let first = downloads[0].0;
        let later = median(downloads[1..].iter().map(|(t, _)| *t).collect());
        (median(ingest), median(rss) / MB, first, later)
    });

    // Downloads from flywheel and from nginx serving the same NAR as files.
    let hash = "0".repeat(32);
    let dl = |suffix: &str| {
        let url = format!("{}/bench/nar/{hash}{suffix}", server.url);
        median((0..2 * SERVER_RUNS).map(|_| curl_get(&url, Some(&token)).0).collect())
    };
    // The first download of each upload apart (taken right after it): it looks every chunk up.
    let dl_zst_first = median(first_downloads);
    let dl_zst = dl(".nar.zst");
    let dl_nar = dl(".nar");
    drop(server);

    // The production layout: chunks in S3 (s3s-fs on this machine, sharing its two cores).
    let s3 = Server::start(Backend::S3);
    s3.create_cache("bench", false);
    let s3_token = s3.admin_token();
    upload_path(&s3, &s3_token, &nar, &nar_hash_hex, nar_size);
    let s3_url = format!("{}/bench/nar/{hash}.nar.zst", s3.url);
    let dl_s3_first = curl_get(&s3_url, Some(&s3_token)).0;
    let dl_s3 = median((0..SERVER_RUNS).map(|_| curl_get(&s3_url, Some(&s3_token)).0).collect());
    drop(s3);
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
    // What s3s-fs itself sends: the same `.nar.zst` file as one object (its bucket is the
    // directory nginx served), in one GET and in four ranged GETs at once.
    let s3s = S3sFs::start(work);
    let s3s_url = format!("{}/static/lib.nar.zst", s3s.url);
    let zst_len = std::fs::metadata(static_root.join("lib.nar.zst")).unwrap().len();
    let s3s_one = median((0..SERVER_RUNS).map(|_| curl_get(&s3s_url, None).0).collect());
    let s3s_four = median((0..SERVER_RUNS).map(|_| ranged_gets_at_once(&s3s_url, zst_len, 4)).collect());
    drop(s3s);
    let s3s_best = s3s_one.min(s3s_four);

    let attic_note = match &attic {
        Some(_) => format!(
            "Attic is atticd built by `scripts/attic.sh` from its repository (commit {}), with SQLite and local storage, the same \
             chunk sizes and zstd, fed the same upload the same way, {SERVER_RUNS} runs on fresh storage; its downloads are of the URL \
             its narinfo names, the first one after the last upload (and a `sync`) and then {} more.",
            std::env::var("ATTIC_REV").unwrap_or_else(|_| "b7c9056".into()),
            2 * SERVER_RUNS - 1
        ),
        None => "Attic could not be built on this machine (`scripts/attic.sh` found no source or failed), so it is not \
                 compared; the references are the CLI tools and nginx."
            .to_string(),
    };
    report.section(
        "Server: ingest and download of one NAR",
        &format!(
            "The NAR of this machine's Rust toolchain `lib` directory ({size_mb:.1} MB), uploaded with `curl -T` through \
             `PUT /_api/v1/upload-path` to a server on local storage, {SERVER_RUNS} runs on fresh storage, each after a \
             `sync` and followed, after another `sync`, by the first download; downloaded with `curl -o /dev/null` {} times \
             more. The S3 rows upload it once to a server on S3 (s3s-fs on this machine, sharing its cores) and download \
             it {SERVER_RUNS} more times after the first; s3s-fs's own rows GET the `.nar.zst` file nginx serves from an s3s-fs whose \
             bucket is nginx's directory, {SERVER_RUNS} times each way. The level 1 row repeats the ingest runs with `zstd-level = 1`. \
             Throughput is NAR bytes per second. It stored {:.1} MB of zstd chunks. {attic_note}",
            2 * SERVER_RUNS,
            stored as f64 / MB
        ),
    );
    let versus_attic = |ours_s: f64, theirs_s: Option<f64>| -> (String, String) {
        match theirs_s {
            Some(t) => (format!("Attic {:.0} MB/s; ", size_mb / t), format!("{:.1}x Attic; ", t / ours_s)),
            None => (String::new(), String::new()),
        }
    };
    let (attic_ref, attic_ratio) = versus_attic(ingest_s, attic.map(|a| a.0));
    report.row(
        "ingest (upload-path)",
        format!("{:.0} MB/s", size_mb / ingest_s),
        format!("{attic_ref}`zstd -3 -T1` {:.0} MB/s; `sha256sum` {:.0} MB/s", size_mb / zstd_cli, size_mb / sha_cli),
        format!("{attic_ratio}{:.2}x zstd CLI", zstd_cli / ingest_s),
        ">= 10x Attic; >= 1.6x zstd CLI",
    );
    report.row(
        "ingest at `zstd-level = 1` (not the default)",
        format!("{:.0} MB/s; stored {:.1} MB", size_mb / ingest_level1_s, stored_level1 as f64 / MB),
        format!("level 3 (the default): {:.0} MB/s, stored {:.1} MB; `zstd -3 -T1` {:.0} MB/s", size_mb / ingest_s, stored as f64 / MB, size_mb / zstd_cli),
        format!("{:.2}x zstd CLI; {:.2}x the stored bytes of level 3", zstd_cli / ingest_level1_s, stored_level1 as f64 / stored as f64),
        "",
    );
    let zst_file = ("same NAR as `.nar.zst` file", ng_zst);
    let zst_target = ">= 4x Attic; >= 0.5x nginx";
    for (figure, ours, theirs, (file, nginx), target) in [
        ("first download after ingest, `.nar.zst`", dl_zst_first, attic.map(|a| a.2), zst_file, zst_target),
        ("later downloads, `.nar.zst` (stored frames)", dl_zst, attic.map(|a| a.3), zst_file, zst_target),
        ("download, `.nar` (decompressed)", dl_nar, None, ("plain `.nar` file", ng_nar), ""),
        ("S3 storage: first download after ingest, `.nar.zst`", dl_s3_first, None, zst_file, ">= 0.25x nginx"),
        ("S3 storage: later downloads, `.nar.zst`", dl_s3, None, zst_file, ">= 0.25x nginx"),
    ] {
        let (attic_ref, attic_ratio) = versus_attic(ours, theirs);
        report.row(
            figure,
            format!("{:.0} MB/s", size_mb / ours),
            format!("{attic_ref}nginx, {file}: {:.0} MB/s", size_mb / nginx),
            format!("{attic_ratio}{:.2}x nginx", nginx / ours),
            target,
        );
    }
    for (figure, ours) in [("S3 storage: first download after ingest, against s3s-fs itself", dl_s3_first), ("S3 storage: later downloads, against s3s-fs itself", dl_s3)] {
        report.row(
            figure,
            format!("{:.0} MB/s", size_mb / ours),
            format!(
                "s3s-fs sending the same NAR's `.nar.zst` file as one object: {:.0} MB/s in one GET, {:.0} MB/s in 4 ranged GETs at once (nginx {})",
                size_mb / s3s_one,
                size_mb / s3s_four,
                ratio(ng_zst / s3s_best)
            ),
            format!("{} s3s-fs", ratio(s3s_best / ours)),
            "",
        );
    }
    report.row(
        "server peak RSS during ingest",
        format!("{rss_mb:.0} MB"),
        attic.map(|a| format!("Attic {:.0} MB", a.1)).unwrap_or_default(),
        attic.map(|a| format!("{:.2}x Attic", rss_mb / a.1)).unwrap_or_default(),
        "< 100 MB",
    );
}
