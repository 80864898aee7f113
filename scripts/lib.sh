# Shared by the scripts in this directory; sourced, not run.

# Debian packages the build and the tests need:
#   libssl-dev libpcre2-dev zlib1g-dev  - nginx, built from the nginx-src crate
#   libclang-dev                        - bindgen, which generates nginx-sys's bindings
#   libio-socket-ssl-perl               - TLS client of the Perl test harness
#   curl openssl python3                - the demo's clients and its lookup service
SNI_GUARD_PACKAGES="libssl-dev libpcre2-dev zlib1g-dev libclang-dev libio-socket-ssl-perl \
curl openssl python3 perl"

# Installs missing packages when run as root; otherwise names them and fails.
need_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0

    if [ "$(id -u)" -ne 0 ]; then
        echo "missing Debian packages: ${missing[*]}" >&2
        echo "install them with: sudo apt-get install ${missing[*]}" >&2
        return 1
    fi

    echo "installing Debian packages: ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" >&2
}

# Prints a free TCP port on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
