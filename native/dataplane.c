/* directflip's data plane; see dataplane.h for the contract.
 *
 * One thread, one epoll set: the stop eventfd, every card's DRM fd, every connection's socket and
 * every vGPU's timerfd.
 * Each wakeup takes the lock, handles what is ready (at most one recvmsg per connection, so a guest
 * that never stops writing cannot starve the others, and every flip event each DRM fd holds), then
 * sends what it queued for each client in one send, and lets go of the lock.
 *
 * A frame (struct frame) is one flip of one buffer; its holders are the guest's "latest" slot and
 * each output that has it pending, in flight or on screen. Each reference of a frame is a hold on
 * its buffer, so a buffer's hold count is the one truth about whether anything still reads it. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <linux/vfio.h>
#include <xf86drm.h>
#include <xf86drmMode.h>

#include "dataplane.h"
#include "fs_codec.h"

#define MAX_BUFS 4096
#define MAX_FRAMES 512
#define RING 8192
#define FAKE_QUEUE 256
#define FAKE_TICK_NS 250000ull /* the fake kernel's look at its queue: 4 kHz */

enum { T_STOP = 1, T_CARD = 2, T_CONN = 3 };
enum { C_FREE = 0, C_FAST, C_SLOW, C_PAUSED, C_DEAD };

struct frame {
	int used;
	int refs;
	int32_t buf;
	uint64_t frame;
	uint64_t recv_ns;
	int presented;
};

struct buf {
	int used;
	uint32_t gen; /* handles carry it: a handle of a freed buffer never names a new one */
	int32_t conn; /* -1 once the connection is gone */
	uint32_t id;
	uint32_t layout;
	int holds;
	int forgotten;
	uint32_t fb[DP_MAX_OUTPUTS];
	/* a vGPU's buffer: the plane layout it was fetched with (dp_buffer_plane) */
	int has_plane;
	uint32_t plane_format, plane_width, plane_height, plane_stride;
	uint64_t plane_modifier;
};

struct fake_flip {
	uint32_t crtc;
	uint64_t token;
	uint64_t due_ns;
};

struct card {
	int used;
	int fd;
	int fake_write_fd; /* -1: a real card */
	uint64_t fake_delay_ns;
	uint32_t fake_sequence;
};

struct output {
	int used;
	int card;
	uint32_t crtc, plane, fb_prop;
	int32_t conn;                          /* the guest shown, or -1 */
	int32_t pending, in_flight, on_screen; /* frames, or -1 */
	uint64_t token, serial;
	int watch;
	struct dp_output_stats stats;
	uint32_t sample_next;
	/* the cursor plane's state (dp_output_cursor), committed with the next frame or alone */
	uint32_t cursor_plane;
	uint32_t cursor_props[DP_CURSOR_PROPS];
	uint64_t cursor_values[DP_CURSOR_PROPS];
	int cursor_dirty;     /* set and not committed yet */
	int cursor_flight;    /* a commit of the cursor alone is in flight (token) */
	int cursor_lost;      /* a state the kernel refused: Python commits the cursor again */
	int cursor_committed; /* a cursor state was committed here; cursor_fb is its FB_ID */
	uint32_t cursor_fb;
};

struct conn {
	int state;
	int fd; /* the client's socket, or a vGPU's device (never read or closed here) */
	/* A vGPU (dp_vgpu_add): its planes are queried at each expiry of timer_fd, the fd in the epoll
	 * set, while the connection is FAST; -1 for a frame-socket client. */
	int timer_fd;
	int silent; /* no client to tell anything (a vGPU, a source of Python's) */
	uint64_t period_ns;
	int cursor; /* also query the cursor plane; any change of its answer goes to Python */
	int cursor_seen;
	int cursor_errno;
	struct vfio_device_gfx_plane_info cursor_answer;
	uint32_t gen;
	uint32_t mask; /* epoll events registered */
	int32_t bufs[DP_MAX_BUFFERS];
	uint32_t ids[DP_MAX_BUFFERS]; /* bufs[i]'s id: a flip's lookup reads this array alone */
	int nbufs;
	uint32_t outputs; /* bit per output that shows this guest */
	int32_t latest;   /* frame, or -1 */
	uint64_t flips;   /* flip records read and shown here */
	uint32_t layout;
	/* input: bytes read and not yet consumed; while PAUSED, [0, in_len) is Python's to take */
	uint8_t in[DP_IN_SIZE + 64];
	size_t in_len, taken;
	int fds[DP_MAX_FDS];
	int nfds;
	size_t fds_from;
	int eof, ctrunc;
	/* output */
	uint8_t *out;
	size_t out_len, out_cap;
	int want_drained, dirty;
};

struct dp {
	pthread_mutex_t lock;
	pthread_t thread;
	int running;
	int epfd, stopfd, notifyfd, devnull;
	struct card cards[DP_MAX_CARDS];
	struct output outputs[DP_MAX_OUTPUTS];
	struct conn *conns[DP_MAX_CONNS];
	struct buf bufs[MAX_BUFS];
	struct frame frames[MAX_FRAMES];
	int32_t free_frames[MAX_FRAMES];
	int nfree_frames;
	struct dp_event ring[RING];
	unsigned ring_head, ring_len;
	uint64_t ring_lost;
	/* the fake kernel */
	pthread_t fake_thread;
	int fake_running, fake_stop;
	pthread_mutex_t fake_lock;
	pthread_cond_t fake_cond;
	struct fake_flip fake_q[FAKE_QUEUE];
	int fake_card[FAKE_QUEUE];
	unsigned fake_head, fake_len;
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t tag(int type, uint32_t gen, int index)
{
	return (uint64_t)type << 56 | (uint64_t)gen << 24 | (uint64_t)(uint32_t)index;
}

static int32_t buf_handle(struct dp *dp, int index)
{
	return index < 0 ? -1 : (int32_t)((dp->bufs[index].gen & 0x7ffff) << 12 | (uint32_t)index);
}

static int32_t conn_handle(struct dp *dp, int index)
{
	return (int32_t)((dp->conns[index]->gen & 0x7fffff) << 8 | (uint32_t)index);
}

/* --- events to Python ------------------------------------------------------------------------- */

static void push(struct dp *dp, const struct dp_event *ev)
{
	if (dp->ring_len == RING) {
		dp->ring_lost++;
		return;
	}
	dp->ring[(dp->ring_head + dp->ring_len) % RING] = *ev;
	if (dp->ring_len++ == 0) {
		uint64_t one = 1;

		if (write(dp->notifyfd, &one, sizeof(one)) < 0) {
			/* the counter cannot overflow at one write per empty-to-nonempty turn */
		}
	}
}

static void push_simple(struct dp *dp, uint32_t kind, int handle, int a)
{
	struct dp_event ev;

	memset(&ev, 0, sizeof(ev));
	ev.kind = kind;
	ev.handle = handle;
	ev.a = a;
	push(dp, &ev);
}

/* --- connections: output ---------------------------------------------------------------------- */

static int conn_poll_fd(const struct conn *c)
{
	return c->timer_fd >= 0 ? c->timer_fd : c->fd;
}

static int conn_watch(struct dp *dp, int index)
{
	struct conn *c = dp->conns[index];
	uint32_t mask = 0;
	struct epoll_event ev;

	if (c->state == C_FAST || c->state == C_SLOW)
		mask |= EPOLLIN;
	if (c->state != C_DEAD && c->out_len)
		mask |= EPOLLOUT;
	if (mask == c->mask)
		return 0;
	/* Nothing to wait for: out of the set, for epoll reports a hang-up (EPOLLHUP) whatever the
	 * mask, and a paused connection whose client hung up would wake this thread for ever. */
	if (!mask) {
		if (epoll_ctl(dp->epfd, EPOLL_CTL_DEL, conn_poll_fd(c), NULL) < 0)
			return -errno;
		c->mask = 0;
		return 0;
	}
	ev.events = mask;
	ev.data.u64 = tag(T_CONN, c->gen, index);
	if (epoll_ctl(dp->epfd, c->mask ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, conn_poll_fd(c), &ev) < 0)
		return -errno;
	c->mask = mask;
	return 0;
}

/* The connection ends here: nothing more is read or sent; Python closes it (DP_EV_CLOSED). */
static void conn_fail(struct dp *dp, int index, int err)
{
	struct conn *c = dp->conns[index];

	if (c->state == C_DEAD)
		return;
	c->state = C_DEAD;
	c->out_len = 0;
	conn_watch(dp, index);
	push_simple(dp, DP_EV_CLOSED, conn_handle(dp, index), err);
}

static void conn_flush(struct dp *dp, int index)
{
	struct conn *c = dp->conns[index];
	size_t sent = 0;

	c->dirty = 0;
	if (c->state == C_DEAD)
		return;
	while (sent < c->out_len) {
		ssize_t n = send(c->fd, c->out + sent, c->out_len - sent, MSG_NOSIGNAL | MSG_DONTWAIT);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				break;
			conn_fail(dp, index, errno == ECONNRESET ? ECONNRESET : EPIPE);
			return;
		}
		sent += (size_t)n;
	}
	if (sent && sent < c->out_len)
		memmove(c->out, c->out + sent, c->out_len - sent);
	c->out_len -= sent;
	if (c->out_len == 0 && c->want_drained) {
		c->want_drained = 0;
		push_simple(dp, DP_EV_DRAINED, conn_handle(dp, index), 0);
	}
	conn_watch(dp, index);
}

