/*
 * forker: a workload for post-copy with a changing process tree. The parent fills MIB MiB of anonymous
 * memory with a pattern each page can be checked against and never writes it again; every 20 ms it forks a
 * child that checks a sample of the inherited pages, writes some of them (copy-on-write) and reads its
 * writes back, one time in four forks a grandchild that does the same, and exits with a status saying how
 * its checks went. The parent reaps the children and counts.
 *
 * "Lazy": a child that found pages of its inherited memory not resident (mincore) when it started. The
 * memory is never swapped out here, so such pages are pages a post-copy restore has not delivered yet.
 *
 * TCP PORT answers one line per connection, after checking every page of the parent's memory:
 *   OK forks=F ok=N fail=N lazy_ok=N lazy_fail=N grandchildren=N fork_errors=N missing=M last_fail=S
 * or "BAD page <n> ..." (same counters) when a page of the parent's memory does not hold its pattern.
 * last_fail: the last failed child's wait status (0: none).
 *
 * Usage: forker PORT [MIB]    (MIB: 48 unless given)
 */
#define _GNU_SOURCE
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / sizeof(uint64_t))
#define SAMPLE_PAGES 32
#define WRITE_PAGES 8
#define GRANDCHILD_EVERY 4
/* a child's exit status: bits of what went wrong, and whether its memory was still arriving */
#define BAD_INHERITED 1
#define BAD_COW 2
#define BAD_GRANDCHILD 4
#define NO_GRANDCHILD 8
#define LAZY 16

static uint64_t *memory;
static uint64_t pages;
static unsigned char *residency;
static _Atomic uint64_t forks, ok, fail, lazy_ok, lazy_fail, grandchildren, fork_errors, last_fail;

static uint64_t pattern(uint64_t page, uint64_t word) { return (page * 0x9e3779b97f4a7c15ULL) ^ word; }

static uint64_t next_random(uint64_t *state) {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    return *state;
}

static uint64_t missing_pages(void) {
    if (mincore(memory, pages * PAGE, residency))
        return 0;
    uint64_t missing = 0;
    for (uint64_t page = 0; page < pages; page++)
        missing += !(residency[page] & 1);
    return missing;
}

static int page_holds(uint64_t page, uint64_t salt) {
    const uint64_t *p = memory + page * WORDS;
    for (uint64_t w = 0; w < WORDS; w++)
        if (p[w] != (pattern(page, w) ^ salt))
            return 0;
    return 1;
}

static void stamp(uint64_t page, uint64_t salt) {
    uint64_t *p = memory + page * WORDS;
    for (uint64_t w = 0; w < WORDS; w++)
        p[w] = pattern(page, w) ^ salt;
}

/* Pages a process wrote since the fork from the parent: they hold pattern ^ salt. */
struct writes {
    uint64_t page[WRITE_PAGES];
    uint64_t salt;
    int n;
};

static uint64_t salt_of(uint64_t page, const struct writes *own, const struct writes *inherited) {
    for (int i = 0; i < own->n; i++)
        if (own->page[i] == page)
            return own->salt;
    for (int i = 0; inherited && i < inherited->n; i++)
        if (inherited->page[i] == page)
            return inherited->salt;
    return 0;
}

/* A child's (or grandchild's, with what its parent wrote) work; returns its exit status. */
static int child_checks(uint64_t seed, const struct writes *inherited) {
    int status = missing_pages() ? LAZY : 0;
    uint64_t state = seed * 0x2545f4914f6cdd1dULL + 1;
    struct writes own = {.salt = seed | 1, .n = 0};
    for (int i = 0; i < SAMPLE_PAGES; i++) {
        uint64_t page = next_random(&state) % pages;
        if (!page_holds(page, salt_of(page, &own, inherited)))
            status |= BAD_INHERITED;
        if (own.n < WRITE_PAGES) {
            own.page[own.n++] = page;
            stamp(page, own.salt);
            if (!page_holds(page, own.salt))
                status |= BAD_COW;
        }
    }
    if (!inherited && seed % GRANDCHILD_EVERY == 0) {
        pid_t pid = fork();
        if (pid == 0)
            _exit(child_checks(seed ^ 0x5bd1e995ULL, &own));
        int wstatus;
        if (pid < 0 || waitpid(pid, &wstatus, 0) != pid)
            status |= NO_GRANDCHILD;
        else if (!WIFEXITED(wstatus) || (WEXITSTATUS(wstatus) & ~LAZY))
            status |= BAD_GRANDCHILD;
        else
            status |= WEXITSTATUS(wstatus) & LAZY;
    }
    /* this process's writes stay its own, whatever its grandchild wrote */
    for (int i = 0; i < own.n; i++)
        if (!page_holds(own.page[i], own.salt))
            status |= BAD_COW;
    return status;
}

