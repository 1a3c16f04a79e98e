# `name = option type default "description";`: most of the modules' options need no more, and
# spelled out as `mkOption { ... }` they made both modules mostly the same five lines. Options
# with an example add `// { example = ...; }`; the rest still use `mkOption` directly.
{ lib }:
type: default: description: lib.mkOption { inherit type default description; }
