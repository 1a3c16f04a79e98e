//! Storage and ingest: flywheel's chunk store against whole-NAR compressors.

use super::*;

/// A compression Nix may upload a NAR in (`nix copy --to ...?compression=NAME`), with the CLI
/// that makes the same-run reference and how the server answers the uploaded URL.
pub(crate) struct Codec {
    /// Nix's name, as in the narinfo's `Compression`.
    name: &'static str,
    /// What follows `.nar` in the file name.
    ext: &'static str,
    /// The CLI compressing to stdout at the level the server's choice compares with; empty for none.
    compress: &'static [&'static str],
    /// The CLI decompressing to stdout.
    decompress: &'static [&'static str],
    /// How the server makes the bytes it sends.
    served: &'static str,
}

pub(crate) const CODECS: [Codec; 5] = [
    Codec { name: "none", ext: "", compress: &[], decompress: &[], served: "chunks decompressed" },
    Codec { name: "zstd", ext: ".zst", compress: &["zstd", "-3", "-T1", "-q", "-c"], decompress: &["zstd", "-d", "-q", "-c"], served: "stored zstd frames as they are" },
    // xz's fastest preset: what recompressing on the fly would cost at the least. The server
    // sends stored LZMA2 chunks instead.
    Codec { name: "xz", ext: ".xz", compress: &["xz", "-0", "-T1", "-c"], decompress: &["xz", "-d", "-c"], served: "stored chunks as uncompressed LZMA2" },
    Codec { name: "bzip2", ext: ".bz2", compress: &["bzip2", "-1", "-c"], decompress: &["bzip2", "-d", "-c"], served: "encoded on the fly, level 1" },
    Codec { name: "br", ext: ".br", compress: &["brotli", "-q", "1", "-c"], decompress: &["brotli", "-d", "-c"], served: "encoded on the fly, quality 1" },
];


