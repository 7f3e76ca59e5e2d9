/* directflip: the frame socket's wire format; see fs_codec.h. */
#include <string.h>

#include "fs_codec.h"

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64(const uint8_t *p)
{
	return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

size_t fs_record_size(uint32_t kind)
{
	switch (kind) {
	case FS_FLIP:
		return 12;
	case FS_PRESENTED:
		return 32;
	case FS_RELEASED:
		return 4;
	default:
		return 0;
	}
}

static int receives(int reader, uint32_t kind)
{
	if (reader == FS_SERVER)
		return kind == FS_FLIP;
	return kind == FS_PRESENTED || kind == FS_RELEASED;
}

int fs_decode(const uint8_t *buf, size_t len, int version, int reader, struct fs_record *out, int max,
	      size_t *used, int *error)
{
	size_t pos = 0;
	int n = 0;

	if (!used || !error)
		return 0;
	*used = 0;
	*error = FS_OK;
	if ((!buf && len) || (!out && max > 0) || max < 0 || (version != 1 && version != 2) ||
	    (reader != FS_SERVER && reader != FS_CLIENT)) {
		*error = FS_E_ARGS;
		return 0;
	}
	while (n < max && len - pos >= 4) {
		const uint8_t *p = buf + pos;
		uint32_t word = get32(p);
		struct fs_record *r = &out[n];

		memset(r, 0, sizeof(*r));
		r->start = pos;
		if (!(word & FS_RECORD) || version < 2) {
			if (word == 0 || word > FS_MAX_JSON) {
				*error = FS_E_LENGTH;
				break;
			}
			if (len - pos - 4 < word)
				break; /* cut short: wait for more */
			r->kind = FS_JSON;
			r->offset = (uint32_t)(pos + 4);
			r->length = word;
			/* offset fits: a caller's buffer holding a JSON body beyond 4 GiB is not ours */
			if ((size_t)r->offset != pos + 4) {
				*error = FS_E_ARGS;
				break;
			}
			pos += 4 + (size_t)word;
			n++;
			continue;
		}
		uint32_t kind = word & 0xffu;
		if (word & 0x7fffff00u) {
			*error = FS_E_RESERVED;
			break;
		}
		size_t size = fs_record_size(kind);
		if (!size || !receives(reader, kind)) {
			*error = FS_E_KIND;
			break;
		}
		if (len - pos - 4 < size)
			break;
		p += 4;
		r->kind = kind;
		r->id = get32(p);
		if (r->id == 0) {
			*error = FS_E_ID;
			break;
		}
		if (kind == FS_FLIP) {
			r->frame = get64(p + 4);
		} else if (kind == FS_PRESENTED) {
			if (get32(p + 4) != 0) {
				*error = FS_E_RESERVED;
				break;
			}
			r->frame = get64(p + 8);
			r->timestamp_ns = get64(p + 16);
			r->sequence = get64(p + 24);
		}
		pos += 4 + size;
		n++;
	}
	*used = pos;
	return n;
}
