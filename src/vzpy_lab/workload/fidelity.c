/*
 * fidelity: state-fidelity workload for checkpoint/restore tests.
 *
 * Usage: fidelity [-d DIR] [-a ADDR] [-i] [-r] PORT
 *   -d DIR   directory for the workload's files (default /tmp)
 *   -a ADDR  IPv4 address to listen on (default 0.0.0.0)
 *   -i       act as a minimal init: setsid, fork the workload, reap children
 *   -r       the credentials child keeps uid/gid 0 and changes only its supplementary groups
 *
 * On start it sets up many kinds of process state (memory, threads, files, pipes, sockets, SysV IPC,
 * signals, timers, a pty, credentials, rlimits ...) and records the "before" values. TCP PORT speaks a
 * line protocol (PING, VERIFY, INFO; every reply ends with a line "END"); PORT+1 echoes every byte back.
 * VERIFY checks each item against the recorded values and re-arms whatever the check consumed, so it can
 * be repeated after every checkpoint/restore. Statically linked, no dependencies beyond libc.
 *
 * Cases raw CRIU handles that a careless checkpoint tool may not: a child stopped by SIGSTOP (it must come
 * back stopped), an open file whose name was unlinked while another link remains (CRIU needs link-remap),
 * and a TCP connection over lo whose send queue holds data the peer's window has not taken yet (it needs
 * the network locked while the sockets are restored).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <fenv.h>
#include <grp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/msg.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define ANON_SIZE (64UL << 20)
#define ANON_SEED 0x9e3779b97f4a7c15ULL
#define SHARED_SIZE (2UL << 20)
#define SHARED_TOKEN_OFF (SHARED_SIZE - 64)
#define FMAP_SIZE (256UL << 10)
#define SHM_SIZE (1UL << 20)
#define GHOST_SIZE (64UL << 10)
#define GHOST_OFFSET 1234
#define APPEND_OFFSET 7
#define NSEMS 4
#define CPU_CHUNK 50000
#define CPU_KMASK ((1U << 20) - 1)
#define ITIMER_USEC 50000
#define PTIMER_NSEC 30000000L
#define MAX_CTL 8
#define MAX_ECHO 8
#define ECHO_BUF 65536
#define DETAIL 512
#define NOFILE_SOFT 777
#define CORE_SOFT (1UL << 20)
#define CORE_HARD (8UL << 20)
#define STACK_SOFT (16UL << 20)
#define RT_VAL1 4242
#define RT_VAL2 4343
#define LINKED_SIZE (16UL << 10)
#define LINKED_OFFSET 321
#define SENDQ_BUF 16384
#define SENDQ_SALT 0x5a

enum item {
	IT_MEMORY, IT_CPU, IT_FILES, IT_PIPES, IT_UNIX, IT_SHM, IT_SEM, IT_MSG, IT_CWD, IT_HANDLERS,
	IT_PENDING, IT_TIMERS, IT_TERMINAL, IT_CREDS, IT_PIDS, IT_RLIMITS, IT_HOSTNAME, IT_STOPPED,
	IT_LINKED, IT_SENDQ, IT_COUNT
};

static const char *item_names[IT_COUNT] = {
	"memory", "cpu", "files", "pipes", "unix_sockets", "sysv_shm", "sysv_sem", "sysv_msg", "cwd",
	"signal_handlers", "pending_signals", "timers", "terminal", "credentials", "pids", "rlimits",
	"hostname", "stopped_task", "unlinked_linked_file", "tcp_send_queue",
};

static char setup_err[IT_COUNT][DETAIL];

/* The credentials child's ids. -r keeps them 0 (only the supplementary groups change): CRIU reads every
 * task's rlimits with prlimit(), which needs CAP_SYS_RESOURCE for a task with other uids/gids. */
static struct {
	uid_t uid, suid;
	gid_t gid, sgid;
} cid = {1234, 1236, 2345, 2347};

static const char pipe_bytes[] = "pipe: unread bytes 0123456789 abcdefghijklmnopqrstuvwxyz";
static const char fifo_bytes[] = "fifo: queued bytes ZYXWVUTSRQPONMLKJIHGFEDCBA 9876543210";
static const char append_text[] = "fidelity append file\nsecond line\n";
static const char *dgrams[] = {"dgram-one", "dgram-two-is-longer", "3"};
static const char pty_in_bytes[] = "to-slave: raw input bytes";
static const char pty_out_bytes[] = "to-master: output bytes";
static const unsigned short sem_values[NSEMS] = {3, 0, 7, 42};

struct qmsg {
	long mtype;
	char mtext[32];
};

static const struct qmsg queued_msgs[] = {
	{1, "alpha"}, {2, "beta"}, {5, "gamma"}, {1, "delta"},
};
#define NMSGS (sizeof(queued_msgs) / sizeof(queued_msgs[0]))

/* What the credentials child reports over its pipe. Smaller than PIPE_BUF: written atomically. */
struct child_reply {
	uint64_t token;
	uid_t ruid, euid, suid;
	gid_t rgid, egid, sgid;
	int ngroups;
	gid_t groups[16];
	pid_t pid, ppid, pgrp, sid;
	char err[128];
};

struct cpu_pub {
	pthread_mutex_t lock;
	uint64_t n, chunks;
	uint32_t k;
	double f;
	long double ld;
	pid_t tid;
	int tls_ok, round_ok;
	char bad[DETAIL];
};

struct echo_conn {
	int fd;
	size_t len;
	char *buf;
};

struct ctl_conn {
	int fd;
	size_t len;
	char buf[512];
};

static struct {
	const char *dir;
	const char *addr;
	int port;
	char path_cwd[256], path_append[256], path_fmap[256], path_fifo[256], path_sock[108];
	char path_ghost[256], path_linked[256], path_linked_other[256];
	struct timespec t0;

	/* memory */
	uint64_t *anon;
	unsigned char *shared;
	unsigned char *fmap;

	/* cpu */
	pthread_t worker;
	struct cpu_pub cpu;
	uint64_t last_cpu_n;

	/* files */
	int fd_append, fd_ghost, fd_linked;

	/* a child stopped by SIGSTOP */
	pid_t stopped;

	/* tcp over lo with unsent data: sendq_w writes, sendq_r never reads until VERIFY */
	int sendq_w, sendq_r;
	uint64_t sendq_sent, sendq_checked;

	/* pipes */
	int pipe_r, pipe_w, fifo_r, fifo_w;

	/* unix sockets */
	int dg[2], st[2], usock;

	/* sysv */
	int shm_id, sem_id, msg_id;
	unsigned char *shm;

	/* signals / timers */
	struct sigaction sa_usr1, sa_hup;
	stack_t altstack;
	timer_t ptimer;
	int ptimer_ok;
	long last_alarm, last_ptick;

	/* terminal */
	int pty_m, pty_s;
	char pty_name[64];
	struct termios tio;
	struct winsize ws;

	/* credentials child */
	pid_t child;
	int req_w, rep_r;
	struct child_reply child0;
	uint64_t token;

	/* pids, rlimits, hostname */
	pid_t pid, ppid, pgrp, sid;
	struct rlimit rl_nofile, rl_core, rl_stack;
	struct utsname uts;

	/* network */
	int ctl_lfd, echo_lfd;
	struct ctl_conn ctl[MAX_CTL];
	struct echo_conn echo[MAX_ECHO];
	uint64_t echo_bytes;
	long verifies;
} g;

static volatile sig_atomic_t term_flag;
static atomic_long alarm_ticks, ptimer_ticks, usr1_count, hup_count;
static atomic_int usr2_count, rt_count;
static int rt_values[8], rt_codes[8], rt_pids[8];
static __thread unsigned long tls_marker;

/* ------------------------------------------------------------------------------------------------ */
/* small helpers                                                                                      */

static void seterr(enum item it, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void seterr(enum item it, const char *fmt, ...)
{
	va_list ap;
	size_t len = strlen(setup_err[it]);

	if (len >= DETAIL - 2)
		return;
	if (len)
		setup_err[it][len++] = ';';
	va_start(ap, fmt);
	vsnprintf(setup_err[it] + len, DETAIL - len, fmt, ap);
	va_end(ap);
}

#define FAILF(...)                                   \
	do {                                         \
		snprintf(d, DETAIL, __VA_ARGS__);    \
		return -1;                           \
	} while (0)

static ssize_t read_full(int fd, void *buf, size_t n)
{
	size_t done = 0;

	while (done < n) {
		ssize_t r = read(fd, (char *)buf + done, n - done);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -1;
		if (r == 0)
			break;
		done += (size_t)r;
	}
	return (ssize_t)done;
}

static int write_full(int fd, const void *buf, size_t n)
{
	size_t done = 0;

	while (done < n) {
		ssize_t r = write(fd, (const char *)buf + done, n - done);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -1;
		done += (size_t)r;
	}
	return 0;
}

static long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static void sleep_ms(long ms)
{
	struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* poll() one fd, retrying on EINTR with the remaining time. Returns revents or 0 on timeout. */
static int poll_one(int fd, short events, long timeout_ms)
{
	long end = now_ms() + timeout_ms;

	for (;;) {
		struct pollfd p = {fd, events, 0};
		long left = end - now_ms();
		int r = poll(&p, 1, left > 0 ? (int)left : 0);
		if (r > 0)
			return p.revents;
		if (r == 0 || (errno != EINTR))
			return 0;
	}
}

/* Read everything queued on a non-blocking fd; after each empty read wait up to wait_ms for more.
 * Keeps the first cap bytes in buf and returns the total count (at most 16 MiB), or -1. */
static ssize_t drain(int fd, char *buf, size_t cap, long wait_ms)
{
	static char scratch[4096];
	size_t got = 0;

	while (got < (16UL << 20)) {
		char *dst = got < cap ? buf + got : scratch;
		size_t room = got < cap ? cap - got : sizeof(scratch);
		ssize_t r = read(fd, dst, room);
		if (r > 0) {
			got += (size_t)r;
			continue;
		}
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && errno != EAGAIN)
			return -1;
		if (r == 0 || !(poll_one(fd, POLLIN, wait_ms) & POLLIN))
			break;
	}
	return (ssize_t)got;
}

static int set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);

	return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static uint64_t xorshift(uint64_t *s)
{
	uint64_t x = *s;

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 0x2545f4914f6cdd1dULL;
}

