// SPDX-License-Identifier: GPL-2.0
// Reference (minimal) cgroup egress filter: the "bpf-ref" configuration of egress's benchmark
// (bench/), an anchor for what egress's data path should cost. Semantics match the
// netfilter configs: deny LPM hit -> reject; else allow LPM hit (+proto/port) -> pass;
// else default-deny.
//   cgroup/connect4   : per connect() (TCP and connected UDP); with --events, one ring buffer
//                       event per call (BPF_RB_NO_WAKEUP; the loader polls every 10 ms)
//   cgroup/sendmsg4   : per unconnected UDP sendmsg with a destination
//   cgroup_skb/egress : per packet leaving a socket of the cgroup
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct lpm_v4_key {
    __u32 prefixlen;
    __u32 addr; /* network byte order */
};

/* value of an allow entry: which L4 ports are allowed (0 = any) */
struct allow_val {
    __u8 proto;   /* 0 = any, IPPROTO_TCP, IPPROTO_UDP */
    __u8 pad;
    __u16 port[3]; /* host byte order, 0 = unused; all zero = any port */
};

struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __type(key, struct lpm_v4_key);
    __type(value, __u8);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __uint(max_entries, 1 << 20);
} deny_v4 SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __type(key, struct lpm_v4_key);
    __type(value, struct allow_val);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __uint(max_entries, 1 << 16);
} allow_v4 SEC(".maps");

/* With `--events`, connect4 writes one event per call, as egress does (but wakes no reader: the
 * loader drains the ring every 10 ms). Set by the loader after load, in .bss. */
__u32 emit_events;

struct flow_event {
    __u64 boot_ns;
    __u32 pid, uid;
    __u32 daddr;
    __u16 dport;
    __u8 proto, allowed;
    char comm[16];
};

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 1 << 22);
} events SEC(".maps");

/* per-CPU counters: 0 = allowed, 1 = denied-by-denylist, 2 = denied-by-default, 3 = events dropped */
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __type(key, __u32);
    __type(value, __u64);
    __uint(max_entries, 4);
} stats SEC(".maps");

static __always_inline void count(__u32 idx)
{
    __u64 *v = bpf_map_lookup_elem(&stats, &idx);
    if (v)
        (*v)++;
}

/* 1 = allow, 0 = deny ; daddr in network order, dport in host order */
static __always_inline int verdict(__u32 daddr, __u8 proto, __u16 dport)
{
    struct lpm_v4_key k = {.prefixlen = 32, .addr = daddr};

    if (bpf_map_lookup_elem(&deny_v4, &k)) {
        count(1);
        return 0;
    }
    struct allow_val *a = bpf_map_lookup_elem(&allow_v4, &k);
    if (a && (a->proto == 0 || a->proto == proto)) {
        if (!a->port[0] && !a->port[1] && !a->port[2])
            goto ok;
        if (dport && (a->port[0] == dport || a->port[1] == dport || a->port[2] == dport))
            goto ok;
    }
    count(2);
    return 0;
ok:
    count(0);
    return 1;
}

static __always_inline __u8 sock_proto(struct bpf_sock_addr *ctx)
{
    return ctx->type == 1 /* SOCK_STREAM */ ? IPPROTO_TCP : IPPROTO_UDP;
}

SEC("cgroup/connect4")
int egress_connect4(struct bpf_sock_addr *ctx)
{
    __u8 proto = sock_proto(ctx);
    __u16 dport = bpf_ntohs((__u16)ctx->user_port);
    int allowed = verdict(ctx->user_ip4, proto, dport);

    if (emit_events) {
        struct flow_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
        if (!e) {
            count(3); /* dropped */
            return allowed;
        }
        e->boot_ns = bpf_ktime_get_boot_ns();
        e->pid = bpf_get_current_pid_tgid() >> 32;
        e->uid = (__u32)bpf_get_current_uid_gid();
        e->daddr = ctx->user_ip4;
        e->dport = dport;
        e->proto = proto;
        e->allowed = (__u8)allowed;
        bpf_get_current_comm(e->comm, sizeof(e->comm));
        bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
    }
    return allowed;
}

SEC("cgroup/sendmsg4")
int egress_sendmsg4(struct bpf_sock_addr *ctx)
{
    return verdict(ctx->user_ip4, sock_proto(ctx), bpf_ntohs((__u16)ctx->user_port));
}

SEC("cgroup_skb/egress")
int egress_skb(struct __sk_buff *skb)
{
    struct iphdr iph;
    __u16 dport = 0;

    if (skb->protocol != bpf_htons(0x0800 /* ETH_P_IP */))
        return 1; /* IPv6 etc.: out of scope for the reference */
    if (bpf_skb_load_bytes(skb, 0, &iph, sizeof(iph)))
        return 0;
    if (iph.protocol == IPPROTO_TCP || iph.protocol == IPPROTO_UDP) {
        __u16 ports[2];
        if (bpf_skb_load_bytes(skb, iph.ihl * 4, ports, sizeof(ports)) == 0)
            dport = bpf_ntohs(ports[1]);
    }
    return verdict(iph.daddr, iph.protocol, dport);
}

char LICENSE[] SEC("license") = "GPL";
