# NixOS module of flywheel: `services.flywheel.server` deploys the cache host,
# `services.flywheel.runner` a CI runner (FUSE mount, local substituter, push daemon, Nix
# settings, lazy store overlay). Import this directory, or use the flake's
# `nixosModules.default`, which also sets `services.flywheel.package`.
{ lib, pkgs, ... }:
{
  imports = [ ./server.nix ./runner.nix ];

  options.services.flywheel.package = lib.mkOption {
    type = lib.types.package;
    default = pkgs.flywheel;
    defaultText = lib.literalExpression "pkgs.flywheel";
    description = ''
      The flywheel package (its `bin/flywheel` runs every role). `pkgs.flywheel` exists with
      the flake's overlay; the flake's `nixosModules.default` sets this option itself.
    '';
  };
}
