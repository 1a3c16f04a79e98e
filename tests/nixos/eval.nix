# Evaluates nixos-module/ with the stand-in lib, NixOS options and pkgs, and one configuration
# module. Fails like NixOS does when an assertion fails; otherwise returns what the tests check.
{ configuration, flywheelPackage ? "/flywheel-stand-in" }:
let
  lib = import ./lib.nix;
  pkgs = import ./pkgs.nix { inherit flywheelPackage; };
  eval = lib.evalModules {
    modules = [
      ./base.nix
      ../../nixos-module
      { nix.package = pkgs.nix; }
      configuration
    ];
    specialArgs = { inherit pkgs; };
  };
  inherit (eval) config options;
  failed = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);

  # Every option under services.flywheel, with what the docs need.
  walk = prefix: tree:
    if lib.isOption tree then [ {
      name = lib.showOption prefix;
      hasType = tree ? type;
      hasDefault = tree ? default;
      hasDescription = (tree.description or "") != "";
    } ]
    else builtins.concatMap (n: walk (prefix ++ [ n ]) tree.${n}) (builtins.attrNames tree);
in
if failed != [ ] then
  throw "\nFailed assertions:\n${lib.concatMapStrings (m: "- ${m}\n") failed}"
else {
  services = lib.filterAttrs (n: _: lib.hasPrefix "flywheel" n) config.systemd.services;
  nixSettings = config.nix.settings;
  tmpfiles = config.systemd.tmpfiles.rules;
  users = config.users.users;
  groups = builtins.attrNames config.users.groups;
  firewall = config.networking.firewall.allowedTCPPorts;
  kernelModules = config.boot.kernelModules;
  systemPackages = config.environment.systemPackages;
  inherit (config) warnings;
  options = walk [ "services" "flywheel" ] options.services.flywheel;
}
