/* A machipc client written from docs/protocol.md alone (no machipc code): the spec's second,
 * independent implementation. tests/test_conformance.py builds it with $(CC) and runs it
 * against both of machipc's transports.
 *
 *   client PATH hello               print the server's HELLO limits
 *   client PATH inline              requests of 4, 0 and 65,536 bytes, inline both ways
 *   client PATH many N              N requests outstanding at once, answered in any order
 *   client PATH memfd SIZE          a SIZE-byte request as a sealed memfd, answer as a memfd
 *   client PATH arena CAP N SIZE    N one-way SIZE-byte messages through one CAP-byte arena,
 *                                   then the skipped-tail case (3/8 then 6/8 of the ring)
 *                                   and a request to sync; prints "waiting" when it first has
 *                                   to wait for the receiver to release ring space
 *
 * Payload bytes are pattern(seed, i) = (seed * 31 + i * 7) & 0xff; the server echoes requests.
 * Exit status 0 and "ok ..." on stdout on success; "FAIL: ..." on stderr and 1 otherwise.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the arena's release word is read with a native load: little-endian hosts only"
#endif

enum { MAGIC = 0x696d, VERSION = 2, HEADER = 24, INLINE_MAX = 65536, PACKET_MAX = HEADER + INLINE_MAX };
enum { MESSAGE = 1, REQUEST = 2, REPLY = 3, ERROR = 4, HELLO = 5 };
enum { PAYLOAD_FD = 1, ARENA = 2 };
enum { CONTROL = 4096, REF = 24 };
#define ALL_SEALS (F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
#define ARENA_SEALS (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)

static const uint64_t MY_LIMIT = 256u << 20; /* largest answer this client accepts */

static void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("FAIL: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void put16(uint8_t *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = v >> (8 * i); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = v >> (8 * i); }
static uint64_t get(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static uint8_t pattern(uint64_t seed, uint64_t i) { return (uint8_t)(seed * 31 + i * 7); }
static void fill(uint8_t *p, uint64_t n, uint64_t seed) { for (uint64_t i = 0; i < n; i++) p[i] = pattern(seed, i); }
static int matches(const uint8_t *p, uint64_t n, uint64_t seed) {
    for (uint64_t i = 0; i < n; i++) if (p[i] != pattern(seed, i)) return 0;
    return 1;
}

static void header(uint8_t *h, int kind, uint32_t flags, uint64_t id, uint64_t length) {
    put16(h, MAGIC);
    h[2] = VERSION;
    h[3] = kind;
    put32(h + 4, flags);
    put64(h + 8, id);
    put64(h + 16, length);
}

/* -- sending (spec §5) ------------------------------------------------------------------ */

/* One sendmsg: header + body, and fd (or -1) as the only SCM_RIGHTS fd. Waits while full. */
static void send_packet(int s, const uint8_t *h, const void *body, size_t n, int fd) {
    struct iovec iov[2] = {{(void *)h, HEADER}, {(void *)body, n}};
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } ctl;
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = n ? 2 : 1};
    if (fd >= 0) {
        memset(&ctl, 0, sizeof ctl);
        msg.msg_control = ctl.buf;
        msg.msg_controllen = sizeof ctl.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    if (sendmsg(s, &msg, 0) != (ssize_t)(HEADER + n)) fail("sendmsg: %s", strerror(errno));
}

static void send_inline(int s, int kind, uint64_t id, const void *data, size_t n) {
    uint8_t h[HEADER];
    header(h, kind, 0, id, n);
    send_packet(s, h, data, n, -1);
}

/* §5.2: fill through a shared mapping, drop it, then seal (F_SEAL_WRITE fails while it exists). */
static void send_memfd(int s, int kind, uint64_t id, uint64_t n, uint64_t seed) {
    int fd = memfd_create("c-client", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0 || ftruncate(fd, n) != 0) fail("memfd: %s", strerror(errno));
    uint8_t *m = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) fail("mmap: %s", strerror(errno));
    fill(m, n, seed);
    munmap(m, n);
    if (fcntl(fd, F_ADD_SEALS, ALL_SEALS) != 0) fail("F_ADD_SEALS: %s", strerror(errno));
    uint8_t h[HEADER];
    header(h, kind, PAYLOAD_FD, id, n);
    send_packet(s, h, NULL, 0, fd);
    close(fd);
}

