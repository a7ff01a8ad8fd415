/*
 * c_floor: the physical floor of machipc's Linux path, measured in C.
 *
 * Raw AF_UNIX SOCK_SEQPACKET. The server sets SO_PASSCRED before listen(),
 * reads SCM_CREDENTIALS from every packet and checks that the pid the client
 * wrote into the payload is the pid the kernel reported. It pins that pid the
 * way machipc's transport does: a pidfd of the connecting process taken at
 * accept (SO_PEERCRED + SO_PEERPIDFD), and per packet from that pid one
 * pidfd_send_signal(pidfd, 0) showing the process still alive after the
 * packet was dequeued (so its pid cannot have been reused). Variants, set by
 * C_FLOOR_IDENTITY in the server's environment:
 *   pin      (default) as above: machipc's per-packet path;
 *   pidfd    SO_PASSPIDFD too: the kernel attaches a new pidfd to every
 *            packet, which the server closes (machipc's fallback for a
 *            connection used by a second process), no pin;
 *   nopidfd  credentials only: no pidfd at all.
 * Payloads above
 * 64 KiB travel as a fresh sealed memfd per message (SCM_RIGHTS); the server
 * maps it read-only and copies it out into a private buffer.
 *
 * Bench payload layout (shared with bench/peers.py), little-endian:
 *   0  u8   tag   'R' request (echoed), 'D' one-way data, 'M' one-way memfd,
 *                 'S' sync (seq = messages sent so far), replies 'Y' / 'E'
 *   4  u32  pid   the sender's own pid (the server compares it with the kernel's)
 *   8  u64  seq   per-connection sequence number (one-way: must be consecutive)
 *
 * Usage:
 *   c_floor serve PATH            server; prints READY when listening
 *   c_floor drive PATH            client driven by stdin commands, one JSON line each:
 *                                   rtt SIZE COUNT | oneway SIZE COUNT |
 *                                   batch SIZE COUNT BATCH | quit
 *   c_floor run MODE SIZE COUNT [BATCH]
 *                                 stand-alone: forks a server, runs MODE
 *                                 (rtt|oneway|batch) once, prints JSON
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SO_PASSPIDFD
#define SO_PASSPIDFD 76
#endif
#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif
#ifndef SCM_PIDFD
#define SCM_PIDFD 4
#endif
#ifndef MFD_ALLOW_SEALING
#define MFD_ALLOW_SEALING 2U
#endif

#define INLINE_MAX (64 * 1024)
#define PACKET_MAX (INLINE_MAX + 64)
#define MAX_FDS 4096
#define MAX_BATCH 256

struct hdr {
    uint8_t tag;
    uint8_t pad[3];
    uint32_t pid;
    uint64_t seq;
};
_Static_assert(sizeof(struct hdr) == 16, "bench header is 16 bytes");

struct memfd_pkt {
    struct hdr h;
    uint64_t size;
};

struct sync_reply {
    struct hdr h; /* tag 'Y', seq = messages received on this connection */
    uint64_t errors;
};

