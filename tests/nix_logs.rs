//! Build logs: `nix store copy-log --to` uploads them, `nix log --store` reads them back, and
//! bad names, encodings and sizes are refused with nothing stored.

#[macro_use]
mod common;

use common::{Backend, Nix, Server, NixVersion};
use reqwest::blocking::Client;
use reqwest::StatusCode;

fn logs_round_trip(version: NixVersion, backend: Backend) {
    let nix = Nix::of(version);
    let server = Server::start(backend);
    server.create_cache("ci", false);
    let src = nix.store("src");
    let seed = common::unique_seed("log");
    let expr = format!(
        r#"derivation {{ name = "logged-{seed}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo this line goes to the log {seed}; echo done > $out" ]; }}"#
    );
    let drv = nix.run(nix.cmd("nix-instantiate").args(["--store", &src, "-E", &expr])).trim().to_string();
    let out = nix.run(nix.cmd("nix-store").args(["--store", &src, "--realise", &drv])).trim().to_string();
    let netrc = server.netrc(&server.admin_token());
    let url = format!("{}/ci", server.url);
    let netrc_arg = netrc.to_string_lossy().into_owned();

    nix.run(nix.cmd("nix").args(["store", "copy-log", "--store", &src, "--to", &url, "--option", "netrc-file", &netrc_arg, &drv]));
    let log = nix.run(nix.cmd("nix-store").args(["--store", &url, "--option", "substituters", "", "--option", "netrc-file", &netrc_arg, "--read-log", &drv]));
    assert!(log.contains(&format!("this line goes to the log {seed}")), "nix-store -l printed {log:?}");
    // `nix log` of an output finds its derivation through the narinfo's Deriver.
    let copied = nix.copy_to(&src, &url, &netrc, std::slice::from_ref(&out));
    assert!(copied.status.success(), "{}", String::from_utf8_lossy(&copied.stderr));
    let log = nix.run(nix.cmd("nix").args(["log", "--store", &url, "--option", "substituters", "", "--option", "netrc-file", &netrc_arg, &out]));
    assert!(log.contains(&format!("this line goes to the log {seed}")), "nix log printed {log:?}");

    // Reading needs pull, writing push.
    let client = Client::new();
    let base = drv.rsplit('/').next().unwrap();
    let log_url = format!("{url}/log/{base}");
    assert_eq!(client.get(&log_url).send().unwrap().status(), StatusCode::UNAUTHORIZED);
    let pull = server.mint(&["--pull", "ci"]);
    assert_eq!(client.get(&log_url).bearer_auth(&pull).send().unwrap().status(), StatusCode::OK);
    assert_eq!(client.put(&log_url).bearer_auth(&pull).body("overwritten").send().unwrap().status(), StatusCode::FORBIDDEN);

    // Bad input changes nothing.
    let admin = server.admin_token();
    let before = server.storage_snapshot();
    let bomb = zstd::bulk::compress(&vec![b'x'; 65 * 1024 * 1024], 19).unwrap();
    let refused = [
        ("not a derivation", format!("{url}/log/{}", &base[..base.len() - 4]), None, b"log".to_vec()),
        ("not a store path", format!("{url}/log/..%2Fescape.drv"), None, b"log".to_vec()),
        ("unknown encoding", log_url.clone(), Some("gzip"), b"log".to_vec()),
        ("not zstd", log_url.clone(), Some("zstd"), b"plain text".to_vec()),
        ("decompresses past the limit", log_url.clone(), Some("zstd"), bomb),
        ("past the limit", log_url.clone(), None, vec![b'y'; 64 * 1024 * 1024 + 1]),
    ];
    for (label, target, encoding, body) in refused {
        let mut request = client.put(&target).bearer_auth(&admin).body(body);
        if let Some(encoding) = encoding {
            request = request.header("Content-Encoding", encoding);
        }
        let status = request.send().unwrap().status();
        assert!(status.is_client_error(), "{label}: {status}");
    }
    assert_eq!(server.storage_snapshot(), before, "a refused log changed storage");
    let unknown = format!("{url}/log/{}-never-built.drv", &base[..32]);
    assert_eq!(client.get(&unknown).bearer_auth(&pull).send().unwrap().status(), StatusCode::NOT_FOUND);

    // An upload compressed as Nix's log-compression would send it is stored decoded.
    let compressed = zstd::bulk::compress(b"a zstd-encoded log line\n", 3).unwrap();
    let resp = client.put(&log_url).bearer_auth(&admin).header("Content-Encoding", "zstd").body(compressed).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(client.get(&log_url).bearer_auth(&pull).send().unwrap().text().unwrap(), "a zstd-encoded log line\n");
}

