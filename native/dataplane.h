/* directflip's data plane: the per-frame traffic of frame-socket guests and vGPUs, on its own thread.
 *
 * Python (the control plane) decides what is shown where and prepares it: it imports a guest's
 * buffers, adds their framebuffers, sets modes, tests configurations. This thread moves frames: it
 * reads the guests' `flip` records, puts each frame's framebuffer on every output that shows the
 * guest (one nonblocking atomic commit per CRTC in flight, the newest frame waiting, older ones
 * dropped), reads the DRM fds' flip events, and answers the guest's `presented` and `released`
 * records itself. Nothing on that path wakes Python.
 *
 * The seam is the table below. Python hands over:
 *   - cards (dp_card_add): their DRM fd is read here from then on; flip events of commits this
 *     thread did not make (Python's blocking commits, cursor-only commits) come back to Python;
 *   - outputs (dp_output_add): a CRTC and its primary plane (plane id, FB_ID property id);
 *   - connections (dp_conn_add): a frame-socket client past its `welcome`, version 2. Its socket is
 *     read here from then on. Anything but a flip this thread can show (a JSON message, a record for
 *     a buffer it has no framebuffer for, a malformed record, descriptors) is handed to Python as the
 *     bytes and descriptors received, and the connection is not read again until Python resumes it:
 *     Python sees every message in order, and checks and answers what it gets exactly as it would
 *     have had it read the socket itself. Every byte to the client goes out through this thread's
 *     queue (dp_conn_send for Python's messages), so records and JSON never interleave mid-message;
 *   - buffers (dp_buffer_add, dp_buffer_fb): a guest's buffer id and, per output, its framebuffer;
 *   - which guest an output shows (dp_output_show): from then on its frames go there, mirrors too.
 *
 * A buffer has one owner, its entry here, which counts its holds: the guest's latest frame, each
 * output that has it pending, in flight or on screen, and whatever Python holds (dp_buffer_hold).
 * The last release tells the guest `released`, or, for a buffer its guest forgot (or whose guest is
 * gone), queues DP_EV_FREED: Python removes its framebuffers and closes it then.
 *
 * Python reads back, in batches and off the frame path: events (dp_poll_events, woken by the
 * eventfd of dp_notify_fd) and per-output metrics (dp_output_stats).
 *
 * Threads: every function may be called from any thread; one lock guards the tables, and this
 * thread holds it only for non-blocking work. Handles are small integers, valid until removed.
 * Functions return 0 (or a handle, or a count) on success and -errno on failure. */
#ifndef DIRECTFLIP_DATAPLANE_H
#define DIRECTFLIP_DATAPLANE_H

#include <stddef.h>
#include <stdint.h>

#define DP_MAX_CARDS 8
#define DP_MAX_OUTPUTS 32
#define DP_MAX_CONNS 64
#define DP_MAX_BUFFERS 64         /* per connection, as the frame socket allows */
#define DP_MAX_FDS 16             /* descriptors per recvmsg, as the frame socket allows */
#define DP_IN_SIZE 65536          /* bytes read per recvmsg */
#define DP_MAX_OUT (1u << 20)     /* bytes queued for a client that does not read: then it is closed */
#define DP_SAMPLES 1024           /* latency samples kept per output */
#define DP_TOKEN_BIT (1ull << 63) /* user_data of this thread's commits: bit 63, output, serial */

struct dp;

enum dp_event_kind {
	DP_EV_DATA = 1,      /* conn: bytes (and descriptors) for Python; the connection waits for
			      * dp_conn_take and dp_conn_resume */
	DP_EV_CLOSED = 2,    /* conn: the connection ended here: a = errno (0: end of stream with
			      * nothing unread, EPIPE/ECONNRESET: lost, ENOBUFS: the client does not read) */
	DP_EV_FLIP = 3,      /* a flip event of a commit this thread did not make: card, crtc, sequence,
			      * timestamp_ns, user_data */
	DP_EV_FREED = 4,     /* buffer: nothing holds it and its guest forgot it (or is gone) */
	DP_EV_PRESENTED = 5, /* output: a frame reached the screen (counted, and told to the guest);
			      * sent only for an output with dp_output_watch set */
	DP_EV_ERROR = 6,     /* output: a commit failed: a = errno; the frame went back to its guest */
	DP_EV_DRAINED = 7,   /* conn: the queue to the client emptied (after dp_conn_send asked) */
};