static void die(const char *what) {
    fprintf(stderr, "c_floor: %s: %s\n", what, strerror(errno));
    exit(2);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ server */

struct conn {
    int used;
    pid_t peer_pid; /* pin: the connecting process and its pidfd (-1: none) */
    int peer_pidfd;
    uint64_t next_seq, received, errors;
};

enum identity { PIN, PIDFD, NOPIDFD };
static enum identity identity = PIN;
static struct conn conns[MAX_FDS];
static unsigned char *copy_buf; /* private, reused copy of memfd payloads */
static size_t copy_cap;

static int receive_memfd(int fd, const struct memfd_pkt *p) {
    struct stat st;
    if (fstat(fd, &st) < 0 || (uint64_t)st.st_size != p->size || p->size < sizeof(struct hdr))
        return -1;
    int seals = fcntl(fd, F_GET_SEALS);
    int need = F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW;
    if (seals < 0 || (seals & need) != need)
        return -1;
    void *map = mmap(NULL, p->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED)
        return -1;
    if (copy_cap < p->size) {
        free(copy_buf);
        copy_buf = malloc(p->size);
        if (!copy_buf)
            die("malloc");
        copy_cap = p->size;
    }
    memcpy(copy_buf, map, p->size);
    munmap(map, p->size);
    const struct hdr *inner = (const struct hdr *)copy_buf;
    if (inner->pid != p->h.pid || inner->seq != p->h.seq)
        return -1;
    if (copy_buf[p->size - 1] != (uint8_t)p->h.seq)
        return -1;
    return 0;
}

/* Handle one packet; returns 0, or -1 when the connection ended. */
static int serve_one(int fd) {
    static unsigned char buf[PACKET_MAX];
    union {
        char raw[CMSG_SPACE(sizeof(struct ucred)) + CMSG_SPACE(sizeof(int)) + CMSG_SPACE(8 * sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {buf, sizeof buf};
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = ctl.raw;
    mh.msg_controllen = sizeof ctl.raw;
    ssize_t n = recvmsg(fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return 1;
        return -1;
    }
    if (n == 0 && mh.msg_controllen == 0)
        return -1;
    struct conn *c = &conns[fd];
    pid_t kpid = 0;
    int have_creds = 0, memfd = -1;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET)
            continue;
        if (cm->cmsg_type == SCM_CREDENTIALS) {
            struct ucred uc;
            memcpy(&uc, CMSG_DATA(cm), sizeof uc);
            kpid = uc.pid;
            have_creds = 1;
        } else if (cm->cmsg_type == SCM_PIDFD) {
            int pfd;
            memcpy(&pfd, CMSG_DATA(cm), sizeof pfd);
            if (pfd >= 0)
                close(pfd);
        } else if (cm->cmsg_type == SCM_RIGHTS) {
            size_t nfd = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < nfd; i++) {
                int f;
                memcpy(&f, CMSG_DATA(cm) + i * sizeof(int), sizeof f);
                if (memfd < 0)
                    memfd = f;
                else
                    close(f);
            }
        }
    }
    int bad = !have_creds || (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || n < (ssize_t)sizeof(struct hdr);
    struct hdr *h = (struct hdr *)buf;
    if (!bad && (pid_t)h->pid != kpid)
        bad = 1;
    if (!bad && identity == PIN && (kpid != c->peer_pid || syscall(SYS_pidfd_send_signal, c->peer_pidfd, 0, NULL, 0) < 0))
        bad = 1; /* not the pinned process, or it is gone: its pid may be another's now */
    switch (bad ? 0 : h->tag) {
    case 'R':
        if (send(fd, buf, (size_t)n, 0) < 0)
            return -1;
        break;
    case 'D':
    case 'M':
        if (h->tag == 'M') {
            if (memfd < 0 || n != sizeof(struct memfd_pkt) || receive_memfd(memfd, (struct memfd_pkt *)buf) < 0)
                c->errors++;
        }
        if (h->seq != c->next_seq)
            c->errors++;
        c->next_seq = h->seq + 1;
        c->received++;
        break;
    case 'S': {
        struct sync_reply r = {{'Y', {0}, 0, c->received}, c->errors};
        if (send(fd, &r, sizeof r, 0) < 0)
            return -1;
        break;
    }
    default: {
        c->errors++;
        struct hdr e = {'E', {0}, (uint32_t)kpid, 0};
        if (n >= (ssize_t)sizeof(struct hdr) && h->tag == 'R')
            send(fd, &e, sizeof e, 0);
        break;
    }
    }
    if (memfd >= 0)
        close(memfd);
    return 0;
}

static int listen_on(const char *path) {
    int ls = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (ls < 0)
        die("socket");
    int one = 1;
    if (setsockopt(ls, SOL_SOCKET, SO_PASSCRED, &one, sizeof one) < 0)
        die("SO_PASSCRED");
    if (identity == PIDFD && setsockopt(ls, SOL_SOCKET, SO_PASSPIDFD, &one, sizeof one) < 0)
        die("SO_PASSPIDFD");
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path) {
        errno = ENAMETOOLONG;
        die(path);
    }
    strcpy(sa.sun_path, path);
    unlink(path);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("bind");
    if (listen(ls, 128) < 0)
        die("listen");
    return ls;
}

static void serve(int ls) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev) < 0)
        die("epoll");
    struct epoll_event evs[64];
    for (;;) {
        int k = epoll_wait(ep, evs, 64, -1);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < k; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                int cfd = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
                if (cfd < 0)
                    continue;
                if (cfd >= MAX_FDS) {
                    close(cfd);
                    continue;
                }
                struct conn *c = &conns[cfd];
                memset(c, 0, sizeof *c);
                c->used = 1;
                c->peer_pidfd = -1;
                if (identity == PIN) {
                    struct ucred uc;
                    socklen_t n = sizeof uc, m = sizeof c->peer_pidfd;
                    if (getsockopt(cfd, SOL_SOCKET, SO_PEERCRED, &uc, &n) < 0 ||
                        getsockopt(cfd, SOL_SOCKET, SO_PEERPIDFD, &c->peer_pidfd, &m) < 0)
                        die("SO_PEERCRED/SO_PEERPIDFD");
                    c->peer_pid = uc.pid;
                }
                struct epoll_event cev = {.events = EPOLLIN, .data.fd = cfd};
                epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev);
                continue;
            }
            /* up to 64 packets per connection per turn, then the next one */
            for (int j = 0; j < 64; j++) {
                int r = serve_one(fd);
                if (r < 0) {
                    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                    close(fd);
                    if (conns[fd].peer_pidfd >= 0)
                        close(conns[fd].peer_pidfd);
                    conns[fd].used = 0;
                    break;
                }
                if (r > 0)
                    break;
            }
        }
    }
}

