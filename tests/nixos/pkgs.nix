# Stand-in `pkgs` for evaluating nixos-module/ without nixpkgs. Packages are fake derivations
# pointing at host directories (`/usr` on Debian has bin/cat, bin/mount, bin/nix-store, ...);
# `flywheel` points at a directory whose bin/flywheel is the binary under test. Text files are
# real store files (`builtins.toFile`), so the tests can run the scripts the module writes.
{ flywheelPackage ? "/flywheel-stand-in" }:
let
  fake = name: outPath: { type = "derivation"; inherit name outPath; outputs = [ "out" ]; };
  runtimeShell = "/bin/sh";
in
{
  inherit runtimeShell;
  flywheel = fake "flywheel" flywheelPackage;
  coreutils = fake "coreutils" "/usr";
  util-linux = fake "util-linux" "/usr";
  nix = fake "nix" "/usr";
  writeText = name: text: builtins.toFile name text;
  # A package with the script as `bin/NAME` in nixpkgs; here the script file itself, which the
  # tests find by its name among `environment.systemPackages`.
  writeShellScriptBin = name: text: fake name (builtins.toFile name ''
    #!${runtimeShell}
    ${text}
  '');
  writeShellScript = name: text: builtins.toFile name ''
    #!${runtimeShell}
    ${text}
  '';
}
