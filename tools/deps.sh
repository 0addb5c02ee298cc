#!/usr/bin/env bash
# Install what LocalMoE needs to build, run and test on Debian/Ubuntu.
# Idempotent: only missing packages are installed.
set -euo pipefail
pkgs=(build-essential nginx nginx-dev libyajl-dev libyaml-dev libpcre2-dev
      libutf8proc-dev libssl-dev zlib1g-dev perl libjson-pp-perl nodejs npm curl ca-certificates
      clang)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
        || missing+=("$p")
done
# Debian's node ships npm inside nodejs on some images: accept any npm.
if command -v npm >/dev/null 2>&1; then
    missing=("${missing[@]/npm}")
fi
if command -v node >/dev/null 2>&1; then
    missing=("${missing[@]/nodejs}")
fi
missing=($(printf '%s\n' "${missing[@]}" | grep -v '^$' || true))
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
    echo "installing: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
