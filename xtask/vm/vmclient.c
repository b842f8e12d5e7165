/* vmclient: the socket calls the VM suite (xtask/vm/init.sh) checks, one per invocation.
 *
 * Built here with `cc -static` and shipped in the initramfs: the guest has busybox but no python.
 * Every command prints one line, `ok ...` or `err NAME ...` (NAME is the errno's name), and exits
 * 0 for ok, 1 otherwise, so the init script compares the outcome with what the policy says.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_ether.h>
#include <netinet/in.h>
#include <netinet/ip_icmp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char *errname(int e) {
    switch (e) {
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    case ENETUNREACH: return "ENETUNREACH";
    case EINVAL: return "EINVAL";
    case EAGAIN: return "EAGAIN";
    default: return "EOTHER";
    }
}

static int fail(const char *what, int e) {
    printf("err %s %s (%d)\n", errname(e), what, e);
    return 1;
}

/* Fills `ss` from a numeric IPv4 or IPv6 address and a port; returns the length or 0. */
static socklen_t sockaddr_of(const char *host, int port, struct sockaddr_storage *ss) {
    memset(ss, 0, sizeof(*ss));
    struct sockaddr_in *v4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons(port);
        return sizeof(*v4);
    }
    if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(port);
        return sizeof(*v6);
    }
    fprintf(stderr, "not a numeric address: %s\n", host);
    exit(2);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* connect() with a deadline; a refused connection is retried until then (the server may still
 * be starting). Returns the connected fd, or -1 with errno set. */
static int connect_until(int type, const char *from, const char *host, int port, double seconds) {
    struct sockaddr_storage dst, src;
    socklen_t len = sockaddr_of(host, port, &dst);
    double deadline = now() + seconds;
    for (;;) {
        int fd = socket(dst.ss_family, type | SOCK_NONBLOCK, 0);
        if (fd < 0)
            return -1;
        if (from) {
            socklen_t slen = sockaddr_of(from, 0, &src);
            if (bind(fd, (struct sockaddr *)&src, slen) < 0)
                return -1;
        }
        int rc = connect(fd, (struct sockaddr *)&dst, len);
        if (rc < 0 && errno == EINPROGRESS) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            int left = (int)((deadline - now()) * 1000);
            if (poll(&p, 1, left > 0 ? left : 0) == 1) {
                int err = 0;
                socklen_t elen = sizeof(err);
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen);
                errno = err;
                rc = err ? -1 : 0;
            } else {
                errno = ETIMEDOUT;
            }
        }
        if (rc == 0) {
            int flags = fcntl(fd, F_GETFL);
            fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
            return fd;
        }
        int e = errno;
        close(fd);
        errno = e;
        if (e != ECONNREFUSED || now() > deadline)
            return -1;
        usleep(50000);
    }
}

/* tcp HOST PORT: connect (IPv4, IPv6 or v4-mapped on an AF_INET6 socket). */
static int cmd_tcp(const char *host, int port) {
    int fd = connect_until(SOCK_STREAM, NULL, host, port, 3);
    if (fd < 0)
        return fail("connect", errno);
    printf("ok connected\n");
    return 0;
}

/* udp HOST PORT: one unconnected sendto. udpc HOST PORT: connect, then send. */
static int cmd_udp(const char *host, int port, int connected) {
    struct sockaddr_storage dst;
    socklen_t len = sockaddr_of(host, port, &dst);
    int fd = socket(dst.ss_family, SOCK_DGRAM, 0);
    if (fd < 0)
        return fail("socket", errno);
    if (connected) {
        if (connect(fd, (struct sockaddr *)&dst, len) < 0)
            return fail("connect", errno);
        if (send(fd, "x", 1, 0) < 0)
            return fail("send", errno);
    } else if (sendto(fd, "x", 1, 0, (struct sockaddr *)&dst, len) < 0) {
        return fail("sendto", errno);
    }
    printf("ok sent\n");
    return 0;
}

/* ping HOST / raw HOST: one ICMP echo request over a ping socket or a raw socket (IPv4). */
static int cmd_icmp(const char *host, int type) {
    struct sockaddr_storage dst;
    socklen_t len = sockaddr_of(host, 0, &dst);
    int fd = socket(AF_INET, type, IPPROTO_ICMP);
    if (fd < 0)
        return fail("socket", errno);
    struct icmphdr echo = {.type = ICMP_ECHO};
    echo.un.echo.id = htons(getpid() & 0xffff);
    echo.un.echo.sequence = htons(1);
    /* One's-complement sum of the header's 16-bit words; ping sockets recompute it anyway. */
    uint32_t sum = (ICMP_ECHO << 8) + ntohs(echo.un.echo.id) + 1;
    sum = (sum & 0xffff) + (sum >> 16);
    echo.checksum = htons(~sum & 0xffff);
    if (sendto(fd, &echo, sizeof(echo), 0, (struct sockaddr *)&dst, len) < 0)
        return fail("sendto", errno);
    printf("ok sent\n");
    return 0;
}

/* packet: open an AF_PACKET socket (what the BPF LSM guard refuses). */
static int cmd_packet(void) {
    int fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (fd < 0)
        return fail("socket", errno);
    printf("ok opened\n");
    return 0;
}

/* tcpserve ADDR PORT: accept one connection, answer "hello", exit. */
static int cmd_tcpserve(const char *addr, int port) {
    struct sockaddr_storage me;
    socklen_t len = sockaddr_of(addr, port, &me);
    int fd = socket(me.ss_family, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&me, len) < 0 || listen(fd, 8) < 0)
        return fail("listen", errno);
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, 10000) != 1)
        return fail("accept", ETIMEDOUT);
    int conn = accept(fd, NULL, NULL);
    if (conn < 0)
        return fail("accept", errno);
    if (write(conn, "hello", 5) != 5)
        return fail("write", errno);
    close(conn);
    printf("ok served\n");
    return 0;
}