struct dp_event {
	uint32_t kind;  /* enum dp_event_kind */
	int32_t handle; /* the connection, buffer or output */
	int32_t a;      /* see the kind */
	uint32_t card;
	uint32_t crtc;
	uint32_t sequence;
	uint64_t timestamp_ns;
	uint64_t user_data;
	uint32_t buffer_id; /* DP_EV_PRESENTED: the guest's buffer id, DP_EV_FREED: the buffer's id */
	uint64_t frame;     /* DP_EV_PRESENTED: the guest's frame number */
};

struct dp_output_stats {
	uint64_t frames;           /* frames submitted to the output */
	uint64_t commits;          /* flips committed */
	uint64_t presented;        /* flip events of those */
	uint64_t dropped;          /* frames replaced by a newer one before their commit */
	uint64_t errors;           /* commits the kernel refused */
	uint64_t busy;             /* of those, EBUSY */
	uint32_t max_in_flight;    /* the most commits ever in flight at once (1: one per CRTC) */
	uint32_t max_pending;      /* the most frames ever waiting at once (1: the newest wins) */
	uint32_t in_flight;        /* 1 while a commit waits for its event */
	uint32_t pending;          /* 1 while a frame waits for the commit in flight */
	uint32_t on_screen_buffer; /* the guest's buffer id on screen (0: none of the guest's) */
	uint64_t on_screen_frame;
	uint32_t samples; /* valid entries in the two arrays below (the newest DP_SAMPLES) */
	uint32_t commit_delay_ns[DP_SAMPLES]; /* flip record read -> commit ioctl returned */
	uint32_t latency_ns[DP_SAMPLES];      /* flip record read -> the flip event's timestamp */
	uint64_t present_ns[DP_SAMPLES];      /* the flip events' timestamps */
};

/* The data plane and its thread. The eventfd of dp_notify_fd is readable while events wait. */
struct dp *dp_new(void);
int dp_start(struct dp *dp);
void dp_free(struct dp *dp); /* stops the thread; closes nothing Python handed over */
int dp_notify_fd(struct dp *dp);
int dp_poll_events(struct dp *dp, struct dp_event *out, int max); /* returns how many */

/* Cards. `fd` is the DRM fd (O_NONBLOCK). A fake card (for benchmarks and tests without a KMS
 * device): `fd` is the read end of a pipe, each commit's request goes to /dev/null's ioctl (built and
 * submitted as for a card, refused with ENOTTY), and a fake kernel thread writes the commit's flip
 * event into `fake_write_fd` at its first tick (every 250 µs) at least `fake_delay_ns` after the
 * commit. Real cards pass -1 and 0. */
int dp_card_add(struct dp *dp, int fd, int fake_write_fd, uint64_t fake_delay_ns);

/* Outputs: a CRTC and the plane that shows the guest. */
int dp_output_add(struct dp *dp, int card, uint32_t crtc_id, uint32_t plane_id, uint32_t fb_prop_id);
/* The guest (connection) the output shows, or -1 for none. While it shows one, this thread commits
 * to the CRTC: Python must not. `on_screen` (a buffer handle, or -1) is what the plane shows now:
 * the output takes a hold on it until a newer frame replaces it. Python calls it with nothing of its
 * own in flight on the CRTC. The guest's flips reach its outputs only from dp_conn_show on. */
int dp_output_show(struct dp *dp, int output, int conn, int on_screen, uint64_t frame);
/* From now on the guest's flips go to every output that shows it, all at once (a guest and its
 * mirrors see the same frames); returns how many. Releasing any of them (dp_output_release) sends
 * all its flips to Python again, until the next dp_conn_show. */
