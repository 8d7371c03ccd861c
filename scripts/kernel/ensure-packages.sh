#!/usr/bin/env bash
# Installs from Debian what the kernel test needs, only what is missing (idempotent; CI runs it as root).
# linux-source-6.12: the newest version in the index (security updates drop old ones), so every part of the guest
# kernel comes from one version (recipe B builds everything from this one source package).
set -euo pipefail
need=()
for p in qemu-system-x86 busybox-static cpio bison flex libelf-dev bc xz-utils make gcc; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
have_src="$(dpkg-query -W -f '${Status} ${Version}' linux-source-6.12 2>/dev/null | sed -n 's/^install ok installed //p')"
if [ ${#need[@]} -eq 0 ] && [ -n "$have_src" ] && [ -s /usr/src/linux-source-6.12.tar.xz ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "ensure-packages: missing ${need[*]} ${have_src:-linux-source-6.12} and not root" >&2; exit 1; fi
apt_opts=(-o DPkg::Lock::Timeout=600 -y -qq --no-install-recommends)
newest() { apt-cache policy linux-source-6.12 | sed -n 's/^ *Candidate: //p'; }
cand="$(newest)"
if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then apt-get update -qq; cand="$(newest)"; fi
[ -n "$cand" ] && [ "$cand" != "(none)" ] || { echo "ensure-packages: no linux-source-6.12 in the apt index" >&2; exit 1; }
pkgs=("${need[@]}")
[ "$have_src" = "$cand" ] && [ -s /usr/src/linux-source-6.12.tar.xz ] || pkgs+=("linux-source-6.12=$cand")
echo "ensure-packages: installing ${pkgs[*]}" >&2
# An index older than the archive gives 404s: refresh once and retry.
DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" "${pkgs[@]}" >&2 ||
  { apt-get update -qq && cand="$(newest)" && pkgs=("${need[@]}" "linux-source-6.12=$cand") &&
    DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" "${pkgs[@]}" >&2; }
