/* The C floor of bench_host.py: the least a compositor can do per frame message. One epoll wakeup,
 * one recvmsg of the guest's flip record, one send of a 36-byte reply, for every message, until the
 * guest hangs up. Usage: floor FD (a connected stream socket inherited from the bench). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>

int main(int argc, char **argv)
{
	char in[4096], out[36];
	struct epoll_event ev = { .events = EPOLLIN };
	int fd, ep;

	if (argc != 2) {
		fprintf(stderr, "usage: floor FD\n");
		return 2;
	}
	fd = atoi(argv[1]);
	ep = epoll_create1(0);
	ev.data.fd = fd;
	if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
		perror("floor: epoll");
		return 1;
	}
	memset(out, 0, sizeof(out));
	for (;;) {
		struct epoll_event got;
		struct iovec iov = { in, sizeof(in) };
		struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
		ssize_t n;

		if (epoll_wait(ep, &got, 1, -1) < 0)
			continue;
		n = recvmsg(fd, &msg, MSG_DONTWAIT);
		if (n == 0)
			return 0;
		if (n < 0)
			continue;
		if (send(fd, out, sizeof(out), MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
			return 0;
	}
}
