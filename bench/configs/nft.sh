# shellcheck shell=bash
# CONFIG nft: nftables, one output chain in the client namespace: the N prefixes in an interval
# set (the kernel picks the set backend), then the server allow rules, policy drop.
CFG_DESC="nftables: ip daddr @deny drop (interval set of N prefixes), allow server, policy drop"
cfg_prepare() {
    local n=$1 rules=$2
    {
        echo "table ip ebench {"
        echo "  set deny {"
        echo "    type ipv4_addr; flags interval;"
        if [ "$n" -gt 0 ]; then
            echo "    elements = {"
            sed 's/$/,/' "$rules"
            echo "    }"
        fi
        echo "  }"
        echo "  chain out {"
        echo "    type filter hook output priority filter; policy drop;"
        echo "    ip daddr @deny drop"
        echo "    ip daddr $SRV_IP tcp dport { $IPERF_PORT, $CONN_PORT } accept"
        echo "    ip daddr $SRV_IP udp dport { $IPERF_PORT, $CONN_PORT } accept"
        echo "  }"
        echo "}"
    } > "$TMP/nft.rules"
}
cfg_setup() { nsc timeout "$LOAD_TIMEOUT" nft -f "$TMP/nft.rules"; }
# the rules die with the namespace