nix_matrix! {
    logs_round_trip_local => |version| logs_round_trip(version, Backend::Local);
}

nix_matrix! {
    logs_round_trip_s3 => |version| logs_round_trip(version, Backend::S3);
}

/// `index-debug-info=true`: Nix uploads, for each `lib/debug/.build-id/xx/<38 hex>.debug` (a
/// 20-byte build ID), where to
/// find it; the server serves it back, and the NAR it points to is served at that address.
fn debuginfo_round_trip(version: NixVersion, backend: Backend) {
    let nix = Nix::of(version);
    let server = Server::start(backend);
    server.create_cache("ci", false);
    let src = nix.store("src");
    let seed = common::unique_seed("debug");
    let expr = format!(
        r#"derivation {{ name = "with-debug-{seed}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "/bin/busybox mkdir -p $out/lib/debug/.build-id/ab && echo {seed} > $out/lib/debug/.build-id/ab/cdef0123456789cdef0123456789cdef012345.debug" ]; }}"#
    );
    let out = nix.run(nix.cmd("nix-build").args(["--store", &src, "--no-out-link", "-E", &expr])).trim().to_string();
    let url = format!("{}/ci", server.url);
    let netrc = server.netrc(&server.admin_token());
    let copied = nix.copy_to(&src, &format!("{url}?index-debug-info=true"), &netrc, std::slice::from_ref(&out));
    assert!(copied.status.success(), "{}", String::from_utf8_lossy(&copied.stderr));

    let client = Client::new();
    let pull = server.mint(&["--pull", "ci"]);
    let resp = client.get(format!("{url}/debuginfo/abcdef0123456789cdef0123456789cdef012345.debug")).bearer_auth(&pull).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let info: serde_json::Value = resp.json().unwrap();
    assert_eq!(info["member"], "lib/debug/.build-id/ab/cdef0123456789cdef0123456789cdef012345.debug", "{info}");
    let archive = info["archive"].as_str().unwrap();
    let nar_url = format!("{url}/debuginfo/{archive}");
    let resp = client.get(&nar_url).bearer_auth(&pull).send().unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{nar_url}");
    let mut nar = Vec::new();
    std::io::Read::read_to_end(&mut xz2::read::XzDecoder::new(&resp.bytes().unwrap()[..]), &mut nar).unwrap();
    assert_eq!(nar, nix.dump(&src, &out), "the archive the record names is the path's NAR");

    // Bad records are refused and change nothing.
    let admin = server.admin_token();
    let before = server.storage_snapshot();
    for (label, id, body) in [
        ("not hex", "xyz0", r#"{"archive":"../nar/a.nar.xz","member":"lib/x.debug"}"#),
        ("odd length", "abc", r#"{"archive":"../nar/a.nar.xz","member":"lib/x.debug"}"#),
        ("not JSON", "abcd", "archive"),
        ("unknown field", "abcd", r#"{"archive":"a","member":"b","extra":1}"#),
        ("absolute member", "abcd", r#"{"archive":"../nar/a.nar.xz","member":"/etc/passwd"}"#),
        ("too long", "abcd", &"x".repeat(20_000)),
    ] {
        let status = client.put(format!("{url}/debuginfo/{id}")).bearer_auth(&admin).body(body.to_string()).send().unwrap().status();
        assert!(status.is_client_error(), "{label}: {status}");
    }
    assert_eq!(server.storage_snapshot(), before, "a refused record changed storage");
}

nix_matrix! {
    debuginfo_round_trip_local => |version| debuginfo_round_trip(version, Backend::Local);
}

nix_matrix! {
    debuginfo_round_trip_s3 => |version| debuginfo_round_trip(version, Backend::S3);
}


/// The number of build logs and debug info records a `flywheel gc` report freed (or would).
fn logs_in(report: &str) -> usize {
    report
        .lines()
        .flat_map(|l| l.split(", "))
        .find_map(|part| part.strip_suffix(" logs and debug info records"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of logs in the gc report:\n{report}"))
}

/// Build logs and debug info expire with their cache's retention period: `flywheel gc`
/// deletes those of a cache whose period has passed since their upload, and they then answer
/// 404, while the same records in a cache with a longer period stay, byte for byte.
fn logs_expire_with_retention(version: NixVersion, backend: Backend) {
    let nix = Nix::of(version);
    // No collection inside the server: only the `flywheel gc` runs below delete anything.
    let server = Server::start_with(backend, "[gc]\ninterval = 0\n");
    let admin = server.admin_token();
    let client = Client::new();
    for (cache, seconds) in [("short", 1), ("long", 86_400)] {
        server.create_cache(cache, false);
        server.set_retention(cache, seconds);
    }
    let src = nix.store("src");
    let seed = common::unique_seed("retained");
    let expr = format!(
        r#"derivation {{ name = "retained-{seed}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo a line for the log {seed}; /bin/busybox mkdir -p $out/lib/debug/.build-id/ab && echo {seed} > $out/lib/debug/.build-id/ab/cdef0123456789cdef0123456789cdef012345.debug" ]; }}"#
    );
    let drv = nix.run(nix.cmd("nix-instantiate").args(["--store", &src, "-E", &expr])).trim().to_string();
    let out = nix.run(nix.cmd("nix-store").args(["--store", &src, "--realise", &drv])).trim().to_string();
    let netrc = server.netrc(&admin);
    let netrc_arg = netrc.to_string_lossy().into_owned();
    let line = format!("a line for the log {seed}");
    let read_log = |cache: &str| {
        nix.cmd("nix-store")
            .args(["--store", &format!("{}/{cache}", server.url), "--option", "substituters", "", "--option", "netrc-file", &netrc_arg, "--read-log", &drv])
            .output()
            .unwrap()
    };
    for cache in ["short", "long"] {
        let url = format!("{}/{cache}", server.url);
        nix.run(nix.cmd("nix").args(["store", "copy-log", "--store", &src, "--to", &url, "--option", "netrc-file", &netrc_arg, &drv]));
        let copied = nix.copy_to(&src, &format!("{url}?index-debug-info=true"), &netrc, std::slice::from_ref(&out));
        assert!(copied.status.success(), "{}", String::from_utf8_lossy(&copied.stderr));
        let log = read_log(cache);
        assert!(String::from_utf8_lossy(&log.stdout).contains(&line), "{cache}: {}", String::from_utf8_lossy(&log.stderr));
    }
    // The records each cache holds, as stored objects: the log and the debug info record.
    let records = |cache: &str| -> std::collections::BTreeMap<String, (u64, [u8; 32])> {
        let logs = format!("caches/{cache}/logs/");
        let debuginfo = format!("caches/{cache}/debuginfo/");
        server.storage_snapshot().into_iter().filter(|(key, _)| key.starts_with(&logs) || key.starts_with(&debuginfo)).collect()
    };
    let short = records("short");
    let long = records("long");
    assert_eq!(short.len(), 2, "{short:?}");
    assert_eq!(long.len(), 2, "{long:?}");
    // A record's URL: `caches/{cache}/logs/{drv}` is served at `{cache}/log/{drv}`.
    let urls = |records: &std::collections::BTreeMap<String, (u64, [u8; 32])>| -> Vec<String> {
        records.keys().map(|key| format!("{}/{}", server.url, key.trim_start_matches("caches/").replacen("/logs/", "/log/", 1))).collect()
    };
    for url in urls(&short).iter().chain(&urls(&long)) {
        assert_eq!(client.get(url).bearer_auth(&admin).send().unwrap().status(), StatusCode::OK, "{url}");
    }

    // Wait until the short cache's records are past its 1 s period, as the collection sees
    // them (it compares their modification times with its own clock): dry runs change nothing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let report = server.gc(&["--dry-run"]);
        let due = logs_in(&report);
        assert!(due <= short.len(), "a dry run would delete records of the long cache too:\n{report}");
        if due == short.len() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the short cache's records never came due:\n{report}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(records("short"), short, "a dry run deleted");
    let report = server.gc(&[]);
    assert_eq!(logs_in(&report), short.len(), "{report}");

    // Expired: gone from storage and 404, to HTTP clients and to Nix alike.
    assert!(records("short").is_empty(), "{:?}", records("short"));
    for url in urls(&short) {
        assert_eq!(client.get(&url).bearer_auth(&admin).send().unwrap().status(), StatusCode::NOT_FOUND, "{url}");
    }
    let log = read_log("short");
    assert!(!log.status.success(), "nix-store -l still found the expired log: {}", String::from_utf8_lossy(&log.stdout));
    // Within the longer period: kept as they were, and served.
    assert_eq!(records("long"), long, "the long cache's records changed");
    for url in urls(&long) {
        assert_eq!(client.get(&url).bearer_auth(&admin).send().unwrap().status(), StatusCode::OK, "{url}");
    }
    let log = read_log("long");
    assert!(String::from_utf8_lossy(&log.stdout).contains(&line), "long: {}", String::from_utf8_lossy(&log.stderr));
}

nix_matrix! {
    logs_expire_with_retention_local => |version| logs_expire_with_retention(version, Backend::Local);
}

nix_matrix! {
    logs_expire_with_retention_s3 => |version| logs_expire_with_retention(version, Backend::S3);
}