int dp_conn_show(struct dp *dp, int conn);
/* How many of the guest's flip records this thread read and showed itself (not those it handed to
 * Python). */
int64_t dp_conn_flips(struct dp *dp, int conn);
/* Stop showing: the output hands back what it holds (the buffer handles on screen, in flight and
 * pending, or -1, with their frame numbers; the caller now owns those holds and the in-flight
 * commit's token, whose event will come to Python as DP_EV_FLIP). */
struct dp_output_state {
	int32_t on_screen, in_flight, pending;
	uint64_t on_screen_frame, in_flight_frame, pending_frame;
	uint64_t in_flight_token; /* a commit in flight: a frame's (in_flight >= 0) or the cursor's alone */
	int32_t in_flight_presented, pending_presented; /* already told `presented` (on a mirror) */
	int32_t cursor_pending;   /* a cursor state set with dp_output_cursor was not committed (yet,
				   * or the kernel refused it) */
	int32_t cursor_committed; /* a cursor state was committed here: cursor_fb is its FB_ID, which
				   * the plane shows or is about to (0: the plane off) */
	uint32_t cursor_fb;
};
int dp_output_release(struct dp *dp, int output, struct dp_output_state *state);
/* The state of the output's cursor plane (the CRTC's cursor plane, or an overlay standing in): its
 * plane id, and DP_CURSOR_PROPS property ids with their values, in this order: FB_ID, CRTC_ID,
 * SRC_X, SRC_Y, SRC_W, SRC_H, CRTC_X, CRTC_Y, CRTC_W, CRTC_H (FB_ID and CRTC_ID 0: the plane off).
 * It goes with the output's next commit: the next frame's, or a commit of its own at once when no
 * commit is in flight and no frame is due. The latest state wins. */
#define DP_CURSOR_PROPS 10
int dp_output_cursor(struct dp *dp, int output, uint32_t plane_id, const uint32_t *props,
		     const uint64_t *values);
int dp_output_watch(struct dp *dp, int output, int watch);
int dp_output_remove(struct dp *dp, int output);
int dp_output_stats(struct dp *dp, int output, struct dp_output_stats *out);

/* Connections. */
int dp_conn_add(struct dp *dp, int fd);
/* Stops reading; Python closes the socket. Descriptors received and not yet taken are handed back in
 * fds (at most max_fds: -EINVAL, and nothing done, if more are held); returns how many. */
int dp_conn_remove(struct dp *dp, int conn, int *fds, int max_fds);
/* What a DP_EV_DATA handed over: the bytes, the descriptors (Python owns them now) and where in the
 * bytes the recvmsg that brought the descriptors began (*fds_from). *flags: 1 = the stream ended
 * after these bytes, 2 = descriptors were lost (MSG_CTRUNC). Returns the byte count (at most cap;
 * call again for the rest, with no descriptors then). */
int dp_conn_take(struct dp *dp, int conn, uint8_t *buf, size_t cap, int *fds, int max_fds, int *nfds,
		 size_t *fds_from, int *flags);
/* Stop reading the connection now (as a DP_EV_DATA would): what was read and not consumed is
 * Python's to take, and the socket Python's to read, until dp_conn_resume. */
int dp_conn_pause(struct dp *dp, int conn);
/* Read the connection again: `fast` = 1 when Python holds nothing of the stream (no partial
 * message, no descriptor waiting), so flips may be handled here; 0: hand every read to Python. */
int dp_conn_resume(struct dp *dp, int conn, int fast);
/* Queue bytes for the client; returns the bytes queued in all, or -ENOBUFS past DP_MAX_OUT (the
 * client does not read: close it) or -EPIPE (it is gone). `drained` = 1 asks for DP_EV_DRAINED
 * once the queue is empty. */
