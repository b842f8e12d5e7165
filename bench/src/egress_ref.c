// SPDX-License-Identifier: GPL-2.0
// Loader for egress_ref.bpf.o, the "bpf-ref" configuration of egress's benchmark (bench/):
// the same hooks and LPM tries as egress, in C with libbpf; events only with --events.
//
//   egress_ref OBJ CGROUP_DIR DENY_FILE ALLOW_SPEC... [--max-seconds S] [--events]
//     DENY_FILE : one IPv4 CIDR per line
//     ALLOW_SPEC: CIDR,PROTO[,PORT[,PORT[,PORT]]]   PROTO = any|tcp|udp, no port = any
//   Loads, fills the maps, attaches connect4 + sendmsg4 + cgroup_skb/egress to CGROUP_DIR
//   with bpf_link (auto-detached when the process exits), prints one JSON "ready" line
//   on stdout, then waits for SIGTERM/SIGINT (or --max-seconds, default 3600) and
//   prints the verdict counters. --events: connect4 writes an event per call into a ring
//   buffer, which this process drains every 10 ms (counting, not printing, the events).
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

struct lpm_v4_key { __u32 prefixlen; __u32 addr; };
struct allow_val { __u8 proto; __u8 pad; __u16 port[3]; };

static volatile sig_atomic_t stop;
static unsigned long long events_read;
static int on_event(void *ctx, void *data, size_t size) {
    (void)ctx; (void)data; (void)size;
    events_read++;
    return 0;
}
static void on_sig(int s) { (void)s; stop = 1; }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int parse_cidr(const char *s, struct lpm_v4_key *k) {
    char buf[64];
    snprintf(buf, sizeof buf, "%s", s);
    char *slash = strchr(buf, '/');
    int plen = 32;
    if (slash) { *slash = 0; plen = atoi(slash + 1); }
    struct in_addr a;
    if (plen < 0 || plen > 32 || inet_pton(AF_INET, buf, &a) != 1) return -1;
    k->prefixlen = (__u32)plen;
    k->addr = a.s_addr;
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s OBJ CGROUP_DIR DENY_FILE ALLOW_SPEC... [--max-seconds S]\n", argv[0]);
        return 2;
    }
    int max_seconds = 3600, events = 0;
    double t0 = now_s();
    struct bpf_object *obj = bpf_object__open_file(argv[1], NULL);
    if (!obj || libbpf_get_error(obj)) { fprintf(stderr, "open %s failed\n", argv[1]); return 1; }
    if (bpf_object__load(obj)) { fprintf(stderr, "load failed: %s\n", strerror(errno)); return 1; }
    int deny_fd = bpf_object__find_map_fd_by_name(obj, "deny_v4");
    int allow_fd = bpf_object__find_map_fd_by_name(obj, "allow_v4");
    int stats_fd = bpf_object__find_map_fd_by_name(obj, "stats");

    /* deny list */
    FILE *f = fopen(argv[3], "r");
    if (!f) { perror(argv[3]); return 1; }
    char line[128];
    long nd = 0;
    __u8 one = 1;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n ")] = 0;
        if (!line[0] || line[0] == '#') continue;
        struct lpm_v4_key k;
        if (parse_cidr(line, &k)) { fprintf(stderr, "bad cidr %s\n", line); return 1; }
        if (bpf_map_update_elem(deny_fd, &k, &one, BPF_ANY)) { perror("deny update"); return 1; }
        nd++;
    }
    fclose(f);
    double t_fill = now_s();

    /* allow specs */
    long na = 0;
    for (int i = 4; i < argc; i++) {
        if (!strcmp(argv[i], "--max-seconds") && i + 1 < argc) { max_seconds = atoi(argv[++i]); continue; }
        if (!strcmp(argv[i], "--events")) { events = 1; continue; }
        char spec[256];
        snprintf(spec, sizeof spec, "%s", argv[i]);
        char *save = NULL, *tok = strtok_r(spec, ",", &save);
        struct lpm_v4_key k;
        struct allow_val v = {0};
        if (!tok || parse_cidr(tok, &k)) { fprintf(stderr, "bad allow spec %s\n", argv[i]); return 1; }
        tok = strtok_r(NULL, ",", &save);
        if (tok) v.proto = !strcmp(tok, "tcp") ? 6 : !strcmp(tok, "udp") ? 17 : 0;
        for (int p = 0; p < 3 && (tok = strtok_r(NULL, ",", &save)); p++) v.port[p] = (__u16)atoi(tok);
        if (bpf_map_update_elem(allow_fd, &k, &v, BPF_ANY)) { perror("allow update"); return 1; }
        na++;
    }

    /* --events: switch connect4's event writing on (a global in .bss) and open the ring */
    struct ring_buffer *rb = NULL;
    if (events) {
        struct bpf_map *m, *bss = NULL;
        bpf_object__for_each_map(m, obj)
            if (strstr(bpf_map__name(m), ".bss")) bss = m;
        __u32 zero = 0, size = bss ? bpf_map__value_size(bss) : 0;
        __u32 *val = size ? calloc(1, size) : NULL;
        if (!val) { fprintf(stderr, "no .bss map for emit_events\n"); return 1; }
        val[0] = 1; /* emit_events is the only .bss variable */
        if (bpf_map_update_elem(bpf_map__fd(bss), &zero, val, BPF_ANY)) { perror("set emit_events"); return 1; }
        free(val);
        rb = ring_buffer__new(bpf_object__find_map_fd_by_name(obj, "events"), on_event, NULL, NULL);
        if (!rb) { fprintf(stderr, "ring buffer: %s\n", strerror(errno)); return 1; }
    }

    /* attach */
    int cgfd = open(argv[2], O_RDONLY | O_DIRECTORY);
    if (cgfd < 0) { perror(argv[2]); return 1; }
    struct bpf_link *links[8];
    int nl = 0;
    struct bpf_program *prog;
    bpf_object__for_each_program(prog, obj) {
        struct bpf_link *l = bpf_program__attach_cgroup(prog, cgfd);
        if (!l || libbpf_get_error(l)) {
            fprintf(stderr, "attach %s failed\n", bpf_program__name(prog));
            return 1;
        }
        links[nl++] = l;
    }
    double t_ready = now_s();
    struct sigaction act = {0};
    act.sa_handler = on_sig;
    sigaction(SIGTERM, &act, NULL);
    sigaction(SIGINT, &act, NULL);
    sigaction(SIGALRM, &act, NULL);
    alarm((unsigned)max_seconds);
    printf("{\"ready\":true,\"deny_entries\":%ld,\"allow_entries\":%ld,\"progs\":%d,\"events\":%s,"
           "\"fill_s\":%.3f,\"total_load_s\":%.3f}\n",
           nd, na, nl, events ? "true" : "false", t_fill - t0, t_ready - t0);
    fflush(stdout);
    while (!stop) {
        if (rb) {
            struct timespec ts = {0, 10 * 1000 * 1000};
            nanosleep(&ts, NULL);
            ring_buffer__consume(rb);
        } else {
            pause();
        }
    }
    if (rb) {
        ring_buffer__consume(rb);
        ring_buffer__free(rb);
    }

    /* counters */
    int ncpu = libbpf_num_possible_cpus();
    __u64 tot[4] = {0};
    __u64 *vals = calloc((size_t)ncpu, sizeof(__u64));
    for (__u32 i = 0; i < 4 && vals; i++) {
        if (bpf_map_lookup_elem(stats_fd, &i, vals) == 0)
            for (int c = 0; c < ncpu; c++) tot[i] += vals[c];
    }
    printf("{\"exit\":true,\"allowed\":%llu,\"denied_list\":%llu,\"denied_default\":%llu,"
           "\"events_read\":%llu,\"events_dropped\":%llu}\n",
           (unsigned long long)tot[0], (unsigned long long)tot[1], (unsigned long long)tot[2], events_read,
           (unsigned long long)tot[3]);
    for (int i = 0; i < nl; i++) bpf_link__destroy(links[i]);
    bpf_object__close(obj);
    close(cgfd);
    return 0;
}
