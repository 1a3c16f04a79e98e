{
  description = "flywheel: chunked Attic-compatible Nix binary cache, lazy FUSE store and local substituter for CI runners";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      overlays.default = final: prev: {
        flywheel = final.callPackage ./nixos-module/package.nix { };
      };

      packages = forAllSystems (pkgs: rec {
        flywheel = pkgs.callPackage ./nixos-module/package.nix { };
        default = flywheel;
      });

      # The module, with `services.flywheel.package` built by the importing system's nixpkgs.
      nixosModules.default = { lib, pkgs, ... }: {
        imports = [ ./nixos-module ];
        services.flywheel.package = lib.mkDefault (pkgs.callPackage ./nixos-module/package.nix { });
      };
      nixosModules.flywheel = self.nixosModules.default;

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [ cargo rustc clippy rustfmt rust-analyzer pkg-config cmake perl fuse3 nix ];
        };
      });

      # A server VM and a runner VM (needs KVM): `nix flake check` or
      # `nix build .#checks.x86_64-linux.vm-test`.
      checks = forAllSystems (pkgs: {
        vm-test = import ./nixos-module/vm-test.nix { inherit pkgs; module = self.nixosModules.default; };
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      });

      formatter = forAllSystems (pkgs: pkgs.nixpkgs-fmt);
    };
}
