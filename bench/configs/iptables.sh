# shellcheck shell=bash
# CONFIG iptables: Debian 12's default iptables (iptables-nft: each rule an nf_tables rule,
# evaluated in order): N `-A OUTPUT -d CIDR -j DROP` rules, the server allow rules, then DROP.
CFG_DESC="iptables-nft: N linear -d CIDR -j DROP rules in OUTPUT, allow server, DROP"
cfg_prepare() {
    local rules=$2
    {
        echo "*filter"
        echo ":INPUT ACCEPT [0:0]"; echo ":FORWARD ACCEPT [0:0]"; echo ":OUTPUT ACCEPT [0:0]"
        awk '{print "-A OUTPUT -d " $1 " -j DROP"}' "$rules"
        echo "-A OUTPUT -d $SRV_IP/32 -p tcp -m multiport --dports $IPERF_PORT,$CONN_PORT -j ACCEPT"
        echo "-A OUTPUT -d $SRV_IP/32 -p udp -m multiport --dports $IPERF_PORT,$CONN_PORT -j ACCEPT"
        echo "-A OUTPUT -j DROP"
        echo "COMMIT"
    } > "$TMP/iptables.rules"
}
cfg_setup() { nsc timeout "$LOAD_TIMEOUT" iptables-nft-restore < "$TMP/iptables.rules"; }
