#!/usr/bin/env bash
# A real Slurm cluster on this machine for the integration tests.
#
#   slurm_cluster.sh start     install slurm-wlm + munge (+ iproute2) if missing, start munged (as user
#                              munge), slurmctld and the slurmd(s); wait until every node is idle
#   slurm_cluster.sh stop      cancel remaining jobs, stop every daemon this script started (by PID), remove
#                              what it created (namespaces, configs; a slurm.conf that was there is restored)
#   slurm_cluster.sh exec CMD  run CMD where the cluster's clients work (sbatch, squeue, scontrol, snakemake)
#   slurm_cluster.sh status    sinfo + squeue
#
# CCALIGN_SLURM_NODES=1 (default): one node on localhost, config in /etc/slurm/slurm.conf.
# CCALIGN_SLURM_NODES=N > 1: N nodes, each slurmd in its own network namespace with its own address and
#   hostname (node1..nodeN, $SUBNET.11...), joined by a bridge inside a "login" namespace where slurmctld
#   runs and `exec` runs clients ($SUBNET.1). All traffic stays inside these namespaces; each one sees its
#   own /etc/hosts and /etc/slurm (bind-mounted from /etc/netns/<namespace>/ by this script), so the host's
#   /etc/slurm/slurm.conf is left alone.
#
# Needs root (daemons, /etc/slurm, namespaces). State, logs and PID files live in $CCALIGN_SLURM_STATE
# (default /tmp/ccalign-slurm). Exit code 3 means the cluster cannot be had here (packages, namespaces).
set -euo pipefail

STATE=${CCALIGN_SLURM_STATE:-/tmp/ccalign-slurm}
PARTITION=${CCALIGN_SLURM_PARTITION:-debug}
NODES=${CCALIGN_SLURM_NODES:-1}
CONF=/etc/slurm/slurm.conf
MARKER="# ccalign integration test cluster"
SUBNET=10.77.0                                        # inside this script's namespaces only
HERE=$(cd "$(dirname "$0")" && pwd)
TAG=ccalign-$(cksum <<<"$STATE" | cut -d' ' -f1)     # namespace names of this state directory
LOGIN=$TAG-login

die() { echo "slurm_cluster: $*" >&2; exit 1; }
unavailable() { echo "slurm_cluster: $*" >&2; exit 3; }

# A process that runs (a zombie does not).
running() { [[ -r /proc/$1/stat ]] && [[ $(cut -d')' -f2 </proc/"$1"/stat | cut -d' ' -f2) != Z ]]; }
alive() { [[ -f $1 ]] && running "$(cat "$1")"; }

