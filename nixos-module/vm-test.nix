# NixOS VM test (needs KVM): a cache VM runs `services.flywheel.server`; a runner VM runs
# `services.flywheel.runner`. A path pushed to the cache is substituted on the runner through
# the local substituter (with signatures required) and read through the FUSE mount.
{ pkgs, module }:
let
  # Test-only signing key of the cache (made by `nix-store --generate-binary-cache-key main-1`).
  secretKey = "main-1:XPnNEZkyE7SKoMyRx4CR1pW/jntMo3HFC1BQ5zgYC2ay7imi/vKhzmVXSmZy9WvpmHCgTZJdh6350Slyj5o9Bg==";
  publicKey = "main-1:su4pov7yoc5lV0pmcvVr6ZhwoE2SXYet+dEpco+aPQY=";
  # Test-only token secret. Real deployments keep secrets out of the store (e.g. agenix, sops-nix).
  tokenSecret = pkgs.writeText "token-secret" "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0";
  signingKey = pkgs.writeText "main.key" secretKey;
in
pkgs.testers.runNixOSTest {
  name = "flywheel";

  nodes.cache = { pkgs, ... }: {
    imports = [ module ];
    services.flywheel.server = {
      enable = true;
      tokenSecretFile = "/etc/flywheel/token-secret";
      openFirewall = true;
      settings.listen = "0.0.0.0:8080";
      # Declared with its key file: created on start, signing with this key.
      caches.main.signingKeyFile = "/etc/flywheel/main.key";
    };
    environment.etc."flywheel/token-secret".source = tokenSecret;
    environment.etc."flywheel/main.key".source = signingKey;
    environment.systemPackages = [ pkgs.curl ];
    nix.settings.experimental-features = [ "nix-command" ];
  };

  nodes.runner = { ... }: {
    imports = [ module ];
    services.flywheel.runner = {
      enable = true;
      serverUrl = "http://cache:8080";
      cache = "main";
      tokenFile = "/etc/flywheel-token";
      trustedPublicKeys = [ publicKey ];
    };
    nix.settings.experimental-features = [ "nix-command" ];
    virtualisation.memorySize = 1024;
  };

  testScript = ''
    import os

    start_all()
    cache.wait_for_unit("flywheel-server.service")
    cache.wait_for_open_port(8080)

    token = cache.succeed(
        "flywheel token mint --config /run/flywheel-server/server.toml --sub vm-test --validity 1d"
        " --pull main --push main"
    ).strip()
    info = cache.succeed(
        f"curl -sf -H 'Authorization: Bearer {token}' http://127.0.0.1:8080/_api/v1/cache-config/main"
    )
    assert "${publicKey}" in info, info

    # A path that exists only on the cache VM, pushed the way Nix pushes.
    path = cache.succeed(
        "mkdir -p /tmp/payload && echo 'hello from flywheel' > /tmp/payload/greeting"
        " && nix-store --add /tmp/payload"
    ).strip()
    cache.succeed(f"printf 'machine 127.0.0.1 password %s\\n' '{token}' > /tmp/netrc")
    cache.succeed(f"nix copy --option netrc-file /tmp/netrc --to http://127.0.0.1:8080/main {path}")

    # The runner gets its token, then starts using it.
    runner.succeed(f"install -m 0400 /dev/stdin /etc/flywheel-token <<< '{token}'")
    runner.succeed("systemctl reset-failed; systemctl restart flywheel-mount.service flywheel-substituter.service")
    runner.wait_for_unit("flywheel-substituter.service")
    runner.wait_for_open_port(37515)
    runner.wait_until_succeeds("mountpoint -q /run/flywheel/store")

    # Substitution through the local substituter, which nix-daemon lists first.
    config = runner.succeed("nix show-config")
    assert "substituters = http://127.0.0.1:37515" in config, config
    runner.fail(f"test -e {path}")
    runner.succeed(f"nix-store --realise {path}")
    assert runner.succeed(f"cat {path}/greeting").strip() == "hello from flywheel"
    runner.succeed(f"nix-store --verify-path {path}")

    # A read through the FUSE mount.
    name = os.path.basename(path)
    assert runner.succeed(f"cat /run/flywheel/store/{name}/greeting").strip() == "hello from flywheel"
  '';
}
