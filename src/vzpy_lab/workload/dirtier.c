/*
 * dirtier: a workload for pre-copy tests. It fills SIZE_MIB MiB with a pattern each page can be checked
 * against, then keeps rewriting a small hot region (HOT_PAGES pages) forever, stamping each page of it with
 * a generation counter. TCP PORT answers one line per connection: "OK <generation>" when every page still
 * holds what it must (cold pages: their pattern; hot pages: the pattern of a generation not in the future),
 * else "BAD page <n>".
 *
 * Usage: dirtier PORT
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
#include <time.h>
#include <unistd.h>

#define SIZE_MIB 32
#define PAGE 4096UL
#define PAGES ((SIZE_MIB << 20) / PAGE)
#define HOT_PAGES 16
#define WORDS (PAGE / sizeof(uint64_t))

static uint64_t *memory;
static _Atomic uint64_t generation;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static uint64_t cold_word(uint64_t page, uint64_t word) { return (page * 0x9e3779b97f4a7c15ULL) ^ word; }

static void stamp(uint64_t page, uint64_t gen) {
    uint64_t *p = memory + page * WORDS;
    for (uint64_t w = 0; w < WORDS; w++)
        p[w] = gen ^ (page << 32) ^ w;
}

static void *rewrite(void *arg) {
    (void)arg;
    struct timespec pause = {0, 20 * 1000 * 1000};
    for (;;) {
        pthread_mutex_lock(&lock);
        uint64_t gen = atomic_load(&generation) + 1;
        for (uint64_t page = 0; page < HOT_PAGES; page++)
            stamp(page, gen);
        atomic_store(&generation, gen);
        pthread_mutex_unlock(&lock);
        nanosleep(&pause, NULL);
    }
    return NULL;
}

static long check(void) {
    pthread_mutex_lock(&lock);
    uint64_t gen = atomic_load(&generation);
    long bad = -1;
    for (uint64_t page = 0; page < PAGES && bad < 0; page++) {
        uint64_t *p = memory + page * WORDS;
        for (uint64_t w = 0; w < WORDS; w++) {
            uint64_t want = page < HOT_PAGES ? (gen ^ (page << 32) ^ w) : cold_word(page, w);
            if (p[w] != want) {
                bad = (long)page;
                break;
            }
        }
    }
    pthread_mutex_unlock(&lock);
    return bad;
}

int main(int argc, char **argv) {
    if (argc != 2)
        return 2;
    memory = mmap(NULL, PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED)
        return 1;
    for (uint64_t page = 0; page < PAGES; page++)
        for (uint64_t w = 0; w < WORDS; w++)
            memory[page * WORDS + w] = cold_word(page, w);
    for (uint64_t page = 0; page < HOT_PAGES; page++)
        stamp(page, 0);
    pthread_t thread;
    if (pthread_create(&thread, NULL, rewrite, NULL))
        return 1;
    int sk = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(sk, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    if (bind(sk, (struct sockaddr *)&addr, sizeof(addr)) || listen(sk, 8))
        return 1;
    for (;;) {
        int c = accept(sk, NULL, NULL);
        if (c < 0)
            continue;
        char reply[64];
        long bad = check();
        int n = bad < 0 ? snprintf(reply, sizeof(reply), "OK %llu\n", (unsigned long long)atomic_load(&generation))
                        : snprintf(reply, sizeof(reply), "BAD page %ld\n", bad);
        if (write(c, reply, (size_t)n) < 0)
            perror("write");
        close(c);
    }
}
