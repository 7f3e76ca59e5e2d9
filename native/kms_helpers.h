/* directflip native helpers: what the KMS layer does per flip, in C.
 *
 * Python resolves every object and property id once; these functions only pack ids and values into
 * an atomic request, submit it, and drain the DRM event queue; kms_copy_rows does the copy rung's
 * strided copy, which numpy did before (numpy cost the daemon a third of its import time for that
 * one copy). Errors come back as negative errno values, never through the C errno of a later call. */
#ifndef DIRECTFLIP_KMS_HELPERS_H
#define DIRECTFLIP_KMS_HELPERS_H

#include <stddef.h>
#include <stdint.h>

struct kms_flip_event {
	uint32_t crtc_id;
	uint32_t sequence;
	uint64_t timestamp_ns; /* CLOCK_MONOTONIC, as the kernel reports it */
	uint64_t user_data;
};

/* Logging hook: level uses Python's logging numbers (10 debug ... 40 error). */
typedef void (*kms_log_fn)(int level, const char *message);
void kms_set_logger(kms_log_fn fn);

/* Build one atomic request from n (object, property, value) triples and commit it with flags.
 * Returns 0 or -errno. */
int kms_atomic_commit(int fd, uint32_t n, const uint32_t *objects, const uint32_t *properties,
		      const uint64_t *values, uint32_t flags, uint64_t user_data);

/* The per-flip hot path: point one plane at a new framebuffer, nonblocking, with a page-flip event
 * carrying user_data. Returns 0 or -errno (-EBUSY: a flip is still pending on that CRTC). */
int kms_flip(int fd, uint32_t plane_id, uint32_t fb_prop_id, uint32_t fb_id, uint64_t user_data);

/* Read what is queued on the DRM fd (one read, as drmHandleEvent does) and store page-flip events
 * in out[0..max). Returns how many were stored, or -errno. Events beyond max are counted in
 * *dropped (never silently lost). Vblank events are ignored: nothing here requests them. */
int kms_drain_events(int fd, struct kms_flip_event *out, int max, int *dropped);

/* The copy rung's per-frame copy (and the QEMU pixel path's): row i (0 <= i < height) is the
 * row_bytes bytes at src + src_offset + i * src_pitch, copied to dst + dst_offset + i * dst_pitch.
 * src_len and dst_len are the sizes of the two buffers as the caller knows them; the bytes come from
 * guests, so every row is checked against them before anything is copied:
 *   -ERANGE  an offset past its buffer's end, or a row that would reach past it (overflowing
 *            offset + pitch * (height - 1) + row_bytes included);
 *   -EINVAL  more than one row with a pitch shorter than a row (the rows would overlap), or a NULL
 *            buffer with a non-zero length.
 * Nothing is copied when it refuses. An empty copy (height or row_bytes 0) copies nothing and
 * returns 0 once the offsets are checked. The two buffers may overlap (each row is a memmove).
 * Returns 0 or -errno. */
int kms_copy_rows(void *dst, size_t dst_len, size_t dst_offset, size_t dst_pitch, const void *src,
		  size_t src_len, size_t src_offset, size_t src_pitch, size_t height, size_t row_bytes);

#endif
