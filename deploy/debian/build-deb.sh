#!/usr/bin/env bash
# Builds callgate_<version>_<arch>.deb with dpkg-deb from a built binary (no debhelper needed):
#   /usr/bin/callgate, /lib/systemd/system/callgate.service (the hardened unit of deploy/systemd with the
#   binary at /usr/bin), /etc/callgate/callgate.toml and /etc/callgate/env (conffiles), the prompts under
#   /usr/share/callgate/sounds/<lang>/callgate/, and maintainer scripts that create the system user
#   `callgate` and start or enable nothing: the config must be edited first.
#
# Usage: deploy/debian/build-deb.sh [--binary PATH] [--out DIR] [--version VERSION]
#   --binary   default target/release/callgate (cargo build --release first)
#   --out      where the .deb goes; default target/debian
#   --version  default: the version in Cargo.toml
# Environment: DEB_COMPRESSION (dpkg-deb -Z: xz, gzip, zstd, none; default xz), DEB_LEVEL (-z, default 6),
# DEB_MAINTAINER (the Maintainer field; default "callgate maintainers <callgate@example.org>").
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
binary="$root/target/release/callgate"
out="$root/target/debian"
version=""
while [ $# -gt 0 ]; do
	case "$1" in
	--binary) binary="$2"; shift 2 ;;
	--out) out="$2"; shift 2 ;;
	--version) version="$2"; shift 2 ;;
	*) echo "usage: $0 [--binary PATH] [--out DIR] [--version VERSION]" >&2; exit 64 ;;
	esac
done
[ -x "$binary" ] || { echo "$binary: no such executable (cargo build --release?)" >&2; exit 1; }
if [ -z "$version" ]; then
	version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)"
fi
arch="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
maintainer="${DEB_MAINTAINER:-callgate maintainers <callgate@example.org>}"
name="callgate_${version}_${arch}"

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
pkg="$stage/$name"
install -d -m 0755 "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" "$pkg/etc/callgate" \
	"$pkg/usr/share/callgate/sounds" "$pkg/usr/share/doc/callgate" "$pkg/usr/share/lintian/overrides"

install -m 0755 "$binary" "$pkg/usr/bin/callgate"
if command -v strip >/dev/null 2>&1; then
	strip --strip-unneeded --remove-section=.comment --remove-section=.note "$pkg/usr/bin/callgate"
fi

# The unit as shipped, with the packaged binary path (the manual install uses /usr/local/bin).
sed 's#/usr/local/bin/callgate#/usr/bin/callgate#g' "$root/deploy/systemd/callgate.service" \
	>"$pkg/lib/systemd/system/callgate.service"
chmod 0644 "$pkg/lib/systemd/system/callgate.service"

install -m 0640 "$root/deploy/asterisk/callgate.toml" "$pkg/etc/callgate/callgate.toml"
install -m 0600 "$root/deploy/systemd/env.example" "$pkg/etc/callgate/env"

for dir in "$root"/deploy/sounds/*/callgate; do
	lang="$(basename "$(dirname "$dir")")"
	install -d -m 0755 "$pkg/usr/share/callgate/sounds/$lang/callgate"
	install -m 0644 "$dir"/*.wav "$pkg/usr/share/callgate/sounds/$lang/callgate/"
done

doc="$pkg/usr/share/doc/callgate"
cat >"$doc/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: callgate

Files: *
Copyright: 2026 The callgate authors
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
chmod 0644 "$doc/copyright"
date="$(date -R -d "@${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)}")"
printf 'callgate (%s) unstable; urgency=medium\n\n  * Package built from the callgate repository.\n\n -- %s  %s\n' \
	"$version" "$maintainer" "$date" | gzip -9n >"$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"
# Deliberate: no manual page (callgate --help), and the config and secrets are not world-readable.
cat >"$pkg/usr/share/lintian/overrides/callgate" <<'OVERRIDES'
callgate: no-manual-page [usr/bin/callgate]
callgate: non-standard-file-perm 0600 != 0644 [etc/callgate/env]
callgate: non-standard-file-perm 0640 != 0644 [etc/callgate/callgate.toml]
OVERRIDES
chmod 0644 "$pkg/usr/share/lintian/overrides/callgate"

# Shared-library dependencies: libc at the newest symbol version the binary needs, libgcc_s.
glibc="2.34"
if command -v objdump >/dev/null 2>&1; then
	found="$(objdump -T "$pkg/usr/bin/callgate" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)"
	[ -n "$found" ] && glibc="$found"
fi
size="$(du -k -s --exclude=DEBIAN "$pkg" | cut -f1)"
cat >"$pkg/DEBIAN/control" <<CONTROL
Package: callgate
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Depends: libc6 (>= $glibc), libgcc-s1, adduser
Recommends: asterisk
Section: net
Priority: optional
Description: BankID verification gate for Asterisk contact-centre calls
 callgate answers calls that the dialplan sends to Stasis(callgate,...),
 asks for the caller's personal number, runs a BankID phone authentication
 and continues the call in the dialplan with the outcome as channel
 variables. It talks to Asterisk over ARI.
 .
 The service is installed but neither enabled nor started: edit
 /etc/callgate/env and /etc/callgate/callgate.toml, run
 "callgate doctor --config /etc/callgate/callgate.toml", then
 "systemctl enable --now callgate".
CONTROL

printf '/etc/callgate/callgate.toml\n/etc/callgate/env\n' >"$pkg/DEBIAN/conffiles"

cat >"$pkg/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
	# The state directory (audit trail, order journal); systemd's StateDirectory= keeps it 0700.
	install -d -m 0700 /var/lib/callgate
	if ! getent passwd callgate >/dev/null; then
		adduser --system --group --home /var/lib/callgate --no-create-home \
			--shell /usr/sbin/nologin --gecos "callgate BankID gate" callgate >/dev/null
	fi
	chown callgate:callgate /var/lib/callgate
	# The config is readable by the service, the secrets only by root (systemd reads them).
	chown root:callgate /etc/callgate /etc/callgate/callgate.toml
	chmod 0750 /etc/callgate
	chmod 0640 /etc/callgate/callgate.toml
	chown root:root /etc/callgate/env
	chmod 0600 /etc/callgate/env
	if [ -d /run/systemd/system ]; then
		systemctl daemon-reload >/dev/null || true
	fi
	if [ -z "$2" ]; then
		echo "callgate installed, not started. Edit /etc/callgate/env and /etc/callgate/callgate.toml,"
		echo "put the prompts where Asterisk finds them (see /usr/share/callgate/sounds), run"
		echo "  callgate doctor --config /etc/callgate/callgate.toml"
		echo "then: systemctl enable --now callgate"
	fi
fi
exit 0
POSTINST

cat >"$pkg/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
# Stop a running service before its binary goes away; an upgrade restarts nothing by itself.
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
	deb-systemd-invoke stop callgate.service >/dev/null || true
fi
exit 0
PRERM

cat >"$pkg/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
fi
# On purge the audit trail in /var/lib/callgate and the callgate user are kept on purpose: the audit
# trail is evidence, and files may still belong to the user.
exit 0
POSTRM
chmod 0755 "$pkg/DEBIAN/postinst" "$pkg/DEBIAN/prerm" "$pkg/DEBIAN/postrm"

mkdir -p "$out"
dpkg-deb --root-owner-group -Z"${DEB_COMPRESSION:-xz}" -z"${DEB_LEVEL:-6}" --build "$pkg" "$out/$name.deb" >/dev/null
echo "$out/$name.deb"
