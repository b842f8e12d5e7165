/* connect() and sendto() through io_uring, which bypasses seccomp but not the cgroup hooks.
 * Usage: uring_connect tcp|udp IPV4 PORT; prints "ok" or the errno name. */
#include <arpa/inet.h>
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    int udp = strcmp(argv[1], "udp") == 0;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    inet_pton(AF_INET, argv[2], &addr.sin_addr);
    int fd = socket(AF_INET, udp ? SOCK_DGRAM : SOCK_STREAM, 0);
    struct io_uring ring;
    if (fd < 0 || io_uring_queue_init(4, &ring, 0) < 0)
        return 3;
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    char payload[] = "x";
    struct iovec iov = {.iov_base = payload, .iov_len = 1};
    struct msghdr msg = {.msg_name = &addr, .msg_namelen = sizeof(addr), .msg_iov = &iov, .msg_iovlen = 1};
    if (udp)
        io_uring_prep_sendmsg(sqe, fd, &msg, 0);
    else
        io_uring_prep_connect(sqe, fd, (struct sockaddr *)&addr, sizeof(addr));
    io_uring_submit(&ring);
    struct io_uring_cqe *cqe;
    if (io_uring_wait_cqe(&ring, &cqe) < 0)
        return 4;
    int res = cqe->res;
    if (res >= 0)
        printf("ok\n");
    else if (res == -EPERM)
        printf("EPERM\n");
    else
        printf("errno %d\n", -res);
    return 0;
}