static int conn_queue(struct dp *dp, int index, const uint8_t *data, size_t len)
{
	struct conn *c = dp->conns[index];

	if (c->state == C_DEAD)
		return -EPIPE;
	if (len == 0 || c->silent) /* a vGPU or a source of Python's is told nothing */
		return (int)c->out_len;
	if (c->out_len + len > DP_MAX_OUT) {
		conn_fail(dp, index, ENOBUFS);
		return -ENOBUFS;
	}
	if (c->out_len + len > c->out_cap) {
		size_t cap = c->out_cap ? c->out_cap : 4096;
		uint8_t *grown;

		while (cap < c->out_len + len)
			cap *= 2;
		grown = realloc(c->out, cap);
		if (!grown) {
			conn_fail(dp, index, ENOMEM);
			return -ENOMEM;
		}
		c->out = grown;
		c->out_cap = cap;
	}
	memcpy(c->out + c->out_len, data, len);
	c->out_len += len;
	c->dirty = 1;
	return (int)c->out_len;
}

static void put32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
	p[2] = (uint8_t)(v >> 16);
	p[3] = (uint8_t)(v >> 24);
}

static void put64(uint8_t *p, uint64_t v)
{
	put32(p, (uint32_t)v);
	put32(p + 4, (uint32_t)(v >> 32));
}

static int conn_alive(struct dp *dp, int index)
{
	return index >= 0 && index < DP_MAX_CONNS && dp->conns[index] && dp->conns[index]->state != C_FREE &&
	       dp->conns[index]->state != C_DEAD;
}

/* --- buffers and frames ----------------------------------------------------------------------- */

static void buf_unhold(struct dp *dp, int32_t b)
{
	struct buf *buf = &dp->bufs[b];

	if (buf->holds <= 0)
		return; /* not held: nothing to give back (a caller's mistake, never a release) */
	if (--buf->holds > 0)
		return;
	if (buf->forgotten || !conn_alive(dp, buf->conn)) {
		struct dp_event ev;

		memset(&ev, 0, sizeof(ev));
		ev.kind = DP_EV_FREED;
		ev.handle = buf_handle(dp, b);
		ev.buffer_id = buf->id;
		push(dp, &ev);
		buf->used = 0;
	} else {
		uint8_t rec[8];

		put32(rec, FS_RECORD | FS_RELEASED);
		put32(rec + 4, buf->id);
		conn_queue(dp, buf->conn, rec, sizeof(rec));
	}
}

/* Frames come from a free list: every flip takes one, and a scan of the pool would touch more
 * cache lines than the rest of the frame's path. */
static int32_t frame_new(struct dp *dp, int32_t b, uint64_t seq, uint64_t recv_ns)
{
	if (!dp->nfree_frames)
		return -1;
	int32_t i = dp->free_frames[--dp->nfree_frames];
	struct frame *f = &dp->frames[i];

	f->used = 1;
	f->refs = 0;
	f->buf = b;
	f->frame = seq;
	f->recv_ns = recv_ns;
	f->presented = 0;
	return i;
}

static void frame_free(struct dp *dp, int32_t f)
{
	dp->frames[f].used = 0;
	dp->free_frames[dp->nfree_frames++] = f;
}

static void frame_ref(struct dp *dp, int32_t f)
{
	dp->frames[f].refs++;
	dp->bufs[dp->frames[f].buf].holds++;
}

static void frame_unref(struct dp *dp, int32_t f)
{
	struct frame *fr = &dp->frames[f];

	buf_unhold(dp, fr->buf);
	if (--fr->refs <= 0)
		frame_free(dp, f);
}

/* Drop a frame reference whose hold on the buffer now belongs to Python. */
static int32_t frame_handover(struct dp *dp, int32_t f, uint64_t *seq)
{
	struct frame *fr = &dp->frames[f];
	int32_t b = fr->buf;

	*seq = fr->frame;
	if (--fr->refs <= 0)
		frame_free(dp, f);
	return b;
}

/* --- outputs ---------------------------------------------------------------------------------- */

static void fake_schedule(struct dp *dp, int card, uint32_t crtc, uint64_t token)
{
	pthread_mutex_lock(&dp->fake_lock);
	if (dp->fake_len < FAKE_QUEUE) {
		unsigned at = (dp->fake_head + dp->fake_len++) % FAKE_QUEUE;

		dp->fake_q[at].crtc = crtc;
		dp->fake_q[at].token = token;
		dp->fake_q[at].due_ns = now_ns() + dp->cards[card].fake_delay_ns;
		dp->fake_card[at] = card;
		/* No wake-up: the fake kernel looks at its queue every FAKE_TICK_NS, as a display engine
		 * finishes flips at its vblank, and this thread pays no futex call per commit. */
	}
	pthread_mutex_unlock(&dp->fake_lock);
}

