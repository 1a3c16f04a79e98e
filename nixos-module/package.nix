# The `flywheel` binary, built from the workspace with its Cargo.lock. No system libraries:
# fuser mounts without libfuse, reqwest runs without TLS, the compression crates and
# aws-lc-sys build their bundled C sources.
{ lib, rustPlatform, cmake, perl }:
rustPlatform.buildRustPackage {
  pname = "flywheel";
  version = (builtins.fromTOML (builtins.readFile ../Cargo.toml)).workspace.package.version;

  src = lib.cleanSourceWith {
    src = ../.;
    filter = path: type:
      let base = baseNameOf path;
      in !(type == "directory" && (lib.hasPrefix "target" base || base == ".git" || base == "nixos-module"))
         && !(lib.hasSuffix ".nix" base);
  };

  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [ "--package" "flywheel" "--bin" "flywheel" ];
  # aws-lc-sys (via object_store's TLS) may use cmake; it is not a cmake project itself.
  nativeBuildInputs = [ cmake perl ];
  dontUseCmakeConfigure = true;
  # The tests need root, /dev/fuse, a real Nix and s3s-fs: run them with ./scripts/test.sh.
  doCheck = false;

  meta = {
    description = "Nix store accelerator for CI runners: chunked Attic-compatible cache, lazy FUSE store, local substituter";
    license = with lib.licenses; [ mit asl20 ];
    mainProgram = "flywheel";
    platforms = lib.platforms.linux;
  };
}
