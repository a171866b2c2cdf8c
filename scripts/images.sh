#!/usr/bin/env bash
# Parley's container images, built with the local Docker engine (see docs/images.md).
#
#   scripts/images.sh build [NAME...]   static release binaries, staging, `docker build`
#                                       (default: gateway operator)
#   scripts/images.sh save DIR [NAME...]  one `docker save` tar per image: DIR/NAME.tar
#                                       (default: all four; they must be built)
#   scripts/images.sh tag NAME          the image's tag (what a manifest names)
#   scripts/images.sh tags              NAME TAG, one line per image
#   scripts/images.sh sizes [NAME...]   the images' sizes as docker counts them
#   scripts/images.sh binaries          only the static binaries and the staging
#
# NAME is one of:
#   gateway   ghcr.io/parley-dev/parley-gateway:<appVersion>    product
#   operator  ghcr.io/parley-dev/parley-operator:<appVersion>   product
#   mock-llm  ghcr.io/parley-dev/parley-mock-llm:<appVersion>   test only (fake upstream)
#   redis     parley-test/redis:<Debian version> (also :local)  test only
# <appVersion> is charts/parley/Chart.yaml's appVersion, so a default `helm install`
# of the chart uses exactly these images.
#
# The binaries are built once for all three Rust images in one cargo invocation (the same
# package set every time, so features unify the same way and nothing rebuilds for
# nothing), statically linked with glibc (`-C target-feature=+crt-static`, static-pie) for
# the explicit target x86_64-unknown-linux-gnu, so build scripts and proc macros, which
# run on the host, are built as usual. They land in target/x86_64-unknown-linux-gnu/release
# and never disturb `make build`/`make release`.
set -euo pipefail
umask 022

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"

TRIPLE=x86_64-unknown-linux-gnu
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
BIN_DIR="$TARGET_DIR/$TRIPLE/release"
# The build context sends only this directory (.dockerignore).
STAGE="$REPO/target/images/stage"
LOG_DIR="$REPO/target/images"
RUST_BINS=(parley-gateway parley-operator parley-mock-llm)
ALL=(gateway operator mock-llm redis)
SOURCE_URL="https://github.com/parley-dev/parley"

die() { echo "images: $*" >&2; exit 1; }
log() { echo "images: $*" >&2; }

app_version() {
  local v
  v=$(sed -n 's/^appVersion:[[:space:]]*"\{0,1\}\([^"[:space:]]*\)"\{0,1\}.*/\1/p' charts/parley/Chart.yaml)
  [ -n "$v" ] || die "no appVersion in charts/parley/Chart.yaml"
  echo "$v"
}

crate_version() {
  sed -n '/^\[workspace.package\]/,/^\[/s/^version[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' Cargo.toml
}

# Debian's redis-server version as a tag: no epoch, `~` and `+` become `-`
# (5:7.0.15-1~deb12u10 -> 7.0.15-1-deb12u10).
redis_version() {
  local v
  v=$(dpkg-query -W -f='${Version}' redis-server 2>/dev/null) || { echo local; return; }
  v=${v#*:}
  echo "${v//[~+]/-}"
}

tag_of() {
  case "$1" in
    gateway) echo "ghcr.io/parley-dev/parley-gateway:$(app_version)" ;;
    operator) echo "ghcr.io/parley-dev/parley-operator:$(app_version)" ;;
    mock-llm) echo "ghcr.io/parley-dev/parley-mock-llm:$(app_version)" ;;
    redis) echo "parley-test/redis:$(redis_version)" ;;
    *) die "unknown image '$1' (one of: ${ALL[*]})" ;;
  esac
}

# Every tag an image gets (the redis image also gets :local, a name that never changes).
tags_of() {
  tag_of "$1"
  if [ "$1" = redis ]; then echo "parley-test/redis:local"; fi
}

docker_cli() {
  if [ -x /usr/bin/docker ]; then echo /usr/bin/docker; else command -v docker; fi
}

