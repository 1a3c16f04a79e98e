# Store paths for the FUSE tests: a static busybox as a real executable, and a path of more
# than 50 MB with small files beside a big one.
{ seed ? "0" }:
let
  bb = "/bin/busybox";
  mk = import ../derivation.nix;
in {
  busybox = mk "busybox-${seed}" ''
    ${bb} mkdir -p $out/bin
    ${bb} cp ${bb} $out/bin/busybox
    ${bb} chmod 555 $out/bin/busybox
  '';
  # A package-like tree: 240 modules of 8 to 47 KiB, of which a job reads some.
  tree = mk "tree-${seed}" ''
    ${bb} mkdir -p $out/lib
    i=0
    while [ $i -lt 240 ]; do
      ${bb} dd if=/dev/urandom of=$out/lib/mod$i.py bs=1024 count=$((8 + i % 40)) 2>/dev/null
      i=$((i + 1))
    done
  '';
  huge = mk "huge-${seed}" ''
    ${bb} mkdir -p $out/data $out/etc
    ${bb} dd if=/dev/urandom of=$out/data/blob bs=1048576 count=52 2>/dev/null
    echo "small config ${seed}" > $out/etc/config
    ${bb} dd if=/dev/urandom of=$out/data/tail bs=1024 count=3 2>/dev/null
  '';
}
