/* The frame floor of bench_host.py: the least any frame path can do per frame, with nothing of a
 * compositor in it. For each flip message: one epoll wakeup, one recvmsg, one commit ioctl (on
 * /dev/null, refused, as the fake card's commit makes) and a flip event queued for the display
 * engine; for each flip event: one epoll wakeup, one read of the event from a pipe, one send of a
 * 44-byte reply (what `presented` and `released` take together). The display engine is a thread
 * named "fakekms" that looks at its queue every 4 ms (as bench/fakedrm.c's does) and writes each event
 * 1 ms or more after its commit; the bench does not count its CPU, as it does not count the fake
 * kernel's. Usage: frame_floor FD (a connected stream socket inherited from the bench). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TICK_NS 4000000ull
#define DELAY_NS 1000000ull

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t due_ns; /* 0: no event queued (one commit in flight at a time, as per CRTC) */
static int event_w;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void *engine(void *arg)
{
	char event[32];

	(void)arg;
	memset(event, 0, sizeof(event));
	for (;;) {
		struct timespec tick = { 0, (long)TICK_NS };

		nanosleep(&tick, NULL);
		pthread_mutex_lock(&lock);
		if (due_ns && due_ns <= now_ns()) {
			due_ns = 0;
			if (write(event_w, event, sizeof(event)) != (ssize_t)sizeof(event))
				perror("frame_floor: event");
		}
		pthread_mutex_unlock(&lock);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	char in[4096], out[44], events[1024];
	struct epoll_event ev = { .events = EPOLLIN };
	int fd, ep, devnull, p[2], pending = 0;
	pthread_t thread;

	if (argc != 2) {
		fprintf(stderr, "usage: frame_floor FD\n");
		return 2;
	}
	fd = atoi(argv[1]);
	devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (devnull < 0 || pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0) {
		perror("frame_floor");
		return 1;
	}
	event_w = p[1];
	ep = epoll_create1(0);
	ev.data.fd = fd;
	if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
		perror("frame_floor: epoll");
		return 1;
	}
	ev.data.fd = p[0];
	if (epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev) < 0) {
		perror("frame_floor: epoll");
		return 1;
	}
	if (pthread_create(&thread, NULL, engine, NULL) != 0)
		return 1;
	pthread_setname_np(thread, "fakekms");
	memset(out, 0, sizeof(out));
	for (;;) {
		struct epoll_event got[2];
		int n = epoll_wait(ep, got, 2, -1);

		for (int i = 0; i < n; i++) {
			if (got[i].data.fd == fd) {
				struct iovec iov = { in, sizeof(in) };
				struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
				ssize_t r = recvmsg(fd, &msg, MSG_DONTWAIT);

				if (r == 0)
					return 0;
				if (r < 0 || pending)
					continue; /* a flip while one is in flight: the newest waits (not
						     here) */
				if (ioctl(devnull, 0xc03864bcul, in) ==
				    0) /* DRM_IOCTL_MODE_ATOMIC's number */
					return 1;
				pthread_mutex_lock(&lock);
				due_ns = now_ns() + DELAY_NS;
				pthread_mutex_unlock(&lock);
				pending = 1;
			} else {
				if (read(p[0], events, sizeof(events)) <= 0)
					continue;
				pending = 0;
				if (send(fd, out, sizeof(out), MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
					return 0;
			}
		}
	}
}
