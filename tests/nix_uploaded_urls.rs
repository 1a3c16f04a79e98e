//! Nix keeps the narinfo it uploaded in its local narinfo cache (30 days by default), with its
//! own `URL` and `Compression`, and later substitutions from that machine ask for that URL. So
//! every NAR is also served at the URL it was uploaded to, in the compression it named.

#[macro_use]
mod common;

use common::{Backend, Nix, Server, NixVersion};

/// Pushes with `nix copy --to ...?compression=COMPRESSION`, then pulls into a fresh store with
/// the same user's narinfo cache still warm: Nix asks for the uploaded URL.
fn pull_with_warm_narinfo_cache(version: NixVersion, backend: Backend, compression: &str) {
    let nix = Nix::of(version);
    let server = Server::start(backend);
    let key = server.create_cache("ci", false);
    let src = nix.store("src");
    let paths = nix.build(&src, &common::unique_seed(&format!("warm-{compression}")), &["big", "tree"]);
    let netrc = server.netrc(&server.admin_token());
    let xdg = nix.dir.path().join("xdg-warm");
    // The narinfo Nix keeps is the one it uploaded, which has no signature of the cache (the
    // server signs when it serves): what makes it trusted is the uploader's own signature, as
    // a runner signs its builds.
    let secret = nix.dir.path().join("runner.key");
    let generated = nix.run(nix.cmd("nix").args(["key", "generate-secret", "--key-name", "runner-1"]));
    std::fs::write(&secret, generated.trim()).unwrap();
    let public = nix.run(nix.cmd("nix").args(["key", "convert-secret-to-public"]).stdin(std::fs::File::open(&secret).unwrap()));
    nix.run(nix.cmd("nix").args(["store", "sign", "--store", &src, "--key-file"]).arg(&secret).args(&paths));
    let trusted = format!("{key} {}", public.trim());
    let url = format!("{}/ci", server.url);

    let out = nix
        .cmd("nix")
        .env("XDG_CACHE_HOME", &xdg)
        .args(["copy", "--store", &src, "--to", &format!("{url}?compression={compression}"), "--option", "netrc-file"])
        .arg(&netrc)
        .args(&paths)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let dst = nix.store("dst");
    let out = nix
        .cmd("nix")
        .env("XDG_CACHE_HOME", &xdg)
        .args(["copy", "--store", &dst, "--from", &url, "--option", "netrc-file"])
        .arg(&netrc)
        .args(["--option", "require-sigs", "true", "--option", "trusted-public-keys", &trusted])
        .args(&paths)
        .output()
        .unwrap();
    assert!(out.status.success(), "{compression}: {}", String::from_utf8_lossy(&out.stderr));
    for path in &paths {
        assert!(nix.verify(&dst, path), "{compression}: {path} does not verify");
        assert_eq!(nix.path_info(&dst, path).nar_hash, nix.path_info(&src, path).nar_hash);
    }
}

nix_matrix! {
    warm_narinfo_cache_xz_local => |version| pull_with_warm_narinfo_cache(version, Backend::Local, "xz");
}

nix_matrix! {
    warm_narinfo_cache_xz_s3 => |version| pull_with_warm_narinfo_cache(version, Backend::S3, "xz");
}

nix_matrix! {
    warm_narinfo_cache_zstd_local => |version| pull_with_warm_narinfo_cache(version, Backend::Local, "zstd");
}

nix_matrix! {
    warm_narinfo_cache_zstd_s3 => |version| pull_with_warm_narinfo_cache(version, Backend::S3, "zstd");
}

nix_matrix! {
    warm_narinfo_cache_none_local => |version| pull_with_warm_narinfo_cache(version, Backend::Local, "none");
}

nix_matrix! {
    warm_narinfo_cache_none_s3 => |version| pull_with_warm_narinfo_cache(version, Backend::S3, "none");
}

nix_matrix! {
    warm_narinfo_cache_bzip2_local => |version| pull_with_warm_narinfo_cache(version, Backend::Local, "bzip2");
}

nix_matrix! {
    warm_narinfo_cache_bzip2_s3 => |version| pull_with_warm_narinfo_cache(version, Backend::S3, "bzip2");
}

nix_matrix! {
    warm_narinfo_cache_br_local => |version| pull_with_warm_narinfo_cache(version, Backend::Local, "br");
}

nix_matrix! {
    warm_narinfo_cache_br_s3 => |version| pull_with_warm_narinfo_cache(version, Backend::S3, "br");
}