static unsigned char pat_byte(size_t i, unsigned salt)
{
	return (unsigned char)((i * 131 + (i >> 9) * 7 + salt) & 0xff);
}

static void fill_pattern(unsigned char *p, size_t n, unsigned salt)
{
	for (size_t i = 0; i < n; i++)
		p[i] = pat_byte(i, salt);
}

/* Index of the first byte of p[from..n) that differs from the pattern, or -1. */
static long check_pattern_from(const unsigned char *p, size_t from, size_t n, unsigned salt)
{
	for (size_t i = from; i < n; i++)
		if (p[i] != pat_byte(i, salt))
			return (long)i;
	return -1;
}

static long check_pattern(const unsigned char *p, size_t n, unsigned salt)
{
	return check_pattern_from(p, 0, n, salt);
}

#define path_in_dir(out, name) snprintf(out, sizeof(out), "%s/%s", g.dir, name)

/* ------------------------------------------------------------------------------------------------ */
/* signal handlers                                                                                    */

static void on_usr1(int sig, siginfo_t *si, void *uc)
{
	(void)sig; (void)si; (void)uc;
	atomic_fetch_add(&usr1_count, 1);
}

static void on_hup(int sig)
{
	(void)sig;
	atomic_fetch_add(&hup_count, 1);
}

static void on_alarm(int sig)
{
	(void)sig;
	atomic_fetch_add(&alarm_ticks, 1);
}

static void on_ptimer(int sig, siginfo_t *si, void *uc)
{
	(void)sig; (void)uc;
	atomic_fetch_add(&ptimer_ticks, 1 + (si->si_overrun > 0 ? si->si_overrun : 0));
}

static void on_usr2(int sig)
{
	(void)sig;
	atomic_fetch_add(&usr2_count, 1);
}

static void on_rt1(int sig, siginfo_t *si, void *uc)
{
	int i = atomic_fetch_add(&rt_count, 1);

	(void)sig; (void)uc;
	if (i < 8) {
		rt_values[i] = si->si_value.sival_int;
		rt_codes[i] = si->si_code;
		rt_pids[i] = si->si_pid;
	}
}

static void on_term(int sig)
{
	(void)sig;
	term_flag = 1;
}

static int install(int sig, void (*h)(int), void (*sa)(int, siginfo_t *, void *), int flags,
		   const int *mask_sigs, int nmask)
{
	struct sigaction act;

	memset(&act, 0, sizeof(act));
	if (sa) {
		act.sa_sigaction = sa;
		flags |= SA_SIGINFO;
	} else {
		act.sa_handler = h;
	}
	act.sa_flags = flags;
	sigemptyset(&act.sa_mask);
	for (int i = 0; i < nmask; i++)
		sigaddset(&act.sa_mask, mask_sigs[i]);
	return sigaction(sig, &act, NULL);
}

static void setup_signals(void)
{
	static const int usr1_mask[] = {SIGTERM, SIGQUIT};
	static const int hup_mask[] = {SIGINT};
	static char altstack_mem[65536];

	g.altstack.ss_sp = altstack_mem;
	g.altstack.ss_size = sizeof(altstack_mem);
	g.altstack.ss_flags = 0;
	if (sigaltstack(&g.altstack, NULL) < 0)
		seterr(IT_HANDLERS, "sigaltstack: %s", strerror(errno));
	if (install(SIGUSR1, NULL, on_usr1, SA_RESTART, usr1_mask, 2) < 0 ||
	    install(SIGHUP, on_hup, NULL, SA_ONSTACK | SA_NODEFER, hup_mask, 1) < 0)
		seterr(IT_HANDLERS, "sigaction: %s", strerror(errno));
	sigaction(SIGUSR1, NULL, &g.sa_usr1);
	sigaction(SIGHUP, NULL, &g.sa_hup);
	if (install(SIGALRM, on_alarm, NULL, SA_RESTART, NULL, 0) < 0 ||
	    install(SIGRTMIN + 2, NULL, on_ptimer, SA_RESTART, NULL, 0) < 0)
		seterr(IT_TIMERS, "sigaction: %s", strerror(errno));
	if (install(SIGUSR2, on_usr2, NULL, SA_RESTART, NULL, 0) < 0 ||
	    install(SIGRTMIN + 1, NULL, on_rt1, SA_RESTART, NULL, 0) < 0)
		seterr(IT_PENDING, "sigaction: %s", strerror(errno));
	install(SIGTERM, on_term, NULL, 0, NULL, 0);
	signal(SIGPIPE, SIG_IGN);
}

static void block_pending_signals(void)
{
	sigset_t s;

	sigemptyset(&s);
	sigaddset(&s, SIGUSR2);
	sigaddset(&s, SIGRTMIN + 1);
	pthread_sigmask(SIG_BLOCK, &s, NULL);
}

