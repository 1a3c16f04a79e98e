# Renders an attribute set as TOML: scalars (strings, integers, booleans, paths) and lists of
# them as `key = value`, nested attribute sets as `[tables]` after the scalars, null values
# left out. Enough for the server's config; it never copies a path into the store.
{ lib }:
let
  inherit (builtins) attrNames concatStringsSep filter isAttrs isBool isInt isList isPath isString match replaceStrings toString typeOf;
  string = s:
    if match ".*[[:cntrl:]].*" (replaceStrings [ "\n" "\r" "\t" ] [ "" "" "" ] s) != null then throw "toml: control character in ${s}"
    else "\"" + replaceStrings [ "\\" "\"" "\n" "\r" "\t" ] [ "\\\\" "\\\"" "\\n" "\\r" "\\t" ] s + "\"";
  key = k: if match "[A-Za-z0-9_-]+" k != null then k else string k;
  value = v:
    if isBool v then (if v then "true" else "false")
    else if isInt v then toString v
    else if isString v then string v
    else if isPath v then string (toString v)
    else if isList v then "[" + concatStringsSep ", " (map value v) + "]"
    else throw "toml: cannot render a ${typeOf v}";
  table = path: attrs:
    let
      names = filter (n: attrs.${n} != null) (attrNames attrs);
      isTable = n: isAttrs attrs.${n};
      scalars = filter (n: !isTable n) names;
      tables = filter isTable names;
      header = if path == [ ] then "" else "\n[" + concatStringsSep "." (map key path) + "]\n";
    in
    header
    + concatStringsSep "" (map (n: "${key n} = ${value attrs.${n}}\n") scalars)
    + concatStringsSep "" (map (n: table (path ++ [ n ]) attrs.${n}) tables);
in
attrs: table [ ] attrs
