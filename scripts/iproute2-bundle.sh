#!/usr/bin/env bash
# This machine's ip and tc (iproute2), packed for a machine that has none, such as a GPU node's container
# image, so that the emulated slow network (hpc_localsgd/launcher/slownet.py) can run there. Each tool
# travels with the shared libraries and the dynamic loader it is linked against here, and runs through
# that loader, so the other machine's C library does not matter. Only the two tools run that way: what
# they start (`ip netns exec NS COMMAND`) uses the other machine's own libraries.
#
#   scripts/iproute2-bundle.sh [DIR]       (default: .iproute2 in the source tree, ignored by git)
#   PATH="DIR/bin:$PATH" ...               (there; scripts/gpu-check.sh does this for its check 7)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.iproute2}
rm -rf "$dir"
mkdir -p "$dir/bin" "$dir/lib" "$dir/libexec"
for tool in ip tc; do
  path=$(command -v "$tool") || {
    echo "iproute2-bundle: $tool is not on PATH here (Debian: apt-get install iproute2)" >&2
    exit 1
  }
  cp -L "$path" "$dir/libexec/$tool"
  # ldd lists "name => /path (address)" for each library and "/path/ld-linux... (address)" for the loader.
  libraries=$(ldd "$path" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
  for library in $libraries; do
    cp -L "$library" "$dir/lib/"
  done
  loader=$(ldd "$path" | awk '$1 ~ /^\/.*ld-linux/ {print $1}')
  [[ -n $loader ]] || {
    echo "iproute2-bundle: ldd names no dynamic loader for $path" >&2
    exit 1
  }
  cat >"$dir/bin/$tool" <<EOF
#!/bin/sh
# $tool ($("$path" -V 2>&1 | head -n 1)), through the loader it was built for
here=\$(dirname "\$(readlink -f "\$0")")/..
exec "\$here/lib/$(basename "$loader")" --library-path "\$here/lib" "\$here/libexec/$tool" "\$@"
EOF
  chmod +x "$dir/bin/$tool"
done
"$dir/bin/ip" -V >/dev/null && "$dir/bin/tc" -V >/dev/null
echo "iproute2-bundle: $dir ($(du -sh "$dir" | cut -f1)): put $dir/bin first on PATH"
