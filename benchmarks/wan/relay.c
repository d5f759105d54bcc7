/* The packet relay between the two TUN devices of a Link, in C: relay.py's model and protocol,
 * fast enough to carry 1 Gbit/s at MTU 1500 on a small machine.
 *
 * Run by wan.link.Link (which compiles it on demand), never by hand:
 *
 *   relay --sender-ns NS --receiver-ns NS --tun NAME --delay-ms D --loss P
 *         --rate-mbit R --queue-bytes Q --seed S [--cpu N]
 *
 * Same model as relay.py, per direction, applied to every packet read:
 *   1. loss: dropped with probability P, drawn from Python's own generator (MT19937 seeded the
 *      way random.Random(seed) seeds it, random() built the same way), so both relays drop the
 *      same packets of the same sequence for the same seed;
 *   2. rate: a FIFO serialised at R Mbit/s of IP bytes; a packet that would make the backlog
 *      exceed Q bytes is dropped (drop-tail);
 *   3. delay: written to the other TUN D ms after it left the queue.
 * Same protocol: {"ready": true, ...} on stdout once both devices exist; the counters as one
 * JSON line when stdin closes (or on SIGINT/SIGTERM); dies with its parent (PR_SET_PDEATHSIG).
 *
 * Why it is faster than relay.py: packets are read straight into a preallocated byte ring per
 * direction (no allocation, no copy; a lost packet is simply not committed), a wake-up drains
 * each TUN completely, and deliveries are timed by a timerfd armed at the earliest due packet
 * (nanosecond resolution, not epoll's millisecond). Memory is bounded: the ring holds what the
 * rate, the queue and the delay can keep in flight (at least 16 MiB, at most 512 MiB); a packet
 * that finds it full is dropped and counted ("ring_drops"; never on a rate-limited link, whose
 * ring is sized for its queue plus its delay line).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <linux/virtio_net.h>
#include <arpa/inet.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_PACKET (65536 + 16) /* an IP packet of up to 64 KiB after its virtio_net_hdr */
#define VNET ((int)sizeof(struct virtio_net_hdr))
#define HEADER 16
#define WRAP 0xFFFFFFFFu
#define BATCH 1024 /* packets read from one TUN per wake-up before deliveries are looked at again */

/* -- Python's random.Random: MT19937, init_by_array seeding, 53-bit random() */

struct mt {
    uint32_t state[624];
    int index;
};

static void mt_init_genrand(struct mt *m, uint32_t s) {
    m->state[0] = s;
    for (int i = 1; i < 624; i++)
        m->state[i] = 1812433253u * (m->state[i - 1] ^ (m->state[i - 1] >> 30)) + (uint32_t)i;
    m->index = 624;
}

static void mt_init_by_array(struct mt *m, const uint32_t *key, int length) {
    mt_init_genrand(m, 19650218u);
    int i = 1, j = 0;
    for (int k = 624 > length ? 624 : length; k; k--) {
        m->state[i] = (m->state[i] ^ ((m->state[i - 1] ^ (m->state[i - 1] >> 30)) * 1664525u)) + key[j] + (uint32_t)j;
        i++, j++;
        if (i >= 624) { m->state[0] = m->state[623]; i = 1; }
        if (j >= length) j = 0;
    }
    for (int k = 623; k; k--) {
        m->state[i] = (m->state[i] ^ ((m->state[i - 1] ^ (m->state[i - 1] >> 30)) * 1566083941u)) - (uint32_t)i;
        i++;
        if (i >= 624) { m->state[0] = m->state[623]; i = 1; }
    }
    m->state[0] = 0x80000000u;
    m->index = 624;
}

/* random.Random(seed) for a non-negative integer seed below 2**64: its 32-bit words, low first */
static void mt_seed(struct mt *m, uint64_t seed) {
    uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    mt_init_by_array(m, key, key[1] ? 2 : 1);
}

