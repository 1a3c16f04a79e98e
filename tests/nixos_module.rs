//! The NixOS module (`nixos-module/`) and `flake.nix`, checked with real Nix 2.8 and no network.
//! There is no nixpkgs here, so the module is evaluated against the stand-in `lib`, NixOS
//! option declarations and `pkgs` in `tests/nixos/`. What the module renders is handed to the
//! real `flywheel` binary: the server's start script runs with `--check-config`, and the
//! runner's command lines are parsed by the binary's own argument parser. A missing `nix` fails
//! these tests; nothing skips.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{NixVersion, FLYWHEEL};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// One evaluation sandbox: a store root for the files the module writes, a fresh cache dir,
/// and a stand-in `flywheel` package whose `bin/flywheel` is the binary under test.
struct Eval {
    dir: tempfile::TempDir,
    version: NixVersion,
}

impl Eval {
    fn new(version: NixVersion) -> Eval {
        let nix = version.bin_dir().join("nix");
        assert!(nix.is_file(), "{} is missing: run ./scripts/test.sh", nix.display());
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("package/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(FLYWHEEL, bin.join("flywheel")).unwrap();
        Eval { dir, version }
    }

    fn package(&self) -> PathBuf {
        self.dir.path().join("package")
    }

    fn store_root(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Evaluates the module with `configuration` (a Nix module expression).
    fn try_eval(&self, configuration: &str) -> Result<Value, String> {
        let expr = format!(
            "import {ROOT}/tests/nixos/eval.nix {{ configuration = {configuration}; flywheelPackage = \"{}\"; }}",
            self.package().display()
        );
        let xdg = tempfile::tempdir_in(self.dir.path()).unwrap();
        let out = Command::new(self.version.bin_dir().join("nix"))
            .args(["eval", "--impure", "--json", "--option", "substituters", "", "--store"])
            .arg(format!("local?root={}", self.store_root().display()))
            .args(["--expr", &expr])
            .env("NIX_CONFIG", "experimental-features = nix-command flakes\n")
            .env("XDG_CACHE_HOME", xdg.path())
            .env_remove("NIX_REMOTE")
            .env_remove("NIX_PATH")
            .output()
            .expect("running nix eval");
        if out.status.success() {
            Ok(serde_json::from_slice(&out.stdout).expect("nix eval printed JSON"))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn eval(&self, configuration: &str) -> Value {
        self.try_eval(configuration).unwrap_or_else(|err| panic!("evaluating {configuration} failed:\n{err}"))
    }

    /// Where a store path the evaluation wrote lies on disk.
    fn physical(&self, store_path: &str) -> PathBuf {
        assert!(store_path.starts_with("/nix/store/"), "{store_path} is not a store path");
        self.store_root().join(store_path.trim_start_matches('/'))
    }

    /// A script the module wrote, with its store references moved to the test's store root,
    /// saved where `sh` can run it.
    fn script(&self, store_path: &str) -> PathBuf {
        let text = std::fs::read_to_string(self.physical(store_path)).unwrap();
        assert!(text.starts_with("#!"), "{store_path} is not a script:\n{text}");
        let moved = text.replace("/nix/store/", &format!("{}/nix/store/", self.store_root().display()));
        let path = self.dir.path().join(store_path.rsplit('/').next().unwrap());
        std::fs::write(&path, moved).unwrap();
        let syntax = Command::new("sh").arg("-n").arg(&path).output().unwrap();
        assert!(syntax.status.success(), "{store_path}: {}", String::from_utf8_lossy(&syntax.stderr));
        path
    }

    /// Directories standing in for systemd's `CREDENTIALS_DIRECTORY` and `RUNTIME_DIRECTORY`.
    fn service_dirs(&self) -> (PathBuf, PathBuf) {
        let credentials = self.dir.path().join("credentials");
        let runtime = self.dir.path().join("runtime");
        std::fs::create_dir_all(&credentials).unwrap();
        std::fs::create_dir_all(&runtime).unwrap();
        (credentials, runtime)
    }
}

/// Runs a service's start script as systemd would, with `--check-config` passed through and no
/// S3 credentials from the test's own environment.
fn check_config(script: &Path, credentials: &Path, runtime: &Path) -> std::process::Output {
    Command::new("sh")
        .arg(script)
        .arg("--check-config")
        .env("CREDENTIALS_DIRECTORY", credentials)
        .env("RUNTIME_DIRECTORY", runtime)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()
        .unwrap()
}

fn service<'a>(eval: &'a Value, name: &str) -> &'a Value {
    let service = &eval["services"][name];
    assert!(service.is_object(), "no service {name} in {:?}", eval["services"].as_object().map(|s| s.keys().collect::<Vec<_>>()));
    service
}

fn str_list(value: &Value) -> Vec<String> {
    match value {
        Value::Array(items) => items.iter().map(|v| v.as_str().unwrap().to_string()).collect(),
        Value::String(s) => vec![s.clone()],
        other => panic!("not a list of strings: {other}"),
    }
}

/// Splits an `ExecStart=` line the way systemd does for what the module writes: words are bare,
/// or JSON-quoted strings; `%d` is the credentials directory, `%%` a percent sign, `$$` a dollar.
fn exec_argv(line: &str, credentials: &Path) -> Vec<String> {
    let mut argv = Vec::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        let (word, tail) = if rest.starts_with('"') {
            let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<String>();
            let word = stream.next().unwrap().unwrap_or_else(|e| panic!("bad quoting in {line}: {e}"));
            let used = stream.byte_offset();
            (word, &rest[used..])
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            (rest[..end].to_string(), &rest[end..])
        };
        let expanded = word
            .replace("%%", "\u{0}")
            .replace("%d", &credentials.display().to_string())
            .replace('\u{0}', "%")
            .replace("$$", "$");
        assert!(!expanded.contains('%'), "unexpanded specifier in {word}");
        argv.push(expanded);
        rest = tail.trim_start();
    }
    argv
}

/// A runner's public key, as `nix key convert-secret-to-public` prints it.
const RUNNER_KEY: &str = "runner-a-1:igeBjeQ3Qac+vYwZm7O2W7beqCySeapjFnmFL9HU2fo=";

fn random_secret() -> String {
    use base64::Engine;
    let mut bytes = [0u8; 48];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

nix_matrix! {
    every_nix_file_parses => every_nix_file_parses_with;
}

fn every_nix_file_parses_with(version: NixVersion) {
    let nix_instantiate = version.bin_dir().join("nix-instantiate");
    let store_root = tempfile::tempdir().unwrap();
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                if !name.starts_with('.') && !name.starts_with("target") {
                    walk(&path, out);
                }
            } else if name.ends_with(".nix") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(Path::new(ROOT), &mut files);
    for expected in ["flake.nix", "nixos-module/default.nix", "nixos-module/server.nix", "nixos-module/runner.nix", "nixos-module/package.nix", "nixos-module/vm-test.nix", "tests/nixos/lib.nix"] {
        assert!(files.contains(&Path::new(ROOT).join(expected)), "{expected} not found");
    }
    for file in &files {
        // A store of its own: without one, Nix opens (and 2.30 migrates) the machine's database.
        let out = Command::new(&nix_instantiate).arg("--store").arg(store_root.path()).arg("--parse").arg(file).output().unwrap();
        assert!(out.status.success(), "{} does not parse:\n{}", file.display(), String::from_utf8_lossy(&out.stderr));
    }
}

nix_matrix! {
    server_with_local_storage_renders_a_config_the_binary_accepts => server_with_local_storage_renders_a_config_the_binary_accepts_with;
}

fn server_with_local_storage_renders_a_config_the_binary_accepts_with(version: NixVersion) {
    let nix = Eval::new(version);
    let storage = nix.dir.path().join("storage");
    let eval = nix.eval(&format!(
        r#"{{ services.flywheel.server = {{
              enable = true;
              tokenSecretFile = "/run/secrets/flywheel-token-secret";
              openFirewall = true;
              settings = {{ listen = "0.0.0.0:8090"; zstd-level = 5; api-endpoint = "https://cache.example.org/"; storage.path = "{}"; gc.grace-period = 7200; compaction.zstd-level = 17; tfstate.keep-versions = 50; bazel.grpc-listen = "0.0.0.0:9092"; bazel.default-instance = "main"; }};
              caches.main = {{
                signingKeyFile = "/run/secrets/flywheel-main.key"; priority = 30; retentionPeriod = 86400;
                trustedUploaderKeys = [ "{RUNNER_KEY}" ]; requireUploaderSignature = true;
              }};
            }}; }}"#,
        storage.display()
    ));
    let server = service(&eval, "flywheel-server");
    let sc = &server["serviceConfig"];
    assert_eq!(
        str_list(&sc["LoadCredential"]),
        ["token-hs256-secret-base64:/run/secrets/flywheel-token-secret", "signing-key-main:/run/secrets/flywheel-main.key"]
    );
    for (key, value) in [
        ("User", "flywheel"),
        ("StateDirectory", "flywheel"),
        ("RuntimeDirectory", "flywheel-server"),
        ("ProtectSystem", "strict"),
        ("UMask", "0077"),
    ] {
        assert_eq!(sc[key], value, "{key}");
    }
    assert_eq!(sc["LimitNOFILE"], 65536);
    for key in ["NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "RestrictNamespaces", "MemoryDenyWriteExecute"] {
        assert_eq!(sc[key], true, "{key}");
    }
    assert_eq!(str_list(&sc["RestrictAddressFamilies"]), ["AF_INET", "AF_INET6", "AF_UNIX"]);
    // Storage outside /var/lib/flywheel: created by tmpfiles, writable through the sandbox.
    assert_eq!(str_list(&sc["ReadWritePaths"]), [storage.display().to_string()]);
    assert!(str_list(&eval["tmpfiles"]).contains(&format!("d {} 0750 flywheel flywheel - -", storage.display())));
    assert_eq!(eval["firewall"], serde_json::json!([8090, 9092]), "the HTTP and the Bazel gRPC port");
    assert_eq!(eval["users"]["flywheel"]["isSystemUser"], true);

    // Run the service's start script as systemd would, with --check-config passed through.
    let script = nix.script(sc["ExecStart"].as_str().unwrap());
    let (credentials, runtime) = nix.service_dirs();
    let secret = random_secret();
    std::fs::write(credentials.join("token-hs256-secret-base64"), format!("{secret}\n")).unwrap();
    let signing_key = flywheel_core::nix::SigningKey::generate("main-1").unwrap().to_nix_string();
    std::fs::write(credentials.join("signing-key-main"), format!("{signing_key}\n")).unwrap();
    let out = check_config(&script, &credentials, &runtime);
    assert!(
        out.status.success(),
        "flywheel serve --check-config refused the rendered config:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("config is valid"));
    assert!(storage.is_dir(), "check-config opens (creates) the local storage");
    let rendered = std::fs::read_to_string(runtime.join("server.toml")).unwrap();
    assert!(rendered.starts_with(&format!("token-hs256-secret-base64 = \"{secret}\"\n")), "{rendered}");
    for line in ["listen = \"0.0.0.0:8090\"", "zstd-level = 5", "api-endpoint = \"https://cache.example.org/\"", "[chunking]", "[storage]", "type = \"local\""] {
        assert!(rendered.lines().any(|l| l == line), "{line:?} missing from\n{rendered}");
    }
    assert!(rendered.lines().any(|l| l == "max-connections = 4096"), "{rendered}");
    let gc = rendered.split("[gc]\n").nth(1).unwrap_or_else(|| panic!("no [gc] in\n{rendered}"));
    assert!(gc.lines().take_while(|l| !l.starts_with('[')).any(|l| l == "grace-period = 7200"), "{rendered}");
    let compaction = rendered.split("[compaction]\n").nth(1).unwrap_or_else(|| panic!("no [compaction] in\n{rendered}"));
    let compaction: Vec<&str> = compaction.lines().take_while(|l| !l.starts_with('[')).collect();
    for line in ["zstd-level = 17", "interval = 86400", "cold-after = 259200", "pack-size = 4194304", "frame-size = 4194304"] {
        assert!(compaction.contains(&line), "{line:?} missing from [compaction] of\n{rendered}");
    }
    let tfstate = rendered.split("[tfstate]\n").nth(1).unwrap_or_else(|| panic!("no [tfstate] in\n{rendered}"));
    let tfstate: Vec<&str> = tfstate.lines().take_while(|l| !l.starts_with('[')).collect();
    for line in ["keep-versions = 50", "max-size = 33554432", "locking = \"auto\""] {
        assert!(tfstate.contains(&line), "{line:?} missing from [tfstate] of\n{rendered}");
    }
    let bazel = rendered.split("[bazel]\n").nth(1).unwrap_or_else(|| panic!("no [bazel] in\n{rendered}"));
    let bazel: Vec<&str> = bazel.lines().take_while(|l| !l.starts_with('[')).collect();
    for line in ["grpc-listen = \"0.0.0.0:9092\"", "default-instance = \"main\"", "max-blob-size = 4294967296", "max-connections = 4096"] {
        assert!(bazel.contains(&line), "{line:?} missing from [bazel] of\n{rendered}");
    }
    let main = rendered.split("[caches.main]\n").nth(1).unwrap_or_else(|| panic!("no [caches.main] in\n{rendered}"));
    let main: Vec<&str> = main.lines().take_while(|l| !l.starts_with('[')).collect();
    for line in [
        format!("signing-key-file = \"{}/signing-key-main\"", credentials.display()),
        "priority = 30".into(),
        "retention-period = 86400".into(),
        "public = false".into(),
        format!("trusted-uploader-keys = [\"{RUNNER_KEY}\"]"),
        "require-uploader-signature = true".into(),
    ] {
        assert!(main.contains(&line.as_str()), "{line:?} missing from [caches.main] of\n{rendered}");
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(runtime.join("server.toml")).unwrap().permissions().mode() & 0o077, 0, "rendered config readable by others");

    // The secret never reached the store.
    let mut stored = Vec::new();
    files_under(&nix.store_root().join("nix/store"), &mut stored);
    assert!(!stored.is_empty());
    for file in stored {
        let text = std::fs::read(&file).unwrap();
        assert!(!String::from_utf8_lossy(&text).contains(&secret), "{} holds the token secret", file.display());
        assert!(!String::from_utf8_lossy(&text).contains(&signing_key), "{} holds the signing key", file.display());
    }

    // A signing key file that holds no key is refused by the check.
    std::fs::write(credentials.join("signing-key-main"), "garbage\n").unwrap();
    let out = check_config(&script, &credentials, &runtime);
    assert!(!out.status.success(), "a bad signing key passed the check");
    assert!(String::from_utf8_lossy(&out.stderr).contains("signing key of cache main"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(credentials.join("signing-key-main"), format!("{signing_key}\n")).unwrap();

    // A bad secret file stops the service before the server starts.
    std::fs::write(credentials.join("token-hs256-secret-base64"), "not base64 !\n").unwrap();
    let out = check_config(&script, &credentials, &runtime);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must hold the base64 token secret"), "{}", String::from_utf8_lossy(&out.stderr));
}

nix_matrix! {
    server_with_s3_storage_renders_a_config_the_binary_accepts => server_with_s3_storage_renders_a_config_the_binary_accepts_with;
}

fn server_with_s3_storage_renders_a_config_the_binary_accepts_with(version: NixVersion) {
    let nix = Eval::new(version);
    let eval = nix.eval(
        r#"{ services.flywheel.server = {
              enable = true;
              tokenSecretFile = "/run/secrets/flywheel-token-secret";
              environmentFile = "/run/secrets/flywheel.env";
              settings.storage = {
                type = "s3"; bucket = "flywheel"; endpoint = "http://127.0.0.1:9000"; allow-http = true;
                region = "eu-1"; access-key-id = "flywheel"; secret-access-key-file = "/run/secrets/s3-secret";
              };
            }; }"#,
    );
    let sc = &service(&eval, "flywheel-server")["serviceConfig"];
    assert_eq!(
        str_list(&sc["LoadCredential"]),
        ["token-hs256-secret-base64:/run/secrets/flywheel-token-secret", "s3-secret-access-key:/run/secrets/s3-secret"]
    );
    assert_eq!(sc["EnvironmentFile"], "/run/secrets/flywheel.env");
    assert_eq!(sc["ReadWritePaths"], serde_json::json!([]));

    let script = nix.script(sc["ExecStart"].as_str().unwrap());
    let (credentials, runtime) = nix.service_dirs();
    std::fs::write(credentials.join("token-hs256-secret-base64"), random_secret()).unwrap();
    std::fs::write(credentials.join("s3-secret-access-key"), "s3-secret-value\n").unwrap();
    let out = check_config(&script, &credentials, &runtime);
    assert!(out.status.success(), "S3 config refused:\n{}", String::from_utf8_lossy(&out.stderr));
    let rendered = std::fs::read_to_string(runtime.join("server.toml")).unwrap();
    let storage = rendered.split("[storage]\n").nth(1).unwrap_or_else(|| panic!("no [storage] in\n{rendered}"));
    for line in [
        "type = \"s3\"".to_string(),
        "bucket = \"flywheel\"".into(),
        "allow-http = true".into(),
        format!("secret-access-key-file = \"{}/s3-secret-access-key\"", credentials.display()),
    ] {
        assert!(storage.lines().any(|l| l == line), "{line:?} missing from [storage] of\n{rendered}");
    }
    assert!(!rendered.contains("s3-secret-value"));
}