ensure_tools() {
  local missing=()
  command -v ldd >/dev/null 2>&1 || missing+=(libc-bin)
  [ -d /usr/share/ca-certificates/mozilla ] || missing+=(ca-certificates)
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]} (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# put SRC DEST [MODE]: copies SRC to DEST unless DEST already has the same bytes (keeps
# the staging stable), and gives it MODE [0644]: the images run as 65532, so everything
# in them must be readable by others (and binaries executable).
put() {
  mkdir -p "$(dirname "$2")"
  if ! cmp -s "$1" "$2"; then cp -L "$1" "$2.tmp" && mv -f "$2.tmp" "$2"; fi
  chmod "${3:-0644}" "$2"
}
put_text() { # put_text DEST < content
  local tmp
  tmp=$(mktemp)
  cat >"$tmp"
  put "$tmp" "$1"
  rm -f "$tmp"
}

build_binaries() {
  local app crate
  app=$(app_version)
  crate=$(crate_version)
  [ "$app" = "$crate" ] || die "charts/parley/Chart.yaml appVersion is $app but the crates are $crate
(Cargo.toml [workspace.package] version): the image tags follow the chart and the
operator's default --gateway-image follows the crates, so they must agree. Bump both."
  log "cargo build --release --target $TRIPLE (static) ${RUST_BINS[*]}"
  local start=$SECONDS
  RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  CARGO_PROFILE_RELEASE_DEBUG=false \
  CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked --target "$TRIPLE" \
      -p parley-gateway -p parley-operator -p parley-e2e \
      --bin parley-gateway --bin parley-operator --bin parley-mock-llm
  log "cargo build took $((SECONDS - start)) s"
  local b out
  for b in "${RUST_BINS[@]}"; do
    [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b was not built"
    # A static binary has no NEEDED libraries: ldd says so ("statically linked" or
    # "not a dynamic executable"); anything else means it would not run FROM scratch.
    out=$(ldd "$BIN_DIR/$b" 2>&1 || true)
    case "$out" in
      *"statically linked"* | *"not a dynamic executable"*) ;;
      *) die "$BIN_DIR/$b is not statically linked: $out" ;;
    esac
  done
}