/* -- receiving (spec §9) ---------------------------------------------------------------- */

struct answer {
    int kind;
    uint64_t id;
    const uint8_t *data; /* the payload: in buf, or a private read-only mapping of a memfd */
    uint64_t length;
    uint8_t *mapped;     /* non-NULL: munmap(mapped, length) when done */
};

static uint8_t buf[PACKET_MAX];
static uint64_t limits[4]; /* from HELLO: max_size, arena_capacity, arenas, inline_max */
static int have_hello;

/* The §5.2 receiver checks on an answer's memfd, then a private read-only mapping. */
static uint8_t *map_sealed(int fd, uint64_t length) {
    struct stat st;
    int seals = fcntl(fd, F_GET_SEALS);
    if (length == 0 || length > MY_LIMIT) fail("memfd answer of %llu bytes", (unsigned long long)length);
    if (seals < 0 || (seals & ALL_SEALS) != ALL_SEALS) fail("answer memfd not fully sealed (%d)", seals);
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size != length)
        fail("answer memfd size %lld != length %llu", (long long)st.st_size, (unsigned long long)length);
    uint8_t *m = mmap(NULL, length, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
    if (m == MAP_FAILED) fail("mmap answer: %s", strerror(errno));
    close(fd);
    return m;
}

/* The next packet from the server; a HELLO (it comes first) is kept in `limits`. */
static void read_packet(int s, struct answer *a) {
    union { char b[CMSG_SPACE(4 * sizeof(int))]; struct cmsghdr align; } ctl;
    struct iovec iov = {buf, sizeof buf};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b, .msg_controllen = sizeof ctl.b};
    ssize_t n = recvmsg(s, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0) fail("recvmsg: %s", strerror(errno));
    if (n == 0) fail("the server closed the connection");
    int fds[4], nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
            for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int) && nfds < 4; i++)
                memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
    if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) fail("truncated packet from the server");
    if (n < HEADER) fail("short packet (%zd bytes)", n);
    a->kind = buf[3];
    uint32_t flags = get(buf + 4, 4);
    a->id = get(buf + 8, 8);
    a->length = get(buf + 16, 8);
    a->mapped = NULL;
    if (get(buf, 2) != MAGIC) fail("bad magic");
    if (buf[2] != VERSION && a->kind != ERROR) fail("version %d", buf[2]);
    if (a->kind != REPLY && a->kind != ERROR && a->kind != HELLO) fail("kind %d", a->kind);
    if ((a->id == 0) != (a->kind == HELLO)) fail("request id %llu on kind %d", (unsigned long long)a->id, a->kind);
    if (flags == PAYLOAD_FD && a->kind == REPLY) {
        if (nfds != 1 || n != HEADER) fail("memfd answer with %d fds and %zd bytes", nfds, n);
        a->data = a->mapped = map_sealed(fds[0], a->length);
    } else {
        for (int i = 0; i < nfds; i++) close(fds[i]);
        if (flags != 0 || nfds) fail("answer with flags %u and %d fds", flags, nfds);
        if (a->length != (uint64_t)(n - HEADER)) fail("length %llu in a %zd-byte packet", (unsigned long long)a->length, n);
        a->data = buf + HEADER;
    }
    if (a->kind == ERROR && a->length < 2) fail("error without a code");
    if (a->kind != HELLO) return;
    if (have_hello) fail("a second HELLO");
    if (a->length < 24) fail("HELLO of %llu bytes", (unsigned long long)a->length);
    limits[0] = get(a->data, 8);
    limits[1] = get(a->data + 8, 8);
    limits[2] = get(a->data + 16, 4);
    limits[3] = get(a->data + 20, 4);
    have_hello = 1;
}

