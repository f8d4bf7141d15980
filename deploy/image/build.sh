#!/usr/bin/env bash
# `make image`: build deploy/Containerfile with podman where no container registry is reachable, then
# smoke-test the result. Opt-in (not part of `make test`): it needs root, podman and mmdebstrap, and
# the Debian archive and PyPI over the network.
#
#   1. bases: mmdebstrap a minimal Debian ($DEBIAN_SUITE, default bookworm) with python3,
#      python3-venv and libstdc++6 into a tarball, `podman import` it as
#      localhost/ws-affinity-lb-base:$DEBIAN_SUITE-<hash of the package list>, and delete the
#      tarball; the same with gcc and python3-dev as ws-affinity-lb-build-base, for the build stage
#      that compiles the data plane. Reused on the next run (REBUILD_BASE=1 makes them again).
#   2. image: `podman build --isolation=chroot` of deploy/Containerfile with BASE set to that image,
#      tagged localhost/ws-affinity-lb:<version> and :latest. Chroot isolation needs no OCI runtime
#      and no cgroup setup, which is what lets it build inside a sandbox or an unprivileged CI job.
#   3. smoke test with `podman run --network=none`: `lb --version` prints the package's version; the
#      image's own `lb keygen` makes throwaway secrets; `lb validate` accepts the deploy config
#      (deploy/kubernetes/base/lb.yaml) mounted where the Deployment mounts it; the process runs as
#      uid 10001; uvloop imports; the data plane is compiled; the demo gateway starts; the entry point is `lb run --config
#      /etc/lb/lb.yaml`; and that default command, run as PID 1 on the deploy config, becomes
#      ready on /readyz on uvloop and exits 0 on SIGTERM.
#
# Nothing built lands in the repository: the work files go to build/image/ (git-ignored) and are
# removed on exit; the images live in podman's storage (`podman rmi` them to reclaim the space).
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${IMAGE:-localhost/ws-affinity-lb}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# libstdc++6: google-crc32c's wheel bundles libcrc32c, a C++ library; without it the CRC32c of a PROXY v2
# header silently falls back to pure Python (Debian's slim images have it through apt; essential has no apt).
RUN_PACKAGES=python3,python3-venv,passwd,libstdc++6
BUILD_PACKAGES=python3,python3-venv,python3-dev,gcc,libc6-dev,passwd
# A base is reused while its tag exists; the tag names its package list, so a changed list makes a new one.
packages_tag() { printf '%s' "$1" | sha256sum | cut -c1-8; }
BASE_IMAGE=${BASE_IMAGE:-localhost/ws-affinity-lb-base:$DEBIAN_SUITE-$(packages_tag "$RUN_PACKAGES")}
BUILD_BASE_IMAGE=${BUILD_BASE_IMAGE:-localhost/ws-affinity-lb-build-base:$DEBIAN_SUITE-$(packages_tag "$BUILD_PACKAGES")}
DEPLOY_CONFIG=${DEPLOY_CONFIG:-deploy/kubernetes/base/lb.yaml}
WORK=build/image

say() { printf '==> %s\n' "$*"; }
fail() { printf 'make image: %s\n' "$*" >&2; exit 1; }
started=$SECONDS
step_started=$SECONDS
took() { say "$1 ($((SECONDS - step_started)) s)"; step_started=$SECONDS; }

# ---- prerequisites: say what is missing and how to get it, rather than failing halfway
[ "$(id -u)" = 0 ] || fail "run as root: mmdebstrap and rootful podman build the base and the image"
missing=()
for tool in podman mmdebstrap python3; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ "${#missing[@]}" = 0 ] || fail "missing ${missing[*]}; install with: apt-get update && apt-get install -y podman mmdebstrap runc"
VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
[ -f "$DEPLOY_CONFIG" ] || fail "no deploy config at $DEPLOY_CONFIG"
config_path=$(realpath "$DEPLOY_CONFIG")

# cgroupfs: the systemd cgroup manager needs a running systemd, which containers and CI jobs lack.
PODMAN=(podman --cgroup-manager=cgroupfs)