nix_matrix! {
    runner_commands_are_accepted_by_the_binary => runner_commands_are_accepted_by_the_binary_with;
}

fn runner_commands_are_accepted_by_the_binary_with(version: NixVersion) {
    let nix = Eval::new(version);
    let eval = nix.eval(
        r#"{ services.flywheel.runner = {
              enable = true;
              serverUrl = "http://cache.internal:8080";
              cache = "ci";
              tokenFile = "/run/secrets/flywheel-token";
              dataDir = "/pvc/flywheel";
              cacheSize = 5368709120;
              trustedPublicKeys = [ "ci-1:su4pov7yoc5lV0pmcvVr6ZhwoE2SXYet+dEpco+aPQY=" ];
              substituter.port = 38000;
              push = { enable = true; metricsListen = "127.0.0.1:9102"; };
              mount = { filesSize = 1073741824; metricsListen = "127.0.0.1:9101"; };
              lazy = { enable = true; paths = [ "/nix/store/00000000000000000000000000000000-toolchain" ]; };
            }; }"#,
    );

    // nix.settings: our substituter first, the key, a short negative TTL, the hook.
    let settings = &eval["nixSettings"];
    assert_eq!(str_list(&settings["substituters"]), ["http://127.0.0.1:38000", "https://cache.nixos.org/"]);
    let keys = str_list(&settings["trusted-public-keys"]);
    assert!(keys.contains(&"ci-1:su4pov7yoc5lV0pmcvVr6ZhwoE2SXYet+dEpco+aPQY=".to_string()), "{keys:?}");
    assert!(keys.iter().any(|k| k.starts_with("cache.nixos.org-1:")), "NixOS's key is kept: {keys:?}");
    assert_eq!(settings["narinfo-cache-negative-ttl"], 30);
    assert_eq!(settings["post-build-hook"].as_str().map(|h| h.ends_with("-flywheel-post-build-hook")), Some(true));

    let credentials = nix.dir.path().join("credentials");
    std::fs::create_dir_all(&credentials).unwrap();
    // What systemd's LoadCredential would put there.
    std::fs::write(credentials.join("token"), "a-token\n").unwrap();
    let flywheel = nix.package().join("bin/flywheel").display().to_string();
    let mut checked = Vec::new();
    for (unit, subcommand) in [("flywheel-mount", "mount"), ("flywheel-substituter", "substitute"), ("flywheel-push-daemon", "push-daemon")] {
        let sc = &service(&eval, unit)["serviceConfig"];
        assert_eq!(str_list(&sc["LoadCredential"]), ["token:/run/secrets/flywheel-token"], "{unit}");
        let argv = exec_argv(sc["ExecStart"].as_str().unwrap(), &credentials);
        assert_eq!(argv[0], flywheel, "{unit}");
        assert_eq!(argv[1], subcommand, "{unit}");
        let value = |flag: &str| argv.iter().position(|a| a == flag).map(|i| argv[i + 1].clone());
        assert_eq!(value("--server").as_deref(), Some("http://cache.internal:8080"), "{unit}");
        assert_eq!(value("--cache").as_deref(), Some("ci"), "{unit}");
        assert_eq!(value("--token-file"), Some(credentials.join("token").display().to_string()), "{unit}");
        // The binary's own config check: every flag known, every value valid, the token file
        // read; and a wrong flag or a bad value is refused.
        let out = Command::new(&argv[0]).args(&argv[1..]).arg("--check-config").output().unwrap();
        assert!(
            out.status.success(),
            "{unit}: flywheel refused {:?}:\n{}",
            &argv[1..],
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("config is valid"), "{unit}");
        let out = Command::new(&argv[0]).args(&argv[1..]).args(["--no-such-flag", "--check-config"]).output().unwrap();
        assert!(!out.status.success(), "{unit}: the check accepts anything");
        let bad_cache: Vec<String> = argv[1..].iter().map(|a| if a == "ci" { "no/such cache".to_string() } else { a.clone() }).collect();
        let out = Command::new(&argv[0]).args(&bad_cache).arg("--check-config").output().unwrap();
        assert!(!out.status.success(), "{unit}: an invalid cache name passes the check");
        checked.push(argv);
    }
    let [mount, substitute, push_daemon] = &checked[..] else { unreachable!() };
    assert_eq!(mount.last().unwrap(), "/run/flywheel/store");
    let flag = |argv: &[String], f: &str| argv.iter().position(|a| a == f).map(|i| argv[i + 1].clone()).unwrap();
    assert_eq!(flag(mount, "--cache-dir"), "/pvc/flywheel/cache");
    assert_eq!(flag(substitute, "--cache-dir"), "/pvc/flywheel/cache", "mount and substituter share the cache");
    assert_eq!(flag(mount, "--cache-size"), "5368709120");
    assert_eq!(flag(mount, "--files-size"), "1073741824");
    assert_eq!(flag(mount, "--metrics-listen"), "127.0.0.1:9101");
    assert_eq!(flag(push_daemon, "--metrics-listen"), "127.0.0.1:9102");
    assert_eq!(flag(substitute, "--listen"), "127.0.0.1:38000");
    assert_eq!(flag(push_daemon, "--socket"), "/run/flywheel-push/push.sock");
    assert!(str_list(&eval["tmpfiles"]).contains(&"d /pvc/flywheel/cache 0700 root root - -".to_string()));

    // Hardening: the substituter and push daemon are sandboxed; the mount must stay in the
    // host's mount namespace, so it has no option that would create one.
    for unit in ["flywheel-substituter", "flywheel-push-daemon"] {
        let sc = &service(&eval, unit)["serviceConfig"];
        assert_eq!(sc["ProtectSystem"], "strict", "{unit}");
        assert_eq!(sc["NoNewPrivileges"], true, "{unit}");
    }
    let mount_sc = service(&eval, "flywheel-mount")["serviceConfig"].as_object().unwrap();
    for key in ["ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ReadWritePaths", "PrivateMounts"] {
        assert!(!mount_sc.contains_key(key), "flywheel-mount sets {key}, which hides the FUSE mount");
    }
    assert_eq!(service(&eval, "flywheel-push-daemon")["serviceConfig"]["DynamicUser"], true);

    // The post-build hook exits 0 even with no daemon to talk to.
    let hook = nix.script(settings["post-build-hook"].as_str().unwrap());
    let out = Command::new("sh").arg(&hook).env("DRV_PATH", "/nix/store/00000000000000000000000000000000-x.drv").env("OUT_PATHS", "").output().unwrap();
    assert!(out.status.success(), "post-build hook failed: {}", String::from_utf8_lossy(&out.stderr));

    // Lazy mode: an overlay over the mount, then the closure registered from dump-db.
    let lazy = service(&eval, "flywheel-lazy-store");
    assert_eq!(str_list(&lazy["requires"]), ["flywheel-mount.service"]);
    let start = std::fs::read_to_string(nix.physical(lazy["serviceConfig"]["ExecStart"].as_str().unwrap())).unwrap();
    nix.script(lazy["serviceConfig"]["ExecStart"].as_str().unwrap());
    assert!(start.contains("lowerdir=/nix/store:/run/flywheel/store,upperdir=/pvc/flywheel/overlay/upper,workdir=/pvc/flywheel/overlay/work"), "{start}");
    assert!(start.contains("'lazy' '--server' 'http://cache.internal:8080' '--cache' 'ci' '--nix-store' '/usr/bin/nix-store' '--cache-dir' '/pvc/flywheel/cache' '--trusted-key' 'ci-1:su4pov7yoc5lV0pmcvVr6ZhwoE2SXYet+dEpco+aPQY='"), "{start}");
    assert_eq!(str_list(&eval["kernelModules"]), ["fuse", "overlay"]);
    assert_eq!(flag(mount, "--fill-max-nar-size"), "0");

    // The job hooks' command: its arguments are the binary's (the runs below fail only where a
    // runner is missing: the mount's socket, the token), and misuse prints the usage.
    let packages = str_list(&eval["systemPackages"]);
    let job = packages.iter().find(|p| p.ends_with("-flywheel-job")).unwrap_or_else(|| panic!("no flywheel-job in {packages:?}"));
    let job = nix.script(job);
    let run = |args: &[&str]| {
        let out = Command::new("sh").arg(&job).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for misuse in [&[][..], &["start"][..], &["restart", "k"][..]] {
        let (code, err) = run(misuse);
        assert_eq!(code, Some(2), "{misuse:?}: {err}");
        assert!(err.contains("usage: flywheel-job start KEY"), "{err}");
    }
    let (code, err) = run(&["start", "ci-job"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no mount answers on /pvc/flywheel/cache/control.sock"), "{err}");
    let (code, err) = run(&["start", "ci-job", "/nix/store/00000000000000000000000000000000-toolchain"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("/run/secrets/flywheel-token"), "flywheel lazy took its arguments and read the token file: {err}");
    let (code, err) = run(&["end"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no mount answers on /pvc/flywheel/cache/control.sock"), "{err}");
}

nix_matrix! {
    /// The runner's signing key: made on first boot by the module's oneshot (run here with
    /// real Nix 2.8 as systemd would), mode 0600 outside the store, kept across boots, its
    /// public half beside it and in the log; Nix's `secret-key-files` names it.
    runner_signing_key_is_generated_once_outside_the_store => runner_signing_key_is_generated_once_outside_the_store_with;
}

fn runner_signing_key_is_generated_once_outside_the_store_with(version: NixVersion) {
    use std::os::unix::fs::PermissionsExt;
    let nix = Eval::new(version);
    let state = nix.dir.path().join("state");
    let key_file = state.join("keys/signing-key");
    let eval = nix.eval(&format!(
        r#"{{ services.flywheel.runner = {{
              enable = true; serverUrl = "http://cache:8080"; configureNix = false;
              signing = {{ enable = true; keyName = "runner-a-1"; keyFile = "{}"; }};
            }}; }}"#,
        key_file.display()
    ));
    assert_eq!(str_list(&eval["nixSettings"]["secret-key-files"]), [key_file.display().to_string()], "set even without configureNix");
    let unit = service(&eval, "flywheel-signing-key");
    assert!(str_list(&unit["before"]).contains(&"nix-daemon.service".to_string()));
    assert!(str_list(&unit["wantedBy"]).contains(&"nix-daemon.service".to_string()));
    assert_eq!(str_list(&unit["unitConfig"]["RequiresMountsFor"]), [state.join("keys").display().to_string()]);
    let sc = &unit["serviceConfig"];
    assert_eq!((sc["Type"].as_str(), sc["RemainAfterExit"].as_bool(), sc["UMask"].as_str()), (Some("oneshot"), Some(true), Some("0077")));

    let script = nix.script(sc["ExecStart"].as_str().unwrap());
    let run = || {
        let out = Command::new("sh").arg(&script).env_remove("NIX_REMOTE").output().unwrap();
        assert!(out.status.success(), "the key service failed:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let log = run();
    let secret = std::fs::read_to_string(&key_file).unwrap();
    let key = flywheel_core::nix::SigningKey::parse(&secret).unwrap();
    assert_eq!(key.name(), "runner-a-1");
    let public = std::fs::read_to_string(state.join("keys/signing-key.pub")).unwrap();
    assert_eq!(flywheel_core::nix::VerifyingKey::parse(&public).unwrap(), key.verifying_key());
    assert!(log.contains(&key.verifying_key().to_nix_string()), "the public key is not in the log:\n{log}");
    assert!(log.contains("generated the key runner-a-1"), "{log}");
    assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(state.join("keys/signing-key.pub")).unwrap().permissions().mode() & 0o777, 0o644);

    // The next boot keeps the key and logs it again; a lost public half is written again.
    std::fs::remove_file(state.join("keys/signing-key.pub")).unwrap();
    let log = run();
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), secret, "the key changed on the next boot");
    assert!(!log.contains("generated"), "{log}");
    assert!(log.contains(&key.verifying_key().to_nix_string()), "{log}");
    assert_eq!(flywheel_core::nix::VerifyingKey::parse(&std::fs::read_to_string(state.join("keys/signing-key.pub")).unwrap()).unwrap(), key.verifying_key());

    // The secret is only on the runner's volume.
    let mut stored = Vec::new();
    files_under(&nix.store_root().join("nix/store"), &mut stored);
    for file in stored {
        assert!(!String::from_utf8_lossy(&std::fs::read(&file).unwrap()).contains(secret.trim()), "{} holds the key", file.display());
    }

    // Defaults: on the data dir, named after the host and the time of generation.
    let eval = nix.eval(r#"{ services.flywheel.runner = { enable = true; serverUrl = "http://cache:8080"; dataDir = "/pvc/flywheel"; signing.enable = true; }; }"#);
    let keys = str_list(&eval["nixSettings"]["secret-key-files"]);
    assert_eq!(keys, ["/pvc/flywheel/signing-key"]);
    let start = std::fs::read_to_string(nix.physical(service(&eval, "flywheel-signing-key")["serviceConfig"]["ExecStart"].as_str().unwrap())).unwrap();
    assert!(start.contains("key='/pvc/flywheel/signing-key'") && start.contains("uname -n"), "{start}");
    let eval = nix.eval(r#"{ services.flywheel.runner = { enable = true; serverUrl = "http://cache:8080"; }; }"#);
    assert!(eval["services"].get("flywheel-signing-key").is_none(), "signing is off by default");
    assert_eq!(eval["nixSettings"]["secret-key-files"], serde_json::json!([]));
}

nix_matrix! {
    server_and_runner_on_one_host_and_defaults => server_and_runner_on_one_host_and_defaults_with;
}

fn server_and_runner_on_one_host_and_defaults_with(version: NixVersion) {
    let nix = Eval::new(version);
    let eval = nix.eval(
        r#"{ services.flywheel.server = { enable = true; tokenSecretFile = "/run/keys/flywheel"; };
             services.flywheel.runner = { enable = true; serverUrl = "http://127.0.0.1:8080"; configureNix = false; }; }"#,
    );
    for unit in ["flywheel-server", "flywheel-mount", "flywheel-substituter"] {
        service(&eval, unit);
    }
    assert!(eval["services"].get("flywheel-push-daemon").is_none(), "push is off by default");
    assert!(eval["services"].get("flywheel-lazy-store").is_none(), "lazy mode is off by default");
    assert_eq!(str_list(&eval["nixSettings"]["substituters"]), ["https://cache.nixos.org/"], "configureNix = false");
    // Anonymous runner: no token flags, no credentials.
    let sc = &service(&eval, "flywheel-substituter")["serviceConfig"];
    assert!(!sc["ExecStart"].as_str().unwrap().contains("--token-file"));
    assert_eq!(sc["LoadCredential"], serde_json::json!([]));
}

nix_matrix! {
    contradicting_options_fail_evaluation_with_a_clear_message => contradicting_options_fail_evaluation_with_a_clear_message_with;
}

fn contradicting_options_fail_evaluation_with_a_clear_message_with(version: NixVersion) {
    let nix = Eval::new(version);
    let server = r#"enable = true; tokenSecretFile = "/run/keys/flywheel";"#;
    let runner = r#"enable = true; serverUrl = "http://cache:8080";"#;
    let cases = [
        (
            "{ services.flywheel.runner.enable = true; }".to_string(),
            "services.flywheel.runner.serverUrl must be set",
        ),
        (
            format!("{{ services.flywheel.runner = {{ {runner} mount.enable = false; lazy.enable = true; }}; }}"),
            "services.flywheel.runner.lazy.enable needs services.flywheel.runner.mount.enable",
        ),
        (
            format!("{{ services.flywheel.server = {{ {server} settings.storage.type = \"s3\"; }}; }}"),
            "services.flywheel.server.settings.storage.bucket must be set when settings.storage.type is \"s3\"",
        ),
        (
            format!("{{ services.flywheel.server = {{ {server} settings.storage.bucket = \"b\"; }}; }}"),
            "only apply to S3 storage",
        ),
        (
            format!(
                "{{ services.flywheel.server = {{ {server} settings.storage = {{ type = \"s3\"; bucket = \"b\"; endpoint = \"http://s3:9000\"; }}; }}; }}"
            ),
            "set settings.storage.allow-http = true",
        ),
        (
            format!(
                "{{ services.flywheel.server = {{ {server} settings.listen = \"0.0.0.0:37515\"; }}; services.flywheel.runner = {{ {runner} }}; }}"
            ),
            "services.flywheel.runner.substituter.port (37515) collides with the port of services.flywheel.server.settings.listen",
        ),
        ("{ services.flywheel.server.enable = true; }".to_string(), "services.flywheel.server.tokenSecretFile must be set"),
        (
            format!("{{ services.flywheel.runner = {{ {runner} push.enable = true; }}; }}"),
            "push.enable needs services.flywheel.runner.tokenFile",
        ),
        (
            format!("{{ services.flywheel.runner = {{ {runner} tokenFile = \"/nix/store/00000000000000000000000000000000-token\"; }}; }}"),
            "tokenFile must not be in the Nix store",
        ),
        (
            "{ services.flywheel.runner = { enable = true; serverUrl = \"cache:8080\"; }; }".to_string(),
            "must start with http:// or https://",
        ),
        (
            format!("{{ services.flywheel.server = {{ {server} settings.listen = \"localhost:8080\"; }}; }}"),
            "settings.listen must be IP:PORT",
        ),
        (
            format!("{{ services.flywheel.runner = {{ {runner} mount.mountPoint = \"/nix/store/fuse\"; }}; }}"),
            "mount.mountPoint (/nix/store/fuse) must be outside /nix/store",
        ),
        (
            format!("{{ services.flywheel.server = {{ {server} caches.\"bad/name\".signingKeyFile = \"/run/keys/k\"; }}; }}"),
            "services.flywheel.server.caches: invalid cache names [\"bad/name\"]",
        ),
        (
            format!("{{ services.flywheel.server = {{ {server} caches.main.signingKeyFile = \"/nix/store/00000000000000000000000000000000-key\"; }}; }}"),
            "caches.<name>.signingKeyFile must not be in the Nix store",
        ),
        (
            format!("{{ services.flywheel.server = {{ {server} caches.main.public = true; }}; }}"),
            "caches.<name>.signingKeyFile must be set for every declared cache",
        ),
        (
            format!(
                "{{ services.flywheel.server = {{ {server} caches.main = {{ signingKeyFile = \"/run/keys/k\"; requireUploaderSignature = true; }}; }}; }}"
            ),
            "requireUploaderSignature needs at least one key in trustedUploaderKeys",
        ),
        (
            format!("{{ services.flywheel.runner = {{ {runner} signing = {{ enable = true; keyFile = \"/nix/store/00000000000000000000000000000000-key\"; }}; }}; }}"),
            "services.flywheel.runner.signing.keyFile must not be in the Nix store",
        ),
        (
            format!("{{ services.flywheel.runner = {{ {runner} signing = {{ enable = true; keyName = \"a:b\"; }}; }}; }}"),
            "services.flywheel.runner.signing.keyName must be non-empty, without ':' or whitespace",
        ),
        // Not an assertion: the module system refuses unknown and mistyped options.
        (format!("{{ services.flywheel.runner = {{ {runner} cacheSise = 1; }}; }}"), "services.flywheel.runner.cacheSise' does not exist"),
        (
            format!("{{ services.flywheel.server = {{ {server} settings.zstd-level = 40; }}; }}"),
            "services.flywheel.server.settings.zstd-level' is not of type `integer between 1 and 19",
        ),
    ];
    for (configuration, message) in cases {
        let err = match nix.try_eval(&configuration) {
            Ok(_) => panic!("{configuration} evaluated, but should fail with {message:?}"),
            Err(err) => err,
        };
        assert!(err.contains(message), "{configuration} failed, but without {message:?}:\n{err}");
    }
}

nix_matrix! {
    every_option_has_a_type_a_default_and_a_description => every_option_has_a_type_a_default_and_a_description_with;
}

fn every_option_has_a_type_a_default_and_a_description_with(version: NixVersion) {
    let nix = Eval::new(version);
    let eval = nix.eval("{ }");
    let options = eval["options"].as_array().unwrap();
    assert!(options.len() > 30, "{options:?}");
    for option in options {
        for key in ["hasType", "hasDefault", "hasDescription"] {
            assert_eq!(option[key], true, "{} lacks {key}", option["name"]);
        }
    }
    // Nothing is configured unless enabled.
    assert_eq!(eval["services"], serde_json::json!({}));
}
