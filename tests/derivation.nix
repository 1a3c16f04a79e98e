# A test store path: `script` run by busybox's sh (the chroot store's /bin/sh), nothing else
# in its environment.
name: script: derivation {
  inherit name;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" script ];
}
