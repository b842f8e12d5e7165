// tcpconn: tiny TCP connect-rate benchmark (client + server) for the egress harness.
//
//   tcpconn server PORT MAXSEC
//       listen on 0.0.0.0:PORT (backlog 4096), accept()+close() in a loop.
//       Exits after MAXSEC seconds or on SIGTERM/SIGINT.
//   tcpconn client IP PORT COUNT MAXSEC [WARMUP]
//       WARMUP (default 500) untimed connects, then COUNT serial connect()+close().
//       Stops early after MAXSEC seconds. Every socket is closed with SO_LINGER{1,0}
//       (RST) so no TIME_WAIT state piles up on either side (ports stay reusable
//       across runs). connect() has a 2 s timeout (SO_SNDTIMEO).
//       Prints one JSON object: connections/s over the whole loop (socket+connect+close)
//       and connect() latency percentiles.
//   tcpconn probe IP PORT TIMEOUT_MS
//       one connect(); prints {"probe":"ok"|"EPERM"|"ETIMEDOUT"|...,"us":...}
//   tcpconn udpsink PORT MAXSEC
//       recvmmsg() loop; prints received packets/s once traffic stops for 1 s (or MAXSEC).
//   tcpconn udpblast IP PORT SECS LEN [unconnected]
//       sendmmsg() batches of 64 datagrams of LEN bytes for SECS seconds; prints pps sent.
//       Default: connect()ed socket (cgroup/connect4 runs once, cgroup_skb per packet);
//       "unconnected": sendto-style with msg_name on each message (cgroup/sendmsg4 per packet).
//   tcpconn denyloop IP PORT SECS [RATE]
//       socket()+connect()+close() to a destination the filter refuses, for SECS seconds,
//       as fast as possible or paced at RATE attempts/s; prints how many attempts were made
//       and how they ended (a cgroup/connect4 reject is EPERM). Drives the event pipeline.
//
// Part of egress's benchmark (bench/, run by `cargo xtask bench`), adapted from the
// workplace's shared harness. Build: cc -O2 -o tcpconn tcpconn.c
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop_flag;
static void on_sig(int s) { (void)s; stop_flag = 1; }

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(uint64_t *v, size_t n, double p) {
    if (n == 0) return 0;
    size_t idx = (size_t)(p / 100.0 * (double)(n - 1) + 0.5);
    if (idx >= n) idx = n - 1;
    return (double)v[idx] / 1000.0; /* ns -> us */
}

static int one_connect(const struct sockaddr_in *sa, int timeout_ms, uint64_t *lat_ns, int *err) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) { *err = errno; return -1; }
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    uint64_t t0 = now_ns();
    int rc = connect(fd, (const struct sockaddr *)sa, sizeof *sa);
    uint64_t t1 = now_ns();
    *lat_ns = t1 - t0;
    if (rc != 0) *err = errno;
    close(fd);
    return rc;
}

static void install_handlers(void) {
    struct sigaction act;
    memset(&act, 0, sizeof act);
    act.sa_handler = on_sig; /* no SA_RESTART: blocking accept()/recvmmsg() return EINTR */
    sigaction(SIGTERM, &act, NULL);
    sigaction(SIGINT, &act, NULL);
    sigaction(SIGALRM, &act, NULL);
}

static int run_server(int port, int maxsec) {
    install_handlers();
    alarm(maxsec);
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) || listen(ls, 4096)) { perror("bind/listen"); return 1; }
    fprintf(stderr, "tcpconn server listening on %d\n", port);
    unsigned long n = 0;
    while (!stop_flag) {
        int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) { if (errno == EINTR) continue; perror("accept"); continue; }
        close(c);
        n++;
    }
    fprintf(stderr, "tcpconn server exiting after %lu accepts\n", n);
    return 0;
}

