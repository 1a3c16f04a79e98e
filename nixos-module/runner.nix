# `services.flywheel.runner`: a CI runner. The FUSE mount and the local substituter share one
# chunk cache on the runner's persistent volume (the first to open it owns it, the other goes
# through its socket); nix-daemon lists the local substituter first; a post-build hook hands
# built paths to the push daemon; optionally the store becomes an overlay whose lower layer is
# the FUSE mount (lazy mode). The token is a systemd credential (`%d/token`), never in the store.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption mkEnableOption mkIf mkMerge mkBefore types literalExpression optional optionals optionalString;
  cfg = config.services.flywheel.runner;
  server = config.services.flywheel.server;
  flywheel = "${config.services.flywheel.package}/bin/flywheel";
  arg = import ./exec-args.nix { inherit lib; };
  option = import ./option.nix { inherit lib; };
  # An ExecStart line: the program, then arguments escaped for systemd, except `{ raw = ...; }`
  # ones (systemd specifiers).
  tokenArgs = optionals (cfg.tokenFile != null) [ "--token-file" { raw = "%d/token"; } ];
  render = a: if builtins.isAttrs a && a ? raw then a.raw else arg a;
  execLine' = args: lib.concatStringsSep " " ([ flywheel ] ++ map render args);
  serverArgs = [ "--server" (toString cfg.serverUrl) "--cache" cfg.cache ] ++ tokenArgs;
  credential = optional (cfg.tokenFile != null) "token:${toString cfg.tokenFile}";

  pushSocket = "/run/flywheel-push/push.sock";
  substituterUrl = "http://127.0.0.1:${toString cfg.substituter.port}";
  serverListen = builtins.match ".*:([0-9]+)" server.settings.listen;
  serverPort = if serverListen == null then null else lib.toInt (builtins.head serverListen);
  inStore = p: p != null && lib.hasPrefix "${builtins.storeDir}/" (toString p);

  mountCommand = execLine' ([ "mount" ] ++ serverArgs ++ [
    "--cache-dir" cfg.cacheDir
    "--cache-size" (toString cfg.cacheSize)
    "--files-size" (toString cfg.mount.filesSize)
    "--offline-timeout" (toString cfg.mount.offlineTimeout)
    "--fill-max-nar-size" (toString cfg.mount.fillMaxNarSize)
  ] ++ lib.optionals (cfg.mount.metricsListen != null) [ "--metrics-listen" cfg.mount.metricsListen ]
    ++ [ cfg.mount.mountPoint ]);
  substituteCommand = execLine' ([ "substitute" ] ++ serverArgs ++ [
    "--listen" "127.0.0.1:${toString cfg.substituter.port}"
    "--cache-dir" cfg.cacheDir
    "--cache-size" (toString cfg.cacheSize)
    "--priority" (toString cfg.substituter.priority)
    "--narinfo-timeout" (toString cfg.substituter.narinfoTimeout)
  ]);
  pushDaemonCommand = execLine' ([ "push-daemon" ] ++ serverArgs
    ++ lib.concatMap (k: [ "--ignore-upstream-key" k ]) cfg.push.ignoreUpstreamKeys
    ++ [ "--socket" pushSocket ]
    ++ lib.optionals (cfg.push.metricsListen != null) [ "--metrics-listen" cfg.push.metricsListen ]);

  # nix-daemon runs the hook after every build, as root. It hands the paths over and exits 0:
  # a failing hook would fail the build.
  postBuildHook = pkgs.writeShellScript "flywheel-post-build-hook" ''
    ${flywheel} hook --socket ${pushSocket} || echo "flywheel post-build hook failed; the build goes on" >&2
    exit 0
  '';

  mountPoint = cfg.mount.mountPoint;
  util = "${pkgs.util-linux}/bin";
  coreutils = "${pkgs.coreutils}/bin";
  lazyStart = pkgs.writeShellScript "flywheel-lazy-store-start" ''
    set -eu
    # The mount service is up once its FUSE file system is mounted.
    i=0
    until ${util}/mountpoint -q ${mountPoint}; do
      i=$((i + 1))
      if [ "$i" -gt 600 ]; then echo "flywheel-lazy-store: ${mountPoint} is not mounted" >&2; exit 1; fi
      ${coreutils}/sleep 0.1
    done
    ${coreutils}/mkdir -p ${cfg.lazy.upperDir} ${cfg.lazy.workDir}
    if ! ${util}/findmnt -n -t overlay ${builtins.storeDir} > /dev/null; then
      # The local store stays the first lower layer: the system's own paths win.
      ${util}/mount -t overlay overlay \
        -o lowerdir=${builtins.storeDir}:${mountPoint},upperdir=${cfg.lazy.upperDir},workdir=${cfg.lazy.workDir} \
        ${builtins.storeDir}
    fi
    ${optionalString (cfg.lazy.paths != [ ]) ''
      # Register the closures (those not valid yet) with their known hashes, from narinfo files
      # signed by a trusted key: Nix sees them valid at once.
      ${lib.escapeShellArgs ([ flywheel "lazy" "--server" (toString cfg.serverUrl) "--cache" cfg.cache ] ++ lazyArgs)} \
        ${optionalString (cfg.tokenFile != null) ''--token-file "$CREDENTIALS_DIRECTORY/token"''} \
        ${lib.escapeShellArgs cfg.lazy.paths}
    ''}
  '';
  # The runner's own signing key, made once: the secret never leaves the runner's volume (and
  # never enters the store); the public half sits beside it and goes to the journal on every
  # boot, for the cache host's `trustedUploaderKeys`.
  signingKey = cfg.signing.keyFile;
  signingKeyStart = pkgs.writeShellScript "flywheel-signing-key" ''
    set -eu
    umask 077
    key=${lib.escapeShellArg signingKey}
    nix_key() { ${config.nix.package}/bin/nix --extra-experimental-features nix-command key "$@"; }
    ${coreutils}/mkdir -p "$(${coreutils}/dirname "$key")"
    if [ ! -s "$key" ]; then
      name=${if cfg.signing.keyName != null then lib.escapeShellArg cfg.signing.keyName else ''"$(${coreutils}/uname -n)-$(${coreutils}/date +%s)"''}
      # Written whole under another name first: a crash never leaves half a key behind.
      nix_key generate-secret --key-name "$name" > "$key.tmp"
      ${coreutils}/chmod 0600 "$key.tmp"
      ${coreutils}/mv -f "$key.tmp" "$key"
      echo "flywheel-signing-key: generated the key $name in $key"
    fi
    ${coreutils}/chmod 0600 "$key"
    nix_key convert-secret-to-public < "$key" > "$key.pub.tmp"
    ${coreutils}/chmod 0644 "$key.pub.tmp"
    ${coreutils}/mv -f "$key.pub.tmp" "$key.pub"
    echo "flywheel-signing-key: this runner signs its builds with $(${coreutils}/cat "$key.pub") (also in $key.pub); list it in the cache's trusted uploader keys"
  '';
  # What `flywheel lazy` needs beside the server: the Nix that registers, the keys that make
  # a narinfo trusted (empty: those of nix.conf), and the mount's control socket (in the cache dir).
  lazyArgs = [ "--nix-store" "${config.nix.package}/bin/nix-store" "--cache-dir" cfg.cacheDir ]
    ++ lib.concatMap (k: [ "--trusted-key" k ]) cfg.trustedPublicKeys;
  # The CI job's start and end, for the runner's own job hooks (as root). Start: make the job's
  # closures valid at once and prefetch what the last jobs with its trace key read. End: save
  # what this job read under its key, and wait for the push daemon's queue.
  jobCommand = pkgs.writeShellScriptBin "flywheel-job" ''
    set -eu
    usage() {
      echo "usage: flywheel-job start KEY [STORE_PATH...]   (make closures valid, prefetch KEY's trace)" >&2
      echo "       flywheel-job end [KEY]                    (save this job's trace${optionalString cfg.push.enable ", flush the pushes"})" >&2
      exit 2
    }
    [ "$#" -ge 1 ] || usage
    command=$1
    shift
    case "$command" in
      start)
        [ "$#" -ge 1 ] || usage
        key=$1
        shift
        if [ "$#" -gt 0 ]; then
          exec ${lib.escapeShellArgs ([ flywheel "lazy" ] ++ serverArgsForRoot ++ lazyArgs)} --prefetch "$key" "$@"
        fi
        exec ${lib.escapeShellArgs [ flywheel "prefetch" "--cache-dir" cfg.cacheDir ]} "$key"
        ;;
      end)
        ${lib.escapeShellArgs [ flywheel "save-trace" "--cache-dir" cfg.cacheDir ]} "$@"
        ${optionalString cfg.push.enable (lib.escapeShellArgs [ flywheel "flush" "--socket" pushSocket ])}
        ;;
      *)
        usage
        ;;
    esac
  '';
  # Outside systemd there are no credentials: root reads the token file itself.
  serverArgsForRoot = [ "--server" (toString cfg.serverUrl) "--cache" cfg.cache ]
    ++ optionals (cfg.tokenFile != null) [ "--token-file" (toString cfg.tokenFile) ];
  lazyStop = pkgs.writeShellScript "flywheel-lazy-store-stop" ''
    if ${util}/findmnt -n -t overlay ${builtins.storeDir} > /dev/null; then
      ${util}/umount -l ${builtins.storeDir}
    fi
  '';

  # Hardening for services that may live in their own mount namespace.
  hardening = import ./hardening.nix;
  sandboxed = hardening.sandbox // {
    SystemCallFilter = [ "@system-service" "~@privileged" ];
    CapabilityBoundingSet = "";
    UMask = "0077";
  };