static void sample(struct output *o, uint32_t *array, uint64_t ns)
{
	array[o->sample_next % DP_SAMPLES] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

/* A nonblocking atomic commit with a flip event: a frame's FB_ID on the output's plane (fb != 0),
 * the cursor plane's state (cursor), or both in one commit, the DRM_IOCTL_MODE_ATOMIC request built
 * on the stack. libdrm's drmModeAtomicCommit builds the same from a drmModeAtomicReq, but allocates
 * and sorts four arrays per call; this is every frame. */
static int atomic_flip(int fd, const struct output *o, uint32_t fb, int cursor, uint64_t user_data)
{
	uint32_t objs[2], counts[2], props[1 + DP_CURSOR_PROPS];
	uint64_t values[1 + DP_CURSOR_PROPS];
	uint32_t n = 0, np = 0;
	struct drm_mode_atomic req;

	if (fb) {
		objs[n] = o->plane;
		counts[n++] = 1;
		props[np] = o->fb_prop;
		values[np++] = fb;
	}
	if (cursor) {
		objs[n] = o->cursor_plane;
		counts[n++] = DP_CURSOR_PROPS;
		memcpy(props + np, o->cursor_props, sizeof(o->cursor_props));
		memcpy(values + np, o->cursor_values, sizeof(o->cursor_values));
		np += DP_CURSOR_PROPS;
	}
	memset(&req, 0, sizeof(req));
	req.flags = DRM_MODE_ATOMIC_NONBLOCK | DRM_MODE_PAGE_FLIP_EVENT;
	req.count_objs = n;
	req.objs_ptr = (uint64_t)(uintptr_t)objs;
	req.count_props_ptr = (uint64_t)(uintptr_t)counts;
	req.props_ptr = (uint64_t)(uintptr_t)props;
	req.prop_values_ptr = (uint64_t)(uintptr_t)values;
	req.user_data = user_data;
	return drmIoctl(fd, DRM_IOCTL_MODE_ATOMIC, &req) ? -errno : 0;
}

/* The output's next commit, if it may make one (nothing in flight) and has something to commit:
 * the pending frame, the cursor's new state, or both. */
static int commit_pending(struct dp *dp, int index)
{
	struct output *o = &dp->outputs[index];
	int32_t f = o->pending;
	struct card *card = &dp->cards[o->card];
	int cursor = o->cursor_dirty && o->cursor_plane;
	uint32_t fb = 0;
	int ret;

	if (o->in_flight >= 0 || o->cursor_flight || (f < 0 && !cursor))
		return 0;
	o->pending = -1;
	if (f >= 0)
		fb = dp->bufs[dp->frames[f].buf].fb[index];
	o->token = DP_TOKEN_BIT | (uint64_t)index << 40 | (++o->serial & 0xffffffffffull);
	ret = atomic_flip(card->fake_write_fd < 0 ? card->fd : dp->devnull, o, fb, cursor, o->token);
	if (card->fake_write_fd >= 0) {
		/* the same request and syscall went to a file that is no DRM device (ENOTTY): the
		 * kernel's share is faked, its flip event comes from the fake kernel */
		ret = 0;
		fake_schedule(dp, o->card, o->crtc, o->token);
	}
	o->cursor_dirty = 0; /* committed, or refused: a refused state is not tried again here */
	if (cursor) {
		o->cursor_lost = ret < 0;
		if (ret == 0) {
			o->cursor_committed = 1;
			o->cursor_fb = (uint32_t)o->cursor_values[0];
		}
	}
	if (ret < 0) {
		o->stats.errors++;
		o->stats.busy += ret == -EBUSY;
		push_simple(dp, DP_EV_ERROR, index, -ret);
		if (f >= 0)
			frame_unref(dp, f);
		return ret;
	}
	if (f < 0) {
		o->cursor_flight = 1;
		return 0;
	}
	o->in_flight = f;
	o->stats.commits++;
	o->stats.max_in_flight = 1;
	sample(o, o->stats.commit_delay_ns, now_ns() - dp->frames[f].recv_ns);
	return 0;
}

static void submit(struct dp *dp, int index, int32_t f)
{
	struct output *o = &dp->outputs[index];

	frame_ref(dp, f);
	o->stats.frames++;
	if (o->pending >= 0) {
		frame_unref(dp, o->pending);
		o->stats.dropped++;
	}
	o->pending = f;
	if (o->in_flight >= 0 || o->cursor_flight)
		o->stats.max_pending = 1;
	commit_pending(dp, index);
}

static void present(struct dp *dp, int index, uint32_t sequence, uint64_t timestamp_ns)
{
	struct output *o = &dp->outputs[index];
	int32_t f = o->in_flight;
	struct frame *fr = &dp->frames[f];
	struct buf *buf = &dp->bufs[fr->buf];

	o->in_flight = -1;
	if (o->on_screen >= 0)
		frame_unref(dp, o->on_screen);
	o->on_screen = f;
	o->stats.presented++;
	sample(o, o->stats.latency_ns, timestamp_ns > fr->recv_ns ? timestamp_ns - fr->recv_ns : 0);
	o->stats.present_ns[o->sample_next % DP_SAMPLES] = timestamp_ns;
	o->sample_next++;
	if (o->stats.samples < DP_SAMPLES)
		o->stats.samples++;
	if (!fr->presented) {
		fr->presented = 1;
		if (!buf->forgotten && conn_alive(dp, buf->conn)) {
			uint8_t rec[36];

			put32(rec, FS_RECORD | FS_PRESENTED);
			put32(rec + 4, buf->id);
			put32(rec + 8, 0);
			put64(rec + 12, fr->frame);
			put64(rec + 20, timestamp_ns);
			put64(rec + 28, sequence);
			conn_queue(dp, buf->conn, rec, sizeof(rec));
		}
	}
	if (o->watch) {
		struct dp_event ev;

		memset(&ev, 0, sizeof(ev));
		ev.kind = DP_EV_PRESENTED;
		ev.handle = index;
		ev.crtc = o->crtc;
		ev.sequence = sequence;
		ev.timestamp_ns = timestamp_ns;
		ev.buffer_id = buf->id;
		ev.frame = fr->frame;
		push(dp, &ev);
	}
	commit_pending(dp, index);
}

/* --- DRM events ------------------------------------------------------------------------------- */

static __thread struct {
	struct dp *dp;
	int card;
	int count;
} drain;

static void on_flip_event(int fd, unsigned int sequence, unsigned int tv_sec, unsigned int tv_usec,
			  unsigned int crtc_id, void *user_data)
{
	struct dp *dp = drain.dp;
	uint64_t token = (uint64_t)(uintptr_t)user_data;
	uint64_t ts = (uint64_t)tv_sec * 1000000000ull + (uint64_t)tv_usec * 1000ull;

	(void)fd;
	drain.count++;
	if (token & DP_TOKEN_BIT) {
		uint64_t index = (token >> 40) & 0x7fffff;

		struct output *o = index < DP_MAX_OUTPUTS ? &dp->outputs[index] : NULL;

		if (o && o->used && o->token == token && o->crtc == crtc_id && o->card == drain.card) {
			if (o->in_flight >= 0) {
				present(dp, (int)index, sequence, ts);
				return;
			}
			if (o->cursor_flight) { /* the cursor's own commit is done: the next may go */
				o->cursor_flight = 0;
				commit_pending(dp, (int)index);
				return;
			}
		}
	}
	struct dp_event ev;

	memset(&ev, 0, sizeof(ev));
	ev.kind = DP_EV_FLIP;
	ev.card = (uint32_t)drain.card;
	ev.crtc = crtc_id;
	ev.sequence = sequence;
	ev.timestamp_ns = ts;
	ev.user_data = token;
	push(dp, &ev);
}

static void card_readable(struct dp *dp, int index)
{
	drmEventContext ctx;

	memset(&ctx, 0, sizeof(ctx));
	ctx.version = 3;
	ctx.page_flip_handler2 = on_flip_event;
	drain.dp = dp;
	drain.card = index;
	/* drmHandleEvent reads once, up to 1 KiB: whole events, as many as are queued and fit. A read
	 * that did not fill it took every event there was, so another read would only say EAGAIN; a
	 * read that brought no event (an end of file) must not loop either. */
	for (int i = 0; i < 64; i++) {
		drain.count = 0;
		if (drmHandleEvent(dp->cards[index].fd, &ctx) != 0 || drain.count == 0 ||
		    drain.count < (int)(1024 / sizeof(struct drm_event_vblank)))
			break;
	}
	drain.dp = NULL;
}

/* --- connections: input ----------------------------------------------------------------------- */

static int32_t conn_buffer(const struct conn *c, uint32_t id)
{
	for (int i = 0; i < c->nbufs; i++)
		if (c->ids[i] == id)
			return c->bufs[i];
	return -1;
}

/* Show frame `seq` of buffer b on every output that shows the guest: 0, or -ENOENT when this
 * thread cannot (an output without a framebuffer for it, a new layout, nowhere to show it). */
static int flip(struct dp *dp, int index, int32_t b, uint64_t seq, uint64_t recv_ns, int check_layout)
{
	struct conn *c = dp->conns[index];
	struct buf *buf = &dp->bufs[b];
	int32_t f;

	if (!c->outputs || (check_layout && (c->latest < 0 || buf->layout != c->layout)))
		return -ENOENT;
	for (int o = 0; o < DP_MAX_OUTPUTS; o++)
		if ((c->outputs >> o & 1) && !buf->fb[o])
			return -ENOENT;
	f = frame_new(dp, b, seq, recv_ns);
	if (f < 0)
		return -ENOMEM;
	frame_ref(dp, f); /* the guest's latest frame */
	if (c->latest >= 0)
		frame_unref(dp, c->latest);
	c->latest = f;
	c->layout = buf->layout;
	for (int o = 0; o < DP_MAX_OUTPUTS; o++)
		if (c->outputs >> o & 1)
			submit(dp, o, f);
	return 0;
}

static void pause_for_python(struct dp *dp, int index, size_t from)
{
	struct conn *c = dp->conns[index];

	if (from) {
		memmove(c->in, c->in + from, c->in_len - from);
		c->in_len -= from;
		c->fds_from = c->fds_from > from ? c->fds_from - from : 0;
	}
	c->taken = 0;
	c->state = C_PAUSED;
	conn_watch(dp, index);
	push_simple(dp, DP_EV_DATA, conn_handle(dp, index), 0);
}

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Consume the flips at the start of the input; hand the rest to Python at the first message this
 * thread does not handle. */
static void consume(struct dp *dp, int index, uint64_t recv_ns)
{
	struct conn *c = dp->conns[index];
	struct fs_record recs[64];
	size_t pos = 0;

	for (;;) {
		size_t used = 0;
		int error = FS_OK;
		int n = fs_decode(c->in + pos, c->in_len - pos, 2, FS_SERVER, recs, 64, &used, &error);

		for (int i = 0; i < n; i++) {
			int32_t b = recs[i].kind == FS_FLIP ? conn_buffer(c, recs[i].id) : -1;

			if (b < 0 || flip(dp, index, b, recs[i].frame, recv_ns, 1) < 0) {
				pause_for_python(dp, index, pos + recs[i].start);
				return;
			}
			c->flips++;
		}
		pos += used;
		if (error != FS_OK) {
			pause_for_python(dp, index, pos);
			return;
		}
		if (n < 64)
			break;
	}
	/* What is left is part of one message: a flip still coming stays here, anything else is
	 * Python's (a JSON message is read whole there, however long). */
	if (c->in_len - pos >= 4 && get32(c->in + pos) != (FS_RECORD | FS_FLIP)) {
		pause_for_python(dp, index, pos);
		return;
	}
	memmove(c->in, c->in + pos, c->in_len - pos);
	c->in_len -= pos;
}

static void conn_readable(struct dp *dp, int index)
{
	struct conn *c = dp->conns[index];
	union {
		char buf[CMSG_SPACE(DP_MAX_FDS * sizeof(int))];
		struct cmsghdr align;
	} control;
	struct iovec iov = { c->in + c->in_len, DP_IN_SIZE - c->in_len };
	struct msghdr msg;
	size_t before = c->in_len;
	ssize_t n;

	if (c->state != C_FAST && c->state != C_SLOW)
		return;
	memset(&msg, 0, sizeof(msg));
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = control.buf;
	msg.msg_controllen = sizeof(control.buf);
	n = recvmsg(c->fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n < 0 && errno != ECONNRESET) {
		conn_fail(dp, index, errno);
		return;
	}
	if (n < 0) {
		/* Reset with our messages unread: Linux says so once all it sent was read. A failed
		 * recvmsg fills in no control data: the buffer holds whatever an earlier call left, which
		 * must not be read as descriptors received now (they were handed over already). */
		n = 0;
		msg.msg_controllen = 0;
		msg.msg_flags = 0;
	}
	c->in_len += (size_t)n;
	c->nfds = 0;
	for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
		if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
			continue;
		size_t count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);

		for (size_t i = 0; i < count; i++) {
			int fd;

			memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
			if (c->nfds < DP_MAX_FDS)
				c->fds[c->nfds++] = fd;
			else
				close(fd);
		}
	}
	c->ctrunc = (msg.msg_flags & MSG_CTRUNC) != 0;
	c->fds_from = before;
	if (n == 0 && c->nfds == 0)
		c->eof = 1;
	if (c->state == C_SLOW || c->nfds || c->ctrunc || c->eof) {
		/* Python checks descriptors against the messages they came with, and ends streams. */
		pause_for_python(dp, index, 0);
		return;
	}
	consume(dp, index, now_ns());
	if (c->in_len >= DP_IN_SIZE) /* cannot happen: a partial flip is under 16 bytes */
		pause_for_python(dp, index, 0);
}

