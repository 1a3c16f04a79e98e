# A small stand-in for the parts of nixpkgs' `lib` that nixos-module/ uses, so that the module
# can be evaluated by Nix 2.8 with no nixpkgs and no network. Every name here is a real nixpkgs
# `lib` name with the same meaning (the module must also work, unchanged, with the real one).
# The module system is the essential subset of nixpkgs' lib/modules.nix: option declarations,
# definitions from many modules, mkIf/mkMerge/mkOverride/mkOrder pushed down and discharged the
# same way, type checks on every definition, typed merges, undeclared options refused, and
# submodules evaluated as nested module systems.
let
  inherit (builtins)
    attrNames concatLists concatMap concatStringsSep elemAt filter foldl' genList head isAttrs
    isBool isFunction isInt isList isPath isString length listToAttrs map mapAttrs match
    replaceStrings sort stringLength substring tail toJSON typeOf;

  lib = rec {
    # ---- lists, attrs, strings -----------------------------------------------------------
    optional = cond: x: if cond then [ x ] else [ ];
    optionals = cond: xs: if cond then xs else [ ];
    optionalString = cond: s: if cond then s else "";
    optionalAttrs = cond: a: if cond then a else { };
    concatStrings = concatStringsSep "";
    concatMapStrings = f: xs: concatStringsSep "" (map f xs);
    concatMapStringsSep = sep: f: xs: concatStringsSep sep (map f xs);
    concatStringsSep = builtins.concatStringsSep;
    mapAttrsToList = f: a: map (n: f n a.${n}) (attrNames a);
    filterAttrs = pred: a:
      listToAttrs (concatMap (n: if pred n a.${n} then [ { name = n; value = a.${n}; } ] else [ ]) (attrNames a));
    hasPrefix = pref: s: substring 0 (stringLength pref) s == pref;
    hasSuffix = suf: s:
      let ls = stringLength s; lf = stringLength suf;
      in lf <= ls && substring (ls - lf) lf s == suf;
    any = builtins.any;
    all = builtins.all;
    last = xs: elemAt xs (length xs - 1);
    toInt = s: if match "-?[0-9]+" s != null then builtins.fromJSON s else throw "Could not convert ${s} to int.";
    concatMap = builtins.concatMap;
    toList = x: if isList x then x else [ x ];
    unique = foldl' (acc: e: if builtins.elem e acc then acc else acc ++ [ e ]) [ ];
    escapeShellArg = arg: "'${replaceStrings [ "'" ] [ "'\\''" ] (toString arg)}'";
    escapeShellArgs = xs: concatStringsSep " " (map escapeShellArg xs);
    isDerivation = x: isAttrs x && (x.type or null) == "derivation";
    isStorePath = x:
      isString (toString x) && hasPrefix "${builtins.storeDir}/" (toString x)
      && match "[^/]+" (substring (stringLength builtins.storeDir + 1) (-1) (toString x)) != null;
    literalExpression = text: { _type = "literalExpression"; inherit text; };
    showOption = loc: concatStringsSep "." loc;

    # ---- properties ----------------------------------------------------------------------
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkMerge = contents: { _type = "merge"; inherit contents; };
    mkOverride = priority: content: { _type = "override"; inherit priority content; };
    mkOptionDefault = mkOverride 1500;
    mkDefault = mkOverride 1000;
    mkForce = mkOverride 50;
    mkOrder = priority: content: { _type = "order"; inherit priority content; };
    mkBefore = mkOrder 500;
    mkAfter = mkOrder 1500;
    defaultOverridePriority = 100;
    defaultOrderPriority = 1000;

    # ---- options -------------------------------------------------------------------------
    mkOption = attrs: attrs // { _type = "option"; };
    mkEnableOption = name: mkOption {
      default = false;
      example = true;
      description = "Whether to enable ${name}.";
      type = types.bool;
    };
    isOption = x: isAttrs x && (x._type or null) == "option";

    mergeEqualOption = loc: defs:
      let first = head defs;
      in foldl' (v: d:
        if d.value == v then v
        else throw "The option `${showOption loc}' has conflicting definition values: ${toJSON first.value} (in ${first.file}) and ${toJSON d.value} (in ${d.file}).")
        first.value (tail defs);
    mergeOneOption = loc: defs:
      if length defs == 1 then (head defs).value
      else throw "The option `${showOption loc}' is defined multiple times, in: ${concatStringsSep ", " (map (d: d.file) defs)}.";

    mkOptionType = { name, description ? name, check ? (x: true), merge ? mergeEqualOption, ... } @ attrs:
      { _type = "option-type"; inherit name description check merge; } // removeAttrs attrs [ "name" "description" "check" "merge" ];

    types = rec {
      bool = mkOptionType { name = "bool"; description = "boolean"; check = isBool; };
      str = mkOptionType { name = "str"; description = "string"; check = isString; };
      lines = mkOptionType {
        name = "lines"; description = "strings concatenated with \"\\n\""; check = isString;
        merge = loc: defs: concatStringsSep "\n" (map (d: d.value) defs);
      };
      int = mkOptionType { name = "int"; description = "signed integer"; check = isInt; };
      ints = {
        between = lo: hi: mkOptionType {
          name = "intBetween"; description = "integer between ${toString lo} and ${toString hi} (both inclusive)";
          check = x: isInt x && x >= lo && x <= hi;
        };
        positive = mkOptionType { name = "positiveInt"; description = "positive integer, meaning >0"; check = x: isInt x && x > 0; };
        unsigned = mkOptionType { name = "unsignedInt"; description = "unsigned integer, meaning >=0"; check = x: isInt x && x >= 0; };
      };
      port = ints.between 0 65535 // { name = "port"; description = "16 bit unsigned integer; between 0 and 65535 (both inclusive)"; };
      path = mkOptionType {
        name = "path"; description = "path";
        check = x: isPath x || (isString x && substring 0 1 x == "/");
      };
      package = mkOptionType {
        name = "package"; description = "package";
        check = x: isDerivation x || isStorePath x;
        merge = mergeOneOption;
      };
      anything = mkOptionType {
        name = "anything"; description = "anything";
        merge = loc: defs:
          if all (d: isAttrs d.value && !isDerivation d.value) defs then (attrsOf anything).merge loc defs
          else mergeEqualOption loc defs;
      };
      enum = values: mkOptionType {
        name = "enum"; description = "one of ${concatMapStringsSep ", " toJSON values}";
        check = x: builtins.elem x values;
      };
      nullOr = elem: mkOptionType {
        name = "nullOr"; description = "null or ${elem.description}";
        check = x: x == null || elem.check x;
        merge = loc: defs:
          let nulls = filter (d: d.value == null) defs;
          in if nulls == defs then null
          else if nulls == [ ] then elem.merge loc defs
          else throw "The option `${showOption loc}' is defined both null and not null, in: ${concatStringsSep ", " (map (d: d.file) defs)}.";
      };
      listOf = elem: mkOptionType {
        name = "listOf"; description = "list of ${elem.description}";
        check = isList;
        merge = loc: defs: concatMap (d:
          genList (i: (mergeDefinitions (loc ++ [ "[definition ${d.file}, entry ${toString i}]" ]) elem
            [ { inherit (d) file; value = elemAt d.value i; } ]).mergedValue) (length d.value)) defs;
      };
      attrsOf = elem: mkOptionType {
        name = "attrsOf"; description = "attribute set of ${elem.description}";
        check = isAttrs;
        merge = loc: defs:
          let
            names = unique (concatMap (d: attrNames d.value) defs);
            merged = map (n: {
              name = n;
              value = mergeDefinitions (loc ++ [ n ]) elem
                (concatMap (d: if d.value ? ${n} then [ { inherit (d) file; value = d.value.${n}; } ] else [ ]) defs);
            }) names;
          in mapAttrs (n: v: v.mergedValue) (listToAttrs (filter (x: x.value.isDefined) merged));
      };
      submodule = module: mkOptionType {
        name = "submodule"; description = "submodule";
        check = x: isAttrs x || isFunction x || isPath x;
        merge = loc: defs: (evalModules {
          modules = [ module ] ++ map (d: { _file = d.file; imports = [ d.value ]; }) defs;
          specialArgs = { name = last loc; };
          prefix = loc;
        }).config;
      };
    };

    # ---- definitions ---------------------------------------------------------------------
    pushDownProperties = cfg:
      if (cfg._type or "") == "merge" then concatMap pushDownProperties cfg.contents
      else if (cfg._type or "") == "if" then map (mapAttrs (n: v: mkIf cfg.condition v)) (pushDownProperties cfg.content)
      else if (cfg._type or "") == "override" then map (mapAttrs (n: v: mkOverride cfg.priority v)) (pushDownProperties cfg.content)
      else [ cfg ];

    dischargeProperties = def:
      if (def._type or "") == "merge" then concatMap dischargeProperties def.contents
      else if (def._type or "") == "if" then
        (if isBool def.condition then (if def.condition then dischargeProperties def.content else [ ])
         else throw "mkIf called with a non-Boolean condition")
      else [ def ];

    filterOverrides = defs:
      let
        prio = d: if (d.value._type or "") == "override" then d.value.priority else defaultOverridePriority;
        best = foldl' (p: d: if prio d < p then prio d else p) 9999 defs;
        strip = d: if (d.value._type or "") == "override" then d // { value = d.value.content; } else d;
      in map strip (filter (d: prio d == best) defs);

    sortProperties = defs:
      let
        order = d: if (d.value._type or "") == "order" then d.value.priority else defaultOrderPriority;
        strip = d: if (d.value._type or "") == "order" then d // { value = d.value.content; } else d;
      in map strip (sort (a: b: order a < order b) defs);

    # Definitions [{file, value}] of one option: discharged, overrides filtered, ordered, checked, merged.
    mergeDefinitions = loc: type: defs:
      let
        discharged = concatMap (d: map (v: { inherit (d) file; value = v; }) (dischargeProperties d.value)) defs;
        final = sortProperties (filterOverrides discharged);
        isDefined = final != [ ];
        bad = filter (d: !type.check d.value) final;
      in {
        inherit isDefined;
        mergedValue =
          if !isDefined then throw "The option `${showOption loc}' is used but not defined."
          else if bad != [ ] then throw "A definition for option `${showOption loc}' is not of type `${type.description}'. Definition value in ${(head bad).file}: ${toJSON (head bad).value}"
          else type.merge loc final;
      };

    # ---- evaluation ----------------------------------------------------------------------
    evalModules = { modules, specialArgs ? { }, prefix ? [ ] }:
      let
        args = specialArgs // { inherit lib config options; };
        load = file: m:
          let
            m1 = if isPath m then load (toString m) (import m)
                 else if isFunction m then load file (m (builtins.intersectAttrs (builtins.functionArgs m) args))
                 else m;
          in if isPath m || isFunction m then m1
          else let f = m._file or file; in {
            file = f;
            imports = m.imports or [ ];
            options = m.options or { };
            config =
              if m ? options || m ? config then m.config or { }
              else removeAttrs m [ "imports" "_file" "key" "meta" ];
          };
        collect = file: m:
          let mod = load (if isPath m then toString m else file) m;
          in [ mod ] ++ concatMap (collect mod.file) mod.imports;
        all' = concatMap (collect "<unknown-file>") modules;

        decls = map (m: { inherit (m) file; value = m.options; }) all';
        defs = map (m: { inherit (m) file; value = m.config; }) all';

        # Walks the option tree and the definitions together.
        evalTree = loc: optDecls: cfgDefs:
          let
            pushed = concatMap (d: map (v: { inherit (d) file; value = v; }) (pushDownProperties d.value)) cfgDefs;
            optNames = unique (concatMap (d: attrNames d.value) optDecls);
            undeclared = filter (n: !builtins.elem n optNames && n != "_module") (concatMap (d: attrNames d.value) pushed);
            sub = n: concatMap (d: if d.value ? ${n} then [ { inherit (d) file; value = d.value.${n}; } ] else [ ]);
            evalName = n:
              let
                ds = sub n optDecls;
                leaves = filter (d: isOption d.value) ds;
                ndefs = sub n pushed;
              in
                if leaves != [ ] then
                  (if length ds > 1 then throw "The option `${showOption (loc ++ [ n ])}' is declared more than once (${concatStringsSep ", " (map (d: d.file) ds)})."
                   else evalOption (loc ++ [ n ]) (head leaves) ndefs)
                else evalTree (loc ++ [ n ]) ds ndefs;
            tree = listToAttrs (map (n: { name = n; value = evalName n; }) optNames);
          in
            if undeclared != [ ] then throw "The option `${showOption (loc ++ [ (head undeclared) ])}' does not exist."
            else { options = mapAttrs (n: v: v.options) tree; config = mapAttrs (n: v: v.config) tree; };

        evalOption = loc: decl: ndefs:
          let
            opt = decl.value;
            type = opt.type or types.anything;
            withDefault = ndefs ++ optional (opt ? default) { file = decl.file; value = mkOptionDefault opt.default; };
            merged = mergeDefinitions loc type withDefault;
            value = if opt ? apply then opt.apply merged.mergedValue else merged.mergedValue;
          in {
            options = opt // { inherit loc value; inherit (merged) isDefined; declarations = [ decl.file ]; };
            config = value;
          };

        result = evalTree prefix decls defs;
        options = result.options;
        config = result.config;
      in { inherit options config; };
  };
in lib