static int run_client(const char *ip, int port, long count, double maxsec, long warmup) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) { fprintf(stderr, "bad ip\n"); return 2; }
    uint64_t *lat = calloc((size_t)count, sizeof *lat);
    if (!lat) return 2;
    long errors = 0, done = 0;
    int first_err = 0;
    uint64_t l;
    int e;
    uint64_t deadline = now_ns() + (uint64_t)(maxsec * 1e9);
    long warm_done = 0;
    for (long i = 0; i < warmup && now_ns() < deadline; i++, warm_done++) {
        if (one_connect(&sa, 2000, &l, &e) != 0 && ++errors > 100) break;
    }
    long warm_errors = errors;
    errors = 0;
    uint64_t t0 = now_ns();
    deadline = t0 + (uint64_t)(maxsec * 1e9);
    int truncated = 0;
    for (long i = 0; i < count; i++) {
        if ((i & 63) == 0 && now_ns() > deadline) { truncated = 1; break; }
        if (one_connect(&sa, 2000, &l, &e) != 0) {
            if (!first_err) first_err = e;
            if (++errors > 100) break;
            continue;
        }
        lat[done++] = l;
    }
    uint64_t t1 = now_ns();
    double el = (double)(t1 - t0) / 1e9;
    qsort(lat, (size_t)done, sizeof *lat, cmp_u64);
    double sum = 0;
    for (long i = 0; i < done; i++) sum += (double)lat[i];
    printf("{\"conns\":%ld,\"errors\":%ld,\"warmup\":%ld,\"warmup_errors\":%ld,\"first_errno\":\"%s\",\"truncated\":%s,"
           "\"elapsed_s\":%.4f,\"cps\":%.1f,\"mean_us\":%.2f,\"p50_us\":%.2f,\"p90_us\":%.2f,"
           "\"p99_us\":%.2f,\"p999_us\":%.2f,\"max_us\":%.2f}\n",
           done, errors, warm_done, warm_errors, first_err ? strerrorname_np(first_err) : "", truncated ? "true" : "false",
           el, el > 0 ? (double)done / el : 0.0, done ? sum / (double)done / 1000.0 : 0.0,
           pct(lat, done, 50), pct(lat, done, 90), pct(lat, done, 99), pct(lat, done, 99.9),
           done ? (double)lat[done - 1] / 1000.0 : 0.0);
    free(lat);
    return errors > 100 ? 1 : 0;
}

static int run_probe(const char *ip, int port, int timeout_ms) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) { fprintf(stderr, "bad ip\n"); return 2; }
    uint64_t l;
    int e = 0;
    int rc = one_connect(&sa, timeout_ms, &l, &e);
    const char *r = rc == 0 ? "ok" : (e == EINPROGRESS || e == EAGAIN) ? "ETIMEDOUT" : strerrorname_np(e);
    printf("{\"probe\":\"%s\",\"us\":%.1f}\n", r ? r : "?", (double)l / 1000.0);
    return 0;
}

/* ---------------- UDP small-packet rate ---------------- */
#define BATCH 64
static int run_udpsink(int port, int maxsec) {
    install_handlers();
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    int big = 32 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa)) { perror("bind"); return 1; }
    struct timeval tv = {0, 200000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    static char bufs[BATCH][2048];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = sizeof bufs[i];
        memset(&msgs[i], 0, sizeof msgs[i]);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    unsigned long long n = 0;
    uint64_t first = 0, last = 0, end = now_ns() + (uint64_t)maxsec * 1000000000ull;
    while (!stop_flag && now_ns() < end) {
        int r = recvmmsg(fd, msgs, BATCH, 0, NULL);
        if (r <= 0) {
            if (first && now_ns() - last > 1000000000ull) break; /* 1 s idle after traffic: done */
            continue;
        }
        last = now_ns();
        if (!first) first = last;
        n += (unsigned)r;
    }
    double el = first ? (double)(last - first) / 1e9 : 0;
    printf("{\"recv_pkts\":%llu,\"recv_s\":%.3f,\"pps_recv\":%.0f}\n", n, el, el > 0 ? n / el : 0.0);
    return 0;
}