/* --- vGPUs ------------------------------------------------------------------------------------ */

static int vgpu_query(int fd, uint32_t plane_type, struct vfio_device_gfx_plane_info *info)
{
	memset(info, 0, sizeof(*info));
	info->argsz = sizeof(*info);
	info->flags = VFIO_GFX_PLANE_TYPE_DMABUF;
	info->drm_plane_type = plane_type;
	return ioctl(fd, VFIO_DEVICE_QUERY_GFX_PLANE, info) < 0 ? -errno : 0;
}

static void vgpu_timer(struct conn *c, uint64_t period_ns)
{
	struct itimerspec its;

	memset(&its, 0, sizeof(its));
	its.it_interval.tv_sec = (time_t)(period_ns / 1000000000ull);
	its.it_interval.tv_nsec = (long)(period_ns % 1000000000ull);
	its.it_value = its.it_interval;
	timerfd_settime(c->timer_fd, 0, &its, NULL); /* cannot fail with a valid fd and times */
}

/* Hand the vGPU to Python: its poll runs there until dp_conn_resume. */
static void vgpu_pause(struct dp *dp, int index, int why)
{
	struct conn *c = dp->conns[index];

	vgpu_timer(c, 0);
	c->taken = 0;
	c->state = C_PAUSED;
	conn_watch(dp, index);
	push_simple(dp, DP_EV_DATA, conn_handle(dp, index), why);
}

/* A tick of a vGPU's timer (with the lock held). The queries themselves may wait on the driver's
 * locks (and the VMM's use of the device), so they are made without the lock: this says whether
 * to make them (1), after pausing a vGPU shown on no output from here. */
static int vgpu_tick(struct dp *dp, int index)
{
	struct conn *c = dp->conns[index];
	uint64_t expirations;

	if (read(c->timer_fd, &expirations, sizeof(expirations)) < 0) {
		/* EAGAIN: nothing expired after all */
	}
	if (c->state != C_FAST)
		return 0;
	if (!c->outputs) {
		vgpu_pause(dp, index, DP_VGPU_NO_OUTPUT);
		return 0;
	}
	return 1;
}

/* What the queries of one tick found, made without the lock. */
struct vgpu_answer {
	int index;
	uint32_t gen;
	int fd, cursor;
	int err, cursor_err;
	struct vfio_device_gfx_plane_info primary, cursor_plane;
};

static void vgpu_ask(struct vgpu_answer *a)
{
	a->err = vgpu_query(a->fd, DRM_PLANE_TYPE_PRIMARY, &a->primary);
	a->cursor_err = a->cursor ? vgpu_query(a->fd, DRM_PLANE_TYPE_CURSOR, &a->cursor_plane) : 0;
}

/* The answers of a tick (the lock held again; the connection may have changed meanwhile). The same
 * dma-buf on the primary plane: nothing to do, the planes read the guest's memory. Another one this
 * thread has a framebuffer for on every output, of the same layout: flipped here. Anything else (a
 * new buffer or layout, the display off, a failed query, the cursor plane changed) goes to Python. */
static void vgpu_answered(struct dp *dp, const struct vgpu_answer *a)
{
	struct conn *c = dp->conns[a->index];
	const struct vfio_device_gfx_plane_info *p = &a->primary;
	int32_t b;

	if (!c || c->state != C_FAST || c->gen != a->gen || c->timer_fd < 0)
		return; /* removed, paused or handed back since: the answer is stale */
	if (!c->outputs || a->err < 0 || !p->drm_format || !p->width || !p->height || !p->size) {
		vgpu_pause(dp, a->index,
			   !c->outputs  ? DP_VGPU_NO_OUTPUT
			   : a->err < 0 ? DP_VGPU_FAILED
					: DP_VGPU_OFF);
		return;
	}
	b = conn_buffer(c, p->dmabuf_id);
	if (b < 0 || !dp->bufs[b].has_plane || dp->bufs[b].plane_format != p->drm_format ||
	    dp->bufs[b].plane_modifier != p->drm_format_mod || dp->bufs[b].plane_width != p->width ||
	    dp->bufs[b].plane_height != p->height || dp->bufs[b].plane_stride != p->stride) {
		vgpu_pause(dp, a->index, DP_VGPU_NEW_BUFFER);
		return;
	}
	if (a->cursor && c->cursor) {
		if (!c->cursor_seen || a->cursor_err != c->cursor_errno ||
		    (!a->cursor_err &&
		     memcmp(&a->cursor_plane, &c->cursor_answer, sizeof(a->cursor_plane)))) {
			c->cursor_seen = 1;
			c->cursor_errno = a->cursor_err;
			c->cursor_answer = a->cursor_plane;
			vgpu_pause(dp, a->index, DP_VGPU_CURSOR);
			return;
		}
	}
	if (c->latest >= 0 && dp->frames[c->latest].buf == b)
		return;
	if (flip(dp, a->index, b, 0, now_ns(), 1) < 0) {
		vgpu_pause(dp, a->index, DP_VGPU_NOT_HERE);
		return;
	}
	c->flips++;
}

/* Send what each client was queued, one send per client. */
static void flush_dirty(struct dp *dp)
{
	for (int i = 0; i < DP_MAX_CONNS; i++)
		if (dp->conns[i] && dp->conns[i]->state != C_FREE && dp->conns[i]->dirty)
			conn_flush(dp, i);
}

/* --- the thread ------------------------------------------------------------------------------- */