/* tcpget FROM HOST PORT: connect from FROM and read the server's greeting. */
static int cmd_tcpget(const char *from, const char *host, int port) {
    int fd = connect_until(SOCK_STREAM, from, host, port, 5);
    if (fd < 0)
        return fail("connect", errno);
    struct timeval tv = {.tv_sec = 3};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    char buf[16] = {0};
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    if (n <= 0)
        return fail("read", n < 0 ? errno : ETIMEDOUT);
    printf("ok got %s\n", buf);
    return 0;
}

/* udpserve ADDR PORT STRANGER: wait for one datagram, answer its sender (a reply), then try the
 * same to STRANGER (who never sent anything). Prints `ok reply=R stranger=S`. */
static int cmd_udpserve(const char *addr, int port, const char *stranger) {
    struct sockaddr_storage me, peer, other;
    socklen_t len = sockaddr_of(addr, port, &me);
    int fd = socket(me.ss_family, SOCK_DGRAM, 0);
    if (bind(fd, (struct sockaddr *)&me, len) < 0)
        return fail("bind", errno);
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, 10000) != 1)
        return fail("recvfrom", ETIMEDOUT);
    char buf[16];
    socklen_t plen = sizeof(peer);
    if (recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&peer, &plen) < 0)
        return fail("recvfrom", errno);
    const char *reply = sendto(fd, "r", 1, 0, (struct sockaddr *)&peer, plen) < 0 ? errname(errno) : "sent";
    socklen_t olen = sockaddr_of(stranger, ntohs(((struct sockaddr_in *)&peer)->sin_port), &other);
    const char *cold = sendto(fd, "s", 1, 0, (struct sockaddr *)&other, olen) < 0 ? errname(errno) : "sent";
    printf("ok reply=%s stranger=%s\n", reply, cold);
    return 0;
}

/* udpask FROM HOST PORT: send from FROM until the server answers (5 s at most). */
static int cmd_udpask(const char *from, const char *host, int port) {
    struct sockaddr_storage dst, src;
    socklen_t len = sockaddr_of(host, port, &dst);
    socklen_t slen = sockaddr_of(from, 0, &src);
    int fd = socket(dst.ss_family, SOCK_DGRAM, 0);
    if (bind(fd, (struct sockaddr *)&src, slen) < 0)
        return fail("bind", errno);
    double deadline = now() + 5;
    while (now() < deadline) {
        sendto(fd, "q", 1, 0, (struct sockaddr *)&dst, len);
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 200) == 1) {
            char buf[16];
            if (recv(fd, buf, sizeof(buf), 0) > 0) {
                printf("ok answered\n");
                return 0;
            }
        }
    }
    return fail("recv", ETIMEDOUT);
}

/* hammer HOST PORT STOPFILE: TCP connects to HOST:PORT, one after another, until STOPFILE exists
 * (120 s at most). A refused connection reached the port, so it got through the filter. Prints
 * `ok eperm=N through=M other=K`: during a daemon restart `through` must stay 0. */
static int cmd_hammer(const char *host, int port, const char *stop) {
    struct sockaddr_storage dst;
    socklen_t len = sockaddr_of(host, port, &dst);
    long eperm = 0, through = 0, other = 0;
    double deadline = now() + 120;
    while (access(stop, F_OK) != 0 && now() < deadline) {
        int fd = socket(dst.ss_family, SOCK_STREAM, 0);
        if (fd < 0)
            return fail("socket", errno);
        if (connect(fd, (struct sockaddr *)&dst, len) == 0 || errno == ECONNREFUSED)
            through++;
        else if (errno == EPERM)
            eperm++;
        else
            other++;
        close(fd);
    }
    printf("ok eperm=%ld through=%ld other=%ld\n", eperm, through, other);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *cmd = argc > 1 ? argv[1] : "";
    if (!strcmp(cmd, "tcp") && argc == 4)
        return cmd_tcp(argv[2], atoi(argv[3]));
    if (!strcmp(cmd, "udp") && argc == 4)
        return cmd_udp(argv[2], atoi(argv[3]), 0);
    if (!strcmp(cmd, "udpc") && argc == 4)
        return cmd_udp(argv[2], atoi(argv[3]), 1);
    if (!strcmp(cmd, "ping") && argc == 3)
        return cmd_icmp(argv[2], SOCK_DGRAM);
    if (!strcmp(cmd, "raw") && argc == 3)
        return cmd_icmp(argv[2], SOCK_RAW);
    if (!strcmp(cmd, "packet") && argc == 2)
        return cmd_packet();
    if (!strcmp(cmd, "tcpserve") && argc == 4)
        return cmd_tcpserve(argv[2], atoi(argv[3]));
    if (!strcmp(cmd, "tcpget") && argc == 5)
        return cmd_tcpget(argv[2], argv[3], atoi(argv[4]));
    if (!strcmp(cmd, "udpserve") && argc == 5)
        return cmd_udpserve(argv[2], atoi(argv[3]), argv[4]);
    if (!strcmp(cmd, "udpask") && argc == 5)
        return cmd_udpask(argv[2], argv[3], atoi(argv[4]));
    if (!strcmp(cmd, "hammer") && argc == 5)
        return cmd_hammer(argv[2], atoi(argv[3]), argv[4]);
    fprintf(stderr, "usage: vmclient tcp|udp|udpc HOST PORT | ping|raw HOST | packet |\n"
                    "       tcpserve ADDR PORT | tcpget FROM HOST PORT |\n"
                    "       udpserve ADDR PORT STRANGER | udpask FROM HOST PORT | hammer HOST PORT STOPFILE\n");
    return 2;
}
