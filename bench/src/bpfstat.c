// SPDX-License-Identifier: GPL-2.0
// bpfstat: what the benchmark needs from bpftool, without bpftool (Debian 12 does not ship it
// in a package of its own). One JSON object per line on stdout.
//
//   bpfstat progs CGROUP_DIR
//       every program attached to CGROUP_DIR, per cgroup hook: id, name, hook, run_cnt and
//       run_time_ns (counted only while kernel.bpf_stats_enabled=1).
//   bpfstat maps PID
//       every BPF map PID holds an fd of: id, name, type, max_entries and memlock (the kernel's
//       own estimate of the map's memory, from /proc/PID/fdinfo), each map once.
//
// Part of egress's benchmark (bench/, run by `cargo xtask bench`). Build: cc -O2 bpfstat.c -lbpf
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <bpf/bpf.h>

static const struct {
    enum bpf_attach_type type;
    const char *hook;
} HOOKS[] = {
    {BPF_CGROUP_INET4_CONNECT, "connect4"},   {BPF_CGROUP_INET6_CONNECT, "connect6"},
    {BPF_CGROUP_UDP4_SENDMSG, "sendmsg4"},    {BPF_CGROUP_UDP6_SENDMSG, "sendmsg6"},
    {BPF_CGROUP_UDP4_RECVMSG, "recvmsg4"},    {BPF_CGROUP_UDP6_RECVMSG, "recvmsg6"},
    {BPF_CGROUP_INET_EGRESS, "skb_egress"},   {BPF_CGROUP_INET_INGRESS, "skb_ingress"},
    {BPF_CGROUP_INET_SOCK_CREATE, "sock_create"}, {BPF_CGROUP_SOCK_OPS, "sock_ops"},
    {BPF_CGROUP_INET_SOCK_RELEASE, "sock_release"},
};

static int progs(const char *cgroup_dir) {
    int cg = open(cgroup_dir, O_RDONLY | O_DIRECTORY);
    if (cg < 0) { perror(cgroup_dir); return 1; }
    for (size_t h = 0; h < sizeof HOOKS / sizeof HOOKS[0]; h++) {
        __u32 ids[64], cnt = 64, flags = 0;
        if (bpf_prog_query(cg, HOOKS[h].type, 0, &flags, ids, &cnt)) continue;
        for (__u32 i = 0; i < cnt; i++) {
            int fd = bpf_prog_get_fd_by_id(ids[i]);
            if (fd < 0) continue;
            struct bpf_prog_info info;
            __u32 len = sizeof info;
            memset(&info, 0, sizeof info);
            if (bpf_obj_get_info_by_fd(fd, &info, &len) == 0)
                printf("{\"hook\":\"%s\",\"id\":%u,\"name\":\"%s\",\"run_cnt\":%llu,\"run_time_ns\":%llu,"
                       "\"xlated_bytes\":%u,\"jited_bytes\":%u}\n",
                       HOOKS[h].hook, info.id, info.name, (unsigned long long)info.run_cnt,
                       (unsigned long long)info.run_time_ns, info.xlated_prog_len, info.jited_prog_len);
            close(fd);
        }
    }
    close(cg);
    return 0;
}

/* The value of a "key:\tvalue" line of an fdinfo file, or -1. */
static long long fdinfo_field(const char *text, const char *key) {
    size_t klen = strlen(key);
    for (const char *line = text; line && *line; line = strchr(line, '\n'), line = line ? line + 1 : NULL)
        if (!strncmp(line, key, klen) && line[klen] == ':') return atoll(line + klen + 1);
    return -1;
}

static int maps(const char *pid) {
    char path[600], target[256], text[4096];
    snprintf(path, sizeof path, "/proc/%s/fd", pid);
    DIR *dir = opendir(path);
    if (!dir) { perror(path); return 1; }
    __u32 seen[1024];
    size_t nseen = 0;
    struct dirent *d;
    while ((d = readdir(dir))) {
        if (d->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "/proc/%s/fd/%s", pid, d->d_name);
        ssize_t n = readlink(path, target, sizeof target - 1);
        if (n < 0) continue;
        target[n] = 0;
        if (strcmp(target, "anon_inode:bpf-map")) continue;
        snprintf(path, sizeof path, "/proc/%s/fdinfo/%s", pid, d->d_name);
        int fd = open(path, O_RDONLY);
        if (fd < 0) continue;
        n = read(fd, text, sizeof text - 1);
        close(fd);
        if (n <= 0) continue;
        text[n] = 0;
        long long id = fdinfo_field(text, "map_id"), memlock = fdinfo_field(text, "memlock");
        int dup = 0;
        for (size_t i = 0; i < nseen; i++) dup |= seen[i] == (__u32)id;
        if (id < 0 || dup) continue;
        if (nseen < sizeof seen / sizeof seen[0]) seen[nseen++] = (__u32)id;
        struct bpf_map_info info;
        __u32 len = sizeof info;
        memset(&info, 0, sizeof info);
        int mfd = bpf_map_get_fd_by_id((__u32)id);
        if (mfd >= 0) {
            bpf_obj_get_info_by_fd(mfd, &info, &len);
            close(mfd);
        }
        printf("{\"id\":%lld,\"name\":\"%s\",\"type\":%lld,\"max_entries\":%lld,\"memlock\":%lld}\n", id,
               info.name, fdinfo_field(text, "map_type"), fdinfo_field(text, "max_entries"), memlock);
    }
    closedir(dir);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "progs")) return progs(argv[2]);
    if (argc == 3 && !strcmp(argv[1], "maps")) return maps(argv[2]);
    fprintf(stderr, "usage: %s progs CGROUP_DIR | maps PID\n", argv[0]);
    return 2;
}