static int raise_pending(void)
{
	union sigval v1 = {.sival_int = RT_VAL1}, v2 = {.sival_int = RT_VAL2};

	if (raise(SIGUSR2) < 0)
		return -1;
	if (sigqueue(getpid(), SIGRTMIN + 1, v1) < 0 || sigqueue(getpid(), SIGRTMIN + 1, v2) < 0)
		return -1;
	return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* setup                                                                                              */

static void setup_memory(void)
{
	uint64_t s = ANON_SEED;
	int fd;

	g.anon = mmap(NULL, ANON_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	g.shared = mmap(NULL, SHARED_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (g.anon == MAP_FAILED || g.shared == MAP_FAILED) {
		seterr(IT_MEMORY, "mmap anon: %s", strerror(errno));
		g.anon = NULL;
		g.shared = NULL;
		return;
	}
	for (size_t i = 0; i < ANON_SIZE / 8; i++)
		g.anon[i] = xorshift(&s);
	fill_pattern(g.shared, SHARED_TOKEN_OFF, 0x5a);

	fd = open(g.path_fmap, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		seterr(IT_MEMORY, "open %s: %s", g.path_fmap, strerror(errno));
		return;
	}
	{
		static unsigned char buf[FMAP_SIZE];
		fill_pattern(buf, FMAP_SIZE, 0x33);
		if (write_full(fd, buf, FMAP_SIZE) < 0)
			seterr(IT_MEMORY, "write %s: %s", g.path_fmap, strerror(errno));
	}
	g.fmap = mmap(NULL, FMAP_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	close(fd);
	if (g.fmap == MAP_FAILED) {
		seterr(IT_MEMORY, "mmap file: %s", strerror(errno));
		g.fmap = NULL;
		return;
	}
	fill_pattern(g.fmap, 4096, 0x77); /* private copy-on-write page differs from the file */
}

static void child_fill_reply(struct child_reply *r)
{
	getresuid(&r->ruid, &r->euid, &r->suid);
	getresgid(&r->rgid, &r->egid, &r->sgid);
	r->ngroups = getgroups(16, r->groups);
	r->pid = getpid();
	r->ppid = getppid();
	r->pgrp = getpgrp();
	r->sid = getsid(0);
}

static void child_main(int req_r, int rep_w, pid_t parent)
{
	static const gid_t groups[] = {2345, 3456, 4567};
	char err[128] = "";
	uint64_t token;

	prctl(PR_SET_NAME, "fidelity-cred");
	if (g.anon)
		munmap(g.anon, ANON_SIZE); /* the child needs only the shared region */
	if (setpgid(0, 0) < 0)
		snprintf(err, sizeof(err), "setpgid: %s", strerror(errno));
	if (setgroups(3, groups) < 0 || setresgid(cid.gid, cid.gid, cid.sgid) < 0 ||
	    setresuid(cid.uid, cid.uid, cid.suid) < 0)
		snprintf(err, sizeof(err), "drop privileges: %s", strerror(errno));
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() != parent)
		_exit(0);
	while (read_full(req_r, &token, sizeof(token)) == (ssize_t)sizeof(token)) {
		struct child_reply r;

		memset(&r, 0, sizeof(r));
		r.token = token;
		memcpy(g.shared + SHARED_TOKEN_OFF, &token, sizeof(token));
		child_fill_reply(&r);
		memcpy(r.err, err, sizeof(r.err));
		if (write_full(rep_w, &r, sizeof(r)) < 0)
			break;
	}
	_exit(0);
}

static int child_query(struct child_reply *r, char *d);

static void setup_child(void)
{
	int req[2], rep[2];
	pid_t parent = getpid();
	char d[DETAIL];

	if (pipe2(req, O_CLOEXEC) < 0 || pipe2(rep, O_CLOEXEC) < 0) {
		seterr(IT_CREDS, "pipe: %s", strerror(errno));
		g.child = -1;
		return;
	}
	g.child = fork();
	if (g.child == 0) {
		close(req[1]);
		close(rep[0]);
		child_main(req[0], rep[1], parent);
	}
	close(req[0]);
	close(rep[1]);
	g.req_w = req[1];
	g.rep_r = rep[0];
	if (g.child < 0) {
		seterr(IT_CREDS, "fork: %s", strerror(errno));
		return;
	}
	if (child_query(&g.child0, d) < 0)
		seterr(IT_PIDS, "first child query: %s", d);
}

static void setup_files(void)
{
	unsigned char buf[GHOST_SIZE];

	g.fd_append = open(g.path_append, O_RDWR | O_APPEND | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
	if (g.fd_append < 0 || write_full(g.fd_append, append_text, strlen(append_text)) < 0 ||
	    lseek(g.fd_append, APPEND_OFFSET, SEEK_SET) < 0)
		seterr(IT_FILES, "append file %s: %s", g.path_append, strerror(errno));

	g.fd_ghost = open(g.path_ghost, O_RDWR | O_CREAT | O_TRUNC, 0600);
	fill_pattern(buf, sizeof(buf), 0x42);
	if (g.fd_ghost < 0 || write_full(g.fd_ghost, buf, sizeof(buf)) < 0 ||
	    lseek(g.fd_ghost, GHOST_OFFSET, SEEK_SET) < 0 || unlink(g.path_ghost) < 0)
		seterr(IT_FILES, "ghost file %s: %s", g.path_ghost, strerror(errno));
}

/* A file opened by one name, hard-linked to another, then unlinked by the first: nlink 1, name gone. */
static void setup_linked_file(void)
{
	unsigned char buf[LINKED_SIZE];

	unlink(g.path_linked);
	unlink(g.path_linked_other);
	g.fd_linked = open(g.path_linked, O_RDWR | O_CREAT | O_TRUNC, 0600);
	fill_pattern(buf, sizeof(buf), 0x37);
	if (g.fd_linked < 0 || write_full(g.fd_linked, buf, sizeof(buf)) < 0 ||
	    lseek(g.fd_linked, LINKED_OFFSET, SEEK_SET) < 0 || link(g.path_linked, g.path_linked_other) < 0 ||
	    unlink(g.path_linked) < 0)
		seterr(IT_LINKED, "linked file %s: %s", g.path_linked, strerror(errno));
}

static void setup_stopped(void)
{
	g.stopped = fork();
	if (g.stopped < 0) {
		seterr(IT_STOPPED, "fork: %s", strerror(errno));
		return;
	}
	if (g.stopped == 0) {
		prctl(PR_SET_NAME, "fid-stopped");
		/* CRIU's pre-dump skips stopped tasks: a copy of the 64 MiB here would all move while frozen */
		if (g.anon)
			munmap(g.anon, ANON_SIZE);
		for (;;)
			raise(SIGSTOP); /* a SIGCONT would only stop it again: it stays stopped */
	}
}

static unsigned char sendq_byte(uint64_t i)
{
	return (unsigned char)((i * 13 + (i >> 9) + SENDQ_SALT) & 0xff);
}

/* Write until the socket takes no more for a while: the receiver's window is full, so what the sender
 * still holds stays unsent (a brief EAGAIN only means the small send buffer waits for lo to carry it). */
static int sendq_fill(void)
{
	unsigned char buf[SENDQ_BUF];

	for (;;) {
		ssize_t n;
		for (size_t i = 0; i < sizeof(buf); i++)
			buf[i] = sendq_byte(g.sendq_sent + i);
		n = send(g.sendq_w, buf, sizeof(buf), MSG_DONTWAIT);
		if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
			return -1;
		if (n < 0 && !(poll_one(g.sendq_w, POLLOUT, 200) & POLLOUT))
			return 0;
		if (n > 0)
			g.sendq_sent += (uint64_t)n;
	}
}

static void setup_sendq(void)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t alen = sizeof(a);
	/* The receiver's buffer well above lo's MSS: a VERIFY that drains it makes the kernel announce the
	 * window at once (with a buffer below the MSS it waits for the sender's zero-window probe, which backs
	 * off to minutes while the CT is frozen). The sender's is small: most of what it holds is unsent. */
	int small = 4096, big = 256 << 10, lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	g.sendq_w = g.sendq_r = -1;
	if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big)) < 0 ||
	    bind(lfd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(lfd, 1) < 0 ||
	    getsockname(lfd, (struct sockaddr *)&a, &alen) < 0) {
		seterr(IT_SENDQ, "listen on lo: %s", strerror(errno));
		goto out;
	}
	g.sendq_w = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (g.sendq_w < 0 || setsockopt(g.sendq_w, SOL_SOCKET, SO_SNDBUF, &small, sizeof(small)) < 0 ||
	    connect(g.sendq_w, (struct sockaddr *)&a, sizeof(a)) < 0) {
		seterr(IT_SENDQ, "connect on lo: %s", strerror(errno));
		goto out;
	}
	g.sendq_r = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	if (g.sendq_r < 0 || sendq_fill() < 0)
		seterr(IT_SENDQ, "fill: %s", strerror(errno));
out:
	if (lfd >= 0)
		close(lfd);
}

static void setup_pipes(void)
{
	int p[2];

	if (pipe2(p, O_NONBLOCK) < 0 || write_full(p[1], pipe_bytes, sizeof(pipe_bytes)) < 0) {
		seterr(IT_PIPES, "pipe: %s", strerror(errno));
		g.pipe_r = g.pipe_w = -1;
	} else {
		g.pipe_r = p[0];
		g.pipe_w = p[1];
	}
	unlink(g.path_fifo);
	g.fifo_r = g.fifo_w = -1;
	if (mkfifo(g.path_fifo, 0600) < 0) {
		seterr(IT_PIPES, "mkfifo %s: %s", g.path_fifo, strerror(errno));
		return;
	}
	g.fifo_r = open(g.path_fifo, O_RDONLY | O_NONBLOCK);
	g.fifo_w = open(g.path_fifo, O_WRONLY);
	if (g.fifo_r < 0 || g.fifo_w < 0 || write_full(g.fifo_w, fifo_bytes, sizeof(fifo_bytes)) < 0)
		seterr(IT_PIPES, "fifo: %s", strerror(errno));
}

static int send_unix_data(void)
{
	char buf[3000];

	for (size_t i = 0; i < 3; i++)
		if (send(g.dg[0], dgrams[i], strlen(dgrams[i]), 0) < 0)
			return -1;
	fill_pattern((unsigned char *)buf, sizeof(buf), 0x11);
	if (send(g.st[0], buf, 1000, 0) != 1000 || send(g.st[0], buf + 1000, 2000, 0) != 2000)
		return -1;
	return 0;
}

static void setup_unix(void)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};

	if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK, 0, g.dg) < 0 ||
	    socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, g.st) < 0 || send_unix_data() < 0)
		seterr(IT_UNIX, "socketpair: %s", strerror(errno));
	unlink(g.path_sock);
	snprintf(a.sun_path, sizeof(a.sun_path), "%s", g.path_sock);
	g.usock = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (g.usock < 0 || bind(g.usock, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(g.usock, 8) < 0)
		seterr(IT_UNIX, "listen %s: %s", g.path_sock, strerror(errno));
}

static int send_msgs(void)
{
	for (size_t i = 0; i < NMSGS; i++)
		if (msgsnd(g.msg_id, &queued_msgs[i], strlen(queued_msgs[i].mtext) + 1, IPC_NOWAIT) < 0)
			return -1;
	return 0;
}

static void setup_sysv(void)
{
	unsigned short vals[NSEMS];

	g.shm_id = shmget(IPC_PRIVATE, SHM_SIZE, IPC_CREAT | 0600);
	g.shm = g.shm_id < 0 ? (void *)-1 : shmat(g.shm_id, NULL, 0);
	if (g.shm == (void *)-1) {
		seterr(IT_SHM, "shm: %s", strerror(errno));
		g.shm = NULL;
	} else {
		fill_pattern(g.shm, SHM_SIZE, 0x99);
	}
	memcpy(vals, sem_values, sizeof(vals));
	g.sem_id = semget(IPC_PRIVATE, NSEMS, IPC_CREAT | 0600);
	if (g.sem_id < 0 || semctl(g.sem_id, 0, SETALL, vals) < 0)
		seterr(IT_SEM, "sem: %s", strerror(errno));
	g.msg_id = msgget(IPC_PRIVATE, IPC_CREAT | 0600);
	if (g.msg_id < 0 || send_msgs() < 0)
		seterr(IT_MSG, "msg: %s", strerror(errno));
}

static void setup_cwd(void)
{
	if (mkdir(g.path_cwd, 0755) < 0 && errno != EEXIST)
		seterr(IT_CWD, "mkdir %s: %s", g.path_cwd, strerror(errno));
	else if (chdir(g.path_cwd) < 0)
		seterr(IT_CWD, "chdir %s: %s", g.path_cwd, strerror(errno));
}

static void setup_timers(void)
{
	struct itimerval it = {{0, ITIMER_USEC}, {0, ITIMER_USEC}};
	struct sigevent sev;
	struct itimerspec ts = {{0, PTIMER_NSEC}, {0, PTIMER_NSEC}};

	if (setitimer(ITIMER_REAL, &it, NULL) < 0)
		seterr(IT_TIMERS, "setitimer: %s", strerror(errno));
	memset(&sev, 0, sizeof(sev));
	sev.sigev_notify = SIGEV_SIGNAL;
	sev.sigev_signo = SIGRTMIN + 2;
	sev.sigev_value.sival_int = 77;
	if (timer_create(CLOCK_MONOTONIC, &sev, &g.ptimer) < 0 || timer_settime(g.ptimer, 0, &ts, NULL) < 0)
		seterr(IT_TIMERS, "timer_create: %s", strerror(errno));
	else
		g.ptimer_ok = 1;
}

static int write_pty_bytes(void)
{
	if (write_full(g.pty_m, pty_in_bytes, sizeof(pty_in_bytes)) < 0)
		return -1;
	return write_full(g.pty_s, pty_out_bytes, sizeof(pty_out_bytes));
}

static void setup_terminal(void)
{
	struct termios t;

	g.pty_s = -1;
	g.pty_m = posix_openpt(O_RDWR | O_NOCTTY);
	if (g.pty_m < 0 || grantpt(g.pty_m) < 0 || unlockpt(g.pty_m) < 0 ||
	    ptsname_r(g.pty_m, g.pty_name, sizeof(g.pty_name)) != 0) {
		seterr(IT_TERMINAL, "ptmx: %s", strerror(errno));
		return;
	}
	g.pty_s = open(g.pty_name, O_RDWR | O_NOCTTY);
	if (g.pty_s < 0 || tcgetattr(g.pty_s, &t) < 0) {
		seterr(IT_TERMINAL, "open %s: %s", g.pty_name, strerror(errno));
		return;
	}
	cfmakeraw(&t);
	t.c_lflag &= ~(tcflag_t)(ECHO | ECHONL);
	t.c_cc[VMIN] = 3;
	t.c_cc[VTIME] = 7;
	cfsetispeed(&t, B38400);
	cfsetospeed(&t, B38400);
	g.ws.ws_row = 33;
	g.ws.ws_col = 101;
	memset(&g.tio, 0, sizeof(g.tio));
	if (tcsetattr(g.pty_s, TCSANOW, &t) < 0 || tcgetattr(g.pty_s, &g.tio) < 0 ||
	    ioctl(g.pty_s, TIOCSWINSZ, &g.ws) < 0 || set_nonblock(g.pty_s) < 0 || set_nonblock(g.pty_m) < 0 ||
	    write_pty_bytes() < 0)
		seterr(IT_TERMINAL, "termios: %s", strerror(errno));
}

