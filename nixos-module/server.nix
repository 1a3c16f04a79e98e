# `services.flywheel.server`: the cache host. `settings` mirrors the TOML that `flywheel serve`
# reads (server/src/config.rs, kebab-case keys); the module renders it into the store without
# secrets, and the service's start script prepends the token secret (a systemd credential) into
# a file under /run that only the service user can read. The S3 secret key stays in its file:
# the config names the credential's path.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkEnableOption mkIf types literalExpression optional optionalAttrs;
  cfg = config.services.flywheel.server;
  s = cfg.settings;
  st = s.storage;
  toTOML = import ./toml.nix { inherit lib; };

  stateDir = "/var/lib/flywheel";
  unit = "flywheel-server";
  isS3 = st.type == "s3";
  s3Only = { inherit (st) bucket endpoint access-key-id secret-access-key-file path-style allow-http; };
  s3OnlySet = builtins.filter (n: s3Only.${n} != null) (builtins.attrNames s3Only);

  listenMatch = builtins.match "(\\[[0-9A-Fa-f:.]+]|[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+):([0-9]+)" s.listen;
  port = if listenMatch == null then null else lib.toInt (builtins.elemAt listenMatch 1);
  grpcMatch = if s.bazel.grpc-listen == null then null
    else builtins.match "(\\[[0-9A-Fa-f:.]+]|[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+):([0-9]+)" s.bazel.grpc-listen;
  grpcPort = if grpcMatch == null then null else lib.toInt (builtins.elemAt grpcMatch 1);
  lowPort = (port != null && port < 1024) || (grpcPort != null && grpcPort < 1024);
  localOutside = !isS3 && !lib.hasPrefix "${stateDir}/" st.path;

  # Everything but the secrets. The start script prepends the token secret (a top-level key, so
  # it may come first) and appends the S3 secret key's file, which lives in
  # $CREDENTIALS_DIRECTORY, to the [storage] table, which is rendered last for that.
  settingsToml =
    toTOML {
      inherit (s) listen zstd-level chunk-parallelism hot-chunk-bytes api-endpoint;
      chunking = { inherit (s.chunking) min-size avg-size max-size; };
      gc = { inherit (s.gc) default-retention-period interval grace-period access-record-interval; };
      compaction = { inherit (s.compaction) interval cold-after pack-size frame-size zstd-level; };
      limits = {
        inherit (s.limits) header-read-timeout idle-timeout body-idle-timeout body-min-rate request-timeout
          max-connections max-uploads upload-queue-timeout;
      };
      tfstate = { inherit (s.tfstate) max-size keep-versions locking; };
      bazel = { inherit (s.bazel) grpc-listen default-instance max-blob-size max-action-result-size max-connections spool-max-bytes; };
    };
  storageToml =
    "\n[storage]\n"
    + toTOML (if isS3 then {
        type = "s3";
        inherit (st) bucket region endpoint access-key-id path-style allow-http;
      } else {
        type = "local";
        inherit (st) path;
      });
  settingsFile = pkgs.writeText "flywheel-server.toml" settingsToml;
  storageFile = pkgs.writeText "flywheel-server-storage.toml" storageToml;
  # Each declared cache's table; the start script writes its header and the key file's path
  # (a credential) before it.
  cacheFile = name: c: pkgs.writeText "flywheel-cache-${name}.toml" (toTOML {
    inherit (c) public priority;
    upstream-cache-key-names = c.upstreamCacheKeyNames;
    retention-period = c.retentionPeriod;
    trusted-uploader-keys = c.trustedUploaderKeys;
    require-uploader-signature = c.requireUploaderSignature;
  });
  validCacheName = name: builtins.match "[A-Za-z0-9][A-Za-z0-9_+-]{0,49}" name != null;
  badCacheNames = builtins.filter (n: !validCacheName n) (builtins.attrNames cfg.caches);
  s3SecretFile = isS3 && st.secret-access-key-file != null;

  # Runs as the service user: $CREDENTIALS_DIRECTORY and $RUNTIME_DIRECTORY come from systemd.
  # Extra arguments go to `flywheel serve` (e.g. `--check-config`).
  startScript = pkgs.writeShellScript "flywheel-server-start" ''
    set -eu
    umask 077
    secret_file="$CREDENTIALS_DIRECTORY/token-hs256-secret-base64"
    secret=
    read -r secret < "$secret_file" || true
    case "$secret" in
      "" | *[!A-Za-z0-9+/=_-]*)
        echo "flywheel-server: ${toString cfg.tokenSecretFile} must hold the base64 token secret on its first line" >&2
        exit 1 ;;
    esac
    config="$RUNTIME_DIRECTORY/server.toml"
    {
      printf 'token-hs256-secret-base64 = "%s"\n' "$secret"
      ${pkgs.coreutils}/bin/cat ${settingsFile}
      ${lib.concatStrings (lib.mapAttrsToList (name: c: ''
        printf '\n[caches.%s]\nsigning-key-file = "%s/signing-key-%s"\n' '${name}' "$CREDENTIALS_DIRECTORY" '${name}'
        ${pkgs.coreutils}/bin/cat ${cacheFile name c}
      '') cfg.caches)}
      ${pkgs.coreutils}/bin/cat ${storageFile}
      ${lib.optionalString s3SecretFile ''printf 'secret-access-key-file = "%s/s3-secret-access-key"\n' "$CREDENTIALS_DIRECTORY"''}
    } > "$config.tmp"
    ${pkgs.coreutils}/bin/mv -f "$config.tmp" "$config"
    exec ${config.services.flywheel.package}/bin/flywheel serve --config "$config" "$@"
  '';

  inStore = p: p != null && lib.hasPrefix "${builtins.storeDir}/" (toString p);
  option = import ./option.nix { inherit lib; };
  nullOrStr = option (types.nullOr types.str) null;