# Install the Debian packages when a command is missing; exit 3 when that is impossible.
install_packages() {
    local cmd missing=()
    for cmd in sbatch squeue sinfo slurmctld slurmd munged; do
        PATH=$PATH:/usr/sbin command -v "$cmd" >/dev/null || missing=(slurm-wlm munge)
    done
    ((NODES == 1)) || PATH=$PATH:/usr/sbin command -v ip >/dev/null || missing+=(iproute2)
    ((${#missing[@]})) || return 0
    echo "slurm_cluster: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install --no-install-recommends -y "${missing[@]}" >"$STATE/apt.log" 2>&1 \
        || { apt-get update >>"$STATE/apt.log" 2>&1 \
             && apt-get install --no-install-recommends -y "${missing[@]}" >>"$STATE/apt.log" 2>&1; } \
        || unavailable "apt-get install ${missing[*]} failed (see $STATE/apt.log)"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# write_conf DEST CTLD_HOST CTLD_ADDR CTLD_PORT SLURMD_PORT "NAME ADDR" ...: slurm.conf for these nodes.
write_conf() {
    local dest=$1 ctld_host=$2 ctld_addr=$3 ctld_port=$4 slurmd_port=$5 cpus mem hw node names=()
    shift 5
    hw=$(slurmd -C | head -n1)                        # NodeName=vm CPUs=2 ... RealMemory=24105
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    [[ -n $cpus && -n $mem ]] || die "cannot parse 'slurmd -C': $hw"
    mem=$((mem / $#))                                 # the nodes share this machine's memory
    sed -e "s|@CTLD_HOST@|$ctld_host|g" -e "s|@CTLD_ADDR@|$ctld_addr|g" -e "s|@STATE@|$STATE|g" \
        -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|$slurmd_port|g" "$HERE/slurm.conf.in" >"$dest.tmp"
    for node in "$@"; do
        read -r name addr <<<"$node"
        echo "NodeName=$name NodeAddr=$addr CPUs=$cpus RealMemory=$mem State=UNKNOWN" >>"$dest.tmp"
        names+=("$name")
        mkdir -p "$STATE/spool/$name"
    done
    local IFS=,
    echo "PartitionName=$PARTITION Nodes=${names[*]} Default=YES MaxTime=INFINITE State=UP" >>"$dest.tmp"
    mv "$dest.tmp" "$dest"
}

start_munge() {
    if alive /run/munge/munged.pid && munge -n </dev/null | unmunge >/dev/null 2>&1; then
        return 0                                      # someone else's munged: use it, never stop it
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile /etc/munge/munge.key \
        && chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key; }
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do alive /run/munge/munged.pid && break; sleep 0.1; done
    alive /run/munge/munged.pid || die "munged did not start"
    cp /run/munge/munged.pid "$STATE/munged.pid"       # ours: stopped by `stop`
}

# in_ns NAMESPACE HOSTNAME CMD...: CMD in the namespace's network, with its /etc/hosts and /etc/slurm and
# its own hostname (private mount and UTS namespaces: nothing leaks to the host).
in_ns() {
    local ns=$1 host=$2
    shift 2
    nsenter --net="/run/netns/$ns" -- unshare --mount --uts -- sh -c \
        'mount --bind "$1/hosts" /etc/hosts && mount --bind "$1/slurm" /etc/slurm && hostname "$2" \
         && shift 2 && exec "$@"' sh "/etc/netns/$ns" "$host" "$@"
}

# Where the clients of this cluster run.
client() {
    if [[ -f $STATE/netns ]]; then in_ns "$LOGIN" login "$@"; else "$@"; fi
}

# A namespace of ours: recorded first (so `stop` removes it whatever happens next), loopback up.
add_ns() {
    echo "$1" >>"$STATE/netns"
    ip netns add "$1" || unavailable "cannot create network namespace $1 (ip netns add failed)"
    ip -n "$1" link set lo up
    mkdir -p "/etc/netns/$1/slurm"
}

start_namespaces() {
    local i ns hosts="127.0.0.1 localhost"$'\n'"$SUBNET.1 login"$'\n' nodes=()
    : >"$STATE/netns"
    add_ns "$LOGIN"
    ip -n "$LOGIN" link add br0 type bridge
    ip -n "$LOGIN" addr add "$SUBNET.1/24" dev br0
    ip -n "$LOGIN" link set br0 up
    for i in $(seq "$NODES"); do
        ns=$TAG-node$i
        add_ns "$ns"
        ip -n "$LOGIN" link add "v$i" type veth peer name eth0 netns "$ns"
        ip -n "$LOGIN" link set "v$i" master br0 up
        ip -n "$ns" addr add "$SUBNET.$((10 + i))/24" dev eth0
        ip -n "$ns" link set eth0 up
        hosts+="$SUBNET.$((10 + i)) node$i"$'\n'
        nodes+=("node$i $SUBNET.$((10 + i))")
    done
    mkdir -p /etc/slurm                               # bind-mount targets (the package creates /etc/slurm)
    write_conf "$STATE/slurm.conf" login "$SUBNET.1" 6817 6818 "${nodes[@]}"
    while read -r ns; do
        printf '%s' "$hosts" >"/etc/netns/$ns/hosts"
        cp "$STATE/slurm.conf" "/etc/netns/$ns/slurm/slurm.conf"
    done <"$STATE/netns"
}

start() {
    [[ $EUID -eq 0 ]] || unavailable "needs root (daemons, /etc/slurm, namespaces)"
    mkdir -p "$STATE"
    local other i
    alive "$STATE/slurmctld.pid" && die "a cluster with state $STATE is up; stop it first"
    install_packages
    if ((NODES == 1)); then
        other=$(sed -n 's/^SlurmctldPidFile=//p' "$CONF" 2>/dev/null || true)
        if [[ -n $other ]] && alive "$other"; then
            die "a test cluster is already running (state in $(dirname "$other")); stop it with" \
                "CCALIGN_SLURM_STATE=$(dirname "$other") $0 stop"
        fi
        if [[ -f $CONF ]] && ! grep -q "^$MARKER" "$CONF"; then
            cp -p "$CONF" "$STATE/slurm.conf.orig"    # someone else's config: put it back on stop
        fi
        mkdir -p /etc/slurm
        # slurmstepd strips SLURM_CONF: the config must live at /etc/slurm/slurm.conf
        write_conf "$CONF" "$(hostname -s)" 127.0.0.1 "$(free_port)" "$(free_port)" "$(hostname -s) 127.0.0.1"
        start_munge
        /usr/sbin/slurmctld -i                        # -i: ignore state left by an earlier cluster
        /usr/sbin/slurmd
    else
        start_namespaces
        start_munge                                   # its socket is a file: every namespace reaches it
        in_ns "$LOGIN" login /usr/sbin/slurmctld -i
        for i in $(seq "$NODES"); do in_ns "$TAG-node$i" "node$i" /usr/sbin/slurmd; done
    fi
    for _ in $(seq 120); do
        if [[ $(client sinfo -h -N -t idle -o %N 2>/dev/null | wc -l) -eq $NODES ]]; then
            echo "slurm_cluster: up ($NODES node(s): $(client sinfo -h -o '%N, %c CPUs, %m MB' | head -n1);" \
                "partition $PARTITION, state $STATE)"
            return 0
        fi
        sleep 0.5
    done
    tail -n 20 "$STATE"/*.log >&2 || true
    stop || true
    die "the nodes did not become idle"
}

# Send SIGTERM to the PID in $1, wait, then SIGKILL.
stop_pid() {
    local pidfile=$1 pid
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if running "$pid"; then
        kill "$pid"
        for _ in $(seq 100); do running "$pid" || break; sleep 0.1; done
        running "$pid" && kill -9 "$pid"
    fi
    rm -f "$pidfile"
}

stop() {
    local ns pid pidfile
    if alive "$STATE/slurmctld.pid"; then
        client scancel --quiet --state=PENDING,RUNNING "--user=$(id -un)" 2>/dev/null || true
        for _ in $(seq 50); do [[ -z $(client squeue -h -t PD,R,CG 2>/dev/null) ]] && break; sleep 0.2; done
    fi
    for pidfile in "$STATE"/slurmd-*.pid; do stop_pid "$pidfile"; done
    stop_pid "$STATE/slurmctld.pid"
    stop_pid "$STATE/munged.pid"
    if [[ -f $STATE/netns ]]; then
        while read -r ns; do
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid"; done  # left by a job of ours
            ip netns del "$ns" 2>/dev/null || true
            rm -rf "/etc/netns/$ns"
        done <"$STATE/netns"
        rmdir /etc/netns 2>/dev/null || true          # only when no one else's namespace config is there
        rm -f "$STATE/netns"
    elif [[ -f $STATE/slurm.conf.orig ]]; then
        mv "$STATE/slurm.conf.orig" "$CONF"
    elif [[ -f $CONF ]] && grep -q "^$MARKER" "$CONF" \
        && grep -q "^SlurmctldPidFile=$STATE/" "$CONF"; then
        rm -f "$CONF"
    fi
    echo "slurm_cluster: stopped"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    exec) shift; client "$@" ;;
    status) client sinfo && client squeue ;;
    *) echo "usage: $0 start|stop|exec CMD...|status" >&2; exit 2 ;;
esac
