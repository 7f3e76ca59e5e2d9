/* directflip native helpers; see kms_helpers.h for the contract of each function. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <xf86drm.h>
#include <xf86drmMode.h>

#include "kms_helpers.h"

static kms_log_fn log_fn;

void kms_set_logger(kms_log_fn fn)
{
	log_fn = fn;
}

static void kms_log(int level, const char *fmt, ...)
{
	char buf[256];
	va_list ap;

	if (!log_fn)
		return;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	log_fn(level, buf);
}

int kms_atomic_commit(int fd, uint32_t n, const uint32_t *objects, const uint32_t *properties,
		      const uint64_t *values, uint32_t flags, uint64_t user_data)
{
	drmModeAtomicReq *req = drmModeAtomicAlloc();
	int ret = 0;

	if (!req)
		return -ENOMEM;
	for (uint32_t i = 0; i < n; i++) {
		if (drmModeAtomicAddProperty(req, objects[i], properties[i], values[i]) < 0) {
			kms_log(40, "atomic: cannot add property %u of object %u", properties[i], objects[i]);
			ret = -ENOMEM;
			goto out;
		}
	}
	/* drmModeAtomicCommit returns -errno itself. */
	ret = drmModeAtomicCommit(fd, req, flags, (void *)(uintptr_t)user_data);
out:
	drmModeAtomicFree(req);
	return ret;
}

int kms_flip(int fd, uint32_t plane_id, uint32_t fb_prop_id, uint32_t fb_id, uint64_t user_data)
{
	return kms_atomic_commit(fd, 1, &plane_id, &fb_prop_id, &(uint64_t){ fb_id },
				 DRM_MODE_ATOMIC_NONBLOCK | DRM_MODE_PAGE_FLIP_EVENT, user_data);
}

/* drmHandleEvent hands events to callbacks with no context pointer of ours, so the drain target
 * lives here for the duration of one kms_drain_events call (the daemon is single-threaded). */
static struct {
	struct kms_flip_event *out;
	int max;
	int count;
	int dropped;
} drain;

static void on_page_flip(int fd, unsigned int sequence, unsigned int tv_sec, unsigned int tv_usec,
			 unsigned int crtc_id, void *user_data)
{
	(void)fd;
	if (drain.count >= drain.max) {
		drain.dropped++;
		kms_log(30, "flip event for CRTC %u dropped: event buffer full", crtc_id);
		return;
	}
	struct kms_flip_event *ev = &drain.out[drain.count++];
	ev->crtc_id = crtc_id;
	ev->sequence = sequence;
	ev->timestamp_ns = (uint64_t)tv_sec * 1000000000ull + (uint64_t)tv_usec * 1000ull;
	ev->user_data = (uint64_t)(uintptr_t)user_data;
}

int kms_drain_events(int fd, struct kms_flip_event *out, int max, int *dropped)
{
	drmEventContext ctx;

	memset(&ctx, 0, sizeof(ctx));
	ctx.version = 3;
	ctx.page_flip_handler2 = on_page_flip;
	drain.out = out;
	drain.max = max;
	drain.count = 0;
	drain.dropped = 0;
	if (dropped)
		*dropped = 0;
	/* drmHandleEvent does one read(); it returns -1 with errno set when read fails. */
	if (drmHandleEvent(fd, &ctx) != 0) {
		int err = errno ? errno : EIO;
		drain.out = NULL;
		return err == EAGAIN ? 0 : -err;
	}
	drain.out = NULL;
	if (dropped)
		*dropped = drain.dropped;
	return drain.count;
}

/* Whether rows 0..height-1 of row_bytes bytes, pitch apart from offset, lie within len bytes: the
 * last row ends at offset + pitch * (height - 1) + row_bytes, which guest-chosen values can make
 * wrap around. So nothing is multiplied or added that could: each term is compared with what is
 * left of the buffer once the earlier terms are taken off (unsigned subtraction of a smaller value,
 * and one division). Returns 0 or -errno, as kms_copy_rows. */
static int rows_fit(size_t len, size_t offset, size_t pitch, size_t height, size_t row_bytes)
{
	size_t left;

	if (offset > len)
		return -ERANGE;
	if (height == 0 || row_bytes == 0)
		return 0;
	if (height > 1 && pitch < row_bytes)
		return -EINVAL;
	left = len - offset;
	if (row_bytes > left)
		return -ERANGE;
	left -= row_bytes; /* room for pitch * (height - 1) */
	if (height > 1 && pitch > left / (height - 1))
		return -ERANGE;
	return 0;
}

int kms_copy_rows(void *dst, size_t dst_len, size_t dst_offset, size_t dst_pitch, const void *src,
		  size_t src_len, size_t src_offset, size_t src_pitch, size_t height, size_t row_bytes)
{
	unsigned char *to = dst;
	const unsigned char *from = src;
	int ret;

	if ((!dst && dst_len) || (!src && src_len))
		return -EINVAL;
	ret = rows_fit(dst_len, dst_offset, dst_pitch, height, row_bytes);
	if (ret == 0)
		ret = rows_fit(src_len, src_offset, src_pitch, height, row_bytes);
	if (ret < 0 || height == 0 || row_bytes == 0)
		return ret;
	to += dst_offset;
	from += src_offset;
	/* Both pitches equal to the row: the rows are one contiguous block on both sides. */
	if (dst_pitch == row_bytes && src_pitch == row_bytes) {
		memmove(to, from, row_bytes * height); /* <= len by rows_fit: no overflow */
		return 0;
	}
	for (size_t i = 0; i < height; i++) {
		memmove(to, from, row_bytes);
		if (i + 1 < height) { /* a pointer one pitch past the last row may lie past the buffer */
			to += dst_pitch;
			from += src_pitch;
		}
	}
	return 0;
}