static void setup_rlimits(void)
{
	struct rlimit r;

	if (getrlimit(RLIMIT_NOFILE, &r) == 0) {
		r.rlim_cur = NOFILE_SOFT;
		if (setrlimit(RLIMIT_NOFILE, &r) < 0)
			seterr(IT_RLIMITS, "NOFILE: %s", strerror(errno));
	}
	r.rlim_cur = CORE_SOFT;
	r.rlim_max = CORE_HARD;
	if (setrlimit(RLIMIT_CORE, &r) < 0)
		seterr(IT_RLIMITS, "CORE: %s", strerror(errno));
	if (getrlimit(RLIMIT_STACK, &r) == 0) {
		r.rlim_cur = STACK_SOFT;
		if (r.rlim_max != RLIM_INFINITY && r.rlim_max < STACK_SOFT)
			r.rlim_cur = r.rlim_max;
		if (setrlimit(RLIMIT_STACK, &r) < 0)
			seterr(IT_RLIMITS, "STACK: %s", strerror(errno));
	}
	getrlimit(RLIMIT_NOFILE, &g.rl_nofile);
	getrlimit(RLIMIT_CORE, &g.rl_core);
	getrlimit(RLIMIT_STACK, &g.rl_stack);
}

/* ------------------------------------------------------------------------------------------------ */
/* cpu worker: exact integer and floating point accumulators with a per-step invariant               */

static void cpu_publish(uint64_t n, uint32_t k, double f, long double ld, uint64_t chunks)
{
	pthread_mutex_lock(&g.cpu.lock);
	g.cpu.n = n;
	g.cpu.k = k;
	g.cpu.f = f;
	g.cpu.ld = ld;
	g.cpu.chunks = chunks;
	g.cpu.tls_ok = tls_marker == 0xC0FFEE5EEDUL;
	g.cpu.round_ok = fegetround() == FE_TOWARDZERO;
	pthread_mutex_unlock(&g.cpu.lock);
}

static void cpu_bad(uint64_t n, const char *what)
{
	pthread_mutex_lock(&g.cpu.lock);
	if (!g.cpu.bad[0])
		snprintf(g.cpu.bad, sizeof(g.cpu.bad), "step %llu: %s", (unsigned long long)n, what);
	pthread_mutex_unlock(&g.cpu.lock);
}

static void *cpu_worker(void *arg)
{
	sigset_t s;
	uint64_t n = 0, chunks = 0;
	uint32_t k = 0;
	double f = 0.0;
	long double ld = 0.0L;

	(void)arg;
	sigemptyset(&s);
	sigaddset(&s, SIGALRM);
	sigaddset(&s, SIGRTMIN + 2);
	sigaddset(&s, SIGUSR1);
	sigaddset(&s, SIGHUP);
	sigaddset(&s, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &s, NULL);
	prctl(PR_SET_NAME, "fidelity-cpu");
	tls_marker = 0xC0FFEE5EEDUL;
	fesetround(FE_TOWARDZERO);
	pthread_mutex_lock(&g.cpu.lock);
	g.cpu.tid = (pid_t)syscall(SYS_gettid);
	pthread_mutex_unlock(&g.cpu.lock);
	for (;;) {
		for (int i = 0; i < CPU_CHUNK; i++) {
			n++;
			k = (k + 1) & CPU_KMASK;
			if (k == 0) {
				f = 0.0;
				ld = 0.0L;
			}
			f += 0.5 * (double)k;
			ld += 0.25L * (long double)k;
			double kk = (double)k * (double)(k + 1);
			if (f * 4.0 != kk || ld * 8.0L != (long double)kk || (n & CPU_KMASK) != k)
				cpu_bad(n, "accumulator invariant broken");
		}
		chunks++;
		cpu_publish(n, k, f, ld, chunks);
		sleep_ms(8);
	}
	return NULL;
}

static void setup_cpu(void)
{
	pthread_mutex_init(&g.cpu.lock, NULL);
	if (pthread_create(&g.worker, NULL, cpu_worker, NULL) != 0)
		seterr(IT_CPU, "pthread_create failed");
}

/* ------------------------------------------------------------------------------------------------ */
/* credentials child protocol                                                                         */

static int child_query(struct child_reply *r, char *d)
{
	uint64_t token = ++g.token ^ ((uint64_t)now_ms() << 20);

	if (g.child <= 0)
		FAILF("no child");
	if (write_full(g.req_w, &token, sizeof(token)) < 0)
		FAILF("write request: %s", strerror(errno));
	for (;;) {
		if (!(poll_one(g.rep_r, POLLIN, 2000) & (POLLIN | POLLHUP)))
			FAILF("child did not answer in 2 s");
		if (read_full(g.rep_r, r, sizeof(*r)) != (ssize_t)sizeof(*r))
			FAILF("child reply: short read or EOF");
		if (r->token == token)
			return 0;
	}
}

/* ------------------------------------------------------------------------------------------------ */
/* checks: each returns 0 (ok) or -1 with the detail in d                                             */

struct vctx {
	struct child_reply child;
	int child_rc;
	char child_err[DETAIL];
};

static int check_memory(struct vctx *v, char *d)
{
	uint64_t s = ANON_SEED, tok;
	long bad;

	if (!g.anon || !g.shared || !g.fmap)
		FAILF("not mapped");
	for (size_t i = 0; i < ANON_SIZE / 8; i++)
		if (g.anon[i] != xorshift(&s))
			FAILF("anon region differs at byte %zu", i * 8);
	if ((bad = check_pattern(g.shared, SHARED_TOKEN_OFF, 0x5a)) >= 0)
		FAILF("shared region differs at byte %ld", bad);
	if (v->child_rc < 0)
		FAILF("shared region: %.400s", v->child_err);
	memcpy(&tok, g.shared + SHARED_TOKEN_OFF, sizeof(tok));
	if (tok != v->child.token)
		FAILF("child's write to the shared region not visible (no longer shared)");
	if ((bad = check_pattern(g.fmap, 4096, 0x77)) >= 0)
		FAILF("private page of file mapping differs at %ld", bad);
	if ((bad = check_pattern_from(g.fmap, 4096, FMAP_SIZE, 0x33)) >= 0)
		FAILF("file mapping differs at %ld", bad);
	return 0;
}

static int cpu_snapshot(struct cpu_pub *c)
{
	pthread_mutex_lock(&g.cpu.lock);
	c->n = g.cpu.n;
	c->k = g.cpu.k;
	c->f = g.cpu.f;
	c->ld = g.cpu.ld;
	c->chunks = g.cpu.chunks;
	c->tid = g.cpu.tid;
	c->tls_ok = g.cpu.tls_ok;
	c->round_ok = g.cpu.round_ok;
	memcpy(c->bad, g.cpu.bad, sizeof(c->bad));
	pthread_mutex_unlock(&g.cpu.lock);
	return 0;
}

static int check_cpu(struct vctx *v, char *d)
{
	struct cpu_pub a, b;
	double kk;
	long end = now_ms() + 2000;

	(void)v;
	cpu_snapshot(&a);
	do {
		sleep_ms(10);
		cpu_snapshot(&b);
	} while (b.chunks == a.chunks && now_ms() < end);
	if (b.bad[0])
		FAILF("%s", b.bad);
	if (b.chunks == a.chunks)
		FAILF("no progress in 2 s (n=%llu)", (unsigned long long)b.n);
	if (b.n <= g.last_cpu_n)
		FAILF("step counter went back: %llu <= %llu", (unsigned long long)b.n,
		      (unsigned long long)g.last_cpu_n);
	kk = (double)b.k * (double)(b.k + 1);
	if ((b.n & CPU_KMASK) != b.k || b.f * 4.0 != kk || b.ld * 8.0L != (long double)kk)
		FAILF("published state inconsistent: n=%llu k=%u f=%.1f", (unsigned long long)b.n, b.k, b.f);
	if (!b.tls_ok)
		FAILF("thread-local marker lost");
	if (!b.round_ok)
		FAILF("worker's FP rounding mode lost");
	g.last_cpu_n = b.n;
	return 0;
}

static int check_fd_flags(int fd, int want, const char *what, char *d)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl < 0)
		FAILF("%s: F_GETFL: %s", what, strerror(errno));
	if ((fl & (O_ACCMODE | O_APPEND | O_NONBLOCK)) != want)
		FAILF("%s: flags %#o, want %#o", what, fl & (O_ACCMODE | O_APPEND | O_NONBLOCK), want);
	return 0;
}

