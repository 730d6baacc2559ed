#!/bin/sh
# Make Debian's libnbd Python binding (python3-libnbd) importable from the venv, and nothing else of the
# system's Python packages: the venv's site-packages gets a symlink to nbd.py and to its C extension.
# Usage: sh tests/nbd_venv.sh .venv   (make does it; apt.sh installs the package first)
set -eu
venv=${1:-.venv}
dist=/usr/lib/python3/dist-packages
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
tag=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
if [ ! -f "$dist/nbd.py" ]; then echo "python3-libnbd is not installed ($dist/nbd.py missing)" >&2; exit 1; fi
ext="$dist/libnbdmod$tag"
if [ ! -f "$ext" ]; then
  echo "python3-libnbd is built for another Python than the venv's ($tag): build the venv with the system python3" >&2
  exit 1
fi
ln -sf "$dist/nbd.py" "$site/nbd.py"
ln -sf "$ext" "$site/libnbdmod$tag"
"$venv/bin/python" -c 'import nbd' 
