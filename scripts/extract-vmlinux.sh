#!/usr/bin/env bash
# Extracts the uncompressed ELF `vmlinux` from a Linux bzImage (e.g. Debian's
# /boot/vmlinuz-*). Faultline boots Linux from the uncompressed image because, on a host
# whose KVM emulates guest ring-0 code, a bzImage's decompressor alone takes minutes.
# Usage: extract-vmlinux.sh BZIMAGE OUTPUT
set -euo pipefail
in=${1:?usage: extract-vmlinux.sh BZIMAGE OUTPUT}
out=${2:?usage: extract-vmlinux.sh BZIMAGE OUTPUT}
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT

is_elf() { [ "$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')" = "7f454c46" ]; }

# Try each compressor at every offset where its magic appears.
try() { # magic-as-grep-pattern decompress-command...
  local magic=$1; shift
  for offset in $(LC_ALL=C grep -obUaP "$magic" "$in" | cut -d: -f1); do
    if tail -c +$((offset + 1)) "$in" | "$@" > "$tmp" 2>/dev/null || [ -s "$tmp" ]; then
      if is_elf "$tmp"; then cp "$tmp" "$out"; echo "extracted $(stat -c %s "$out") bytes of vmlinux from $in"; exit 0; fi
    fi
  done
}
try '\xFD\x37\x7A\x58\x5A\x00' xz -dc
try '\x28\xB5\x2F\xFD' zstd -dc
try '\x1F\x8B\x08' gzip -dc
try '\x02\x21\x4C\x18' lz4 -dc
try '\x5D\x00\x00\x00' xz -dc --format=lzma
echo "no compressed ELF kernel found in $in" >&2
exit 1
