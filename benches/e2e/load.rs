//! The server under concurrent load.

use super::*;

/// The load run of the ops issue, against flywheel on S3 and against nginx serving the same
/// paths as a `file://` binary cache (`nix copy --to file://`).
pub(crate) fn load_section(report: &mut Report, work: &Path) {
    use common::load::{self, LoadResult};
    const SECS: u64 = 30;
    let nix = common::Nix::new();
    let server = Server::start(Backend::S3);
    server.create_cache("load", false);
    let src = nix.store("load-src");
    let paths = nix.build(&src, &common::unique_seed("load"), &["big", "single", "tree", "empty", "withRefs"]);
    let token = server.mint(&["--push", "load", "--pull", "load"]);
    let out = nix.copy_to(&src, &format!("{}/load", server.url), &server.netrc(&token), &paths);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hashes: Vec<&str> = paths.iter().map(|p| common::hash_part(p)).collect();

    let targets = load::targets(&format!("{}/load", server.url), Some(&token), &hashes);
    let ours = load::run(&targets, Some(&token), 64, 8, std::time::Duration::from_secs(SECS), 1_000_000);
    drop(server);

    let static_root = work.join("load-static");
    nix.run(nix.cmd("nix").args(["copy", "--store", &src, "--to", &format!("file://{}", static_root.display())]).args(&paths));
    let nginx = Nginx::start(&static_root, work);
    let base = format!("http://127.0.0.1:{}", nginx.port);
    let targets = load::targets(&base, None, &hashes);
    let reference = load::run(&targets, None, 64, 8, std::time::Duration::from_secs(SECS), 1_000_000);
    drop(nginx);
    assert!(ours.errors.is_empty(), "flywheel load errors: {:?}", &ours.errors[..ours.errors.len().min(5)]);
    assert!(reference.errors.is_empty(), "nginx load errors: {:?}", &reference.errors[..reference.errors.len().min(5)]);

    report.section(
        "Server under load",
        &format!(
            "64 clients fetching narinfos and 8 downloading NARs, each in a loop over one keep-alive connection, for {SECS} s, \
             over 5 corpus paths (one of 6 MB): flywheel on S3 (s3s-fs), and nginx serving the same paths as a `file://` binary \
             cache (xz NARs) as the reference. Load generator, server and S3 share this machine's 2 cores. Errors: flywheel {}, \
             nginx {}. Request counts: flywheel {} narinfos, {} NARs; nginx {} narinfos, {} NARs.",
            ours.errors.len(),
            reference.errors.len(),
            ours.narinfo.len(),
            ours.nar.len(),
            reference.narinfo.len(),
            reference.nar.len()
        ),
    );
    let pct = LoadResult::percentile_ms;
    for (figure, a, b) in [("narinfo", &ours.narinfo, &reference.narinfo), ("NAR download", &ours.nar, &reference.nar)] {
        for p in [50.0, 99.0] {
            report.row(
                &format!("{figure} latency, p{p:.0}"),
                format!("{:.2} ms", pct(a, p)),
                format!("nginx static cache: {:.2} ms", pct(b, p)),
                format!("{:.2}x nginx", pct(a, p) / pct(b, p)),
                "zero errors",
            );
        }
    }
    report.row(
        "narinfo throughput",
        format!("{:.0} /s", ours.narinfo.len() as f64 / ours.elapsed.as_secs_f64()),
        format!("nginx: {:.0} /s", reference.narinfo.len() as f64 / reference.elapsed.as_secs_f64()),
        format!(
            "{:.2}x nginx",
            (ours.narinfo.len() as f64 / ours.elapsed.as_secs_f64()) / (reference.narinfo.len() as f64 / reference.elapsed.as_secs_f64())
        ),
        "",
    );
}