stage_rootfs() {
  ensure_tools
  local root="$STAGE/rootfs"
  put_text "$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin
EOF
  put_text "$root/etc/group" <<'EOF'
root:x:0:
nonroot:x:65532:
EOF
  # The Mozilla roots of Debian's ca-certificates package, not the host's
  # /etc/ssl/certs/ca-certificates.crt: that one also holds whatever CAs this machine's
  # admin added (/usr/local/share/ca-certificates), which must not ship in an image.
  # Roots deselected in /etc/ca-certificates.conf ("!mozilla/...") stay out as well.
  local f name
  {
    for f in /usr/share/ca-certificates/mozilla/*.crt; do
      name="mozilla/$(basename "$f")"
      if grep -qxF "!$name" /etc/ca-certificates.conf 2>/dev/null; then continue; fi
      cat "$f"
      echo
    done
  } | put_text "$root/etc/ssl/certs/ca-certificates.crt"
}

stage_rust() {
  local b
  for b in "${RUST_BINS[@]}"; do
    put "$BIN_DIR/$b" "$STAGE/bin/$b" 0755
  done
}

# Debian's redis-server and exactly the shared libraries ldd lists, at the paths ldd
# names (symlinks resolved), plus the dynamic loader.
stage_redis() {
  if ! command -v redis-server >/dev/null 2>&1; then
    log "installing redis-server (Debian package)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
  ensure_tools
  local bin root="$STAGE/redis" libs lib
  bin=$(command -v redis-server)
  # Debian's /usr/bin/redis-server is a symlink to redis-check-rdb; the binary picks its
  # mode from argv[0], and the image runs it as /usr/bin/redis-server.
  put "$bin" "$root/usr/bin/redis-server" 0755
  libs=$(ldd "$bin" | awk '/=> \// {print $3} /^[[:space:]]*\/[^ ]+ \(/ {print $1}')
  [ -n "$libs" ] || die "ldd $bin listed no libraries"
  # Drop files of an earlier staging that ldd no longer lists.
  if [ -d "$root/lib" ] || [ -d "$root/lib64" ] || [ -d "$root/usr/lib" ]; then
    find "$root" -type f ! -path "$root/usr/bin/redis-server" ! -path "$root/etc/*" -print |
      while read -r f; do
        grep -qxF "${f#"$root"}" <<<"$libs" || rm -f "$f"
      done
  fi
  while read -r lib; do
    put "$lib" "$root$lib" "$(stat -L -c %a "$lib")"
  done <<<"$libs"
  put "$STAGE/rootfs/etc/passwd" "$root/etc/passwd"
  put "$STAGE/rootfs/etc/group" "$root/etc/group"
}

stage() {
  stage_rootfs
  stage_rust
}

docker_build() { # NAME
  local name=$1 docker target tag args=() t
  docker=$(docker_cli)
  tag=$(tag_of "$name")
  target=$name
  args+=(--build-arg "VERSION=$(app_version)")
  args+=(--build-arg "REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)")
  args+=(--build-arg "SOURCE=$SOURCE_URL")
  if [ "$name" = redis ]; then
    args+=(--build-arg "REDIS_VERSION=$(dpkg-query -W -f='${Version}' redis-server 2>/dev/null || echo unknown)")
  fi
  while read -r t; do args+=(-t "$t"); done < <(tags_of "$name")
  mkdir -p "$LOG_DIR"
  # The classic builder: every step is a COPY, and Debian's docker.io has no buildx.
  if ! DOCKER_BUILDKIT=0 "$docker" build -f "$REPO/Dockerfile" --target "$target" "${args[@]}" "$REPO" \
      >"$LOG_DIR/build-$name.log" 2>&1; then
    cat "$LOG_DIR/build-$name.log" >&2
    die "docker build of $name failed"
  fi
  log "built $tag"
}

size_of() { # TAG -> bytes
  "$(docker_cli)" image inspect -f '{{.Size}}' "$1"
}

print_sizes() {
  local name tag bytes
  for name in "$@"; do
    tag=$(tag_of "$name")
    bytes=$(size_of "$tag" 2>/dev/null) || { printf '%-9s %-48s %s\n' "$name" "$tag" "(not built)"; continue; }
    awk -v n="$name" -v t="$tag" -v b="$bytes" 'BEGIN { printf "%-9s %-48s %6.1f MB (%d bytes)\n", n, t, b / 1e6, b }'
  done
}

cmd_build() {
  local names=("$@") name need_rust=0 need_redis=0
  [ "${#names[@]}" -gt 0 ] || names=(gateway operator)
  for name in "${names[@]}"; do
    tag_of "$name" >/dev/null
    case "$name" in redis) need_redis=1 ;; *) need_rust=1 ;; esac
  done
  "$REPO/scripts/docker.sh"
  if [ "$need_rust" = 1 ]; then
    build_binaries
    stage
  else
    stage_rootfs
  fi
  if [ "$need_redis" = 1 ]; then stage_redis; fi
  for name in "${names[@]}"; do docker_build "$name"; done
  print_sizes "${names[@]}"
}

cmd_save() {
  local dir=${1:-}
  [ -n "$dir" ] || die "usage: scripts/images.sh save DIR [NAME...]"
  shift
  local names=("$@") name docker tags t
  [ "${#names[@]}" -gt 0 ] || names=("${ALL[@]}")
  for name in "${names[@]}"; do tag_of "$name" >/dev/null; done
  "$REPO/scripts/docker.sh"
  docker=$(docker_cli)
  mkdir -p "$dir"
  for name in "${names[@]}"; do
    mapfile -t tags < <(tags_of "$name")
    for t in "${tags[@]}"; do
      "$docker" image inspect "$t" >/dev/null 2>&1 ||
        die "image $t is not built: run \`make images test-images\` (or scripts/images.sh build $name)"
    done
    "$docker" save -o "$dir/$name.tar.tmp" "${tags[@]}"
    mv -f "$dir/$name.tar.tmp" "$dir/$name.tar"
    echo "$dir/$name.tar ${tags[*]}"
  done
}

main() {
  local cmd=${1:-build}
  [ $# -eq 0 ] || shift
  case "$cmd" in
    build) cmd_build "$@" ;;
    binaries) build_binaries; stage ;;
    save) cmd_save "$@" ;;
    tag) [ $# -eq 1 ] || die "usage: scripts/images.sh tag NAME"; tag_of "$1" ;;
    tags) for n in "${ALL[@]}"; do echo "$n $(tag_of "$n")"; done ;;
    sizes) if [ $# -eq 0 ]; then set -- "${ALL[@]}"; fi; "$REPO/scripts/docker.sh"; print_sizes "$@" ;;
    -h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
    *) die "unknown command '$cmd' (build, save, tag, tags, sizes, binaries)" ;;
  esac
}

main "$@"
