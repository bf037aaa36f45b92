"""The check a shard reader makes on the header block before each image it reads by offset
(data/shard_index.py `tar_header_holds`): what tells a tar rewritten at the same size from the one indexed."""

from __future__ import annotations

import io
import tarfile

from mixmae_scale.data.shard_index import TAR_HEADER, tar_header_holds


def _header(size: int, fmt: int = tarfile.USTAR_FORMAT, name: str = "sample.jpg") -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(format=fmt)[-TAR_HEADER:]  # a GNU long name comes first: the member's own block is last


def test_a_members_own_header_holds_for_its_size_only():
    header = _header(1234)
    assert tar_header_holds(header, 1234)
    assert not tar_header_holds(header, 1235)
    assert tar_header_holds(_header(77, tarfile.GNU_FORMAT, "a/" * 80 + "long.jpg"), 77)
    assert tar_header_holds(_header(77, tarfile.PAX_FORMAT, "b/" * 80 + "long.jpg"), 77)


def test_image_bytes_or_a_damaged_header_do_not_pass_for_a_header():
    header = bytearray(_header(1234))
    header[0] ^= 0x01  # one bit of the name: the checksum no longer holds
    assert not tar_header_holds(bytes(header), 1234)
    jpeg = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 200, 30)).save(jpeg, format="JPEG")
    assert not tar_header_holds(jpeg.getvalue()[:TAR_HEADER], 1234)
    assert not tar_header_holds(b"\0" * TAR_HEADER, 0)  # the end-of-archive blocks
    assert not tar_header_holds(_header(10)[:-1], 10)


def test_a_size_past_8_gib_in_gnu_base_256_is_read():
    size = 9 * 2**30
    header = _header(size, tarfile.GNU_FORMAT)
    assert header[124] & 0x80 and tar_header_holds(header, size)
