#!/usr/bin/env bash
# Lays out the root file system of the sockpool image (Containerfile, FROM scratch):
# the binary, every shared library it links (as ldd lists them, at the same paths)
# and a passwd/group naming the unprivileged user it runs as.
#
#   scripts/container-rootfs.sh [BINARY] [CONTEXT]
#   podman build -t sockpool:0.1.0 -f Containerfile CONTEXT
#
# BINARY defaults to target/release/sockpool (cargo build --release), CONTEXT to
# target/container. A static binary (no libraries) works as well.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-$repo/target/release/sockpool}"
ctx="${2:-$repo/target/container}"
root="$ctx/rootfs"

[ -x "$bin" ] || { echo "no executable at $bin (cargo build --release?)" >&2; exit 1; }

rm -rf "$root"
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp"
chmod 1777 "$root/tmp"
install -m 0755 "$bin" "$root/usr/local/bin/sockpool"

# ldd prints "name => /path (addr)" for libraries and "/path (addr)" for the loader;
# linux-vdso has no file. A static binary prints "not a dynamic executable" and exits 1.
if libs="$(ldd "$bin" 2>/dev/null)"; then
  for lib in $(printf '%s\n' "$libs" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    # -L: copy the file a symlink (libc.so.6 -> libc-2.x.so on older systems) points to.
    cp -L "$lib" "$root$lib"
  done
fi

# 65532: the conventional "nonroot" id of distroless images; nothing else uses it.
printf 'root:x:0:0:root:/:/sbin/nologin\nsockpool:x:65532:65532:sockpool:/:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nsockpool:x:65532:\n' >"$root/etc/group"

echo "$root"