/* The next answer (REPLY or ERROR), past the HELLO. */
static void next_answer(int s, struct answer *a) {
    do read_packet(s, a); while (a->kind == HELLO);
}

static void release_answer(struct answer *a) {
    if (a->mapped) munmap(a->mapped, a->length);
}

/* One request's answer, which must be a REPLY echoing `seed`'s pattern of n bytes. */
static void expect_echo(int s, uint64_t id, uint64_t n, uint64_t seed) {
    struct answer a;
    next_answer(s, &a);
    if (a.id != id) fail("answer for %llu, expected %llu", (unsigned long long)a.id, (unsigned long long)id);
    if (a.kind == ERROR)
        fail("error %llu: %.*s", (unsigned long long)get(a.data, 2), (int)(a.length - 2), (const char *)a.data + 2);
    if (a.length != n || !matches(a.data, n, seed)) fail("reply to %llu: wrong bytes", (unsigned long long)id);
    release_answer(&a);
}

/* -- the arena (spec §5.3) --------------------------------------------------------------- */

struct arena {
    int fd;
    uint8_t *map;
    uint64_t cap, head;
    uint32_t id;
    int announced; /* a non-zero release was seen: the receiver holds it */
    int waited;
};

static void arena_make(struct arena *r, uint64_t cap, uint32_t id) {
    memset(r, 0, sizeof *r);
    r->cap = cap;
    r->id = id;
    r->fd = memfd_create("c-arena", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (r->fd < 0 || ftruncate(r->fd, CONTROL + cap) != 0) fail("arena: %s", strerror(errno));
    if (fcntl(r->fd, F_ADD_SEALS, ARENA_SEALS) != 0) fail("arena seals: %s", strerror(errno));
    /* §5.3: pre-faulted, so the ring has no holes (a receiver refuses those) */
    r->map = mmap(NULL, CONTROL + cap, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, 0);
    if (r->map == MAP_FAILED) fail("arena mmap: %s", strerror(errno));
}

static uint64_t arena_release(struct arena *r) { return __atomic_load_n((uint64_t *)r->map, __ATOMIC_ACQUIRE); }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void arena_send(int s, struct arena *r, int kind, uint64_t id, uint64_t n, uint64_t seed) {
    if (n == 0 || n > r->cap) fail("%llu bytes do not fit the arena", (unsigned long long)n);
    uint64_t start = r->head;
    if (start % r->cap + n > r->cap) start += r->cap - start % r->cap; /* never wrap a region */
    uint64_t end = start + n;
    double deadline = now() + 60;
    for (;;) {
        uint64_t rel = arena_release(r);
        if (rel == r->head || end - rel <= r->cap) break; /* empty, or no overlap with [rel, head) */
        if (!r->waited++) { puts("waiting"); fflush(stdout); }
        if (now() > deadline) fail("the receiver released nothing for 60 s");
        usleep(200);
    }
    fill(r->map + CONTROL + start % r->cap, n, seed);
    r->head = end;
    if (!r->announced && arena_release(r) != 0) r->announced = 1;
    uint8_t h[HEADER], ref[REF];
    header(h, kind, ARENA | (r->announced ? 0 : PAYLOAD_FD), id, n);
    put32(ref, r->id);
    put32(ref + 4, 0);
    put64(ref + 8, start % r->cap);
    put64(ref + 16, end);
    send_packet(s, h, ref, REF, r->announced ? -1 : r->fd);
}

/* -- scenarios ---------------------------------------------------------------------------- */

static int connect_to(const char *path) {
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path) fail("path longer than sun_path");
    strcpy(sa.sun_path, path);
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof sa) != 0) fail("connect %s: %s", path, strerror(errno));
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(s, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) fail("SO_PEERCRED: %s", strerror(errno));
    if (cred.uid != 0 && cred.uid != geteuid()) fail("server uid %u is neither root nor me", cred.uid);
    return s;
}