in
{
  options.services.flywheel.server = {
    enable = mkEnableOption "the flywheel binary cache server (`flywheel serve`)";

    tokenSecretFile = option (types.nullOr types.path) null ''
        Required. A file holding base64 of at least 32 random bytes (Attic's
        `token-hs256-secret-base64`), e.g. made by `openssl rand -base64 48`. It signs every
        token. Read at service start through systemd's `LoadCredential`; never copied into the
        Nix store (give a string, not a Nix path literal).
      '' // { example = "/run/secrets/flywheel-token-secret"; };

    environmentFile = option (types.nullOr types.path) null ''
        A systemd `EnvironmentFile` read at service start, e.g. with `AWS_ACCESS_KEY_ID=` and
        `AWS_SECRET_ACCESS_KEY=` for S3 storage.
      '' // { example = "/run/secrets/flywheel-s3.env"; };

    caches = mkOption {
      default = { };
      example = literalExpression ''
        { main = { signingKeyFile = "/run/secrets/flywheel-main.key"; }; }
      '';
      description = ''
        Caches declared by the configuration, by name. The server creates each on start and
        brings an existing one in line with these options (signing key, visibility, priority,
        retention, upstream keys, trusted uploader keys); caches made through the API are left
        alone.
      '';
      type = types.attrsOf (types.submodule {
        options = {
          signingKeyFile = option (types.nullOr types.str) null ''
              Required. A file holding the cache's secret signing key in Nix's format (made by
              `nix key generate-secret --key-name main-1`). Read at service start through
              systemd's `LoadCredential`; never copied into the Nix store. Clients trust its
              public key (`nix key convert-secret-to-public`).
            '' // { example = "/run/secrets/flywheel-main.key"; };
          public = option types.bool false
            "Whether anyone may pull from the cache without a token.";
          priority = option types.int 41
            "Priority announced in `nix-cache-info`; lower is preferred by Nix.";
          retentionPeriod = option (types.nullOr types.ints.unsigned) null
            "Seconds a path is kept after its last access; null: `settings.gc.default-retention-period`.";
          upstreamCacheKeyNames = option (types.listOf types.str) [ "cache.nixos.org-1" ]
            "Key names of upstream caches, whose paths clients do not push.";
          trustedUploaderKeys = option (types.listOf types.str) [ ] ''
              Public keys (`name:base64`) of trusted uploaders, such as the key each runner
              generates (`services.flywheel.runner.signing`, written to its `signing-key.pub`).
              Rotate a key by adding the new one, deploying the runner with it, then removing
              the old one.
            '' // { example = [ "runner-a-1:igeBjeQ3Qac+vYwZm7O2W7beqCySeapjFnmFL9HU2fo=" ]; };
          requireUploaderSignature = option types.bool false ''
              Whether the server refuses (403) every upload whose path carries no valid
              signature by one of `trustedUploaderKeys`. Needs at least one key.
            '';
        };
      });
    };

    openFirewall = option types.bool false
      "Whether to open the ports of `settings.listen` and `settings.bazel.grpc-listen` in the firewall.";

    settings = {
      listen = option types.str "127.0.0.1:8080"
        "IP address and port to listen on (`listen`)." // { example = "[::]:8080"; };
      zstd-level = option (types.ints.between 1 19) 3
        "zstd level of stored chunks (`zstd-level`).";
      chunk-parallelism = option (types.ints.between 1 1024) 64
        "Chunks stored or fetched at once per request (`chunk-parallelism`).";
      hot-chunk-bytes = option types.ints.unsigned 67108864
        "Bytes of chunks the chunk API sent lately, kept in memory for the next runner that misses them (`hot-chunk-bytes`); 0 keeps none.";
      api-endpoint = nullOrStr ''
        The URL clients reach the server at, for `cache-config` answers (`api-endpoint`); null:
        the request's Host header.
      '';
      chunking = {
        min-size = mkOption { type = types.ints.positive; default = 16384; description = "FastCDC minimum chunk size in bytes (`chunking.min-size`, Attic's default)."; };
        avg-size = mkOption { type = types.ints.positive; default = 65536; description = "FastCDC average chunk size in bytes (`chunking.avg-size`, Attic's default)."; };
        max-size = mkOption { type = types.ints.positive; default = 262144; description = "FastCDC maximum chunk size in bytes (`chunking.max-size`, Attic's default)."; };
      };
      gc = {
        default-retention-period = option types.ints.unsigned 0
          "Seconds a path is kept after its last access, for caches without their own period; 0 keeps paths forever (`gc.default-retention-period`).";
        interval = option types.ints.unsigned 43200
          "Seconds between garbage collections in the server; 0 runs none (`gc.interval`).";
        grace-period = option types.ints.unsigned 21600
          "Unreferenced chunks and manifests younger than this many seconds are kept, so uploads in flight lose nothing (`gc.grace-period`).";
        access-record-interval = option types.ints.positive 3600
          "Seconds between two access records of one path (`gc.access-record-interval`).";
      };
      compaction = {
        interval = option types.ints.unsigned 86400
          "Seconds between compactions in the server, which pack the chunks of cold paths; 0 runs none (`compaction.interval`, or run `flywheel compact`).";
        cold-after = option types.ints.unsigned 259200
          "A path is cold once neither read nor published for this many seconds (`compaction.cold-after`).";
        pack-size = option (types.ints.between 1 67108864) 4194304
          "Bytes of chunks per pack (`compaction.pack-size`).";
        frame-size = option (types.ints.between 1 16777216) 4194304
          "Bytes per zstd frame in a pack; reading one chunk decompresses its whole frame (`compaction.frame-size`).";
        zstd-level = option (types.ints.between 1 22) 19
          "zstd level of packs (`compaction.zstd-level`).";
      };
      limits = let
        seconds = default: description: mkOption { type = types.ints.between 1 86400; inherit default description; };
      in {
        header-read-timeout = seconds 10 "Seconds from a new connection, or a request's first byte, to the end of its headers (`limits.header-read-timeout`).";
        idle-timeout = seconds 60 "Seconds a kept-alive connection may wait for its next request (`limits.idle-timeout`).";
        body-idle-timeout = seconds 30 "Seconds without request body bytes, or without the client taking response bytes, before a request is given up (`limits.body-idle-timeout`).";
        body-min-rate = option types.ints.unsigned 1024
          "Bytes per second a request body must average over each `body-idle-timeout` of waiting (`limits.body-min-rate`).";
        request-timeout = seconds 60 "Seconds a request without a body (narinfo, listings; not NAR downloads) may take to be answered (`limits.request-timeout`).";
        max-connections = option (types.ints.between 1 1000000) 4096 ''
            Connections served at once (`limits.max-connections`); further ones wait in the
            listen backlog. The server lowers it to three quarters of its open file limit,
            which the service sets to 65536 (LimitNOFILE).
          '';
        max-uploads = option (types.ints.between 1 256) 64
          "NAR uploads decoded at once, each on a thread of the server's blocking pool (`limits.max-uploads`).";
        upload-queue-timeout = seconds 30 "Seconds an upload waits for one of `max-uploads` before it is refused with 503 (`limits.upload-queue-timeout`).";
      };
      tfstate = {
        max-size = option (types.ints.between 1 1073741824) 33554432
          "Largest OpenTofu/Terraform state accepted at `/_state/v1/{project}/{stack}`, in bytes (`tfstate.max-size`).";
        keep-versions = option (types.ints.between 1 10000) 30
          "Versions of each stack's state kept, the current one included (`tfstate.keep-versions`).";
        locking = option (types.enum [ "auto" "conditional" "claims" ]) "auto" ''
            How state locks are made exclusive across replicas (`tfstate.locking`): `auto`
            probes the store for conditional creates; `claims` is for S3 servers whose
            If-None-Match check is not atomic with the write (s3s-fs).
          '';
      };
      bazel = {
        grpc-listen = nullOrStr ''
            IP address and port of the Bazel remote cache's gRPC listener (`bazel.grpc-listen`),
            for `bazel --remote_cache=grpc://HOST:PORT`; null: none. Bazel's HTTP cache protocol
            is served on `listen` in any case.
          '' // { example = "0.0.0.0:9092"; };
        default-instance = nullOrStr
          "The cache that gRPC requests without `--remote_instance_name` use (`bazel.default-instance`); null: such requests are refused.";
        max-blob-size = option (types.ints.between 1 1099511627776) 4294967296
          "Largest Bazel CAS blob accepted, in bytes (`bazel.max-blob-size`).";
        max-action-result-size = option (types.ints.between 1 7340032) 4194304
          "Largest Bazel action result accepted, in bytes (`bazel.max-action-result-size`).";
        max-connections = option (types.ints.between 1 1000000) 4096
          "gRPC connections served at once (`bazel.max-connections`); one more is closed as soon as it is accepted.";
        spool-max-bytes = option types.ints.positive 17179869184
          "Bytes of ByteStream writes kept in temporary files at once, arriving or waiting to be resumed (`bazel.spool-max-bytes`).";
      };
      storage = {
        type = option (types.enum [ "local" "s3" ]) "local"
          "Where chunks, manifests and path records live: a local directory or an S3 bucket (`storage.type`).";
        path = option types.str "${stateDir}/storage"
          "Directory of `local` storage (`storage.path`); created if missing.";
        bucket = nullOrStr "S3 bucket (`storage.bucket`); required when `type` is `s3`.";
        region = option types.str "us-east-1"
          "S3 region (`storage.region`); S3-compatible servers usually accept any.";
        endpoint = nullOrStr "S3 endpoint URL, e.g. `http://127.0.0.1:9000` (`storage.endpoint`); null: AWS.";
        access-key-id = nullOrStr "S3 access key id (`storage.access-key-id`); null: `AWS_ACCESS_KEY_ID` from `environmentFile`.";
        secret-access-key-file = option (types.nullOr types.path) null ''
            A file holding the S3 secret key, passed to the server as a systemd credential and
            never copied into the Nix store; null: `AWS_SECRET_ACCESS_KEY` from
            `environmentFile`.
          '' // { example = "/run/secrets/flywheel-s3-secret"; };
        path-style = option (types.nullOr types.bool) null
          "Path-style S3 addressing (`storage.path-style`), which RustFS and s3s-fs need; null: the server's default (true).";
        allow-http = option (types.nullOr types.bool) null
          "Allow a plain `http://` S3 endpoint (`storage.allow-http`); null: the server's default (false).";
      };
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.tokenSecretFile != null;
        message = "services.flywheel.server.tokenSecretFile must be set: a file holding base64 of at least 32 random bytes (e.g. `openssl rand -base64 48`), which signs the server's tokens.";
      }
      {
        assertion = !inStore cfg.tokenSecretFile && !inStore st.secret-access-key-file && !inStore cfg.environmentFile;
        message = "services.flywheel.server: secret files (tokenSecretFile, settings.storage.secret-access-key-file, environmentFile) must not be in the Nix store, which every user can read; give their paths as strings.";
      }
      {
        assertion = builtins.all (c: c.signingKeyFile != null) (builtins.attrValues cfg.caches);
        message = "services.flywheel.server.caches.<name>.signingKeyFile must be set for every declared cache (make a key with `nix key generate-secret --key-name NAME-1`).";
      }
      {
        assertion = builtins.all (c: !inStore c.signingKeyFile) (builtins.attrValues cfg.caches);
        message = "services.flywheel.server.caches.<name>.signingKeyFile must not be in the Nix store, which every user can read; give its path as a string.";
      }
      {
        assertion = builtins.all (c: !c.requireUploaderSignature || c.trustedUploaderKeys != [ ]) (builtins.attrValues cfg.caches);
        message = "services.flywheel.server.caches.<name>.requireUploaderSignature needs at least one key in trustedUploaderKeys: with none, every upload would be refused.";
      }
      {
        assertion = badCacheNames == [ ];
        message = "services.flywheel.server.caches: invalid cache names ${builtins.toJSON badCacheNames}: use 1 to 50 letters, digits, '-', '_' or '+', starting with a letter or digit.";
      }
      {
        assertion = listenMatch != null;
        message = "services.flywheel.server.settings.listen must be IP:PORT (e.g. 127.0.0.1:8080 or [::]:8080), not \"${s.listen}\".";
      }
      {
        assertion = !isS3 || st.bucket != null;
        message = "services.flywheel.server.settings.storage.bucket must be set when settings.storage.type is \"s3\".";
      }
      {
        assertion = isS3 || s3OnlySet == [ ];
        message = "services.flywheel.server.settings.storage.{${lib.concatStringsSep "," s3OnlySet}} only apply to S3 storage, but settings.storage.type is \"local\".";
      }
      {
        assertion = !isS3 || st.endpoint == null || !lib.hasPrefix "http://" st.endpoint || st.allow-http == true;
        message = "services.flywheel.server.settings.storage.endpoint is plain http:// (${toString st.endpoint}): set settings.storage.allow-http = true.";
      }
      {
        assertion = s.chunking.min-size < s.chunking.avg-size && s.chunking.avg-size < s.chunking.max-size;
        message = "services.flywheel.server.settings.chunking: min-size < avg-size < max-size must hold.";
      }
    ];

    users.users.flywheel = {
      isSystemUser = true;
      group = "flywheel";
      home = stateDir;
      description = "flywheel cache server";
    };
    users.groups.flywheel = { };

    environment.systemPackages = [ config.services.flywheel.package ];
    networking.firewall.allowedTCPPorts = optional (cfg.openFirewall && port != null) port
      ++ optional (cfg.openFirewall && grpcPort != null) grpcPort;

    # Local storage outside the state directory: create it for the service user.
    systemd.tmpfiles.rules = optional localOutside
      "d ${st.path} 0750 flywheel flywheel - -";

    systemd.services.${unit} = {
      description = "flywheel binary cache server";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      environment.RUST_LOG = "info,tower_http=warn";
      serviceConfig = {
        ExecStart = "${startScript}";
        Restart = "on-failure";
        RestartSec = 5;
        User = "flywheel";
        Group = "flywheel";
        StateDirectory = "flywheel";
        StateDirectoryMode = "0750";
        RuntimeDirectory = unit;
        RuntimeDirectoryMode = "0700";
        LoadCredential = [ "token-hs256-secret-base64:${toString cfg.tokenSecretFile}" ]
          ++ optional s3SecretFile "s3-secret-access-key:${toString st.secret-access-key-file}"
          ++ lib.mapAttrsToList (name: c: "signing-key-${name}:${c.signingKeyFile}") cfg.caches;
        ReadWritePaths = optional localOutside st.path;
        UMask = "0077";
        # One descriptor per connection (limits.max-connections, 4096 by default) plus storage
        # files and S3 sockets; the usual 1024 let about 1100 idle sockets stop the server.
        LimitNOFILE = 65536;
      } // (import ./hardening.nix).sandbox // {
        PrivateUsers = !lowPort;
        ProtectProc = "invisible";
        ProcSubset = "pid";
        RemoveIPC = true;
        SystemCallFilter = [ "@system-service" "~@privileged" "~@resources" ];
        CapabilityBoundingSet = if lowPort then "CAP_NET_BIND_SERVICE" else "";
        AmbientCapabilities = if lowPort then "CAP_NET_BIND_SERVICE" else "";
      } // optionalAttrs (cfg.environmentFile != null) {
        EnvironmentFile = toString cfg.environmentFile;
      };
    };
  };
}
