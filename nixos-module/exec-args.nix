# One argument of a systemd `ExecStart=` line: a JSON string (which systemd unquotes with C
# escapes) with `%` and `$` doubled so that systemd expands neither specifiers nor variables.
# The same rule as nixpkgs' `utils.escapeSystemdExecArg`.
{ lib }:
arg:
let
  s = if builtins.isPath arg then toString arg
      else if builtins.isString arg then arg
      else if builtins.isInt arg || lib.isDerivation arg then toString arg
      else throw "escapeSystemdExecArg: cannot escape a ${builtins.typeOf arg}";
in
builtins.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON s)
