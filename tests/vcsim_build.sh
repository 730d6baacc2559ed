#!/bin/sh
# Build the vCenter simulator for the vSphere tests (tests/vcsim/*.go) from Debian's packages:
# golang-go and golang-github-vmware-govmomi-dev (govmomi 0.24 in bookworm), in GOPATH mode.
#
# The binary goes to var/bin/vcsim (var/ is git-ignored) and is rebuilt only when its sources, the
# govmomi package or the Go toolchain changed. Prints the binary's path on success; exits non-zero
# with the reason when the packages cannot be installed or the build fails.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
bin="$root/var/bin"
out="$bin/vcsim"
stamp="$bin/vcsim.stamp"
pkgs="golang-go golang-github-vmware-govmomi-dev"

mkdir -p "$bin"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$bin/.vcsim-build.lock"
  flock 9  # one build at a time (parallel test runs share var/bin)
fi

missing=""
for pkg in $pkgs; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "vcsim_build: Debian packages missing:$missing; install them as root (apt-get install$missing)" >&2
    exit 1
  fi
  echo "vcsim_build: installing$missing" >&2
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing; } >"$bin/apt.log" 2>&1; then
    echo "vcsim_build: could not install$missing from the Debian archive (see $bin/apt.log):" >&2
    tail -n 5 "$bin/apt.log" >&2
    exit 1
  fi
fi

govmomi=$(dpkg-query -W -f='${Version}' golang-github-vmware-govmomi-dev)
want=$( { sha256sum "$here"/vcsim/*.go; echo "govmomi $govmomi"; go version; } | sha256sum | cut -d' ' -f1)
if [ -x "$out" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$out"
  exit 0
fi

echo "vcsim_build: building vcsim against govmomi $govmomi ($(go version | cut -d' ' -f3))" >&2
mkdir -p "$root/var/cache/go-build" "$root/var/gopath"
if ! (cd "$here/vcsim" && env GO111MODULE=off GOFLAGS= \
      GOPATH="$root/var/gopath:/usr/share/gocode" GOCACHE="$root/var/cache/go-build" \
      go build -o "$out.tmp" .); then
  echo "vcsim_build: go build failed for tests/vcsim" >&2
  rm -f "$out.tmp"
  exit 1
fi
mv "$out.tmp" "$out"
echo "$want" >"$stamp"
echo "$out"
