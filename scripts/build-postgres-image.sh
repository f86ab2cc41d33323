#!/usr/bin/env bash
# Build, offline, a PostgreSQL 15 image that stands in for the official `postgres:15`.
#
# Usage: scripts/build-postgres-image.sh [TAG]     (default: symfo-failover/postgres:15)
#
# No image can be pulled on these machines, so the root file system is made with
# debootstrap from the Debian mirror and imported. The image keeps the interface of the
# official one that the harness uses: POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB,
# POSTGRES_HOST_AUTH_METHOD, POSTGRES_INITDB_ARGS and PGDATA; `docker-entrypoint.sh`
# as the entry point and `postgres` as the command, run as the `postgres` user. It also
# has the ja_JP.UTF-8 locale, for a Japanese-speaking server. Nothing is done if the tag
# exists already. Needs root, a Docker engine (scripts/docker-engine.sh start) and
# debootstrap (installed with apt-get if missing). Prints the tag.
set -euo pipefail

TAG=${1:-symfo-failover/postgres:15}
SUITE=${SYMFO_IMAGE_SUITE:-bookworm}
# The Debian mirror this machine's apt already uses (deb822 or one-line sources).
apt_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    awk '/^URIs:/ { print $2 }
         $1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; break } }' "$f"
  done
}
MIRROR=${SYMFO_IMAGE_MIRROR:-$(apt_mirror | awk 'NR == 1')}
PG_MAJOR=15
PG_BINDIR=/usr/lib/postgresql/$PG_MAJOR/bin
IMAGE_PATH=$PG_BINDIR:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { printf 'build-postgres-image: %s\n' "$*" >&2; }
die() { printf 'build-postgres-image: %s\n' "$*" >&2; exit 1; }

command -v docker >/dev/null 2>&1 || die "the docker client is missing (scripts/docker-engine.sh start installs it)"
timeout 10 docker info >/dev/null 2>&1 \
  || die "no Docker engine answers (start one: scripts/docker-engine.sh start)"
if docker image inspect "$TAG" >/dev/null 2>&1; then
  say "$TAG is present already"
  printf '%s\n' "$TAG"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || die "building the image needs root (debootstrap and chroot); run as root or with sudo"
if ! command -v debootstrap >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || die "debootstrap is missing and this is not Debian/Ubuntu"
  say "installing debootstrap (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq debootstrap >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq debootstrap >/dev/null
  fi
  command -v debootstrap >/dev/null 2>&1 || die "debootstrap could not be installed"
fi

[ -n "$MIRROR" ] || die "no Debian mirror found in /etc/apt/sources.list*; set SYMFO_IMAGE_MIRROR to one"