static int check_files(struct vctx *v, char *d)
{
	char buf[256];
	unsigned char gbuf[GHOST_SIZE];
	struct stat st;
	size_t alen = strlen(append_text);

	memset(&st, 0, sizeof(st));
	long bad;

	(void)v;
	if (check_fd_flags(g.fd_append, O_RDWR | O_APPEND, "append file", d) < 0)
		return -1;
	if (!(fcntl(g.fd_append, F_GETFD) & FD_CLOEXEC))
		FAILF("append file lost FD_CLOEXEC");
	if (lseek(g.fd_append, 0, SEEK_CUR) != APPEND_OFFSET)
		FAILF("append file offset %lld, want %d", (long long)lseek(g.fd_append, 0, SEEK_CUR),
		      APPEND_OFFSET);
	if (fstat(g.fd_append, &st) < 0 || st.st_size != (off_t)alen)
		FAILF("append file size %lld, want %zu", (long long)st.st_size, alen);
	if (pread(g.fd_append, buf, sizeof(buf), 0) != (ssize_t)alen || memcmp(buf, append_text, alen))
		FAILF("append file content differs");
	if (check_fd_flags(g.fd_ghost, O_RDWR, "ghost file", d) < 0)
		return -1;
	if (fstat(g.fd_ghost, &st) < 0 || st.st_nlink != 0 || st.st_size != GHOST_SIZE)
		FAILF("ghost file: nlink %lu size %lld", (unsigned long)st.st_nlink, (long long)st.st_size);
	if (lseek(g.fd_ghost, 0, SEEK_CUR) != GHOST_OFFSET)
		FAILF("ghost file offset %lld, want %d", (long long)lseek(g.fd_ghost, 0, SEEK_CUR), GHOST_OFFSET);
	if (pread(g.fd_ghost, gbuf, sizeof(gbuf), 0) != (ssize_t)sizeof(gbuf))
		FAILF("ghost file short read");
	if ((bad = check_pattern(gbuf, sizeof(gbuf), 0x42)) >= 0)
		FAILF("ghost file content differs at %ld", bad);
	return 0;
}

static int check_queue_bytes(int rfd, int wfd, const char *want, size_t n, const char *what, char *d)
{
	char buf[4096];
	ssize_t got = drain(rfd, buf, sizeof(buf), 50);
	int rc = 0;

	if (got < 0) {
		snprintf(d, DETAIL, "%s: read: %s", what, strerror(errno));
		rc = -1;
	} else if ((size_t)got != n || memcmp(buf, want, n)) {
		snprintf(d, DETAIL, "%s: %zd bytes queued, want %zu%s", what, got, n,
			 (size_t)got == n ? " (content differs)" : "");
		rc = -1;
	}
	if (write_full(wfd, want, n) < 0 && rc == 0) { /* re-arm for the next VERIFY */
		snprintf(d, DETAIL, "%s: re-arm write: %s", what, strerror(errno));
		rc = -1;
	}
	return rc;
}

static int check_pipes(struct vctx *v, char *d)
{
	(void)v;
	if (check_fd_flags(g.pipe_r, O_RDONLY | O_NONBLOCK, "pipe read end", d) < 0 ||
	    check_fd_flags(g.fifo_r, O_RDONLY | O_NONBLOCK, "fifo read end", d) < 0 ||
	    check_fd_flags(g.fifo_w, O_WRONLY, "fifo write end", d) < 0)
		return -1;
	if (check_queue_bytes(g.pipe_r, g.pipe_w, pipe_bytes, sizeof(pipe_bytes), "pipe", d) < 0)
		return -1;
	return check_queue_bytes(g.fifo_r, g.fifo_w, fifo_bytes, sizeof(fifo_bytes), "fifo", d);
}

static int check_dgrams(char *d)
{
	char buf[256];
	int rc = 0;

	for (size_t i = 0; i < 3; i++) {
		ssize_t r = recv(g.dg[1], buf, sizeof(buf), MSG_DONTWAIT);
		if (rc == 0 && (r != (ssize_t)strlen(dgrams[i]) || memcmp(buf, dgrams[i], (size_t)r))) {
			snprintf(d, DETAIL, "datagram %zu: got %zd bytes", i, r);
			rc = -1;
		}
	}
	if (rc == 0 && recv(g.dg[1], buf, sizeof(buf), MSG_DONTWAIT) >= 0) {
		snprintf(d, DETAIL, "unexpected extra datagram");
		rc = -1;
	}
	while (recv(g.dg[1], buf, sizeof(buf), MSG_DONTWAIT) >= 0)
		;
	return rc;
}

static int check_stream(char *d)
{
	char buf[4096], want[3000];
	ssize_t got = 0;

	for (;;) {
		ssize_t r = recv(g.st[1], buf + got, sizeof(buf) - (size_t)got, MSG_DONTWAIT);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0 || (got += r) == (ssize_t)sizeof(buf))
			break;
	}
	fill_pattern((unsigned char *)want, sizeof(want), 0x11);
	if (got != (ssize_t)sizeof(want) || memcmp(buf, want, sizeof(want)))
		FAILF("stream socketpair: %zd bytes queued, want %zu", got, sizeof(want));
	return 0;
}

static int listener_exchange(char *d)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	char buf[8];
	int c, s = -1, rc = -1;

	snprintf(a.sun_path, sizeof(a.sun_path), "%s", g.path_sock);
	c = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (c < 0 || connect(c, (struct sockaddr *)&a, sizeof(a)) < 0)
		snprintf(d, DETAIL, "connect %s: %s", g.path_sock, strerror(errno));
	else if (!(poll_one(g.usock, POLLIN, 1000) & POLLIN))
		snprintf(d, DETAIL, "connection to %s did not arrive at the listener", g.path_sock);
	else if ((s = accept4(g.usock, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) < 0)
		snprintf(d, DETAIL, "accept on %s: %s", g.path_sock, strerror(errno));
	else if (write(c, "ping", 4) != 4 || drain(s, buf, sizeof(buf), 100) != 4 || memcmp(buf, "ping", 4))
		snprintf(d, DETAIL, "exchange over %s failed", g.path_sock);
	else
		rc = 0;
	close(c);
	if (s >= 0)
		close(s);
	return rc;
}

static int check_listener(char *d)
{
	struct sockaddr_un a;
	socklen_t alen = sizeof(a), olen;
	int on = 0, s, stray = 0;

	memset(&a, 0, sizeof(a));
	if (getsockname(g.usock, (struct sockaddr *)&a, &alen) < 0 || strcmp(a.sun_path, g.path_sock))
		FAILF("listener bound to '%s', want %s", a.sun_path, g.path_sock);
	olen = sizeof(on);
	if (getsockopt(g.usock, SOL_SOCKET, SO_ACCEPTCONN, &on, &olen) < 0 || !on)
		FAILF("listener is not listening");
	while ((s = accept4(g.usock, NULL, NULL, SOCK_CLOEXEC)) >= 0 || errno == EINTR) {
		if (s >= 0) {
			close(s);
			stray++;
		}
	}
	if (listener_exchange(d) < 0)
		return -1;
	if (stray)
		FAILF("%d unexpected queued connection(s) on %s", stray, g.path_sock);
	return 0;
}

static int check_unix(struct vctx *v, char *d)
{
	char d2[DETAIL];
	int rc;

	(void)v;
	rc = check_dgrams(d);
	if (check_stream(rc ? d2 : d) < 0)
		rc = -1;
	if (send_unix_data() < 0 && rc == 0) /* re-arm for the next VERIFY */
		FAILF("re-arm send: %s", strerror(errno));
	if (rc < 0)
		return -1;
	return check_listener(d);
}

static int check_shm(struct vctx *v, char *d)
{
	struct shmid_ds ds;
	long bad;

	(void)v;
	if (shmctl(g.shm_id, IPC_STAT, &ds) < 0)
		FAILF("shmctl(%d): %s", g.shm_id, strerror(errno));
	if (ds.shm_perm.mode & SHM_DEST)
		FAILF("segment %d is marked for removal", g.shm_id);
	if (ds.shm_segsz != SHM_SIZE || ds.shm_nattch < 1)
		FAILF("segment size %zu nattch %lu", (size_t)ds.shm_segsz, (unsigned long)ds.shm_nattch);
	if ((bad = check_pattern(g.shm, SHM_SIZE, 0x99)) >= 0)
		FAILF("attached segment differs at %ld", bad);
	return 0;
}

static int check_sem(struct vctx *v, char *d)
{
	unsigned short vals[NSEMS];

	(void)v;
	if (semctl(g.sem_id, 0, GETALL, vals) < 0)
		FAILF("semctl(%d, GETALL): %s", g.sem_id, strerror(errno));
	for (int i = 0; i < NSEMS; i++)
		if (vals[i] != sem_values[i])
			FAILF("semaphore %d = %u, want %u", i, vals[i], sem_values[i]);
	return 0;
}

static int check_msg(struct vctx *v, char *d)
{
	struct msqid_ds ds;
	struct qmsg m;
	int rc = 0;

	(void)v;
	if (msgctl(g.msg_id, IPC_STAT, &ds) < 0)
		FAILF("msgctl(%d): %s", g.msg_id, strerror(errno));
	if (ds.msg_qnum != NMSGS)
		rc = snprintf(d, DETAIL, "%lu messages queued, want %zu", (unsigned long)ds.msg_qnum, NMSGS);
	for (size_t i = 0; i < NMSGS && !rc; i++) {
		ssize_t r;
		memset(&m, 0, sizeof(m));
		while ((r = msgrcv(g.msg_id, &m, sizeof(m.mtext), 0, IPC_NOWAIT)) < 0 && errno == EINTR)
			;
		if (r < 0 || m.mtype != queued_msgs[i].mtype || strcmp(m.mtext, queued_msgs[i].mtext))
			rc = snprintf(d, DETAIL, "message %zu: type %ld '%.31s'", i, m.mtype, m.mtext);
	}
	while (msgrcv(g.msg_id, &m, sizeof(m.mtext), 0, IPC_NOWAIT) >= 0 || errno == EINTR)
		;
	if (send_msgs() < 0 && !rc)
		FAILF("re-arm msgsnd: %s", strerror(errno));
	return rc ? -1 : 0;
}

static int check_cwd(struct vctx *v, char *d)
{
	char buf[512];

	(void)v;
	if (!getcwd(buf, sizeof(buf)))
		FAILF("getcwd: %s", strerror(errno));
	if (strcmp(buf, g.path_cwd))
		FAILF("cwd is %.200s, want %.200s", buf, g.path_cwd);
	return 0;
}

static int same_mask(const sigset_t *a, const sigset_t *b)
{
	for (int s = 1; s <= 64; s++)
		if (sigismember(a, s) != sigismember(b, s))
			return 0;
	return 1;
}

