# Test store paths, built in a chroot store with busybox as /bin/sh. Input-addressed, so
# substituting them needs a trusted signature. `seed` makes a distinct corpus per test run.
{ seed ? "0" }:
let
  bb = "/bin/busybox";
  mk = import ./derivation.nix;
in rec {
  single = mk "single-file-${seed}" "echo hello ${seed} > $out";
  # Several MB of random bytes.
  big = mk "big-${seed}" ''
    ${bb} mkdir $out
    ${bb} dd if=/dev/urandom of=$out/blob bs=1048576 count=6 2>/dev/null
  '';
  tree = mk "tree-${seed}" ''
    ${bb} mkdir -p $out/bin $out/share/doc
    printf '#!/bin/sh\necho run\n' > $out/bin/run
    ${bb} chmod 755 $out/bin/run
    ${bb} ln -s ../bin/run $out/share/link
    ${bb} ln -s /nonexistent/target $out/dangling
    echo doc > $out/share/doc/README
  '';
  empty = mk "empty-dir-${seed}" "${bb} mkdir $out";
  withRefs = mk "with-refs-${seed}" ''
    ${bb} mkdir $out
    echo ${single} > $out/ref
    ${bb} ln -s ${tree} $out/tree
  '';
  # The next version of `big`: the same bytes with a few inserted in the middle.
  bigNext = mk "big-${seed}-2" ''
    ${bb} mkdir $out
    ${bb} head -c 3000000 ${big}/blob > $out/blob
    echo "a change in version two" >> $out/blob
    ${bb} tail -c +3000001 ${big}/blob >> $out/blob
  '';
}
