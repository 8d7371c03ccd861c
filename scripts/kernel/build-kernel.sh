#!/usr/bin/env bash
# Builds (or reuses) a tinyconfig Linux 6.12 bzImage with the mtty VFIO sample driver built in
# (shared/kernel-guest.md recipe B: group/container AND cdev/iommufd, DMA_LOGGING_REPORT).
# Source: Debian's linux-source-6.12, newest version in the index (installed by ensure-packages.sh).
# Cache: <repo>/.cache/kernel/<debian version>-<fragment hash>/bzImage, so reruns take no time.
# Prints the bzImage path on stdout as its last line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
ver="$(dpkg-query -W -f '${Version}' linux-source-6.12 2>/dev/null || true)"
[ -n "$ver" ] || { echo "build-kernel: linux-source-6.12 is not installed" >&2; exit 1; }
frag="$here/mtty.config"
key="$ver-$(sha256sum "$frag" | cut -c1-12)"
cache="$root/.cache/kernel/$key"
if [ -s "$cache/bzImage" ]; then echo "build-kernel: cached $cache/bzImage" >&2; echo "$cache/bzImage"; exit 0; fi
work="$root/.cache/kernel/build-$key"
rm -rf "$work"; mkdir -p "$work"
t0=$(date +%s)
echo "build-kernel: extracting linux-source-6.12 $ver" >&2
# Documentation is not needed to build; everything else is (Kconfig sources the whole tree).
tar -C "$work" -xf /usr/src/linux-source-6.12.tar.xz --exclude='linux-source-6.12/Documentation'
src="$work/linux-source-6.12"
mkdir -p "$src/Documentation" && touch "$src/Documentation/Kconfig"
# Config fragment: each line CONFIG_X=y; MODULES off.
sed -e '/^#/d' -e '/^$/d' -e 's/^/CONFIG_/' -e 's/$/=y/' "$frag" > "$work/fragment.config"
echo "# CONFIG_MODULES is not set" >> "$work/fragment.config"
( cd "$src" && make -s tinyconfig >&2 && scripts/kconfig/merge_config.sh -m .config "$work/fragment.config" >/dev/null && make -s olddefconfig >&2 )
# Every requested option must have survived olddefconfig (a missing dependency silently drops it).
missing=0
while read -r opt; do
  grep -qx "$opt" "$src/.config" || { echo "build-kernel: $opt did not survive olddefconfig" >&2; missing=1; }
done < <(grep '=y$' "$work/fragment.config")
[ $missing = 0 ] || exit 1
echo "build-kernel: make -j$(nproc) bzImage" >&2
( cd "$src" && make -s -j"$(nproc)" bzImage KBUILD_BUILD_TIMESTAMP='' >&2 )
mkdir -p "$cache"
cp "$src/arch/x86/boot/bzImage" "$cache/bzImage"
cp "$src/.config" "$cache/config"
rm -rf "$work"
echo "build-kernel: built in $(( $(date +%s) - t0 )) s" >&2
echo "$cache/bzImage"