/* ------------------------------------------------------------------ client */

struct client {
    int fd;
    uint32_t pid;
    uint64_t sent; /* one-way messages sent on this connection */
    unsigned char *buf, *rbuf;
    size_t cap;
};

static void client_connect(struct client *c, const char *path) {
    c->fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        die("socket");
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strncpy(sa.sun_path, path, sizeof sa.sun_path - 1);
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("connect");
    c->pid = (uint32_t)getpid();
    c->sent = 0;
    c->cap = PACKET_MAX;
    c->buf = calloc(1, c->cap);
    c->rbuf = calloc(1, PACKET_MAX);
    if (!c->buf || !c->rbuf)
        die("calloc");
}

static void ensure(struct client *c, size_t size) {
    if (size > c->cap) {
        free(c->buf);
        c->buf = calloc(1, size);
        if (!c->buf)
            die("calloc");
        c->cap = size;
    }
}

/* Send a sync and check that the server got every message, in order, from our pid. */
static uint64_t sync_check(struct client *c) {
    struct hdr s = {'S', {0}, c->pid, c->sent};
    if (send(c->fd, &s, sizeof s, 0) < 0)
        die("send sync");
    struct sync_reply r;
    ssize_t n = recv(c->fd, &r, sizeof r, 0);
    if (n != sizeof r || r.h.tag != 'Y')
        return 1;
    return r.errors + (r.h.seq != c->sent);
}

static uint64_t do_rtt(struct client *c, size_t size, uint64_t count) {
    if (size < sizeof(struct hdr) || size > INLINE_MAX)
        return count;
    ensure(c, size);
    uint64_t errors = 0;
    struct hdr *h = (struct hdr *)c->buf;
    for (uint64_t i = 0; i < count; i++) {
        *h = (struct hdr){'R', {0}, c->pid, i};
        if (send(c->fd, c->buf, size, 0) != (ssize_t)size)
            die("send");
        ssize_t n = recv(c->fd, c->rbuf, PACKET_MAX, 0);
        if (n != (ssize_t)size || memcmp(c->rbuf, c->buf, size) != 0)
            errors++;
    }
    return errors;
}

