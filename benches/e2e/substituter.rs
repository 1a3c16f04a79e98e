//! The runner substituter, push and post-build hook.

use super::*;

pub(crate) fn substituter_section(report: &mut Report, work: &Path) {
    use substituter_common::{CountingProxy, Setup, StaticCache, Substitute};
    let setup = Setup::new("ci");
    let mut paths = setup.build("bench", &["big", "tree", "single", "withRefs", "bigNext"]);
    let next = paths.pop().unwrap();
    let sysroot = Command::new("rustc").args(["--print", "sysroot"]).output().unwrap();
    let lib = PathBuf::from(String::from_utf8(sysroot.stdout).unwrap().trim()).join("lib");
    let out = setup.nix.run(setup.nix.cmd("nix-store").args(["--store", &setup.src, "--add"]).arg(&lib));
    paths.push(out.trim().to_string());
    let nar_bytes: u64 = paths.iter().map(|p| setup.nix.path_info(&setup.src, p).nar_size).sum();

    // Push: the whole corpus, then the next version of `big` through a counting proxy.
    let (push_all, out) = timed(|| setup.push(&setup.server.url, &paths, &[]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let proxy = CountingProxy::start(&setup.server.url, "ci", None);
    let (push_next, out) = timed(|| setup.push(&proxy.url, std::slice::from_ref(&next), &[]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sent = proxy.bytes_up();
    let (old_nar, new_nar) = (setup.nix.dump(&setup.src, &paths[0]), setup.nix.dump(&setup.src, &next));
    let (_, new_bytes) = substituter_common::new_chunks(&old_nar, &new_nar);
    // The reference: the same new version as one whole NAR through upload-path.
    let whole_server = Server::start(Backend::Local);
    whole_server.create_cache("bench", false);
    let whole_token = whole_server.admin_token();
    let nar_file = work.join("next.nar");
    std::fs::write(&nar_file, &new_nar).unwrap();
    let info = setup.nix.path_info(&setup.src, &next);
    let hex = {
        let out = Command::new("sha256sum").arg(&nar_file).output().unwrap();
        String::from_utf8(out.stdout).unwrap()[..64].to_string()
    };
    let whole_time = upload_path(&whole_server, &whole_token, &nar_file, &hex, info.nar_size);

    // Substitution into fresh stores: straight from the server and from a plain file:// cache
    // (both on loopback and through a 1 Gbit/s link), and through our substituter.
    let static_cache = StaticCache::new(&setup.nix, &setup.src, &paths);
    let netrc = setup.server.netrc(&setup.token);
    let realise_with = |name: &str, subs: &str, key: &str, netrc: &Path| -> f64 {
        let dst = setup.nix.store(name);
        let mut cmd = setup.nix.cmd("nix-store");
        cmd.args(["--store", &dst, "--realise"])
            .args(&paths)
            .args(["--option", "substituters", subs, "--option", "trusted-public-keys", key])
            .args(["--option", "require-sigs", "true", "--option", "netrc-file"])
            .arg(netrc);
        // Each run starts with no dirty pages from the one before: otherwise the kernel's
        // writeback throttles whichever run comes later in the sequence.
        let _ = Command::new("sync").status();
        let (t, out) = timed(|| cmd.output().unwrap());
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let _ = Command::new("chmod").args(["-R", "u+w", &dst]).status();
        let _ = std::fs::remove_dir_all(&dst);
        t
    };
    let realise = |name: &str, subs: &str, key: &str| realise_with(name, subs, key, &netrc);
    let server_url = format!("{}/ci", setup.server.url);
    let link = Link::start(&setup.server.url, 125e6);
    let linked_url = format!("{}/ci", link.url());
    let direct = median((0..RUNS).map(|i| realise(&format!("direct-{i}"), &server_url, &setup.key)).collect());
    let direct_link = median((0..RUNS).map(|i| realise(&format!("direct-link-{i}"), &linked_url, &setup.key)).collect());
    // A slower link, 100 Mbit/s, as a runner in another zone or site than the cache node has.
    let slow_link = Link::start(&setup.server.url, 12.5e6);
    let slow_url = format!("{}/ci", slow_link.url());
    let direct_slow = median((0..RUNS).map(|i| realise(&format!("direct-slow-{i}"), &slow_url, &setup.key)).collect());
    // The production layout: the server keeps its chunks in S3 (RustFS there, s3s-fs here).
    let direct_s3_link = {
        let s3_server = Server::start(Backend::S3);
        let s3_key = s3_server.create_cache("ci", false);
        let s3_token = s3_server.mint(&["--pull", "ci", "--push", "ci"]);
        let s3_token_file = work.join("s3-token");
        std::fs::write(&s3_token_file, &s3_token).unwrap();
        let out = setup
            .nix
            .cmd(common::FLYWHEEL)
            .args(["push", "--server", &s3_server.url, "--cache", "ci", "--token-file"])
            .arg(&s3_token_file)
            .args(["--store", &format!("local?root={}", setup.src)])
            .args(&paths)
            .output()
            .unwrap();
        assert!(out.status.success(), "push to the S3 server: {}", String::from_utf8_lossy(&out.stderr));
        let s3_netrc = s3_server.netrc(&s3_token);
        let s3_link = Link::start(&s3_server.url, 125e6);
        let url = format!("{}/ci", s3_link.url());
        median((0..RUNS).map(|i| realise_with(&format!("direct-s3-{i}"), &url, &s3_key, &s3_netrc)).collect())
    };
    let plain = median((0..RUNS).map(|i| realise(&format!("static-{i}"), &static_cache.url, &static_cache.public_key)).collect());
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for i in 0..RUNS {
        let cache_dir = tempfile::tempdir_in(work).unwrap();
        let sub = Substitute::start(&link.url(), "ci", &setup.token_file, cache_dir.path());
        cold.push(realise(&format!("cold-{i}"), &sub.url, &setup.key));
        warm.push(realise(&format!("warm-{i}"), &sub.url, &setup.key));
    }
    let (cold, warm) = (median(cold), median(warm));
    let mut cold_slow = Vec::new();
    for i in 0..RUNS {
        let cache_dir = tempfile::tempdir_in(work).unwrap();
        let sub = Substitute::start(&slow_link.url(), "ci", &setup.token_file, cache_dir.path());
        cold_slow.push(realise(&format!("cold-slow-{i}"), &sub.url, &setup.key));
    }
    let cold_slow = median(cold_slow);

    // Hook latency, with a push daemon running.
    let socket = work.join("push.sock");
    let mut daemon = setup
        .nix
        .cmd(common::FLYWHEEL)
        .args(["push-daemon", "--server", &setup.server.url, "--cache", "ci", "--token-file"])
        .arg(&setup.token_file)
        .args(["--store", &format!("local?root={}", setup.src), "--socket"])
        .arg(&socket)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let drv = setup.nix.run(setup.nix.cmd("nix-store").args(["--store", &setup.src, "-q", "--deriver", &paths[0]]));
    let hook = median(
        (0..21)
            .map(|_| {
                time_cmd(
                    Command::new(common::FLYWHEEL).args(["hook", "--socket"]).arg(&socket).env("DRV_PATH", drv.trim()).env("OUT_PATHS", ""),
                )
            })
            .collect(),
    );
    let _ = daemon.kill();
    let _ = daemon.wait();

    let mb = |b: f64| b / MB;
    report.section(
        "Runner substituter and push",
        &format!(
            "Corpus: {} paths, {:.0} MB of NAR (the toolchain's `lib`, a 6 MB random path, small paths). `nix-store --realise` \
             of the corpus into a fresh store by substitution only, signatures required, {RUNS} runs each. \"Link\": the \
             server behind a proxy limited to 125 MB/s (1 Gbit/s), or to 12.5 MB/s (100 Mbit/s), shared by all \
             connections, as a runner's link to the cache node; loopback has none. The server keeps its chunks on local \
             disk, and in one reference in S3 (`s3s-fs`, the engine RustFS is built on), as it does in production: that \
             reference, over 1 Gbit/s, is the \"cold from the server\" of the target. Our substituter reaches the server \
             through the link. Warm runs need no link bytes beyond narinfo checks, so their figure is the 1 Gbit/s one. \
             Nix's own unpacking bounds every ratio: a `file://` cache on this disk, which costs nothing to serve, is \
             the floor of any substitution.",
            paths.len(),
            mb(nar_bytes as f64)
        ),
    );
    report.row(
        "substitution, our substituter, warm cache",
        format!("{warm:.2} s"),
        format!(
            "server direct: loopback {direct:.2} s, 1 Gbit/s link {direct_link:.2} s, 100 Mbit/s link {direct_slow:.2} s, \
             1 Gbit/s link with the server on S3 {direct_s3_link:.2} s; plain `file://` cache {plain:.2} s"
        ),
        format!(
            "{:.1}x faster than cold from the server in production (chunks in S3, 1 Gbit/s); with its chunks on local \
             disk: {:.1}x over 100 Mbit/s, {:.1}x over 1 Gbit/s (where even the `file://` floor is only {:.1}x), {:.1}x on \
             loopback",
            direct_s3_link / warm,
            direct_slow / warm,
            direct_link / warm,
            direct_link / plain,
            direct / warm
        ),
        ">= 3x faster than cold from the server",
    );
    report.row(
        "substitution, our substituter, cold cache, 1 Gbit/s link",
        format!("{cold:.2} s"),
        format!("server direct over the same link: {direct_link:.2} s"),
        format!("{:.2}x", cold / direct_link),
        "",
    );
    report.row(
        "substitution, our substituter, cold cache, 100 Mbit/s link",
        format!("{cold_slow:.2} s"),
        format!("server direct over the same link: {direct_slow:.2} s"),
        format!("{:.2}x", cold_slow / direct_slow),
        "",
    );
    report.row(
        "push of a new version (`big` with bytes inserted)",
        format!("{} bytes sent, {:.2} s", sent, push_next),
        format!("new chunk bytes {new_bytes}; whole NAR through upload-path: {} bytes, {:.2} s", new_nar.len(), whole_time),
        format!("{:.1}% over the new chunk bytes", 100.0 * (sent as f64 - new_bytes as f64) / new_bytes as f64),
        "<= new chunk bytes + 5%",
    );
    report.row("push of the whole corpus to an empty cache", format!("{push_all:.2} s"), String::new(), String::new(), "");
    report.row(
        "post-build hook",
        format!("{:.1} ms (median of 21)", hook * 1e3),
        String::new(),
        String::new(),
        "< 50 ms",
    );
}