static void count(int wstatus) {
    int lazy = WIFEXITED(wstatus) && (WEXITSTATUS(wstatus) & LAZY);
    int good = WIFEXITED(wstatus) && (WEXITSTATUS(wstatus) & ~LAZY) == 0;
    if (good) {
        atomic_fetch_add(lazy ? &lazy_ok : &ok, 1);
    } else {
        atomic_fetch_add(lazy ? &lazy_fail : &fail, 1);
        atomic_store(&last_fail, (uint64_t)wstatus);
    }
}

static void *fork_children(void *arg) {
    (void)arg;
    struct timespec pause = {0, 20 * 1000 * 1000};
    for (;;) {
        uint64_t n = atomic_fetch_add(&forks, 1) + 1;
        pid_t pid = fork();
        if (pid == 0)
            _exit(child_checks(n, NULL));
        if (pid < 0)
            atomic_fetch_add(&fork_errors, 1);
        else if (n % GRANDCHILD_EVERY == 0)
            atomic_fetch_add(&grandchildren, 1);
        int wstatus;
        while ((pid = waitpid(-1, &wstatus, WNOHANG)) > 0)
            count(wstatus);
        nanosleep(&pause, NULL);
    }
    return NULL;
}

static long first_bad_page(void) {
    for (uint64_t page = 0; page < pages; page++)
        if (!page_holds(page, 0))
            return (long)page;
    return -1;
}

static int report(char *buf, size_t size) {
    long bad = first_bad_page();
    char head[32];
    if (bad < 0)
        snprintf(head, sizeof(head), "OK");
    else
        snprintf(head, sizeof(head), "BAD page %ld", bad);
    return snprintf(buf, size,
                    "%s forks=%llu ok=%llu fail=%llu lazy_ok=%llu lazy_fail=%llu grandchildren=%llu "
                    "fork_errors=%llu missing=%llu last_fail=%llu\n",
                    head, (unsigned long long)atomic_load(&forks), (unsigned long long)atomic_load(&ok),
                    (unsigned long long)atomic_load(&fail), (unsigned long long)atomic_load(&lazy_ok),
                    (unsigned long long)atomic_load(&lazy_fail), (unsigned long long)atomic_load(&grandchildren),
                    (unsigned long long)atomic_load(&fork_errors), (unsigned long long)missing_pages(),
                    (unsigned long long)atomic_load(&last_fail));
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3)
        return 2;
    uint64_t mib = argc == 3 ? strtoull(argv[2], NULL, 10) : 48;
    pages = (mib << 20) / PAGE;
    if (!pages)
        return 2;
    memory = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    residency = malloc(pages);
    if (memory == MAP_FAILED || !residency)
        return 1;
    for (uint64_t page = 0; page < pages; page++)
        stamp(page, 0);
    int sk = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(sk, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    if (bind(sk, (struct sockaddr *)&addr, sizeof(addr)) || listen(sk, 8))
        return 1;
    pthread_t thread;
    if (pthread_create(&thread, NULL, fork_children, NULL))
        return 1;
    for (;;) {
        int c = accept(sk, NULL, NULL);
        if (c < 0)
            continue;
        char reply[512];
        int n = report(reply, sizeof(reply));
        if (write(c, reply, (size_t)n) < 0)
            perror("write");
        close(c);
    }
}