DIR=$(mktemp -d "${TMPDIR:-/var/tmp}/symfo-rootfs.XXXXXX")
cleanup() {
  # debootstrap mounts /proc and /sys in the target; never delete through a mount.
  local m
  for m in $(awk -v d="$DIR/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  rm -rf --one-file-system "$DIR"
}
trap cleanup EXIT

say "debootstrap $SUITE into $DIR (about a minute)"
started=$SECONDS
if ! debootstrap --variant=minbase \
    --include="postgresql-$PG_MAJOR,locales,libnss-wrapper,ca-certificates" \
    "$SUITE" "$DIR" "$MIRROR" >"$DIR.log" 2>&1; then
  tail -n 30 "$DIR.log" >&2
  rm -f "$DIR.log"
  die "debootstrap failed"
fi
rm -f "$DIR.log"
say "debootstrap took $((SECONDS - started)) s"

# The package made and may have started a default cluster: the image must have none
# (PGDATA is initialised by the entry point, as in the official image).
for pid in $(ls /proc | grep -E '^[0-9]+$'); do
  if [ "$(readlink "/proc/$pid/root" 2>/dev/null || true)" = "$DIR" ]; then
    kill -9 "$pid" 2>/dev/null || true
  fi
done
rm -rf "$DIR/etc/postgresql/$PG_MAJOR" "$DIR/var/lib/postgresql/$PG_MAJOR"

# Locales: en_US.UTF-8 (the official image's LANG) and ja_JP.UTF-8.
sed -i -E 's/^# *((en_US|ja_JP)\.UTF-8 UTF-8)/\1/' "$DIR/etc/locale.gen"
chroot "$DIR" locale-gen >/dev/null

# Listen on every address by default, as the official image does.
sed -ri "s!^#?(listen_addresses)\s*=\s*\S+.*!\1 = '*'!" \
  "$DIR/usr/share/postgresql/$PG_MAJOR/postgresql.conf.sample"
install -d -o root -g root -m 0755 "$DIR/docker-entrypoint-initdb.d"
# Any uid may create its socket here (docker run --user), as in the official image.
install -d -m 3777 "$DIR/run/postgresql"

cat >"$DIR/usr/local/bin/docker-entrypoint.sh" <<'ENTRYPOINT'
#!/usr/bin/env bash
# The entry point of symfo-failover's PostgreSQL image: the part of the official image's
# docker-entrypoint.sh that tests rely on. When PGDATA holds no cluster, initialise it
# (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB, POSTGRES_HOST_AUTH_METHOD,
# POSTGRES_INITDB_ARGS); then run the command as the postgres user.
set -Eeo pipefail

log() { printf '%s [entrypoint] %s\n' "$(date '+%F %T')" "$*" >&2; }

# `docker run IMAGE -c fsync=off`: the arguments are for postgres.
if [ "${1:0:1}" = '-' ]; then
  set -- postgres "$@"
fi

if [ "$1" = postgres ]; then
  : "${PGDATA:=/var/lib/postgresql/data}"
  export PGDATA
  if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres /var/run/postgresql
    chmod 3777 /var/run/postgresql
    [ "$(stat -c %U "$PGDATA")" = postgres ] || chown -R postgres:postgres "$PGDATA"
    chmod 0700 "$PGDATA"
    # Run this script again as postgres; exec keeps the server as the container's pid 1.
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$BASH_SOURCE" "$@"
  fi

  if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA"
    chmod 0700 "$PGDATA"
    # `docker run --user UID` with a uid the image does not know: initdb must look the
    # user up, so give it a passwd entry for the time of the initialisation.
    if ! getent passwd "$(id -u)" >/dev/null; then
      for wrapper in {/usr,}/lib{/*,}/libnss_wrapper.so; do
        if [ -s "$wrapper" ]; then
          NSS_WRAPPER_PASSWD=$(mktemp)
          NSS_WRAPPER_GROUP=$(mktemp)
          export LD_PRELOAD=$wrapper NSS_WRAPPER_PASSWD NSS_WRAPPER_GROUP
          printf 'postgres:x:%s:%s:PostgreSQL:%s:/bin/false\n' "$(id -u)" "$(id -g)" "$PGDATA" >"$NSS_WRAPPER_PASSWD"
          printf 'postgres:x:%s:\n' "$(id -g)" >"$NSS_WRAPPER_GROUP"
          break
        fi
      done
    fi
    user=${POSTGRES_USER:-postgres}
    db=${POSTGRES_DB:-$user}
    method=${POSTGRES_HOST_AUTH_METHOD:-}
    if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$method" != trust ]; then
      cat >&2 <<'EOF'
Error: Database is uninitialized and superuser password is not specified.
       You must specify POSTGRES_PASSWORD to a non-empty value for the
       superuser. For example, "-e POSTGRES_PASSWORD=password" on "docker run".

       You may also use "POSTGRES_HOST_AUTH_METHOD=trust" to allow all
       connections without a password. This is *not* recommended.
EOF
      exit 1
    fi
    : "${method:=scram-sha-256}"
    log "initialising $PGDATA (superuser $user, host authentication $method)"
    args=(--username="$user" --auth-local=trust --auth-host="$method")
    # As in the official image, POSTGRES_INITDB_ARGS is word-split by the shell, and the
    # password goes through a pipe, never a file.
    if [ -n "${POSTGRES_PASSWORD:-}" ]; then
      eval 'initdb "${args[@]}" --pwfile=<(printf "%s\n" "$POSTGRES_PASSWORD") '"${POSTGRES_INITDB_ARGS:-}"
    else
      eval 'initdb "${args[@]}" '"${POSTGRES_INITDB_ARGS:-}"
    fi
    # initdb's host lines cover loopback only; the official image opens every address.
    printf '\nhost all all all %s\n' "$method" >>"$PGDATA/pg_hba.conf"
    if [ "$db" != postgres ]; then
      log "creating database $db"
      quoted=${db//\"/\"\"}
      # Single-user mode: no server listens before initialisation is complete.
      printf 'CREATE DATABASE "%s";\n' "$quoted" | postgres --single -D "$PGDATA" -j postgres >/dev/null
    fi
    for f in /docker-entrypoint-initdb.d/*; do
      [ -e "$f" ] && log "ignoring $f: init scripts are not supported by this image"
    done
    if [ -n "${NSS_WRAPPER_PASSWD:-}" ]; then
      rm -f "$NSS_WRAPPER_PASSWD" "$NSS_WRAPPER_GROUP"
      unset LD_PRELOAD NSS_WRAPPER_PASSWD NSS_WRAPPER_GROUP
    fi
    log "initialisation complete"
  fi
fi

exec "$@"
ENTRYPOINT
chmod 0755 "$DIR/usr/local/bin/docker-entrypoint.sh"

# Smaller: package caches, lists and documentation are not needed at run time.
rm -rf "$DIR"/var/cache/apt/archives/*.deb "$DIR"/var/lib/apt/lists/* \
  "$DIR"/usr/share/doc/* "$DIR"/usr/share/man/* "$DIR"/usr/share/info/*
: >"$DIR/etc/hostname"

say "importing $TAG"
tar --numeric-owner -C "$DIR" -c . | docker import \
  --change 'ENTRYPOINT ["docker-entrypoint.sh"]' \
  --change 'CMD ["postgres"]' \
  --change "ENV PATH=$IMAGE_PATH" \
  --change 'ENV PGDATA=/var/lib/postgresql/data' \
  --change 'ENV LANG=en_US.utf8' \
  --change 'EXPOSE 5432' \
  --change 'USER root' \
  --message "symfo-failover: PostgreSQL $PG_MAJOR on Debian $SUITE (debootstrap)" \
  - "$TAG" >/dev/null
say "built $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{ printf "%.0f MB", $1 / 1e6 }'), $((SECONDS - started)) s in all)"
printf '%s\n' "$TAG"
