# shellcheck shell=bash
# CONFIG ipset: an ipset hash:net holding the N prefixes, matched by ONE iptables(-nft) rule;
# then the server allow rules and DROP.
CFG_DESC="ipset hash:net of N prefixes + 1 iptables-nft rule, allow server, DROP"
cfg_prepare() {
    local rules=$2
    awk '{print "add ebench-deny " $1}' "$rules" > "$TMP/ipset.rules"
    {
        echo "*filter"
        echo ":INPUT ACCEPT [0:0]"; echo ":FORWARD ACCEPT [0:0]"; echo ":OUTPUT ACCEPT [0:0]"
        echo "-A OUTPUT -m set --match-set ebench-deny dst -j DROP"
        echo "-A OUTPUT -d $SRV_IP/32 -p tcp -m multiport --dports $IPERF_PORT,$CONN_PORT -j ACCEPT"
        echo "-A OUTPUT -d $SRV_IP/32 -p udp -m multiport --dports $IPERF_PORT,$CONN_PORT -j ACCEPT"
        echo "-A OUTPUT -j DROP"
        echo "COMMIT"
    } > "$TMP/ipset-iptables.rules"
}
cfg_setup() {
    nsc ipset create ebench-deny hash:net family inet hashsize 65536 maxelem 1048576
    nsc timeout "$LOAD_TIMEOUT" ipset restore < "$TMP/ipset.rules"
    nsc iptables-nft-restore < "$TMP/ipset-iptables.rules"
}