mkdir -p "$WORK"
tmp=$(mktemp -d "$PWD/$WORK/run.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# ---- 1. the base images: the run stage's (python3) and the build stage's (also gcc and Python's
# headers, which compile the data plane; the same python3 at the same path, so the venv carries over)
# mmdebstrap's essential variant: no apt, no docs, no man pages, no locales; passwd for useradd.
make_base() {  # make_base IMAGE PACKAGES
    local image=$1 packages=$2
    if [ "${REBUILD_BASE:-0}" = 1 ] || ! "${PODMAN[@]}" image exists "$image"; then
        say "base: mmdebstrap $DEBIAN_SUITE ($packages) from $DEBIAN_MIRROR"
        mmdebstrap --quiet --variant=essential --include="$packages" \
            --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
            --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
            "$DEBIAN_SUITE" "$tmp/base.tar" "$DEBIAN_MIRROR"
        "${PODMAN[@]}" import --quiet --change 'CMD ["/bin/bash"]' \
            --message "mmdebstrap $DEBIAN_SUITE + $packages for deploy/Containerfile" \
            "$tmp/base.tar" "$image" >/dev/null
        rm -f "$tmp/base.tar"
        took "base: imported $image"
    else
        say "base: reusing $image (REBUILD_BASE=1 to make it again)"
    fi
}
make_base "$BASE_IMAGE" "$RUN_PACKAGES"
make_base "$BUILD_BASE_IMAGE" "$BUILD_PACKAGES"

# ---- 2. the image
# pip inside the build must trust what this host trusts (a TLS-inspecting proxy's CA, say), and use
# the host's index if one is set. Both come in as a read-only bind mount over /mnt (an empty
# directory in Debian bases, so no mount point is left behind) that exists only while each RUN step
# runs, and PIP_CONFIG_FILE (a build ARG of the build stage only) points pip at it.
mkdir -p "$tmp/pip"
ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
{
    echo '[global]'
    if [ -f "$ca" ]; then
        cp "$ca" "$tmp/pip/ca.pem"
        echo 'cert = /mnt/ca.pem'
    fi
    [ -z "${PIP_INDEX_URL:-}" ] || echo "index-url = $PIP_INDEX_URL"
} >"$tmp/pip/pip.conf"
chmod -R a+rX "$tmp/pip"

say "image: podman build --isolation=chroot FROM $BUILD_BASE_IMAGE, then $BASE_IMAGE"
"${PODMAN[@]}" build --isolation=chroot --layers \
    --build-arg "BASE=$BASE_IMAGE" --build-arg "BUILD_BASE=$BUILD_BASE_IMAGE" --build-arg PIP_CONFIG_FILE=/mnt/pip.conf \
    --volume "$tmp/pip:/mnt:ro" \
    --file deploy/Containerfile --tag "$IMAGE:$VERSION" --tag "$IMAGE:latest" . \
    >"$tmp/build.log" 2>&1 || { tail -n 40 "$tmp/build.log" >&2; fail "podman build failed (last lines above)"; }
took "image: built $IMAGE:$VERSION"

# ---- 3. smoke test
# podman asks the OCI runtime for nofile 1048576 and a large nproc by default; without
# CAP_SYS_RESOURCE (a sandbox, some CI runners) raising a limit fails with "setrlimit: Operation not
# permitted". Ask for the limits this shell already has instead, nproc capped at kernel.pid_max (no
# more processes can exist anyway; here runc refused any nproc above it). runc rather than crun where
# both exist: crun 1.8 refuses a host with cgroup v1 and v2 both mounted ("cgroups in hybrid mode not
# supported, drop all controllers from cgroupv2").
nofile=$(ulimit -n)
nproc=$(ulimit -u)
pid_max=$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo "$nproc")
if [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ]; then nproc=$pid_max; fi
RUN=("${PODMAN[@]}" run --rm --network=none --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
if command -v runc >/dev/null 2>&1; then RUN+=(--runtime runc); fi

out=$("${RUN[@]}" "$IMAGE:$VERSION" --version) || fail "lb --version failed in the image"
[ "$out" = "$VERSION" ] || fail "lb --version printed '$out', expected '$VERSION'"
say "smoke: lb --version -> $out"

# Throwaway secrets for every ${file:/etc/lb/secrets/NAME} the deploy config reads, from the image's
# own `lb keygen`; readable by uid 10001, removed on exit.
mkdir -p "$tmp/secrets"
names=$(grep -o '\${file:/etc/lb/secrets/[^}]*}' "$DEPLOY_CONFIG" | sed 's|.*/||; s|}$||' | sort -u)
for name in $names; do
    "${RUN[@]}" "$IMAGE:$VERSION" keygen >"$tmp/secrets/$name" || fail "lb keygen failed in the image"
done
chmod -R a+rX "$tmp/secrets"
"${RUN[@]}" \
    --volume "$config_path:/etc/lb/lb.yaml:ro" --volume "$tmp/secrets:/etc/lb/secrets:ro" \
    "$IMAGE:$VERSION" validate --config /etc/lb/lb.yaml \
    || fail "lb validate rejected $DEPLOY_CONFIG inside the image"
say "smoke: lb validate --config $DEPLOY_CONFIG (secrets: $(echo $names)) -> ok"

uid=$("${RUN[@]}" --entrypoint id "$IMAGE:$VERSION" -u)
[ "$uid" = 10001 ] || fail "the image runs as uid $uid, expected 10001"
"${RUN[@]}" --entrypoint python3 "$IMAGE:$VERSION" -c 'import uvloop' || fail "uvloop does not import"
"${RUN[@]}" --entrypoint python3 "$IMAGE:$VERSION" -W error -c 'import google_crc32c; assert google_crc32c.implementation == "c"' \
    || fail "google-crc32c runs its pure-Python fallback in the image (its C extension does not load)"
compiled=$("${RUN[@]}" --entrypoint python3 "$IMAGE:$VERSION" -c \
    'import lb.compiled as c; s = c.compiled_state(); print(s.describe()); assert s.modules and not s.stale') \
    || fail "the image's data plane is not compiled, or is stale: $compiled"
# The example StatefulSet runs the demo gateway from this image as `python -m backends_demo`.
"${RUN[@]}" --entrypoint python "$IMAGE:$VERSION" -m backends_demo --help >/dev/null \
    || fail "python -m backends_demo (the example gateway's command) fails in the image"
entry=$("${PODMAN[@]}" image inspect --format '{{json .Config.Entrypoint}} {{json .Config.Cmd}}' "$IMAGE:$VERSION")
[ "$entry" = '["lb"] ["run","--config","/etc/lb/lb.yaml"]' ] || fail "unexpected entry point: $entry"
say "smoke: uid 10001, uvloop imports, crc32c in C, $compiled, backends_demo runs, entry point $entry"

# The real thing, as Kubernetes runs it: the default entry point (lb is PID 1) on the deploy config;
# /readyz answers 200 (polled against a deadline), the loop is uvloop's, and SIGTERM stops it with
# exit 0 after the config's shutdown_delay. No network but the container's own loopback: discovery
# finds no DNS and keeps its empty set: readiness waits for discovery's first lookups to end, not
# to find anything. The probe also checks that PID 1 catches SIGTERM: the kernel drops a signal
# PID 1 has no handler for. lb installs its handlers before it binds anything, so by the time
# /readyz answers 200 they are there; the check is what keeps that so.
container=""
trap 'rm -rf "$tmp"; [ -z "$container" ] || "${PODMAN[@]}" rm --force --time 0 "$container" >/dev/null 2>&1 || true' EXIT
container=$("${RUN[@]/--rm/--detach}" \
    --volume "$config_path:/etc/lb/lb.yaml:ro" --volume "$tmp/secrets:/etc/lb/secrets:ro" "$IMAGE:$VERSION")
probe='
import urllib.request
urllib.request.urlopen("http://127.0.0.1:9000/readyz", timeout=1).read()
caught = next(line for line in open("/proc/1/status") if line.startswith("SigCgt:")).split()[1]
assert int(caught, 16) & 1 << 14, "SIGTERM not caught yet"
'
deadline=$((SECONDS + 30))
until "${PODMAN[@]}" exec "$container" python3 -c "$probe" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ] || [ "$("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$container")" != true ]; then
        "${PODMAN[@]}" logs --tail 20 "$container" >&2 || true
        fail "lb run in the image was not ready (/readyz, SIGTERM handler) within 30 s (its last log lines above)"
    fi
    sleep 0.5
done
"${PODMAN[@]}" exec "$container" sh -c 'tr "\0" " " </proc/1/cmdline | grep -q "/lb run --config" && grep -q uvloop /proc/1/maps' \
    || fail "PID 1 is not lb run on uvloop"
stop_started=$SECONDS
"${PODMAN[@]}" stop --time 60 "$container" >/dev/null
code=$("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$container")
[ "$code" = 0 ] || { "${PODMAN[@]}" logs --tail 20 "$container" >&2; fail "lb exited $code on SIGTERM, expected 0"; }
say "smoke: lb run (PID 1, uvloop) ready on /readyz; SIGTERM -> exit 0 in $((SECONDS - stop_started)) s"

size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE:$VERSION")
took "smoke: passed"
say "done in $((SECONDS - started)) s: $IMAGE:$VERSION ($((size / 1000000)) MB)"
