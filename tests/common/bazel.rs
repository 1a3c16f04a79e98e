//! Runs Debian's Bazel 4.2.3 over the test workspace (`tests/bazel/workspace`, six genrules):
//! `--batch`, so that no Bazel server outlives a run, with the flags that make its cache keys
//! independent of the caller's environment.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// What one `bazel build //:all` did.
pub struct BazelRun {
    /// Wall time, JVM start included.
    pub took: Duration,
    /// Bazel's process summary, such as `7 processes: 6 remote cache hit, 1 internal.`
    pub summary: String,
}

/// Builds the workspace (copied under `root` on first use) in the output base `root/base`,
/// with `flags` (the remote-cache flags), failing on a failed build.
pub fn build(bazel: &Path, root: &Path, base: &str, flags: &[String]) -> BazelRun {
    let workspace = root.join("workspace");
    if !workspace.exists() {
        std::fs::create_dir_all(&workspace).unwrap();
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bazel/workspace");
        for entry in std::fs::read_dir(source).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), workspace.join(entry.file_name())).unwrap();
        }
    }
    let started = Instant::now();
    let out = Command::new(bazel)
        .current_dir(&workspace)
        .arg("--nohome_rc")
        .arg(format!("--output_user_root={}", root.join("user-root").display()))
        .arg(format!("--output_base={}", root.join(base).display()))
        .args(["--batch", "--host_jvm_args=-Xmx512m", "build"])
        .args(["--spawn_strategy=local", "--incompatible_strict_action_env", "--symlink_prefix=/", "--noshow_progress"])
        .args(["--color=no", "--curses=no"])
        .args(flags)
        .arg("//:all")
        .env("HOME", root)
        .output()
        .expect("running bazel");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "bazel build failed:\n{stderr}");
    let summary = stderr
        .lines()
        .find(|l| l.contains(" processes: ") || l.contains(" process: "))
        .unwrap_or_else(|| panic!("no process summary in Bazel's output:\n{stderr}"))
        .trim_start_matches("INFO: ")
        .to_string();
    BazelRun { took, summary }
}

/// The outputs of a build in `root/base`, in the order of `names`.
pub fn outputs(root: &Path, base: &str, names: &[&str]) -> Vec<Vec<u8>> {
    let bin = root.join(base).join("execroot/flywheel_bazel_test/bazel-out/k8-fastbuild/bin");
    names.iter().map(|name| std::fs::read(bin.join(name)).unwrap()).collect()
}

/// The number before `what` in a summary such as `7 processes: 6 remote cache hit, 1 internal.`
pub fn count(summary: &str, what: &str) -> usize {
    let parts = summary.rsplit_once(": ").map_or(summary, |(_, p)| p);
    parts
        .trim_end_matches('.')
        .split(", ")
        .find_map(|part| part.strip_suffix(what).and_then(|n| n.trim().parse().ok()))
        .unwrap_or(0)
}