static int same_action(int sig, const struct sigaction *want, char *d)
{
	struct sigaction cur;

	if (sigaction(sig, NULL, &cur) < 0)
		FAILF("sigaction(%d): %s", sig, strerror(errno));
	if (cur.sa_handler != want->sa_handler)
		FAILF("%s: handler %p, want %p", strsignal(sig), (void *)cur.sa_handler, (void *)want->sa_handler);
	if (cur.sa_flags != want->sa_flags)
		FAILF("%s: flags %#x, want %#x", strsignal(sig), cur.sa_flags, want->sa_flags);
	if (!same_mask(&cur.sa_mask, &want->sa_mask))
		FAILF("%s: sa_mask differs", strsignal(sig));
	return 0;
}

static int check_handlers(struct vctx *v, char *d)
{
	stack_t ss;

	(void)v;
	if (same_action(SIGUSR1, &g.sa_usr1, d) < 0 || same_action(SIGHUP, &g.sa_hup, d) < 0)
		return -1;
	if (sigaltstack(NULL, &ss) < 0 || ss.ss_sp != g.altstack.ss_sp || ss.ss_size != g.altstack.ss_size)
		FAILF("sigaltstack changed");
	return 0;
}

static int pending_deliver(char *d)
{
	sigset_t s;

	atomic_store(&usr2_count, 0);
	atomic_store(&rt_count, 0);
	sigemptyset(&s);
	sigaddset(&s, SIGUSR2);
	sigaddset(&s, SIGRTMIN + 1);
	pthread_sigmask(SIG_UNBLOCK, &s, NULL); /* the handlers run before this returns */
	pthread_sigmask(SIG_BLOCK, &s, NULL);
	if (atomic_load(&usr2_count) != 1)
		FAILF("SIGUSR2 delivered %d times on unblock, want 1", atomic_load(&usr2_count));
	if (atomic_load(&rt_count) != 2)
		FAILF("SIGRTMIN+1 delivered %d times on unblock, want 2", atomic_load(&rt_count));
	if (rt_values[0] != RT_VAL1 || rt_values[1] != RT_VAL2)
		FAILF("sigqueue values %d,%d want %d,%d", rt_values[0], rt_values[1], RT_VAL1, RT_VAL2);
	if (rt_codes[0] != SI_QUEUE || rt_pids[0] != g.pid)
		FAILF("siginfo code %d pid %d, want SI_QUEUE from %d", rt_codes[0], rt_pids[0], g.pid);
	return 0;
}

static int check_pending(struct vctx *v, char *d)
{
	sigset_t p, m;
	int usr2, rt1, rc;

	(void)v;
	sigpending(&p);
	pthread_sigmask(SIG_BLOCK, NULL, &m);
	if (!sigismember(&m, SIGUSR2) || !sigismember(&m, SIGRTMIN + 1))
		FAILF("SIGUSR2/SIGRTMIN+1 no longer blocked");
	usr2 = sigismember(&p, SIGUSR2);
	rt1 = sigismember(&p, SIGRTMIN + 1);
	rc = pending_deliver(d); /* consumes whatever is pending */
	if (raise_pending() < 0) /* re-arm for the next VERIFY */
		FAILF("re-arm: %s", strerror(errno));
	if (!usr2 || !rt1)
		FAILF("not pending: SIGUSR2=%d SIGRTMIN+1=%d", usr2, rt1);
	return rc;
}

/* A periodic timer reads 0 from its expiry until its signal is dequeued (the kernel re-arms it then): on a
   slow guest that window is long. Disarmed is 0 for several periods in a row, not once. */
#define DISARMED_READS 10

static int check_timer_values(char *d)
{
	struct itimerval it;
	struct itimerspec ts;
	int reads;

	for (reads = 0; reads < DISARMED_READS; reads++) {
		if (getitimer(ITIMER_REAL, &it) < 0)
			FAILF("getitimer: %s", strerror(errno));
		if (it.it_value.tv_sec != 0 || it.it_value.tv_usec != 0)
			break;
		sleep_ms(ITIMER_USEC / 1000);
	}
	if (it.it_interval.tv_sec != 0 || it.it_interval.tv_usec != ITIMER_USEC)
		FAILF("itimer interval %ld.%06ld", (long)it.it_interval.tv_sec, (long)it.it_interval.tv_usec);
	if (it.it_value.tv_sec == 0 && it.it_value.tv_usec == 0)
		FAILF("itimer disarmed");
	if (!g.ptimer_ok)
		FAILF("no posix timer");
	for (reads = 0; reads < DISARMED_READS; reads++) {
		if (timer_gettime(g.ptimer, &ts) < 0)
			FAILF("timer_gettime: %s", strerror(errno));
		if (ts.it_value.tv_sec != 0 || ts.it_value.tv_nsec != 0)
			break;
		sleep_ms(PTIMER_NSEC / 1000000);
	}
	if (ts.it_interval.tv_sec != 0 || ts.it_interval.tv_nsec != PTIMER_NSEC)
		FAILF("posix timer interval %ld.%09ld", (long)ts.it_interval.tv_sec, ts.it_interval.tv_nsec);
	if (ts.it_value.tv_sec == 0 && ts.it_value.tv_nsec == 0)
		FAILF("posix timer disarmed");
	return 0;
}

static int check_timers(struct vctx *v, char *d)
{
	long a0 = atomic_load(&alarm_ticks), p0 = atomic_load(&ptimer_ticks);
	long end = now_ms() + 1000;

	(void)v;
	if (check_timer_values(d) < 0)
		return -1;
	if (a0 < g.last_alarm || p0 < g.last_ptick)
		FAILF("tick counters went back");
	while ((atomic_load(&alarm_ticks) <= a0 || atomic_load(&ptimer_ticks) <= p0) && now_ms() < end)
		sleep_ms(5);
	if (atomic_load(&alarm_ticks) <= a0)
		FAILF("ITIMER_REAL did not fire within 1 s (ticks %ld)", a0);
	if (atomic_load(&ptimer_ticks) <= p0)
		FAILF("posix timer did not fire within 1 s (ticks %ld)", p0);
	g.last_alarm = atomic_load(&alarm_ticks);
	g.last_ptick = atomic_load(&ptimer_ticks);
	return 0;
}

static int same_termios(const struct termios *a, const struct termios *b, char *d)
{
	if (a->c_iflag != b->c_iflag || a->c_oflag != b->c_oflag || a->c_cflag != b->c_cflag ||
	    a->c_lflag != b->c_lflag)
		FAILF("termios flags i%#x o%#x c%#x l%#x, want i%#x o%#x c%#x l%#x", a->c_iflag, a->c_oflag,
		      a->c_cflag, a->c_lflag, b->c_iflag, b->c_oflag, b->c_cflag, b->c_lflag);
	if (memcmp(a->c_cc, b->c_cc, sizeof(a->c_cc)))
		FAILF("termios c_cc differs (VMIN %u VTIME %u)", a->c_cc[VMIN], a->c_cc[VTIME]);
	if (cfgetispeed(a) != cfgetispeed(b) || cfgetospeed(a) != cfgetospeed(b))
		FAILF("termios speed differs");
	return 0;
}

static int check_terminal(struct vctx *v, char *d)
{
	struct termios t;
	struct winsize ws;
	char name[64];

	(void)v;
	memset(&t, 0, sizeof(t));
	if (tcgetattr(g.pty_s, &t) < 0)
		FAILF("tcgetattr: %s", strerror(errno));
	if (same_termios(&t, &g.tio, d) < 0)
		return -1;
	if (ioctl(g.pty_s, TIOCGWINSZ, &ws) < 0 || ws.ws_row != g.ws.ws_row || ws.ws_col != g.ws.ws_col)
		FAILF("window size %ux%u, want %ux%u", ws.ws_row, ws.ws_col, g.ws.ws_row, g.ws.ws_col);
	if (ptsname_r(g.pty_m, name, sizeof(name)) != 0 || strcmp(name, g.pty_name))
		FAILF("pty is %s, want %s", name, g.pty_name);
	if (check_queue_bytes(g.pty_s, g.pty_m, pty_in_bytes, sizeof(pty_in_bytes), "pty input", d) < 0)
		return -1;
	return check_queue_bytes(g.pty_m, g.pty_s, pty_out_bytes, sizeof(pty_out_bytes), "pty output", d);
}

static int check_creds(struct vctx *v, char *d)
{
	const struct child_reply *r = &v->child;

	if (v->child_rc < 0)
		FAILF("%s", v->child_err);
	if (r->err[0])
		FAILF("child: %.120s", r->err);
	if (r->ruid != cid.uid || r->euid != cid.uid || r->suid != cid.suid)
		FAILF("child uids %u/%u/%u, want %u/%u/%u", r->ruid, r->euid, r->suid, cid.uid, cid.uid, cid.suid);
	if (r->rgid != cid.gid || r->egid != cid.gid || r->sgid != cid.sgid)
		FAILF("child gids %u/%u/%u, want %u/%u/%u", r->rgid, r->egid, r->sgid, cid.gid, cid.gid, cid.sgid);
	if (r->ngroups != 3 || r->groups[0] != 2345 || r->groups[1] != 3456 || r->groups[2] != 4567)
		FAILF("child groups (%d) differ", r->ngroups);
	return 0;
}

static int check_pids(struct vctx *v, char *d)
{
	const struct child_reply *a = &g.child0, *b = &v->child;
	struct cpu_pub c;

	if (getpid() != g.pid || getppid() != g.ppid || getpgrp() != g.pgrp || getsid(0) != g.sid)
		FAILF("main pid/ppid/pgrp/sid %d/%d/%d/%d, want %d/%d/%d/%d", getpid(), getppid(), getpgrp(),
		      getsid(0), g.pid, g.ppid, g.pgrp, g.sid);
	cpu_snapshot(&c);
	if (c.tid <= 0)
		FAILF("worker thread id unknown");
	if (v->child_rc < 0)
		FAILF("%s", v->child_err);
	if (a->pid != g.child || b->pid != a->pid || b->ppid != a->ppid || b->pgrp != a->pgrp ||
	    b->sid != a->sid)
		FAILF("child pid/ppid/pgrp/sid %d/%d/%d/%d, want %d/%d/%d/%d", b->pid, b->ppid, b->pgrp, b->sid,
		      a->pid, a->ppid, a->pgrp, a->sid);
	if (a->pgrp != a->pid || a->ppid != g.pid)
		FAILF("child is not in its own process group under us");
	return 0;
}