in
{
  options.services.flywheel.runner = {
    enable = mkEnableOption "the flywheel runner side: FUSE mount, local substituter, push daemon and Nix settings";

    serverUrl = option (types.nullOr types.str) null
      "Required. Base URL of the flywheel cache server." // { example = "http://cache.example.org:8080"; };

    cache = option types.str "main"
      "Name of the cache on the server.";

    tokenFile = option (types.nullOr types.path) null ''
        A file holding a token (JWT, e.g. from `flywheel token mint`) that may pull from the
        cache, and push to it if `push.enable`. Passed to the services as a systemd credential;
        never copied into the Nix store (give a string, not a Nix path literal). Null: anonymous
        (a public cache).
      '' // { example = "/run/secrets/flywheel-token"; };

    dataDir = option types.str "/var/lib/flywheel-runner"
      "The runner's persistent volume (PVC) directory, which holds the chunk cache and the lazy store's upper layer." // { example = "/pvc/flywheel"; };

    cacheDir = mkOption {
      type = types.str;
      default = "${cfg.dataDir}/cache";
      defaultText = literalExpression ''"''${config.services.flywheel.runner.dataDir}/cache"'';
      description = "Directory of the local chunk cache, shared by the FUSE mount and the local substituter.";
    };

    cacheSize = option types.ints.positive 10737418240
      "Byte quota of the local chunk cache (LRU eviction beyond it); 10 GiB by default.";

    configureNix = option types.bool true ''
        Whether to set `nix.settings`: the local substituter first in `substituters`,
        `trustedPublicKeys`, `narinfo-cache-negative-ttl` and the post-build hook.
      '';

    trustedPublicKeys = option (types.listOf types.str) [ ]
      "Public keys of the cache (`flywheel serve` prints it; `GET /_api/v1/cache-config/NAME` answers it), added to `nix.settings.trusted-public-keys`." // { example = [ "main-1:su4pov7yoc5lV0pmcvVr6ZhwoE2SXYet+dEpco+aPQY=" ]; };

    narinfoCacheNegativeTtl = option types.ints.unsigned 30
      "Seconds Nix remembers that a path was missing (`narinfo-cache-negative-ttl`), so that paths pushed by other runners are found soon.";

    mount = {
      enable = option types.bool true
        "Whether to run the lazy FUSE store (`flywheel mount`).";
      mountPoint = option types.str "/run/flywheel/store"
        "Where the FUSE store is mounted (outside the Nix store).";
      offlineTimeout = option types.ints.positive 10
        "Seconds to wait for the server before a read of uncached content fails with EIO.";
      filesSize = option types.ints.unsigned 2147483648
        "Byte budget of whole files kept decompressed under `cacheDir/files` for FUSE passthrough (on top of `cacheSize`); 0 turns passthrough off.";
      fillMaxNarSize = option types.ints.unsigned 0
        "Store paths up to this NAR size are fetched whole in the background once a job reads from them (reads always go first); larger ones are left to on-demand reads. 0 (the default, chosen by measurement: see BENCHMARKS.md) turns the fill off.";
      metricsListen = option (types.nullOr types.str) null
        "Address where the mount serves Prometheus `/metrics`; null: none. (The substituter serves `/metrics` on its own port.)" // { example = "127.0.0.1:9101"; };
    };

    substituter = {
      enable = option types.bool true
        "Whether to run the local substituter (`flywheel substitute`) on 127.0.0.1.";
      port = option types.port 37515
        "Port of the local substituter on 127.0.0.1.";
      priority = option types.ints.unsigned 30
        "Substituter priority announced to Nix (lower is tried first; cache.nixos.org has 40).";
      narinfoTimeout = option types.ints.positive 3
        "Seconds a narinfo request may wait for the server before the substituter answers 404 and Nix moves on.";
    };

    push = {
      enable = option types.bool false
        "Whether to push every build: the push daemon (`flywheel push-daemon`) and nix-daemon's post-build hook (`flywheel hook`). Needs `tokenFile` with push permission. `flywheel flush` waits for the queue (end of a CI job).";
      ignoreUpstreamKeys = option (types.listOf types.str) [ "cache.nixos.org-1" ]
        "Key names of upstream caches whose paths are not pushed.";
      metricsListen = option (types.nullOr types.str) null
        "Address where the push daemon serves Prometheus `/metrics`; null: none." // { example = "127.0.0.1:9102"; };
    };

    signing = {
      enable = option types.bool false ''
          Whether the runner signs its builds with a key of its own. On first boot the
          `flywheel-signing-key` service generates the key into `signing.keyFile` (mode 0600,
          never in the Nix store), writes its public half to `keyFile.pub` and prints it to the
          journal (`journalctl -u flywheel-signing-key`), on every boot; Nix's
          `secret-key-files` names it, so nix-daemon signs every path it builds, and
          `flywheel push` and the post-build hook upload those signatures. List the public key
          in the cache's trusted uploader keys (`services.flywheel.server.caches.<name>.trustedUploaderKeys`,
          or `trusted_uploader_keys` through `cache-config`).
        '';
      keyName = option (types.nullOr types.str) null ''
          Name of the generated key. Null: the host name and the time of generation
          (`<hostname>-<unix seconds>`), so that every runner, and every key a runner makes
          again after losing its volume, has a name of its own. Used only when a key is
          generated.
        '' // { example = "runner-a-1"; };
      keyFile = mkOption {
        type = types.str;
        default = "${cfg.dataDir}/signing-key";
        defaultText = literalExpression ''"''${config.services.flywheel.runner.dataDir}/signing-key"'';
        description = ''
          The runner's secret signing key, generated when missing; on the persistent volume by
          default, so the key outlives restarts. Its public key is written to the same path
          with `.pub` appended. To rotate: delete both, restart `flywheel-signing-key` and
          nix-daemon, add the new public key to the cache, then remove the old one.
        '';
      };
    };

    lazy = {
      enable = option types.bool false ''
          Whether to overlay the Nix store: lower layers the local store and the FUSE mount, upper
          layer on `dataDir`; paths registered with `flywheel lazy` are valid at once and their
          bytes arrive on first read. Needs `mount.enable`. Puts `flywheel-job` on the PATH for
          the CI runner's job hooks, run as root: `flywheel-job start KEY [STORE_PATH...]`
          registers the job's closures and prefetches what the last jobs with trace key KEY
          read; `flywheel-job end` saves what this job read under KEY (and, with `push.enable`,
          waits for the pushes).
        '';
      upperDir = mkOption {
        type = types.str;
        default = "${cfg.dataDir}/overlay/upper";
        defaultText = literalExpression ''"''${config.services.flywheel.runner.dataDir}/overlay/upper"'';
        description = "Upper layer of the store overlay (where builds write).";
      };
      workDir = mkOption {
        type = types.str;
        default = "${cfg.dataDir}/overlay/work";
        defaultText = literalExpression ''"''${config.services.flywheel.runner.dataDir}/overlay/work"'';
        description = "Work directory of the store overlay, on the same file system as `upperDir`.";
      };
      paths = option (types.listOf types.str) [ ]
        "Store paths whose closures are registered in Nix's database when the overlay comes up (`flywheel lazy`: narinfo files signed by one of `trustedPublicKeys`, or by a key of nix.conf when that list is empty)." // { example = [ "/nix/store/...-ci-toolchain" ]; };
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = cfg.serverUrl != null;
          message = "services.flywheel.runner.serverUrl must be set: the URL of the flywheel cache server, e.g. http://cache.example.org:8080.";
        }
        {
          assertion = cfg.serverUrl == null || builtins.match "https?://.+" cfg.serverUrl != null;
          message = "services.flywheel.runner.serverUrl must start with http:// or https://, not \"${toString cfg.serverUrl}\".";
        }
        {
          assertion = !cfg.lazy.enable || cfg.mount.enable;
          message = "services.flywheel.runner.lazy.enable needs services.flywheel.runner.mount.enable: the FUSE mount is the lower layer of the lazy store overlay.";
        }
        {
          assertion = !cfg.push.enable || cfg.tokenFile != null;
          message = "services.flywheel.runner.push.enable needs services.flywheel.runner.tokenFile: pushing needs a token with push permission.";
        }
        {
          assertion = !inStore cfg.tokenFile;
          message = "services.flywheel.runner.tokenFile must not be in the Nix store, which every user can read; give its path as a string.";
        }
        {
          assertion = !(cfg.substituter.enable && server.enable && serverPort == cfg.substituter.port);
          message = "services.flywheel.runner.substituter.port (${toString cfg.substituter.port}) collides with the port of services.flywheel.server.settings.listen (${server.settings.listen}) on this machine.";
        }
        {
          assertion = !cfg.signing.enable || !inStore cfg.signing.keyFile;
          message = "services.flywheel.runner.signing.keyFile must not be in the Nix store, which every user can read.";
        }
        {
          assertion = cfg.signing.keyName == null || builtins.match "[^:[:space:]]+" cfg.signing.keyName != null;
          message = "services.flywheel.runner.signing.keyName must be non-empty, without ':' or whitespace (it is the name in `name:key`).";
        }
        {
          assertion = !lib.hasPrefix "${builtins.storeDir}/" "${mountPoint}/";
          message = "services.flywheel.runner.mount.mountPoint (${mountPoint}) must be outside ${builtins.storeDir}.";
        }
      ];

      environment.systemPackages = [ config.services.flywheel.package ];
      boot.kernelModules = [ "fuse" ] ++ optional cfg.lazy.enable "overlay";
      systemd.tmpfiles.rules = [
        "d ${cfg.dataDir} 0755 root root - -"
        "d ${cfg.cacheDir} 0700 root root - -"
      ];
    }

    (mkIf cfg.configureNix {
      nix.settings = {
        substituters = mkIf cfg.substituter.enable (mkBefore [ substituterUrl ]);
        trusted-public-keys = cfg.trustedPublicKeys;
        narinfo-cache-negative-ttl = cfg.narinfoCacheNegativeTtl;
        post-build-hook = mkIf cfg.push.enable "${postBuildHook}";
      };
    })

    (mkIf cfg.mount.enable {
      systemd.tmpfiles.rules = [ "d ${mountPoint} 0755 root root - -" ];
      # In the host's mount namespace (or the mount would be invisible): none of the hardening
      # options that create a mount namespace. Root, for /dev/fuse and mount(2).
      systemd.services.flywheel-mount = {
        description = "flywheel lazy FUSE store at ${mountPoint}";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" "systemd-tmpfiles-setup.service" ];
        serviceConfig = {
          ExecStart = mountCommand;
          ExecStopPost = "-${util}/umount -l ${mountPoint}";
          Restart = "on-failure";
          RestartSec = 2;
          LoadCredential = credential;
          CapabilityBoundingSet = "CAP_SYS_ADMIN CAP_DAC_READ_SEARCH";
        } // hardening.always;
      };
    })

    (mkIf cfg.substituter.enable {
      systemd.services.flywheel-substituter = {
        description = "flywheel local substituter on ${substituterUrl}";
        wantedBy = [ "multi-user.target" ];
        before = [ "nix-daemon.service" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" "systemd-tmpfiles-setup.service" ] ++ optional cfg.mount.enable "flywheel-mount.service";
        serviceConfig = sandboxed // {
          ExecStart = substituteCommand;
          Restart = "always";
          RestartSec = 1;
          LoadCredential = credential;
          ReadWritePaths = [ cfg.cacheDir ];
        };
      };
    })

    (mkIf cfg.push.enable {
      environment.variables.FLYWHEEL_PUSH_SOCKET = pushSocket;
      # Reads the store through nix-daemon, so it needs no privileges of its own.
      systemd.services.flywheel-push-daemon = {
        description = "flywheel push daemon (fed by nix-daemon's post-build hook)";
        wantedBy = [ "multi-user.target" ];
        before = [ "nix-daemon.service" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        path = [ config.nix.package ];
        environment = {
          NIX_REMOTE = "daemon";
          XDG_CACHE_HOME = "/var/cache/flywheel-push";
        };
        serviceConfig = sandboxed // {
          ExecStart = pushDaemonCommand;
          Restart = "always";
          RestartSec = 1;
          DynamicUser = true;
          RuntimeDirectory = "flywheel-push";
          CacheDirectory = "flywheel-push";
          RuntimeDirectoryMode = "0755";
          UMask = "0011";
          LoadCredential = credential;
        };
      };
    })

    (mkIf cfg.signing.enable {
      # Set whether or not `configureNix` is: signing builds is what this option is for.
      nix.settings.secret-key-files = [ signingKey ];
      systemd.services.flywheel-signing-key = {
        description = "flywheel runner signing key (generated on first boot)";
        # nix-daemon reads the key when a build finishes, so it waits for it.
        wantedBy = [ "multi-user.target" "nix-daemon.service" ];
        before = [ "nix-daemon.service" ];
        after = [ "systemd-tmpfiles-setup.service" ];
        unitConfig.RequiresMountsFor = [ (dirOf signingKey) ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = "${signingKeyStart}";
          UMask = "0077";
          PrivateNetwork = true;
          NoNewPrivileges = true;
          ProtectHome = true;
          PrivateTmp = true;
        };
      };
    })

    (mkIf cfg.lazy.enable {
      environment.systemPackages = [ jobCommand ];
      systemd.services.flywheel-lazy-store = {
        description = "flywheel lazy store: ${builtins.storeDir} as an overlay over the FUSE mount";
        wantedBy = [ "multi-user.target" ];
        before = [ "nix-daemon.service" "nix-daemon.socket" ];
        requires = [ "flywheel-mount.service" ];
        after = [ "flywheel-mount.service" ];
        restartIfChanged = false;
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = "${lazyStart}";
          ExecStop = "${lazyStop}";
          RuntimeDirectory = "flywheel-lazy-store";
          LoadCredential = credential;
        };
      };
    })
  ]);
}