static int send_memfd(struct client *c, size_t size) {
    int mfd = memfd_create("c_floor", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (mfd < 0)
        die("memfd_create");
    size_t off = 0;
    while (off < size) {
        ssize_t w = write(mfd, c->buf + off, size - off);
        if (w < 0)
            die("write memfd");
        off += (size_t)w;
    }
    if (fcntl(mfd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
        die("F_ADD_SEALS");
    struct memfd_pkt p = {*(struct hdr *)c->buf, size};
    p.h.tag = 'M';
    union {
        char raw[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {&p, sizeof p};
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = ctl.raw;
    mh.msg_controllen = sizeof ctl.raw;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &mfd, sizeof mfd);
    ssize_t n = sendmsg(c->fd, &mh, 0);
    close(mfd);
    return n == sizeof p ? 0 : -1;
}

static uint64_t do_oneway(struct client *c, size_t size, uint64_t count) {
    if (size < sizeof(struct hdr))
        return count;
    ensure(c, size);
    struct hdr *h = (struct hdr *)c->buf;
    for (uint64_t i = 0; i < count; i++) {
        *h = (struct hdr){'D', {0}, c->pid, c->sent};
        c->buf[size - 1] = (uint8_t)c->sent;
        if (size > INLINE_MAX) {
            if (send_memfd(c, size) < 0)
                die("sendmsg memfd");
        } else if (send(c->fd, c->buf, size, 0) != (ssize_t)size) {
            die("send");
        }
        c->sent++;
    }
    return sync_check(c);
}

static uint64_t do_batch(struct client *c, size_t size, uint64_t count, unsigned batch) {
    if (size < sizeof(struct hdr) || size > INLINE_MAX || batch == 0 || batch > MAX_BATCH)
        return count;
    static unsigned char *bufs;
    static size_t bufs_size;
    if (bufs_size != size) {
        free(bufs);
        bufs = calloc(MAX_BATCH, size);
        if (!bufs)
            die("calloc");
        bufs_size = size;
    }
    struct mmsghdr mm[MAX_BATCH];
    struct iovec iov[MAX_BATCH];
    uint64_t done = 0;
    while (done < count) {
        unsigned k = (count - done) < batch ? (unsigned)(count - done) : batch;
        for (unsigned j = 0; j < k; j++) {
            unsigned char *b = bufs + (size_t)j * size;
            *(struct hdr *)b = (struct hdr){'D', {0}, c->pid, c->sent + j};
            iov[j] = (struct iovec){b, size};
            memset(&mm[j], 0, sizeof mm[j]);
            mm[j].msg_hdr.msg_iov = &iov[j];
            mm[j].msg_hdr.msg_iovlen = 1;
        }
        unsigned off = 0;
        while (off < k) {
            int r = sendmmsg(c->fd, mm + off, k - off, 0);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                die("sendmmsg");
            }
            off += (unsigned)r;
        }
        c->sent += k;
        done += k;
    }
    return sync_check(c);
}

static void emit(const char *op, size_t size, uint64_t count, unsigned batch, uint64_t ns, uint64_t errors) {
    double secs = ns / 1e9;
    printf("{\"op\": \"%s\", \"size\": %zu, \"count\": %llu, \"batch\": %u, \"ns\": %llu, \"errors\": %llu, "
           "\"us_per_msg\": %.3f, \"msg_per_s\": %.0f, \"gb_per_s\": %.4f, \"pid\": %u}\n",
           op, size, (unsigned long long)count, batch, (unsigned long long)ns, (unsigned long long)errors,
           count ? secs * 1e6 / count : 0.0, secs > 0 ? count / secs : 0.0, secs > 0 ? count * (double)size / secs / 1e9 : 0.0,
           (unsigned)getpid());
    fflush(stdout);
}

static uint64_t run_op(struct client *c, const char *op, size_t size, uint64_t count, unsigned batch) {
    if (strcmp(op, "rtt") == 0)
        return do_rtt(c, size, count);
    if (strcmp(op, "oneway") == 0)
        return do_oneway(c, size, count);
    if (strcmp(op, "batch") == 0)
        return do_batch(c, size, count, batch);
    fprintf(stderr, "c_floor: unknown op %s\n", op);
    return count ? count : 1;
}

static void drive(const char *path) {
    struct client c;
    client_connect(&c, path);
    printf("READY %u\n", c.pid);
    fflush(stdout);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        char op[32];
        unsigned long long size = 0, count = 0;
        unsigned batch = 0;
        int k = sscanf(line, "%31s %llu %llu %u", op, &size, &count, &batch);
        if (k < 1 || strcmp(op, "quit") == 0)
            break;
        uint64_t t0 = now_ns();
        uint64_t errors = run_op(&c, op, (size_t)size, count, batch);
        uint64_t t1 = now_ns();
        emit(op, (size_t)size, count, batch, t1 - t0, errors);
    }
}

static void usage(void) {
    fprintf(stderr, "usage: c_floor serve PATH | drive PATH | run rtt|oneway|batch SIZE COUNT [BATCH]\n");
    exit(2);
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    const char *id = getenv("C_FLOOR_IDENTITY");
    if (id && strcmp(id, "pidfd") == 0)
        identity = PIDFD;
    else if (id && strcmp(id, "nopidfd") == 0)
        identity = NOPIDFD;
    else if (id && *id && strcmp(id, "pin") != 0)
        usage();
    if (argc == 3 && strcmp(argv[1], "serve") == 0) {
        int ls = listen_on(argv[2]);
        printf("READY %d\n", (int)getpid());
        fflush(stdout);
        serve(ls);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "drive") == 0) {
        drive(argv[2]);
        return 0;
    }
    if ((argc == 5 || argc == 6) && strcmp(argv[1], "run") == 0) {
        char path[108];
        snprintf(path, sizeof path, "/tmp/c_floor.%d.sock", (int)getpid());
        int ls = listen_on(path);
        pid_t srv = fork();
        if (srv < 0)
            die("fork");
        if (srv == 0) {
            serve(ls);
            _exit(0);
        }
        close(ls);
        struct client c;
        client_connect(&c, path);
        size_t size = strtoull(argv[3], NULL, 10);
        uint64_t count = strtoull(argv[4], NULL, 10);
        unsigned batch = argc == 6 ? (unsigned)strtoul(argv[5], NULL, 10) : 32;
        run_op(&c, argv[2], size, count / 10 + 1, batch); /* warm-up */
        uint64_t t0 = now_ns();
        uint64_t errors = run_op(&c, argv[2], size, count, batch);
        uint64_t t1 = now_ns();
        emit(argv[2], size, count, batch, t1 - t0, errors);
        kill(srv, SIGTERM);
        waitpid(srv, NULL, 0);
        unlink(path);
        return errors ? 1 : 0;
    }
    usage();
    return 2;
}