static uint32_t mt_next(struct mt *m) {
    if (m->index >= 624) {
        for (int k = 0; k < 624; k++) {
            uint32_t y = (m->state[k] & 0x80000000u) | (m->state[(k + 1) % 624] & 0x7fffffffu);
            m->state[k] = m->state[(k + 397) % 624] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
        }
        m->index = 0;
    }
    uint32_t y = m->state[m->index++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

static double mt_random(struct mt *m) {
    uint32_t a = mt_next(m) >> 5, b = mt_next(m) >> 6;
    return (a * 67108864.0 + b) * (1.0 / 9007199254740992.0);
}

/* -- one direction: loss, a rate-limited drop-tail queue, a fixed delay; packets in a byte ring */

struct counts {
    uint64_t packets, bytes, lost, queue_drops, delivered, write_errors, ring_drops;
};

struct direction {
    const char *name;
    int fd_in, fd_out;
    uint64_t delay_ns;
    double loss;
    double ns_per_byte; /* 0: unlimited */
    uint64_t queue_bytes;
    struct mt rng;
    unsigned char *ring;
    size_t cap, head, tail, entries;
    uint64_t free_at; /* ns: when the link has serialised what is queued */
    int offload;      /* packets carry a virtio_net_hdr and may be GSO batches of MTU-sized segments */
    struct counts c;
};

struct entry {
    uint64_t due;
    uint32_t len;
    uint32_t segments; /* the wire packets it stands for (more than one: a GSO batch) */
};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Where the next packet (up to MAX_PACKET) can be read into, or SIZE_MAX if the ring is full. */
static size_t ring_slot(struct direction *d) {
    const size_t need = HEADER + MAX_PACKET;
    if (!d->entries) d->head = d->tail = 0;
    if (d->tail >= d->head) {
        if (d->cap - d->tail >= need) return d->tail;
        if (need < d->head) return 0; /* wrap: the caller marks the rest of the ring unused */
        return SIZE_MAX;
    }
    return d->head - d->tail > need ? d->tail : SIZE_MAX;
}

static void ring_commit(struct direction *d, size_t at, uint64_t due, uint32_t len, uint32_t segments) {
    if (at == 0 && d->tail != 0 && d->cap - d->tail >= HEADER)
        ((struct entry *)(d->ring + d->tail))->len = WRAP;
    struct entry *e = (struct entry *)(d->ring + at);
    e->due = due;
    e->len = len;
    e->segments = segments;
    d->tail = at + HEADER + ((len + 7u) & ~(size_t)7u);
    d->entries++;
}

static struct entry *ring_head(struct direction *d) {
    if (!d->entries) return NULL;
    if (d->cap - d->head < HEADER || ((struct entry *)(d->ring + d->head))->len == WRAP) d->head = 0;
    return (struct entry *)(d->ring + d->head);
}

static void ring_pop(struct direction *d, struct entry *e) {
    d->head += HEADER + ((e->len + 7u) & ~(size_t)7u);
    d->entries--;
}

static unsigned char scratch[MAX_PACKET];

/* The link model for one wire packet of `size` IP bytes arriving at `now`: 1 if it goes, with the
 * time it is due at the other end; 0 if lost or dropped at the tail of the queue. */
static int admit(struct direction *d, uint64_t now, uint32_t size, uint64_t *due) {
    d->c.packets++;
    d->c.bytes += size;
    if (d->loss > 0 && mt_random(&d->rng) < d->loss) {
        d->c.lost++;
        return 0;
    }
    if (d->ns_per_byte > 0) {
        uint64_t start = d->free_at > now ? d->free_at : now;
        if ((double)(start - now) / d->ns_per_byte + (double)size > (double)d->queue_bytes) {
            d->c.queue_drops++;
            return 0;
        }
        d->free_at = start + (uint64_t)((double)size * d->ns_per_byte);
        *due = d->free_at + d->delay_ns;
    } else {
        *due = now + d->delay_ns;
    }
    return 1;
}

static uint16_t ip_checksum(const unsigned char *ip, int len) {
    uint32_t sum = 0;
    for (int i = 0; i < len; i += 2) sum += (uint32_t)(ip[i] << 8 | ip[i + 1]);
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* Segments [a, b) of the TCP/IPv4 GSO batch in `orig` (vnet header, then the packet) as one unit:
 * a shorter batch, or a plain packet when b == a + 1. The receiving kernel takes the TCP checksum
 * as offloaded (CHECKSUM_PARTIAL), like a GRO batch from a NIC; the IP header is made whole. */
static void commit_run(struct direction *d, const unsigned char *orig, int hl, int payload, int mss, int a, int b,
                       uint64_t due) {
    size_t at = ring_slot(d);
    if (at == SIZE_MAX) {
        d->c.ring_drops += (uint64_t)(b - a);
        return;
    }
    unsigned char *out = d->ring + at + HEADER;
    struct virtio_net_hdr vh;
    memcpy(&vh, orig, VNET);
    const unsigned char *ip = orig + VNET;
    int ihl = (ip[0] & 15) * 4;
    int first = a * mss, last = b * mss < payload ? b * mss : payload;
    if (b - a == 1) vh.gso_type = VIRTIO_NET_HDR_GSO_NONE, vh.gso_size = 0;
    memcpy(out, &vh, VNET);
    unsigned char *p = out + VNET;
    memcpy(p, ip, (size_t)hl);
    memcpy(p + hl, ip + hl + first, (size_t)(last - first));
    uint16_t total = (uint16_t)(hl + last - first), id;
    total = htons(total);
    memcpy(p + 2, &total, 2);
    memcpy(&id, ip + 4, 2);
    id = htons((uint16_t)(ntohs(id) + a));
    memcpy(p + 4, &id, 2);
    p[10] = p[11] = 0;
    uint16_t check = htons(ip_checksum(p, ihl));
    memcpy(p + 10, &check, 2);
    uint32_t seq;
    memcpy(&seq, p + ihl + 4, 4);
    seq = htonl(ntohl(seq) + (uint32_t)first);
    memcpy(p + ihl + 4, &seq, 4);
    if (a > 0) p[ihl + 13] &= (unsigned char)~0x80;                   /* CWR: first segment only */
    if (last < payload) p[ihl + 13] &= (unsigned char)~(0x01 | 0x08); /* FIN, PSH: last only */
    ring_commit(d, at, due, (uint32_t)(VNET + hl + last - first), (uint32_t)(b - a));
}

/* A packet read with offloads on: a plain packet is one wire packet; a TCP/IPv4 GSO batch is as
 * many MTU-sized wire packets as the sender's MSS cuts it into, each through the model on its own
 * (so loss and the queue act per wire packet), the survivors kept together in runs. */
static void ingest_offloaded(struct direction *d, size_t at, unsigned char *buf, int got, uint64_t now) {
    struct virtio_net_hdr vh;
    memcpy(&vh, buf, VNET);
    unsigned char *ip = buf + VNET;
    int len = got - VNET, segments = 1, hl = len, payload = 0, mss = 0;
    if (vh.gso_type == VIRTIO_NET_HDR_GSO_TCPV4 && len >= 40) {
        int ihl = (ip[0] & 15) * 4;
        hl = ihl + (ip[ihl + 12] >> 4) * 4;
        payload = len - hl;
        mss = vh.gso_size;
        if (hl > len) hl = len, payload = 0;
        if (mss > 0 && payload > 0) segments = (payload + mss - 1) / mss;
    }
    if (at == SIZE_MAX) {
        d->c.packets += (uint64_t)segments;
        d->c.ring_drops += (uint64_t)segments;
        return;
    }
    if (segments == 1) {
        uint64_t due;
        if (admit(d, now, (uint32_t)len, &due)) ring_commit(d, at, due, (uint32_t)got, 1);
        return;
    }
    static uint64_t dues[MAX_PACKET / 64];
    static unsigned char kept[MAX_PACKET / 64];
    int all = 1;
    for (int k = 0; k < segments; k++) {
        int seg = hl + (k == segments - 1 ? payload - k * mss : mss);
        kept[k] = (unsigned char)admit(d, now, (uint32_t)seg, &dues[k]);
        all &= kept[k];
    }
    if (all) { /* the common case: the batch stays one unit, due when its last packet is */
        ring_commit(d, at, dues[segments - 1], (uint32_t)got, (uint32_t)segments);
        return;
    }
    memcpy(scratch, buf, (size_t)got); /* the ring slot is reused for the first run */
    for (int a = 0; a < segments;) {
        if (!kept[a]) { a++; continue; }
        int b = a + 1;
        while (b < segments && kept[b]) b++;
        commit_run(d, scratch, hl, payload, mss, a, b, dues[b - 1]);
        a = b;
    }
}

/* Read what the kernel queued on the input TUN (up to a batch) and schedule each packet. */
static void ingest(struct direction *d) {
    for (int n = 0; n < BATCH; n++) {
        size_t at = ring_slot(d);
        unsigned char *buf = at == SIZE_MAX ? scratch : d->ring + at + HEADER;
        ssize_t got = read(d->fd_in, buf, MAX_PACKET);
        if (got < 0) break; /* EAGAIN: drained */
        uint64_t now = now_ns(), due;
        if (d->offload) {
            ingest_offloaded(d, at, buf, (int)got, now);
        } else if (at == SIZE_MAX) {
            d->c.packets++;
            d->c.bytes += (uint64_t)got;
            d->c.ring_drops++;
        } else if (admit(d, now, (uint32_t)got, &due)) {
            ring_commit(d, at, due, (uint32_t)got, 1);
        }
    }
}

/* Write every packet that is due; return when the next one is due (0 if none waits). */
static uint64_t deliver(struct direction *d, uint64_t now) {
    struct entry *e;
    while ((e = ring_head(d)) && e->due <= now) {
        if (write(d->fd_out, (unsigned char *)e + HEADER, e->len) < 0)
            d->c.write_errors += e->segments;
        else
            d->c.delivered += e->segments;
        ring_pop(d, e);
    }
    return e ? e->due : 0;
}

/* -- set-up */

static void die(const char *what) {
    fprintf(stderr, "relay: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void enter_namespace(const char *name) {
    char path[512];
    snprintf(path, sizeof path, "/run/netns/%s", name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) die(path);
    if (setns(fd, CLONE_NEWNET) != 0) die("setns");
    close(fd);
}

static int open_tun(const char *name, int offload) {
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) die("/dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI | (offload ? IFF_VNET_HDR : 0);
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
    if (ioctl(fd, TUNSETIFF, &ifr) != 0) die("TUNSETIFF");
    /* TSO and checksum offload: the stacks hand over and take 64 KiB batches, as with a NIC's TSO
     * and GRO, which is what lets two cores carry 1 Gbit/s of 1500-byte packets */
    if (offload && ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4) != 0) die("TUNSETOFFLOAD");
    return fd;
}

static void setup_direction(struct direction *d, const char *name, int fd_in, int fd_out, double delay_ms,
                            double loss, double rate_mbit, uint64_t queue_bytes, uint64_t seed, int offload) {
    memset(d, 0, sizeof *d);
    d->offload = offload;
    d->name = name, d->fd_in = fd_in, d->fd_out = fd_out;
    d->delay_ns = (uint64_t)(delay_ms * 1e6);
    d->loss = loss;
    d->ns_per_byte = rate_mbit > 0 ? 8e3 / rate_mbit : 0;
    d->queue_bytes = queue_bytes;
    mt_seed(&d->rng, seed);
    /* in flight: the queue plus the delay line at the rate (packets carry a header and padding of
     * up to 23 bytes each, hence x2), or, unlimited, whatever a fast host can push in the delay */
    double line = rate_mbit > 0 ? rate_mbit * 1e6 / 8 * delay_ms / 1000 + (double)queue_bytes : 4e9 * delay_ms / 1000;
    double cap = 2 * line + 4.0 * MAX_PACKET;
    if (cap < 16.0 * 1024 * 1024) cap = 16.0 * 1024 * 1024;
    if (cap > 512.0 * 1024 * 1024) cap = 512.0 * 1024 * 1024;
    d->cap = (size_t)cap & ~(size_t)7u;
    d->ring = mmap(NULL, d->cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (d->ring == MAP_FAILED) die("mmap");
}

static void print_counts(const struct direction *d) {
    printf("\"%s\": {\"packets\": %llu, \"bytes\": %llu, \"lost\": %llu, \"queue_drops\": %llu, "
           "\"delivered\": %llu, \"write_errors\": %llu, \"ring_drops\": %llu}",
           d->name, (unsigned long long)d->c.packets, (unsigned long long)d->c.bytes, (unsigned long long)d->c.lost,
           (unsigned long long)d->c.queue_drops, (unsigned long long)d->c.delivered,
           (unsigned long long)d->c.write_errors, (unsigned long long)d->c.ring_drops);
}

static volatile sig_atomic_t stopping;

static void on_signal(int sig) {
    (void)sig;
    stopping = 1;
}

int main(int argc, char **argv) {
    const char *sender_ns = NULL, *receiver_ns = NULL, *tun = "wan0";
    double delay_ms = 0, loss = 0, rate_mbit = 0;
    unsigned long long queue_bytes = 0, seed = 1;
    int cpu = -1, offload = 1;
    static const struct option options[] = {
        {"sender-ns", required_argument, 0, 's'}, {"receiver-ns", required_argument, 0, 'r'},
        {"tun", required_argument, 0, 't'},       {"delay-ms", required_argument, 0, 'd'},
        {"loss", required_argument, 0, 'l'},      {"rate-mbit", required_argument, 0, 'R'},
        {"queue-bytes", required_argument, 0, 'q'}, {"seed", required_argument, 0, 'S'},
        {"cpu", required_argument, 0, 'c'},       {"no-offload", no_argument, 0, 'n'}, {0, 0, 0, 0}};
    for (int opt; (opt = getopt_long(argc, argv, "", options, NULL)) != -1;) {
        switch (opt) {
        case 's': sender_ns = optarg; break;
        case 'r': receiver_ns = optarg; break;
        case 't': tun = optarg; break;
        case 'd': delay_ms = strtod(optarg, NULL); break;
        case 'l': loss = strtod(optarg, NULL); break;
        case 'R': rate_mbit = strtod(optarg, NULL); break;
        case 'q': queue_bytes = strtoull(optarg, NULL, 10); break;
        case 'S': seed = strtoull(optarg, NULL, 10); break;
        case 'c': cpu = atoi(optarg); break;
        case 'n': offload = 0; break;
        default: fprintf(stderr, "relay: unknown option\n"); return 2;
        }
    }
    if (!sender_ns || !receiver_ns || delay_ms < 0 || loss < 0 || loss >= 1 || rate_mbit < 0) {
        fprintf(stderr, "relay: --sender-ns and --receiver-ns are required; delay, rate >= 0, 0 <= loss < 1\n");
        return 2;
    }
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() == 1) return 1; /* the parent died before the line above took effect */
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) != 0) die("sched_setaffinity");
    }
    int home = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    if (home < 0) die("/proc/self/ns/net");
    enter_namespace(sender_ns);
    int fd_sender = open_tun(tun, offload);
    enter_namespace(receiver_ns);
    int fd_receiver = open_tun(tun, offload);
    if (setns(home, CLONE_NEWNET) != 0) die("setns home");
    close(home);

    static struct direction forward, backward;
    setup_direction(&forward, "sender->receiver", fd_sender, fd_receiver, delay_ms, loss, rate_mbit, queue_bytes, seed,
                    offload);
    setup_direction(&backward, "receiver->sender", fd_receiver, fd_sender, delay_ms, loss, rate_mbit, queue_bytes,
                    seed + 1, offload);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    int timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (timer < 0 || ep < 0) die("timerfd/epoll");
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.ptr = &forward;
    epoll_ctl(ep, EPOLL_CTL_ADD, fd_sender, &ev);
    ev.data.ptr = &backward;
    epoll_ctl(ep, EPOLL_CTL_ADD, fd_receiver, &ev);
    ev.data.ptr = NULL;
    ev.events = EPOLLIN | EPOLLHUP;
    epoll_ctl(ep, EPOLL_CTL_ADD, STDIN_FILENO, &ev);
    static int timer_tag;
    ev.events = EPOLLIN;
    ev.data.ptr = &timer_tag;
    epoll_ctl(ep, EPOLL_CTL_ADD, timer, &ev);

    printf("{\"ready\": true, \"pid\": %d, \"relay\": \"c\", \"offload\": %s}\n", (int)getpid(),
           offload ? "true" : "false");
    fflush(stdout);

    uint64_t armed = 0;
    while (!stopping) {
        uint64_t now = now_ns();
        uint64_t a = deliver(&forward, now), b = deliver(&backward, now);
        uint64_t next = !a ? b : !b ? a : (a < b ? a : b);
        if (next != armed) { /* absolute: a late wake-up never shifts the schedule */
            struct itimerspec its;
            memset(&its, 0, sizeof its);
            its.it_value.tv_sec = (time_t)(next / 1000000000u);
            its.it_value.tv_nsec = (long)(next % 1000000000u);
            timerfd_settime(timer, TFD_TIMER_ABSTIME, &its, NULL); /* next == 0 disarms */
            armed = next;
        }
        struct epoll_event events[8];
        int n = epoll_wait(ep, events, 8, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        int done = 0;
        for (int i = 0; i < n; i++) {
            void *tag = events[i].data.ptr;
            if (tag == NULL) {
                done = 1;
            } else if (tag == &timer_tag) {
                uint64_t expirations;
                if (read(timer, &expirations, sizeof expirations) < 0) { /* EAGAIN: re-armed meanwhile */ }
                armed = 0;
            } else {
                ingest((struct direction *)tag);
            }
        }
        if (done) break;
    }

    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    printf("{");
    print_counts(&forward);
    printf(", ");
    print_counts(&backward);
    printf(", \"cpu_seconds\": {\"user\": %.6f, \"system\": %.6f}}\n",
           usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6, usage.ru_stime.tv_sec + usage.ru_stime.tv_usec / 1e6);
    fflush(stdout);
    return 0;
}