static pid_t worker_tid0;

static int check_rlimit(int res, const struct rlimit *want, const char *name, char *d)
{
	struct rlimit r;

	if (getrlimit(res, &r) < 0)
		FAILF("getrlimit(%s): %s", name, strerror(errno));
	if (r.rlim_cur != want->rlim_cur || r.rlim_max != want->rlim_max)
		FAILF("%s %llu/%llu, want %llu/%llu", name, (unsigned long long)r.rlim_cur,
		      (unsigned long long)r.rlim_max, (unsigned long long)want->rlim_cur,
		      (unsigned long long)want->rlim_max);
	return 0;
}

static int check_rlimits(struct vctx *v, char *d)
{
	(void)v;
	if (g.rl_nofile.rlim_cur != NOFILE_SOFT)
		FAILF("NOFILE soft limit was not set");
	if (check_rlimit(RLIMIT_NOFILE, &g.rl_nofile, "NOFILE", d) < 0 ||
	    check_rlimit(RLIMIT_CORE, &g.rl_core, "CORE", d) < 0)
		return -1;
	return check_rlimit(RLIMIT_STACK, &g.rl_stack, "STACK", d);
}

static int check_hostname(struct vctx *v, char *d)
{
	struct utsname u;

	(void)v;
	if (uname(&u) < 0)
		FAILF("uname: %s", strerror(errno));
	if (strcmp(u.nodename, g.uts.nodename))
		FAILF("nodename %.64s, want %.64s", u.nodename, g.uts.nodename);
	if (strcmp(u.domainname, g.uts.domainname))
		FAILF("domainname %.64s, want %.64s", u.domainname, g.uts.domainname);
	return 0;
}

static int check_worker_tid(char *d)
{
	struct cpu_pub c;

	cpu_snapshot(&c);
	if (c.tid != worker_tid0)
		FAILF("worker tid %d, want %d", c.tid, worker_tid0);
	return 0;
}

static int check_pids_all(struct vctx *v, char *d)
{
	if (check_pids(v, d) < 0)
		return -1;
	return check_worker_tid(d);
}

/* Asks the kernel as the parent (no /proc: the workload may run in a PID namespace without its own /proc).
 * WNOWAIT leaves the stop reportable for the next VERIFY. */
static int check_stopped(struct vctx *v, char *d)
{
	siginfo_t si;

	(void)v;
	memset(&si, 0, sizeof(si));
	if (waitid(P_PID, (id_t)g.stopped, &si, WSTOPPED | WNOHANG | WNOWAIT) < 0)
		FAILF("stopped child %d: waitid: %s", g.stopped, strerror(errno));
	if (si.si_pid != g.stopped)
		FAILF("child %d is not stopped (it runs)", g.stopped);
	if (si.si_code != CLD_STOPPED)
		FAILF("child %d: si_code %d, want CLD_STOPPED", g.stopped, si.si_code);
	return 0;
}

static int check_linked(struct vctx *v, char *d)
{
	unsigned char buf[LINKED_SIZE];
	struct stat st, other;
	long bad;

	(void)v;
	if (access(g.path_linked, F_OK) == 0)
		FAILF("unlinked name %s exists again", g.path_linked);
	if (fstat(g.fd_linked, &st) < 0 || st.st_nlink != 1 || st.st_size != (off_t)LINKED_SIZE)
		FAILF("linked file: nlink %lu size %lld", (unsigned long)st.st_nlink, (long long)st.st_size);
	if (stat(g.path_linked_other, &other) < 0 || other.st_ino != st.st_ino || other.st_dev != st.st_dev)
		FAILF("the open file is no longer the one linked as %s", g.path_linked_other);
	if (lseek(g.fd_linked, 0, SEEK_CUR) != LINKED_OFFSET)
		FAILF("linked file offset %lld, want %d", (long long)lseek(g.fd_linked, 0, SEEK_CUR), LINKED_OFFSET);
	if (pread(g.fd_linked, buf, sizeof(buf), 0) != (ssize_t)sizeof(buf))
		FAILF("linked file short read");
	if ((bad = check_pattern(buf, sizeof(buf), 0x37)) >= 0)
		FAILF("linked file content differs at %ld", bad);
	return 0;
}

/* Everything written so far arrives, in order; then the queue is filled again. */
static int check_sendq(struct vctx *v, char *d)
{
	unsigned char buf[SENDQ_BUF];
	long deadline = now_ms() + 3000;

	(void)v;
	if (g.sendq_sent <= g.sendq_checked)
		FAILF("nothing was queued");
	while (g.sendq_checked < g.sendq_sent) {
		ssize_t n;
		if (poll_one(g.sendq_r, POLLIN, deadline - now_ms()) <= 0)
			FAILF("%llu of %llu queued bytes arrived",
			      (unsigned long long)g.sendq_checked, (unsigned long long)g.sendq_sent);
		n = recv(g.sendq_r, buf, sizeof(buf), MSG_DONTWAIT);
		if (n <= 0)
			FAILF("recv after %llu bytes: %s", (unsigned long long)g.sendq_checked,
			      n == 0 ? "EOF" : strerror(errno));
		for (ssize_t i = 0; i < n; i++)
			if (buf[i] != sendq_byte(g.sendq_checked + (uint64_t)i))
				FAILF("byte %llu differs", (unsigned long long)(g.sendq_checked + (uint64_t)i));
		g.sendq_checked += (uint64_t)n;
	}
	if (sendq_fill() < 0)
		FAILF("re-arm: %s", strerror(errno));
	return 0;
}

typedef int (*check_fn)(struct vctx *, char *);

static const check_fn checks[IT_COUNT] = {
	check_memory, check_cpu, check_files, check_pipes, check_unix, check_shm, check_sem, check_msg,
	check_cwd, check_handlers, check_pending, check_timers, check_terminal, check_creds,
	check_pids_all, check_rlimits, check_hostname, check_stopped, check_linked, check_sendq,
};

/* Appends the VERIFY reply to out (cap bytes). */
static size_t do_verify(char *out, size_t cap)
{
	struct vctx v;
	size_t len = 0;

	memset(&v, 0, sizeof(v));
	v.child_rc = child_query(&v.child, v.child_err);
	for (int i = 0; i < IT_COUNT; i++) {
		char d[DETAIL] = "";
		int rc;

		if (setup_err[i][0]) {
			snprintf(d, sizeof(d), "setup: %.400s", setup_err[i]);
			rc = -1;
		} else {
			rc = checks[i](&v, d);
		}
		for (char *p = d; *p; p++)
			if (*p == '\n' || *p == '\r')
				*p = ' ';
		if (len < cap)
			len += (size_t)snprintf(out + len, cap - len, rc ? "ITEM %s FAIL %s\n" : "ITEM %s ok\n",
						item_names[i], rc ? d : "");
	}
	g.verifies++;
	return len < cap ? len : cap;
}

static long rss_kb(void)
{
	long pages = 0, rss = 0;
	FILE *f = fopen("/proc/self/statm", "r");

	if (f) {
		if (fscanf(f, "%ld %ld", &pages, &rss) != 2)
			rss = 0;
		fclose(f);
		return rss * (sysconf(_SC_PAGESIZE) / 1024);
	}
	{
		struct rusage ru;
		getrusage(RUSAGE_SELF, &ru);
		return ru.ru_maxrss;
	}
}

static size_t do_info(char *out, size_t cap)
{
	struct cpu_pub c;

	cpu_snapshot(&c);
	return (size_t)snprintf(
		out, cap,
		"pid %d\nppid %d\nchild_pid %d\nworker_tid %d\nrss_kb %ld\ncpu_steps %llu\nalarm_ticks %ld\n"
		"ptimer_ticks %ld\necho_bytes %llu\nverifies %ld\nuptime_ms %ld\nshm_id %d\nsem_id %d\n"
		"msg_id %d\npipe_rfd %d\npipe_wfd %d\nfifo_wfd %d\npty %s\ndir %s\nhostname %s\nanon_addr %p\n",
		getpid(), getppid(), g.child, c.tid, rss_kb(), (unsigned long long)c.n, atomic_load(&alarm_ticks),
		atomic_load(&ptimer_ticks), (unsigned long long)g.echo_bytes, g.verifies,
		now_ms() - (g.t0.tv_sec * 1000L + g.t0.tv_nsec / 1000000L), g.shm_id, g.sem_id, g.msg_id,
		g.pipe_r, g.pipe_w, g.fifo_w, g.pty_name, g.dir, g.uts.nodename, (void *)g.anon);
}

/* ------------------------------------------------------------------------------------------------ */
/* network: control (line protocol) and echo                                                          */

static int tcp_listen(int port)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	int one = 1, fd;

	if (inet_pton(AF_INET, g.addr, &a.sin_addr) != 1)
		return -1;
	fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 16) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

static void ctl_reply(struct ctl_conn *c, const char *line)
{
	static char out[16384];
	size_t len = 0;

	if (!strcmp(line, "PING")) {
		len = (size_t)snprintf(out, sizeof(out), "PONG\n");
	} else if (!strcmp(line, "VERIFY")) {
		len = do_verify(out, sizeof(out) - 8);
	} else if (!strcmp(line, "INFO")) {
		len = do_info(out, sizeof(out) - 8);
	} else if (line[0]) {
		len = (size_t)snprintf(out, sizeof(out), "ERR unknown command\n");
	} else {
		return;
	}
	if (len > sizeof(out) - 8)
		len = sizeof(out) - 8;
	memcpy(out + len, "END\n", 4);
	if (write_full(c->fd, out, len + 4) < 0) {
		close(c->fd);
		c->fd = -1;
	}
}