static void *run(void *arg)
{
	struct dp *dp = arg;
	struct epoll_event evs[64];

	for (;;) {
		int n = epoll_wait(dp->epfd, evs, 64, -1);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			break;
		pthread_mutex_lock(&dp->lock);
		int stop = 0, asks = 0;
		struct vgpu_answer answers[DP_MAX_CONNS];

		for (int i = 0; i < n; i++) {
			uint64_t t = evs[i].data.u64;
			int type = (int)(t >> 56);
			uint32_t gen = (uint32_t)(t >> 24) & 0xffffffff;
			int index = (int)(t & 0xffffff);

			if (type == T_STOP) {
				stop = 1;
			} else if (type == T_CARD) {
				if (dp->cards[index].used)
					card_readable(dp, index);
			} else if (type == T_CONN) {
				struct conn *c = dp->conns[index];

				if (!c || c->state == C_FREE || (c->gen & 0xffffffff) != gen)
					continue; /* removed since epoll_wait returned */
				if (c->timer_fd >= 0) {
					if (vgpu_tick(dp, index) && asks < DP_MAX_CONNS) {
						answers[asks].index = index;
						answers[asks].gen = c->gen;
						/* a descriptor of its own: Python may close
						 * the device's while the query runs */
						answers[asks].fd = fcntl(c->fd, F_DUPFD_CLOEXEC, 0);
						answers[asks].cursor = c->cursor;
						asks++;
					}
				} else if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
					conn_readable(dp, index);
				if (evs[i].events & EPOLLOUT)
					c->dirty = 1;
			}
		}
		flush_dirty(dp);
		pthread_mutex_unlock(&dp->lock);
		if (asks) {
			/* Each query has a duplicate of the device's descriptor: the vGPU may be removed
			 * meanwhile (its answer is then dropped, for the generation changed), never a
			 * descriptor reused for something else queried. */
			for (int i = 0; i < asks; i++) {
				vgpu_ask(&answers[i]);
				if (answers[i].fd >= 0)
					close(answers[i].fd);
			}
			pthread_mutex_lock(&dp->lock);
			for (int i = 0; i < asks; i++)
				vgpu_answered(dp, &answers[i]);
			flush_dirty(dp);
			pthread_mutex_unlock(&dp->lock);
		}
		if (stop)
			break;
	}
	return NULL;
}

static void *fake_kernel(void *arg)
{
	struct dp *dp = arg;

	pthread_mutex_lock(&dp->fake_lock);
	while (!dp->fake_stop) {
		uint64_t now = now_ns();

		while (dp->fake_len && dp->fake_q[dp->fake_head].due_ns <= now) {
			struct fake_flip next = dp->fake_q[dp->fake_head];
			int card = dp->fake_card[dp->fake_head];
			struct drm_event_vblank ev;

			dp->fake_head = (dp->fake_head + 1) % FAKE_QUEUE;
			dp->fake_len--;
			memset(&ev, 0, sizeof(ev));
			ev.base.type = DRM_EVENT_FLIP_COMPLETE;
			ev.base.length = sizeof(ev);
			ev.user_data = next.token;
			ev.tv_sec = (uint32_t)(now / 1000000000ull);
			ev.tv_usec = (uint32_t)(now % 1000000000ull / 1000ull);
			ev.sequence = ++dp->cards[card].fake_sequence;
			ev.crtc_id = next.crtc;
			if (write(dp->cards[card].fake_write_fd, &ev, sizeof(ev)) < 0) {
				/* a full pipe: the event is lost, as a driver bug would lose it */
			}
		}
		/* Sleep a tick, or until stopped (dp_free signals the condition). */
		struct timespec until;
		uint64_t wake = now + FAKE_TICK_NS;

		until.tv_sec = (time_t)(wake / 1000000000ull);
		until.tv_nsec = (long)(wake % 1000000000ull);
		pthread_cond_timedwait(&dp->fake_cond, &dp->fake_lock, &until);
	}
	pthread_mutex_unlock(&dp->fake_lock);
	return NULL;
}

/* --- the API ---------------------------------------------------------------------------------- */

struct dp *dp_new(void)
{
	struct dp *dp = calloc(1, sizeof(*dp));
	struct epoll_event ev;

	if (!dp)
		return NULL;
	pthread_mutex_init(&dp->lock, NULL);
	pthread_mutex_init(&dp->fake_lock, NULL);
	pthread_condattr_t attr;

	pthread_condattr_init(&attr);
	pthread_condattr_setclock(&attr, CLOCK_MONOTONIC); /* the timed waits are in CLOCK_MONOTONIC */
	pthread_cond_init(&dp->fake_cond, &attr);
	pthread_condattr_destroy(&attr);
	dp->epfd = dp->stopfd = dp->notifyfd = dp->devnull = -1;
	dp->epfd = epoll_create1(EPOLL_CLOEXEC);
	dp->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	dp->notifyfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	dp->devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
	for (int i = 0; i < DP_MAX_OUTPUTS; i++)
		dp->outputs[i].conn = -1;
	for (int32_t i = MAX_FRAMES - 1; i >= 0; i--)
		dp->free_frames[dp->nfree_frames++] = i;
	ev.events = EPOLLIN;
	ev.data.u64 = tag(T_STOP, 0, 0);
	if (dp->epfd < 0 || dp->stopfd < 0 || dp->notifyfd < 0 || dp->devnull < 0 ||
	    epoll_ctl(dp->epfd, EPOLL_CTL_ADD, dp->stopfd, &ev) < 0) {
		dp_free(dp);
		return NULL;
	}
	return dp;
}

int dp_start(struct dp *dp)
{
	int ret;

	if (dp->running)
		return -EALREADY;
	ret = -pthread_create(&dp->thread, NULL, run, dp);
	if (ret == 0) {
		dp->running = 1;
		pthread_setname_np(dp->thread, "dataplane");
	}
	return ret;
}

void dp_free(struct dp *dp)
{
	if (!dp)
		return;
	if (dp->running) {
		uint64_t one = 1;

		if (write(dp->stopfd, &one, sizeof(one)) < 0) {
			/* an eventfd write of 1 fails only at overflow */
		}
		pthread_join(dp->thread, NULL);
	}
	if (dp->fake_running) {
		pthread_mutex_lock(&dp->fake_lock);
		dp->fake_stop = 1;
		pthread_cond_signal(&dp->fake_cond);
		pthread_mutex_unlock(&dp->fake_lock);
		pthread_join(dp->fake_thread, NULL);
	}
	for (int i = 0; i < DP_MAX_CONNS; i++) {
		if (dp->conns[i]) {
			for (int k = 0; k < dp->conns[i]->nfds; k++)
				close(dp->conns[i]->fds[k]);
			if (dp->conns[i]->state != C_FREE && dp->conns[i]->timer_fd >= 0)
				close(dp->conns[i]->timer_fd);
			free(dp->conns[i]->out);
			free(dp->conns[i]);
		}
	}
	if (dp->epfd >= 0)
		close(dp->epfd);
	if (dp->stopfd >= 0)
		close(dp->stopfd);
	if (dp->notifyfd >= 0)
		close(dp->notifyfd);
	if (dp->devnull >= 0)
		close(dp->devnull);
	pthread_mutex_destroy(&dp->lock);
	pthread_mutex_destroy(&dp->fake_lock);
	pthread_cond_destroy(&dp->fake_cond);
	free(dp);
}

int dp_notify_fd(struct dp *dp)
{
	return dp->notifyfd;
}

int dp_poll_events(struct dp *dp, struct dp_event *out, int max)
{
	uint64_t count;
	int n = 0;

	pthread_mutex_lock(&dp->lock);
	/* Read the eventfd first: an event pushed after this read writes it again. */
	if (read(dp->notifyfd, &count, sizeof(count)) < 0) {
		/* EAGAIN: nothing was signalled */
	}
	while (n < max && dp->ring_len) {
		out[n++] = dp->ring[dp->ring_head];
		dp->ring_head = (dp->ring_head + 1) % RING;
		dp->ring_len--;
	}
	if (dp->ring_len) {
		uint64_t one = 1;

		if (write(dp->notifyfd, &one, sizeof(one)) < 0) {
			/* see push */
		}
	}
	pthread_mutex_unlock(&dp->lock);
	return n;
}

