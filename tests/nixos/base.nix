# Stand-in declarations of the NixOS options that nixos-module/ sets, with the types NixOS gives
# them (a subset of their sub-options). Anything the module sets that NixOS does not declare
# fails evaluation here too, because the stand-in module system refuses undeclared options.
{ lib, ... }:
let
  inherit (lib) mkOption types;
  # nixos/lib/systemd-unit-options.nix: lists concatenate, other values must agree.
  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge = loc: defs:
      if lib.any (d: builtins.isList d.value) defs then builtins.concatMap (d: lib.toList d.value) defs
      else lib.mergeEqualOption loc defs;
  };
  unitNames = mkOption { type = types.listOf types.str; default = [ ]; description = "Unit names."; };
  service = types.submodule {
    options = {
      enable = mkOption { type = types.bool; default = true; description = "Whether the unit is enabled."; };
      description = mkOption { type = types.str; default = ""; description = "Unit description."; };
      wantedBy = unitNames; requiredBy = unitNames; after = unitNames; before = unitNames;
      wants = unitNames; requires = unitNames; bindsTo = unitNames; partOf = unitNames;
      conflicts = unitNames;
      restartIfChanged = mkOption { type = types.bool; default = true; description = "Restart on switch."; };
      unitConfig = mkOption { type = types.attrsOf unitOption; default = { }; description = "[Unit] section."; };
      serviceConfig = mkOption { type = types.attrsOf unitOption; default = { }; description = "[Service] section."; };
      environment = mkOption { type = types.attrsOf types.str; default = { }; description = "Environment."; };
      path = mkOption { type = types.listOf types.package; default = [ ]; description = "Packages in PATH."; };
      script = mkOption { type = types.lines; default = ""; description = "Shell script."; };
      preStart = mkOption { type = types.lines; default = ""; description = "Shell script run before."; };
    };
  };
in
{
  options = {
    assertions = mkOption { type = types.listOf types.anything; default = [ ]; description = "Assertions."; };
    warnings = mkOption { type = types.listOf types.str; default = [ ]; description = "Warnings."; };
    systemd.services = mkOption { type = types.attrsOf service; default = { }; description = "Services."; };
    systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; description = "tmpfiles.d rules."; };
    users.users = mkOption {
      type = types.attrsOf (types.submodule {
        options = {
          isSystemUser = mkOption { type = types.bool; default = false; description = "System user."; };
          group = mkOption { type = types.str; default = ""; description = "Primary group."; };
          home = mkOption { type = types.path; default = "/var/empty"; description = "Home."; };
          description = mkOption { type = types.str; default = ""; description = "GECOS."; };
        };
      });
      default = { };
      description = "Users.";
    };
    users.groups = mkOption { type = types.attrsOf (types.submodule { options = { }; }); default = { }; description = "Groups."; };
    networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; description = "Open TCP ports."; };
    boot.kernelModules = mkOption { type = types.listOf types.str; default = [ ]; description = "Kernel modules loaded at boot."; };
    environment.variables = mkOption { type = types.attrsOf types.str; default = { }; description = "Session variables."; };
    environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; description = "System packages."; };
    nix.package = mkOption { type = types.package; description = "The Nix package."; };
    # Freeform in NixOS (`nix.conf` atoms); declared here with the types the freeform type takes.
    nix.settings = mkOption {
      type = types.submodule {
        options = {
          substituters = mkOption { type = types.listOf types.str; default = [ ]; description = "Substituters."; };
          trusted-public-keys = mkOption { type = types.listOf types.str; default = [ ]; description = "Keys."; };
          narinfo-cache-negative-ttl = mkOption { type = types.nullOr types.int; default = null; description = "TTL."; };
          post-build-hook = mkOption { type = types.nullOr types.str; default = null; description = "Hook."; };
          secret-key-files = mkOption { type = types.listOf types.str; default = [ ]; description = "Keys that sign local builds."; };
        };
      };
      default = { };
      description = "nix.conf settings.";
    };
  };
  # What NixOS's nix module defines (config-level definitions, so lists merge): cache.nixos.org
  # last, and its key.
  config.nix.settings = {
    substituters = lib.mkAfter [ "https://cache.nixos.org/" ];
    trusted-public-keys = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
  };
}