static void ctl_input(struct ctl_conn *c)
{
	ssize_t r = read(c->fd, c->buf + c->len, sizeof(c->buf) - c->len);
	char *nl;

	if (r < 0 && (errno == EINTR || errno == EAGAIN))
		return;
	if (r <= 0) {
		close(c->fd);
		c->fd = -1;
		return;
	}
	c->len += (size_t)r;
	while (c->fd >= 0 && (nl = memchr(c->buf, '\n', c->len))) {
		size_t n = (size_t)(nl - c->buf);
		*nl = 0;
		if (n && c->buf[n - 1] == '\r')
			c->buf[n - 1] = 0;
		ctl_reply(c, c->buf);
		memmove(c->buf, nl + 1, c->len - n - 1);
		c->len -= n + 1;
	}
	if (c->fd >= 0 && c->len == sizeof(c->buf)) { /* line too long */
		close(c->fd);
		c->fd = -1;
	}
}

static void echo_close(struct echo_conn *e)
{
	close(e->fd);
	e->fd = -1;
	e->len = 0;
}

static void echo_flush(struct echo_conn *e)
{
	while (e->len) {
		ssize_t w = write(e->fd, e->buf, e->len);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN)
			return;
		if (w < 0) {
			echo_close(e);
			return;
		}
		memmove(e->buf, e->buf + w, e->len - (size_t)w);
		e->len -= (size_t)w;
	}
}

static void echo_input(struct echo_conn *e)
{
	ssize_t r = read(e->fd, e->buf + e->len, ECHO_BUF - e->len);

	if (r < 0 && (errno == EINTR || errno == EAGAIN))
		return;
	if (r <= 0) {
		echo_close(e);
		return;
	}
	e->len += (size_t)r;
	g.echo_bytes += (uint64_t)r;
	echo_flush(e);
}

static void accept_ctl(void)
{
	int fd = accept4(g.ctl_lfd, NULL, NULL, SOCK_CLOEXEC);
	struct timeval tv = {5, 0};

	if (fd < 0)
		return;
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	for (int i = 0; i < MAX_CTL; i++)
		if (g.ctl[i].fd < 0) {
			g.ctl[i].fd = fd;
			g.ctl[i].len = 0;
			return;
		}
	close(fd);
}

static void accept_echo(void)
{
	int fd = accept4(g.echo_lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	int one = 1;

	if (fd < 0)
		return;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	for (int i = 0; i < MAX_ECHO; i++)
		if (g.echo[i].fd < 0) {
			g.echo[i].fd = fd;
			g.echo[i].len = 0;
			return;
		}
	close(fd);
}

static void cleanup(void)
{
	if (g.child > 0 && kill(g.child, SIGKILL) == 0)
		while (waitpid(g.child, NULL, 0) < 0 && errno == EINTR)
			;
	if (g.stopped > 0 && kill(g.stopped, SIGKILL) == 0)
		while (waitpid(g.stopped, NULL, 0) < 0 && errno == EINTR)
			;
	unlink(g.path_linked_other);
	if (g.shm)
		shmdt(g.shm);
	if (g.shm_id >= 0)
		shmctl(g.shm_id, IPC_RMID, NULL);
	if (g.sem_id >= 0)
		semctl(g.sem_id, 0, IPC_RMID);
	if (g.msg_id >= 0)
		msgctl(g.msg_id, IPC_RMID, NULL);
	unlink(g.path_append);
	unlink(g.path_fmap);
	unlink(g.path_fifo);
	unlink(g.path_sock);
	rmdir(g.path_cwd);
}

static void serve(void)
{
	struct pollfd p[2 + MAX_CTL + MAX_ECHO];

	while (!term_flag) {
		int n = 0;
		p[n++] = (struct pollfd){g.ctl_lfd, POLLIN, 0};
		p[n++] = (struct pollfd){g.echo_lfd, POLLIN, 0};
		for (int i = 0; i < MAX_CTL; i++)
			p[n++] = (struct pollfd){g.ctl[i].fd, POLLIN, 0};
		for (int i = 0; i < MAX_ECHO; i++)
			p[n++] = (struct pollfd){g.echo[i].fd,
						 (short)((g.echo[i].len < ECHO_BUF ? POLLIN : 0) |
							 (g.echo[i].len ? POLLOUT : 0)),
						 0};
		if (poll(p, (nfds_t)n, -1) < 0)
			continue; /* EINTR: timer ticks arrive all the time */
		if (p[0].revents)
			accept_ctl();
		if (p[1].revents)
			accept_echo();
		for (int i = 0; i < MAX_CTL; i++)
			if (g.ctl[i].fd >= 0 && p[2 + i].revents)
				ctl_input(&g.ctl[i]);
		for (int i = 0; i < MAX_ECHO; i++) {
			short re = p[2 + MAX_CTL + i].revents;
			if (g.echo[i].fd >= 0 && (re & POLLOUT))
				echo_flush(&g.echo[i]);
			if (g.echo[i].fd >= 0 && (re & (POLLIN | POLLHUP | POLLERR)))
				echo_input(&g.echo[i]);
		}
	}
}

/* ------------------------------------------------------------------------------------------------ */
/* main                                                                                               */

/* Minimal init for a PID namespace: reaps children, forwards SIGTERM, exits with the workload. */
static int run_init(void)
{
	pid_t w;
	int status = 0;
	sigset_t s;

	setsid();
	sigemptyset(&s);
	sigaddset(&s, SIGTERM);
	sigaddset(&s, SIGCHLD);
	sigprocmask(SIG_BLOCK, &s, NULL);
	w = fork();
	if (w < 0)
		return 1;
	if (w == 0) {
		sigprocmask(SIG_UNBLOCK, &s, NULL);
		return -1; /* the workload continues in main() */
	}
	prctl(PR_SET_NAME, "fidelity-init");
	for (;;) {
		int sig = 0;
		pid_t r;
		while ((r = waitpid(-1, &status, WNOHANG)) > 0)
			if (r == w)
				return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
		if (sigwait(&s, &sig) == 0 && sig == SIGTERM)
			kill(w, SIGTERM);
	}
}

static int usage(void)
{
	fprintf(stderr, "usage: fidelity [-d DIR] [-a ADDR] [-i] [-r] PORT\n");
	return 2;
}

static int init_paths(void)
{
	if (strlen(g.dir) + sizeof("/fidelity-append.dat") > sizeof(g.path_sock))
		return -1; /* the unix socket path must fit in sun_path */
	path_in_dir(g.path_cwd, "fidelity-cwd");
	path_in_dir(g.path_append, "fidelity-append.dat");
	path_in_dir(g.path_fmap, "fidelity-map.dat");
	path_in_dir(g.path_fifo, "fidelity.fifo");
	path_in_dir(g.path_sock, "fidelity.sock");
	path_in_dir(g.path_ghost, "fidelity-ghost.dat");
	path_in_dir(g.path_linked, "fidelity-linked.dat");
	path_in_dir(g.path_linked_other, "fidelity-linked-other.dat");
	return 0;
}

static void init_globals(void)
{
	g.shm_id = g.sem_id = g.msg_id = -1;
	g.pty_m = g.pty_s = g.usock = -1;
	g.fd_append = g.fd_ghost = g.fd_linked = -1;
	g.sendq_w = g.sendq_r = -1;
	g.ctl_lfd = g.echo_lfd = -1;
	for (int i = 0; i < MAX_CTL; i++)
		g.ctl[i].fd = -1;
	for (int i = 0; i < MAX_ECHO; i++) {
		g.echo[i].fd = -1;
		g.echo[i].buf = malloc(ECHO_BUF);
	}
	clock_gettime(CLOCK_MONOTONIC, &g.t0);
}

static void record_identity(void)
{
	g.pid = getpid();
	g.ppid = getppid();
	g.pgrp = getpgrp();
	g.sid = getsid(0);
	if (uname(&g.uts) < 0)
		seterr(IT_HOSTNAME, "uname: %s", strerror(errno));
}

static void setup_all(void)
{
	setup_rlimits();
	setup_cwd();
	block_pending_signals();
	setup_memory();
	setup_child();
	setup_signals();
	setup_files();
	setup_linked_file();
	setup_stopped();
	setup_sendq();
	setup_pipes();
	setup_unix();
	setup_sysv();
	setup_terminal();
	if (raise_pending() < 0)
		seterr(IT_PENDING, "raise: %s", strerror(errno));
	setup_timers();
	setup_cpu();
	while (!worker_tid0) { /* the worker publishes its tid first thing */
		struct cpu_pub c;
		sleep_ms(1);
		cpu_snapshot(&c);
		worker_tid0 = c.tid;
	}
}

int main(int argc, char **argv)
{
	int opt, init = 0;

	g.dir = "/tmp";
	g.addr = "0.0.0.0";
	while ((opt = getopt(argc, argv, "d:a:ir")) != -1) {
		if (opt == 'd')
			g.dir = optarg;
		else if (opt == 'a')
			g.addr = optarg;
		else if (opt == 'i')
			init = 1;
		else if (opt == 'r')
			memset(&cid, 0, sizeof(cid));
		else
			return usage();
	}
	if (optind != argc - 1 || (g.port = atoi(argv[optind])) <= 0 || g.port > 65534)
		return usage();
	if (init) {
		int rc = run_init();
		if (rc >= 0)
			return rc;
	}
	setsid(); /* a daemon; fails harmlessly if already a group leader */
	if (init_paths() < 0)
		return usage();
	init_globals();
	record_identity();
	setup_all();
	g.ctl_lfd = tcp_listen(g.port);
	g.echo_lfd = tcp_listen(g.port + 1);
	if (g.ctl_lfd < 0 || g.echo_lfd < 0) {
		fprintf(stderr, "fidelity: listen on %s:%d/%d: %s\n", g.addr, g.port, g.port + 1, strerror(errno));
		cleanup();
		return 1;
	}
	serve();
	cleanup();
	return 0;
}