/// The cost of serving NARs at the URL their uploader's narinfo named, in each compression Nix
/// uploads in, when the store keeps zstd chunks only: GETs of the uploaded URL beside the same
/// compressed file from nginx and the compression tools' own speed on the same NAR.
pub(crate) fn compression_section(report: &mut Report, work: &Path) {
    let work = work.join("compression");
    let static_root = work.join("static");
    std::fs::create_dir_all(static_root.join("nar")).unwrap();
    // lib/rustlib (about 180 MB: libraries, objects, scripts) rather than the whole lib: the
    // slow codecs (bzip2 and xz at some 10 MB/s) would take minutes per run on all of it.
    let nar = nar_of_sysroot(&work, "lib/rustlib");
    let nar_size = std::fs::metadata(&nar).unwrap().len();
    let nar_hash = format!("sha256:{}", file_hash(&nar));
    let size_mb = nar_size as f64 / MB;
    eprintln!("NAR of the toolchain's lib/rustlib: {size_mb:.1} MB");

    // The files Nix would upload, made by the reference tools (timed), then their decompression.
    struct Made {
        file: String,
        file_size: u64,
        compress_s: Option<f64>,
        decompress_s: Option<f64>,
    }
    let mut made = Vec::new();
    for codec in &CODECS {
        let scratch = work.join(format!("upload.nar{}", codec.ext));
        let (compress_s, decompress_s) = if codec.compress.is_empty() {
            std::fs::copy(&nar, &scratch).unwrap();
            (None, None)
        } else {
            let compress = median(
                (0..RUNS).map(|_| time_to_file(Command::new(codec.compress[0]).args(&codec.compress[1..]).arg(&nar), &scratch)).collect(),
            );
            let decompress =
                median((0..RUNS).map(|_| time_cmd(Command::new(codec.decompress[0]).args(&codec.decompress[1..]).arg(&scratch))).collect());
            (Some(compress), Some(decompress))
        };
        let file = format!("{}.nar{}", file_hash(&scratch), codec.ext);
        let file_size = std::fs::metadata(&scratch).unwrap().len();
        std::fs::rename(&scratch, static_root.join("nar").join(&file)).unwrap();
        eprintln!("{}: {:.1} MB file", codec.name, file_size as f64 / MB);
        made.push(Made { file, file_size, compress_s, decompress_s });
    }
    std::fs::remove_file(&nar).unwrap();

    // Uploaded as `nix copy --to` sends it: the NAR under its file name, then the narinfo that
    // names it, one store path per compression.
    let server = Server::start(Backend::Local);
    server.create_cache("bench", false);
    let token = server.admin_token();
    let auth = format!("Authorization: Bearer {token}");
    for (i, (codec, made)) in CODECS.iter().zip(&made).enumerate() {
        let nar_file = static_root.join("nar").join(&made.file);
        let put = |url: String, body: &mut Command| {
            let status = body.args(["-sf", "-X", "PUT", "-H", &auth]).arg(&url).stdout(Stdio::null()).status().unwrap();
            assert!(status.success(), "PUT {url} failed");
        };
        put(format!("{}/bench/nar/{}", server.url, made.file), Command::new("curl").arg("-T").arg(&nar_file));
        let hash_part = format!("{:0>32}", i + 1);
        let narinfo = format!(
            "StorePath: /nix/store/{hash_part}-lib\nURL: nar/{}\nCompression: {}\nFileHash: sha256:{}\nFileSize: {}\nNarHash: {nar_hash}\nNarSize: {nar_size}\nReferences: \n",
            made.file,
            codec.name,
            made.file.split_once('.').unwrap().0,
            made.file_size
        );
        let narinfo_file = work.join(format!("{hash_part}.narinfo"));
        std::fs::write(&narinfo_file, narinfo).unwrap();
        put(format!("{}/bench/{hash_part}.narinfo", server.url), Command::new("curl").arg("-T").arg(&narinfo_file));
    }

    // GETs of each uploaded URL from the server (with its CPU time), then from nginx.
    let mut ours = Vec::new();
    for (codec, made) in CODECS.iter().zip(&made) {
        let url = format!("{}/bench/nar/{}", server.url, made.file);
        let cpu_before = cpu_seconds(server.pid());
        let gets: Vec<(f64, u64)> = (0..RUNS).map(|_| curl_get(&url, Some(&token))).collect();
        let cpu = (cpu_seconds(server.pid()) - cpu_before) / RUNS as f64;
        let sent = gets[0].1;
        if codec.name == "none" {
            assert_eq!(sent, nar_size, "the uncompressed NAR is the NAR");
        }
        ours.push((median(gets.iter().map(|g| g.0).collect()), cpu, sent));
    }
    drop(server);
    let nginx = Nginx::start(&static_root, &work);
    let reference: Vec<f64> = made
        .iter()
        .map(|m| {
            let url = format!("http://127.0.0.1:{}/nar/{}", nginx.port, m.file);
            median((0..2 * RUNS).map(|_| curl_get(&url, None).0).collect())
        })
        .collect();
    drop(nginx);

    report.section(
        "NARs at their uploaded URL, by compression",
        &format!(
            "The NAR of the Rust toolchain's lib/rustlib ({size_mb:.1} MB) uploaded to a server on local storage as `nix copy --to ...?compression=X` \
             sends it (`PUT nar/<filehash>.nar.<ext>`, then the narinfo naming that URL), once per compression, and downloaded from \
             that URL with `curl -o /dev/null`, {RUNS} runs each; throughput is NAR bytes per second, CPU is the server's user plus \
             system time per download. References, on the same NAR in the same run: nginx serving the uploaded file itself (what a \
             static binary cache keeps), {} runs; and each tool's own single-threaded speed compressing the NAR at the level \
             compared (xz at its fastest preset, `-0`, the least an on-the-fly xz would cost) and decompressing its output, {RUNS} runs. \
             The uploaded files were made by those same commands.",
            2 * RUNS
        ),
    );
    for (((codec, made), (get_s, cpu, sent)), ng_s) in CODECS.iter().zip(&made).zip(&ours).zip(&reference) {
        let mut refs = format!("nginx, uploaded file ({:.0} MB): {:.0} MB/s", made.file_size as f64 / MB, size_mb / ng_s);
        let mut ratios = format!("{} nginx", ratio(ng_s / get_s));
        if let (Some(c), Some(d)) = (made.compress_s, made.decompress_s) {
            let tool = codec.compress[..codec.compress.len() - 1].join(" ");
            let _ = write!(refs, "; `{tool}` {:.0} MB/s, `{} -d` {:.0} MB/s", size_mb / c, codec.compress[0], size_mb / d);
            let _ = write!(ratios, "; {} `{tool}`", ratio(c / get_s));
        }
        report.row(
            &format!("GET `.nar{}` ({})", codec.ext, codec.served),
            format!("{:.0} MB/s; {:.1} CPU s; {:.0} MB sent", size_mb / get_s, cpu, *sent as f64 / MB),
            refs,
            ratios,
            "",
        );
    }
}