static void many(int s, int count) {
    /* ids near 2**63: all 64 bits travel. Send and read interleaved, so neither queue stalls. */
    const uint64_t base = (1ull << 63) + 1000;
    char *seen = calloc(count, 1);
    int sent = 0, got = 0;
    while (got < count) {
        struct pollfd p = {s, POLLIN | (sent < count ? POLLOUT : 0), 0};
        if (poll(&p, 1, 60000) <= 0) fail("no progress for 60 s");
        if (p.revents & POLLIN) {
            struct answer a;
            read_packet(s, &a);  /* one packet per readiness: the HELLO is not an answer */
            if (a.kind == HELLO) continue;
            uint64_t k = a.id - base;
            if (k >= (uint64_t)count || seen[k]++) fail("unexpected or repeated answer %llu", (unsigned long long)a.id);
            char want[32];
            int n = snprintf(want, sizeof want, "request %llu", (unsigned long long)k);
            if (a.kind != REPLY || a.length != (uint64_t)n || memcmp(a.data, want, n)) fail("wrong answer to %llu", (unsigned long long)k);
            got++;
        } else if (p.revents & POLLOUT) {
            char text[32];
            int n = snprintf(text, sizeof text, "request %d", sent);
            send_inline(s, REQUEST, base + sent, text, n);
            sent++;
        } else {
            fail("poll: revents %d", p.revents);
        }
    }
    free(seen);
    printf("ok many %d\n", count);
}

int main(int argc, char **argv) {
    if (argc < 3) fail("usage: client PATH hello|inline|many N|memfd SIZE|arena CAP N SIZE");
    int s = connect_to(argv[1]);
    const char *what = argv[2];
    static uint8_t data[INLINE_MAX];
    if (!strcmp(what, "hello")) {
        struct answer a;
        send_inline(s, REQUEST, 1, "x", 1); /* the HELLO comes before this answer */
        next_answer(s, &a);
        printf("hello max_size=%llu arena_capacity=%llu arenas=%llu inline_max=%llu\n",
               (unsigned long long)limits[0], (unsigned long long)limits[1],
               (unsigned long long)limits[2], (unsigned long long)limits[3]);
    } else if (!strcmp(what, "inline")) {
        uint64_t sizes[] = {4, 0, INLINE_MAX};
        for (int i = 0; i < 3; i++) {
            fill(data, sizes[i], i + 1);
            send_inline(s, REQUEST, i + 1, data, sizes[i]);
            expect_echo(s, i + 1, sizes[i], i + 1);
        }
        if (!have_hello) fail("no HELLO came first");
        puts("ok inline");
    } else if (!strcmp(what, "many") && argc > 3) {
        many(s, atoi(argv[3]));
    } else if (!strcmp(what, "memfd") && argc > 3) {
        uint64_t n = strtoull(argv[3], NULL, 0);
        send_memfd(s, REQUEST, 7, n, 7);
        expect_echo(s, 7, n, 7);
        printf("ok memfd %llu\n", (unsigned long long)n);
    } else if (!strcmp(what, "arena") && argc > 5) {
        uint64_t cap = strtoull(argv[3], NULL, 0), size = strtoull(argv[5], NULL, 0);
        int count = atoi(argv[4]);
        struct arena r;
        arena_make(&r, cap, 42);
        for (int k = 0; k < count; k++) arena_send(s, &r, MESSAGE, 0, size, 100 + k);
        /* The skipped tail: once the ring is empty, 6/8 of it must go after 3/8 even though
         * tail + region exceed the capacity. */
        uint64_t a = cap / 8 * 3, b = cap / 8 * 6;
        arena_send(s, &r, REQUEST, 1, a, 1);
        expect_echo(s, 1, a, 1);
        while (arena_release(&r) != r.head) usleep(200); /* released after the copy, before the reply at the latest */
        arena_send(s, &r, REQUEST, 2, b, 2);
        expect_echo(s, 2, b, 2);
        if (!r.announced) fail("the server never released a region");
        printf("ok arena %d messages, waited %d times\n", count, r.waited);
    } else {
        fail("unknown scenario %s", what);
    }
    close(s);
    return 0;
}