int dp_card_add(struct dp *dp, int fd, int fake_write_fd, uint64_t fake_delay_ns)
{
	struct epoll_event ev;
	int ret = -ENOSPC;

	/* This thread must never wait in a read: a card fd handed over blocking (logind's TakeDevice)
	 * would hold dp->lock, and with it every call of Python's, in a read that an event read
	 * elsewhere or a spurious wakeup leaves waiting. */
	int flags = fcntl(fd, F_GETFL);

	if (flags < 0 || (!(flags & O_NONBLOCK) && fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0))
		return -errno;
	pthread_mutex_lock(&dp->lock);
	for (int i = 0; i < DP_MAX_CARDS; i++) {
		if (dp->cards[i].used)
			continue;
		ev.events = EPOLLIN;
		ev.data.u64 = tag(T_CARD, 0, i);
		if (epoll_ctl(dp->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
			ret = -errno;
			break;
		}
		dp->cards[i] = (struct card){
			.used = 1, .fd = fd, .fake_write_fd = fake_write_fd, .fake_delay_ns = fake_delay_ns
		};
		ret = i;
		if (fake_write_fd >= 0 && !dp->fake_running) {
			int err = pthread_create(&dp->fake_thread, NULL, fake_kernel, dp);

			if (err) {
				epoll_ctl(dp->epfd, EPOLL_CTL_DEL, fd, NULL);
				dp->cards[i].used = 0;
				ret = -err;
				break;
			}
			pthread_setname_np(dp->fake_thread, "fakekms");
			dp->fake_running = 1;
		}
		break;
	}
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

static int valid_output(struct dp *dp, int output)
{
	return output >= 0 && output < DP_MAX_OUTPUTS && dp->outputs[output].used;
}

static int valid_buffer(struct dp *dp, int buffer)
{
	return buffer >= 0 && buffer < MAX_BUFS && dp->bufs[buffer].used;
}

static int valid_conn(struct dp *dp, int conn)
{
	return conn >= 0 && conn < DP_MAX_CONNS && dp->conns[conn] && dp->conns[conn]->state != C_FREE;
}

/* Handles: the index and the generation of the slot, so a stale one is refused, not misread. */
static int buf_index(struct dp *dp, int handle)
{
	int index = handle & (MAX_BUFS - 1);

	if (handle < 0 || !dp->bufs[index].used || (dp->bufs[index].gen & 0x7ffff) != (uint32_t)handle >> 12)
		return -1;
	return index;
}

static int conn_index(struct dp *dp, int handle)
{
	int index = handle & 0xff;

	if (handle < 0 || index >= DP_MAX_CONNS || !valid_conn(dp, index) ||
	    (dp->conns[index]->gen & 0x7fffff) != (uint32_t)handle >> 8)
		return -1;
	return index;
}

int dp_output_add(struct dp *dp, int card, uint32_t crtc_id, uint32_t plane_id, uint32_t fb_prop_id)
{
	int ret = -ENOSPC;

	pthread_mutex_lock(&dp->lock);
	if (card < 0 || card >= DP_MAX_CARDS || !dp->cards[card].used) {
		ret = -ENOENT;
		goto out;
	}
	for (int i = 0; i < DP_MAX_OUTPUTS; i++) {
		struct output *o = &dp->outputs[i];

		if (o->used)
			continue;
		uint64_t serial = o->serial; /* tokens of a slot's earlier outputs may still come */

		memset(o, 0, sizeof(*o));
		o->serial = serial;
		o->used = 1;
		o->card = card;
		o->crtc = crtc_id;
		o->plane = plane_id;
		o->fb_prop = fb_prop_id;
		o->conn = o->pending = o->in_flight = o->on_screen = -1;
		ret = i;
		break;
	}
out:
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_output_show(struct dp *dp, int output, int conn, int on_screen, uint64_t frame)
{
	int ret = 0;

	pthread_mutex_lock(&dp->lock);
	int ci = conn < 0 ? -1 : conn_index(dp, conn);
	int bi = on_screen < 0 ? -1 : buf_index(dp, on_screen);

	if (!valid_output(dp, output) || (conn >= 0 && ci < 0) || (on_screen >= 0 && bi < 0)) {
		ret = -ENOENT;
		goto out;
	}
	struct output *o = &dp->outputs[output];

	if (o->conn >= 0 || o->pending >= 0 || o->in_flight >= 0 || o->on_screen >= 0) {
		ret = -EBUSY; /* dp_output_release first */
		goto out;
	}
	if (ci < 0)
		goto out;
	if (bi >= 0) {
		int32_t f = frame_new(dp, bi, frame, now_ns());

		if (f < 0) {
			ret = -ENOMEM;
			goto out;
		}
		frame_ref(dp, f);
		dp->frames[f].presented = 1;
		o->on_screen = f;
	}
	o->conn = ci;
out:
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_output_release(struct dp *dp, int output, struct dp_output_state *state)
{
	int ret = 0;

	pthread_mutex_lock(&dp->lock);
	if (!valid_output(dp, output)) {
		ret = -ENOENT;
		goto out;
	}
	struct output *o = &dp->outputs[output];

	memset(state, 0, sizeof(*state));
	state->in_flight_token = o->in_flight >= 0 || o->cursor_flight ? o->token : 0;
	state->cursor_pending = (o->cursor_dirty || o->cursor_lost) && o->cursor_plane;
	state->cursor_committed = o->cursor_committed;
	state->cursor_fb = o->cursor_fb;
	o->cursor_plane = 0; /* Python commits the cursor from now on */
	o->cursor_dirty = o->cursor_flight = o->cursor_lost = o->cursor_committed = 0;
	state->in_flight_presented = o->in_flight >= 0 && dp->frames[o->in_flight].presented;
	state->pending_presented = o->pending >= 0 && dp->frames[o->pending].presented;
	state->on_screen = o->on_screen >= 0
				   ? buf_handle(dp, frame_handover(dp, o->on_screen, &state->on_screen_frame))
				   : -1;
	state->in_flight = o->in_flight >= 0
				   ? buf_handle(dp, frame_handover(dp, o->in_flight, &state->in_flight_frame))
				   : -1;
	state->pending =
		o->pending >= 0 ? buf_handle(dp, frame_handover(dp, o->pending, &state->pending_frame)) : -1;
	o->on_screen = o->in_flight = o->pending = -1;
	/* The guest's flips go to Python from now on, also for its other outputs (their frames stay
	 * there): one output of a guest run from Python and its mirror from here would see different
	 * frames. dp_conn_show gives them their flips back. */
	if (o->conn >= 0 && dp->conns[o->conn])
		dp->conns[o->conn]->outputs = 0;
	o->conn = -1;
out:
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_output_cursor(struct dp *dp, int output, uint32_t plane_id, const uint32_t *props,
		     const uint64_t *values)
{
	int ret = 0;

	pthread_mutex_lock(&dp->lock);
	if (!valid_output(dp, output) || !plane_id) {
		ret = valid_output(dp, output) ? -EINVAL : -ENOENT;
		goto out;
	}
	struct output *o = &dp->outputs[output];

	o->cursor_plane = plane_id;
	memcpy(o->cursor_props, props, sizeof(o->cursor_props));
	memcpy(o->cursor_values, values, sizeof(o->cursor_values));
	o->cursor_dirty = 1;
	if (o->conn >= 0) /* shown here: commit it now if the CRTC is idle and no frame is due */
		commit_pending(dp, output);
out:
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_output_watch(struct dp *dp, int output, int watch)
{
	int ret = 0;

	pthread_mutex_lock(&dp->lock);
	if (valid_output(dp, output))
		dp->outputs[output].watch = watch;
	else
		ret = -ENOENT;
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_output_remove(struct dp *dp, int output)
{
	struct dp_output_state state;
	int ret = dp_output_release(dp, output, &state);

	if (ret < 0)
		return ret;
	pthread_mutex_lock(&dp->lock);
	/* What it held goes back as releases: nothing shows it here any more. The in-flight commit's
	 * event, if it comes, goes to Python, which ignores a token it does not know. */
	int32_t held[3] = { state.on_screen, state.in_flight, state.pending };

	for (int i = 0; i < 3; i++)
		if (held[i] >= 0)
			buf_unhold(dp, buf_index(dp, held[i]));
	for (int b = 0; b < MAX_BUFS; b++)
		dp->bufs[b].fb[output] = 0;
	dp->outputs[output].used = 0;
	pthread_mutex_unlock(&dp->lock);
	return 0;
}

int dp_output_stats(struct dp *dp, int output, struct dp_output_stats *out)
{
	int ret = 0;

	pthread_mutex_lock(&dp->lock);
	if (!valid_output(dp, output)) {
		ret = -ENOENT;
	} else {
		struct output *o = &dp->outputs[output];

		*out = o->stats;
		out->in_flight = o->in_flight >= 0;
		out->pending = o->pending >= 0;
		out->on_screen_buffer = o->on_screen >= 0 ? dp->bufs[dp->frames[o->on_screen].buf].id : 0;
		out->on_screen_frame = o->on_screen >= 0 ? dp->frames[o->on_screen].frame : 0;
	}
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

/* A free connection slot, set up for `fd` and paused (not in the epoll set): its index, or -errno.
 * Called with the lock held. */
static int conn_slot(struct dp *dp, int fd)
{
	for (int i = 0; i < DP_MAX_CONNS; i++) {
		struct conn *c = dp->conns[i];

		if (c && c->state != C_FREE)
			continue;
		if (!c) {
			c = calloc(1, sizeof(*c));
			if (!c)
				return -ENOMEM;
			dp->conns[i] = c;
		}
		uint32_t gen = c->gen + 1;
		uint8_t *out = c->out;
		size_t cap = c->out_cap;

		memset(c, 0, offsetof(struct conn, in));
		c->in_len = c->taken = 0;
		c->nfds = 0;
		c->eof = c->ctrunc = 0;
		c->out = out;
		c->out_cap = cap;
		c->out_len = 0;
		c->want_drained = c->dirty = 0;
		c->gen = gen;
		c->fd = fd;
		c->timer_fd = -1;
		c->latest = -1;
		c->state = C_PAUSED;
		return i;
	}
	return -ENOSPC;
}

int dp_conn_add(struct dp *dp, int fd)
{
	int ret;

	pthread_mutex_lock(&dp->lock);
	ret = conn_slot(dp, fd);
	if (ret >= 0) {
		int i = ret;

		dp->conns[i]->state = C_FAST;
		ret = conn_watch(dp, i);
		if (ret < 0) /* epoll refused the fd */
			dp->conns[i]->state = C_FREE;
		else
			ret = conn_handle(dp, i);
	}
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_local_add(struct dp *dp)
{
	int ret;

	pthread_mutex_lock(&dp->lock);
	ret = conn_slot(dp, -1);
	if (ret >= 0) {
		dp->conns[ret]->silent = 1;
		ret = conn_handle(dp, ret);
	}
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_conn_remove(struct dp *dp, int conn, int *fds, int max_fds)
{
	int ret = 0;

	pthread_mutex_lock(&dp->lock);
	conn = conn_index(dp, conn);
	if (!valid_conn(dp, conn)) {
		ret = -ENOENT;
		goto out;
	}
	struct conn *c = dp->conns[conn];

	if (c->nfds > max_fds) {
		ret = -EINVAL;
		goto out;
	}

	if (c->mask)
		epoll_ctl(dp->epfd, EPOLL_CTL_DEL, conn_poll_fd(c), NULL);
	c->mask = 0;
	if (c->timer_fd >= 0) {
		close(c->timer_fd);
		c->timer_fd = -1;
	}
	for (int o = 0; o < DP_MAX_OUTPUTS; o++) {
		if (dp->outputs[o].used && dp->outputs[o].conn == conn) {
			/* Its frames stay where they are until the output is given another guest or
			 * released; it just stops receiving this guest's frames. */
			dp->outputs[o].conn = -1;
		}
	}
	c->outputs = 0;
	/* Descriptors received and not taken yet go back to Python, which tells what they are before
	 * closing them: closing one of a file whose filesystem never answers would hold this lock. */
	for (int k = 0; k < c->nfds; k++)
		fds[k] = c->fds[k];
	ret = c->nfds;
	c->nfds = 0;
	c->state = C_FREE;
	if (c->latest >= 0) {
		int32_t latest = c->latest;

		c->latest = -1;
		frame_unref(dp, latest);
	}
	/* Buffers it announced: gone with it once nothing holds them. */
	for (int i = 0; i < c->nbufs; i++) {
		struct buf *b = &dp->bufs[c->bufs[i]];

		b->conn = -1;
		b->forgotten = 1;
		if (b->holds == 0) {
			b->holds = 1;
			buf_unhold(dp, c->bufs[i]);
		}
	}
	c->nbufs = 0;
	c->out_len = 0;
out:
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_conn_take(struct dp *dp, int conn, uint8_t *buf, size_t cap, int *fds, int max_fds, int *nfds,
		 size_t *fds_from, int *flags)
{
	int ret;

	pthread_mutex_lock(&dp->lock);
	conn = conn_index(dp, conn);
	if (!valid_conn(dp, conn) || dp->conns[conn]->state != C_PAUSED) {
		ret = -ENOENT;
		goto out;
	}
	struct conn *c = dp->conns[conn];
	size_t n = c->in_len - c->taken < cap ? c->in_len - c->taken : cap;

	memcpy(buf, c->in + c->taken, n);
	*fds_from = c->fds_from > c->taken ? c->fds_from - c->taken : 0;
	c->taken += n;
	*nfds = 0;
	for (int k = 0; k < c->nfds; k++) {
		if (*nfds < max_fds)
			fds[(*nfds)++] = c->fds[k];
		else
			close(c->fds[k]);
	}
	c->nfds = 0;
	*flags = (c->taken == c->in_len && c->eof ? 1 : 0) | (c->ctrunc ? 2 : 0);
	c->ctrunc = 0;
	ret = (int)n;
out:
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_conn_resume(struct dp *dp, int conn, int fast)
{
	int ret = 0;

	pthread_mutex_lock(&dp->lock);
	conn = conn_index(dp, conn);
	if (!valid_conn(dp, conn)) {
		ret = -ENOENT;
		goto out;
	}
	struct conn *c = dp->conns[conn];

	if (c->state == C_DEAD) {
		ret = -EPIPE;
		goto out;
	}
	if (c->eof) {
		ret = -EPIPE; /* the stream ended: Python closes it */
		goto out;
	}
	if ((c->timer_fd >= 0 && !fast) || c->fd < 0) {
		ret = -EINVAL; /* a vGPU is polled here or by Python, never half; a local source never */
		goto out;
	}
	for (int k = 0; k < c->nfds; k++)
		close(c->fds[k]);
	c->nfds = 0;
	c->in_len = c->taken = 0;
	c->state = fast ? C_FAST : C_SLOW;
	if (c->timer_fd >= 0)
		vgpu_timer(c, c->period_ns);
	conn_watch(dp, conn);
out:
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_conn_send(struct dp *dp, int conn, const uint8_t *data, size_t len, int drained)
{
	int ret;

	pthread_mutex_lock(&dp->lock);
	conn = conn_index(dp, conn);
	if (!valid_conn(dp, conn)) {
		ret = -ENOENT;
		goto out;
	}
	ret = conn_queue(dp, conn, data, len);
	if (ret >= 0) {
		struct conn *c = dp->conns[conn];

		if (drained)
			c->want_drained = 1;
		conn_flush(dp, conn);
		ret = c->state == C_DEAD ? -EPIPE : (int)c->out_len;
	}
out:
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_conn_latest(struct dp *dp, int conn, int *buffer, uint64_t *frame, int *presented)
{
	int ret = 0;

	pthread_mutex_lock(&dp->lock);
	conn = conn_index(dp, conn);
	if (!valid_conn(dp, conn)) {
		ret = -ENOENT;
	} else {
		int32_t f = dp->conns[conn]->latest;

		*buffer = f >= 0 ? buf_handle(dp, dp->frames[f].buf) : -1;
		*frame = f >= 0 ? dp->frames[f].frame : 0;
		*presented = f >= 0 && dp->frames[f].presented;
	}
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_buffer_add(struct dp *dp, int conn, uint32_t id, uint32_t layout)
{
	int ret = -ENOSPC;

	pthread_mutex_lock(&dp->lock);
	conn = conn_index(dp, conn);
	if (!valid_conn(dp, conn) || id == 0) {
		ret = valid_conn(dp, conn) ? -EINVAL : -ENOENT;
		goto out;
	}
	struct conn *c = dp->conns[conn];

	if (conn_buffer(c, id) >= 0) {
		ret = -EEXIST;
		goto out;
	}
	if (c->nbufs >= DP_MAX_BUFFERS)
		goto out;
	for (int b = 0; b < MAX_BUFS; b++) {
		if (dp->bufs[b].used)
			continue;
		uint32_t gen = dp->bufs[b].gen + 1;

		memset(&dp->bufs[b], 0, sizeof(dp->bufs[b]));
		dp->bufs[b].gen = gen;
		dp->bufs[b].used = 1;
		dp->bufs[b].conn = conn;
		dp->bufs[b].id = id;
		dp->bufs[b].layout = layout;
		c->ids[c->nbufs] = id;
		c->bufs[c->nbufs++] = b;
		ret = buf_handle(dp, b);
		break;
	}
out:
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_buffer_plane(struct dp *dp, int buffer, uint32_t format, uint64_t modifier, uint32_t width,
		    uint32_t height, uint32_t stride)
{
	int ret = 0;

	pthread_mutex_lock(&dp->lock);
	buffer = buf_index(dp, buffer);
	if (buffer < 0) {
		ret = -ENOENT;
	} else {
		struct buf *b = &dp->bufs[buffer];

		b->has_plane = 1;
		b->plane_format = format;
		b->plane_modifier = modifier;
		b->plane_width = width;
		b->plane_height = height;
		b->plane_stride = stride;
	}
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_buffer_fb(struct dp *dp, int buffer, int output, uint32_t fb_id)
{
	int ret = 0;

	pthread_mutex_lock(&dp->lock);
	buffer = buf_index(dp, buffer);
	if (!valid_buffer(dp, buffer) || output < 0 || output >= DP_MAX_OUTPUTS)
		ret = -ENOENT;
	else
		dp->bufs[buffer].fb[output] = fb_id;
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_buffer_forget(struct dp *dp, int buffer)
{
	int ret = 0;

	pthread_mutex_lock(&dp->lock);
	buffer = buf_index(dp, buffer);
	if (!valid_buffer(dp, buffer) || dp->bufs[buffer].forgotten) {
		ret = -ENOENT;
		goto out;
	}
	struct buf *b = &dp->bufs[buffer];

	b->forgotten = 1;
	if (valid_conn(dp, b->conn)) {
		struct conn *c = dp->conns[b->conn];

		for (int i = 0; i < c->nbufs; i++) {
			if (c->bufs[i] == buffer) {
				c->nbufs--;
				c->bufs[i] = c->bufs[c->nbufs];
				c->ids[i] = c->ids[c->nbufs];
				break;
			}
		}
	}
	if (b->holds == 0) {
		b->holds = 1;
		buf_unhold(dp, buffer);
	}
out:
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_buffer_hold(struct dp *dp, int buffer)
{
	int ret;

	pthread_mutex_lock(&dp->lock);
	buffer = buf_index(dp, buffer);
	ret = valid_buffer(dp, buffer) ? ++dp->bufs[buffer].holds : -ENOENT;
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_buffer_release(struct dp *dp, int buffer)
{
	int ret;

	pthread_mutex_lock(&dp->lock);
	buffer = buf_index(dp, buffer);
	if (!valid_buffer(dp, buffer) || dp->bufs[buffer].holds <= 0) {
		ret = -ENOENT;
	} else {
		buf_unhold(dp, buffer);
		ret = dp->bufs[buffer].used ? dp->bufs[buffer].holds : 0;
		flush_dirty(dp);
	}
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_buffer_holds(struct dp *dp, int buffer)
{
	int ret;

	pthread_mutex_lock(&dp->lock);
	buffer = buf_index(dp, buffer);
	ret = valid_buffer(dp, buffer) ? dp->bufs[buffer].holds : -ENOENT;
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_flip(struct dp *dp, int conn, int buffer, uint64_t frame, uint64_t received_ns)
{
	int ret;

	pthread_mutex_lock(&dp->lock);
	conn = conn_index(dp, conn);
	buffer = buf_index(dp, buffer);
	if (!valid_conn(dp, conn) || !valid_buffer(dp, buffer) || dp->bufs[buffer].conn != conn)
		ret = -ENOENT;
	else
		ret = flip(dp, conn, buffer, frame, received_ns, 0);
	flush_dirty(dp);
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_conn_set_latest(struct dp *dp, int conn, int buffer, uint64_t frame, uint32_t layout)
{
	int ret = 0;

	pthread_mutex_lock(&dp->lock);
	conn = conn_index(dp, conn);
	if (conn >= 0 && buffer == -1) { /* no latest frame any more (a vGPU's display went off) */
		struct conn *c = dp->conns[conn];

		if (c->latest >= 0) {
			int32_t latest = c->latest;

			c->latest = -1;
			frame_unref(dp, latest);
			flush_dirty(dp);
		}
		goto out;
	}
	buffer = buf_index(dp, buffer);
	if (conn < 0 || buffer < 0 || dp->bufs[buffer].conn != conn) {
		ret = -ENOENT;
		goto out;
	}
	struct conn *c = dp->conns[conn];
	int32_t f = frame_new(dp, buffer, frame, now_ns());

	if (f < 0) {
		ret = -ENOMEM;
		goto out;
	}
	frame_ref(dp, f);
	if (c->latest >= 0)
		frame_unref(dp, c->latest);
	c->latest = f;
	c->layout = layout;
	flush_dirty(dp);
out:
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_conn_pause(struct dp *dp, int conn)
{
	int ret = 0;

	pthread_mutex_lock(&dp->lock);
	conn = conn_index(dp, conn);
	if (conn < 0) {
		ret = -ENOENT;
	} else if (dp->conns[conn]->state == C_DEAD) {
		ret = -EPIPE;
	} else if (dp->conns[conn]->state != C_PAUSED) {
		struct conn *c = dp->conns[conn];

		c->state = C_PAUSED;
		c->taken = 0;
		if (c->timer_fd >= 0)
			vgpu_timer(c, 0);
		conn_watch(dp, conn);
	}
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

static int valid_period(uint64_t period_ns)
{
	return period_ns >= 1000000ull && period_ns <= 10000000000ull; /* 1 ms to 10 s */
}

int dp_vgpu_add(struct dp *dp, int device_fd, uint64_t period_ns, int cursor)
{
	int timer, ret;

	if (device_fd < 0 || !valid_period(period_ns))
		return -EINVAL;
	timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	if (timer < 0)
		return -errno;
	pthread_mutex_lock(&dp->lock);
	ret = conn_slot(dp, device_fd); /* paused: polled here from dp_conn_resume on */
	if (ret >= 0) {
		struct conn *c = dp->conns[ret];

		c->timer_fd = timer;
		c->period_ns = period_ns;
		c->cursor = cursor != 0;
		c->silent = 1;
		ret = conn_handle(dp, ret);
	} else {
		close(timer);
	}
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_vgpu_set(struct dp *dp, int conn, uint64_t period_ns, int cursor)
{
	int ret = 0;

	if (!valid_period(period_ns))
		return -EINVAL;
	pthread_mutex_lock(&dp->lock);
	conn = conn_index(dp, conn);
	if (conn < 0 || dp->conns[conn]->timer_fd < 0) {
		ret = conn < 0 ? -ENOENT : -EINVAL;
	} else {
		struct conn *c = dp->conns[conn];

		if (c->period_ns != period_ns && c->state == C_FAST)
			vgpu_timer(c, period_ns);
		c->period_ns = period_ns;
		c->cursor = cursor != 0;
	}
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int dp_conn_show(struct dp *dp, int conn)
{
	int ret = 0;

	pthread_mutex_lock(&dp->lock);
	conn = conn_index(dp, conn);
	if (conn < 0) {
		ret = -ENOENT;
	} else {
		uint32_t mask = 0;

		for (int o = 0; o < DP_MAX_OUTPUTS; o++) {
			if (dp->outputs[o].used && dp->outputs[o].conn == conn) {
				mask |= 1u << o;
				ret++;
			}
		}
		dp->conns[conn]->outputs = mask;
	}
	pthread_mutex_unlock(&dp->lock);
	return ret;
}

int64_t dp_conn_flips(struct dp *dp, int conn)
{
	int64_t ret;

	pthread_mutex_lock(&dp->lock);
	conn = conn_index(dp, conn);
	ret = conn < 0 ? -ENOENT : (int64_t)dp->conns[conn]->flips;
	pthread_mutex_unlock(&dp->lock);
	return ret;
}