int dp_conn_send(struct dp *dp, int conn, const uint8_t *data, size_t len, int drained);
/* The guest's latest frame (the buffer handle, -1 for none, its frame number, and whether the guest
 * was told `presented` for it); the output that shows it holds its own. */
int dp_conn_latest(struct dp *dp, int conn, int *buffer, uint64_t *frame, int *presented);

/* Python showed a frame itself (no output of the guest is run from here): it is the guest's latest
 * now, held as such, and `layout` the layout the guest's next flips are checked against. `buffer`
 * -1: the guest has no latest frame any more (its hold is let go). */
int dp_conn_set_latest(struct dp *dp, int conn, int buffer, uint64_t frame, uint32_t layout);

/* Buffers: `layout` is Python's name for the buffer's layout; a flip of a buffer of another layout
 * than the latest frame's goes to Python (it re-plans). */
int dp_buffer_add(struct dp *dp, int conn, uint32_t id, uint32_t layout);
int dp_buffer_fb(struct dp *dp, int buffer, int output, uint32_t fb_id); /* 0: none */
int dp_buffer_forget(struct dp *dp, int buffer);
int dp_buffer_hold(struct dp *dp, int buffer);    /* returns the holds now */
int dp_buffer_release(struct dp *dp, int buffer); /* returns the holds now */
int dp_buffer_holds(struct dp *dp, int buffer);

/* vGPUs (VFIO mediated devices with dma-buf display planes). `device_fd` stays Python's: this thread
 * only queries it. The connection starts paused (Python polls the device); from dp_conn_resume (fast)
 * on, this thread asks for the primary plane every `period_ns` (a timerfd) and, with `cursor`, for
 * the cursor plane too. The dma-buf on screen unchanged: nothing happens. Another dma-buf whose
 * buffer (dp_buffer_add with the dmabuf_id as the id, dp_buffer_plane with the layout it was fetched
 * with) has a framebuffer on every output that shows the guest: it is flipped here, as a frame-socket
 * flip would be. Anything else (an unknown dmabuf_id or another layout, the plane off, a failed
 * query, any change of the cursor plane's answer, the guest shown on no output from here) pauses the
 * connection and goes to Python as DP_EV_DATA with nothing to take: Python polls the device itself
 * and resumes. A vGPU is told nothing (no `presented`, no `released`). Periods: 1 ms to 10 s. */
/* Why a vGPU was handed back: DP_EV_DATA's `a`. */
enum dp_vgpu_why {
	DP_VGPU_NO_OUTPUT = 1,  /* no output of the guest's is run from here any more */
	DP_VGPU_FAILED = 2,     /* the plane query failed */
	DP_VGPU_OFF = 3,        /* the primary plane is off */
	DP_VGPU_NEW_BUFFER = 4, /* a dma-buf not handed over, or in another layout */
	DP_VGPU_CURSOR = 5,     /* the cursor plane's answer changed */
	DP_VGPU_NOT_HERE = 6,   /* the frame cannot be shown from here (a framebuffer missing) */
};
int dp_vgpu_add(struct dp *dp, int device_fd, uint64_t period_ns, int cursor);
/* A source whose frames Python reads itself (a QEMU display's D-Bus calls): a connection with no
 * socket, never read here and told nothing. Its frames come with dp_flip; they are shown, held and
 * released exactly as a frame-socket guest's, from the same tables. */
int dp_local_add(struct dp *dp);
int dp_vgpu_set(struct dp *dp, int conn, uint64_t period_ns, int cursor);
int dp_buffer_plane(struct dp *dp, int buffer, uint32_t format, uint64_t modifier, uint32_t width,
		    uint32_t height, uint32_t stride);

/* A frame Python read (a flip the fast path handed over, once Python added what it lacked): shown
 * exactly as this thread shows the flips it reads. -ENOENT: an output showing the guest has no
 * framebuffer for the buffer. `received_ns`: CLOCK_MONOTONIC when the flip was read. */
int dp_flip(struct dp *dp, int conn, int buffer, uint64_t frame, uint64_t received_ns);

#endif