static int run_udpblast(const char *ip, int port, double secs, int len, int unconnected) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) { fprintf(stderr, "bad ip\n"); return 2; }
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (!unconnected && connect(fd, (struct sockaddr *)&sa, sizeof sa)) { perror("connect"); return 1; }
    static char buf[2048];
    memset(buf, 'x', sizeof buf);
    if (len > (int)sizeof buf) len = sizeof buf;
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = buf;
        iov[i].iov_len = (size_t)len;
        memset(&msgs[i], 0, sizeof msgs[i]);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        if (unconnected) { msgs[i].msg_hdr.msg_name = &sa; msgs[i].msg_hdr.msg_namelen = sizeof sa; }
    }
    unsigned long long sent = 0, errs = 0;
    int first_err = 0;
    uint64_t t0 = now_ns(), end = t0 + (uint64_t)(secs * 1e9), t;
    while ((t = now_ns()) < end) {
        int r = sendmmsg(fd, msgs, BATCH, 0);
        if (r < 0) {
            if (!first_err) first_err = errno;
            if (++errs > 1000000) break;
            continue;
        }
        sent += (unsigned)r;
    }
    double el = (double)(now_ns() - t0) / 1e9;
    printf("{\"sent_pkts\":%llu,\"send_errors\":%llu,\"first_errno\":\"%s\",\"send_s\":%.3f,\"pps_sent\":%.0f,"
           "\"payload_bytes\":%d,\"unconnected\":%s}\n",
           sent, errs, first_err ? strerrorname_np(first_err) : "", el, sent / el, len,
           unconnected ? "true" : "false");
    return 0;
}

/* ---------------- blocked connects (event pipeline load) ---------------- */
static int run_denyloop(const char *ip, int port, double secs, double rate) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) { fprintf(stderr, "bad ip\n"); return 2; }
    unsigned long long attempts = 0, eperm = 0, ok = 0, other = 0;
    int other_errno = 0;
    uint64_t t0 = now_ns(), end = t0 + (uint64_t)(secs * 1e9), t = t0;
    double gap_ns = rate > 0 ? 1e9 / rate : 0;
    while (t < end) {
        if (gap_ns > 0) {
            uint64_t due = t0 + (uint64_t)((double)attempts * gap_ns);
            while ((t = now_ns()) < due) {
                if (due - t > 200000) {
                    struct timespec ts = {0, (long)(due - t - 100000)};
                    nanosleep(&ts, NULL);
                }
            }
            if (t >= end) break;
        }
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) { other_errno = errno; other++; break; }
        int rc = connect(fd, (const struct sockaddr *)&sa, sizeof sa);
        if (rc == 0) ok++;
        else if (errno == EPERM) eperm++;
        else { if (!other_errno) other_errno = errno; other++; }
        close(fd);
        attempts++;
        t = now_ns();
    }
    double el = (double)(now_ns() - t0) / 1e9;
    printf("{\"attempts\":%llu,\"eperm\":%llu,\"connected\":%llu,\"other_errors\":%llu,\"other_errno\":\"%s\","
           "\"elapsed_s\":%.4f,\"attempts_per_s\":%.0f,\"target_rate\":%.0f}\n",
           attempts, eperm, ok, other, other_errno ? strerrorname_np(other_errno) : "", el,
           el > 0 ? (double)attempts / el : 0.0, rate);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 4 && !strcmp(argv[1], "server")) return run_server(atoi(argv[2]), atoi(argv[3]));
    if (argc >= 6 && !strcmp(argv[1], "client"))
        return run_client(argv[2], atoi(argv[3]), atol(argv[4]), atof(argv[5]), argc > 6 ? atol(argv[6]) : 500);
    if (argc >= 5 && !strcmp(argv[1], "probe")) return run_probe(argv[2], atoi(argv[3]), atoi(argv[4]));
    if (argc >= 4 && !strcmp(argv[1], "udpsink")) return run_udpsink(atoi(argv[2]), atoi(argv[3]));
    if (argc >= 6 && !strcmp(argv[1], "udpblast"))
        return run_udpblast(argv[2], atoi(argv[3]), atof(argv[4]), atoi(argv[5]), argc > 6 && !strcmp(argv[6], "unconnected"));
    if (argc >= 5 && !strcmp(argv[1], "denyloop"))
        return run_denyloop(argv[2], atoi(argv[3]), atof(argv[4]), argc > 5 ? atof(argv[5]) : 0);
    fprintf(stderr,
            "usage: %s server PORT MAXSEC | client IP PORT COUNT MAXSEC [WARMUP] | probe IP PORT TIMEOUT_MS\n"
            "       | udpsink PORT MAXSEC | udpblast IP PORT SECS LEN [unconnected]\n"
            "       | denyloop IP PORT SECS [RATE]\n",
            argv[0]);
    return 2;
}
