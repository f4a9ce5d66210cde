"""The serving worker's request framing (rareml.server.framing): a request goes to a thread only
once it is whole, so a slow client costs a buffer, not a worker."""
from __future__ import annotations

import pytest

from rareml.server import COMPLETE, INCOMPLETE, MAX_HEADER, OVERSIZE, framing

HEAD = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def test_headers_alone_wait_for_their_end():
    assert framing(b"GET /health HTTP/1.1\r\nHost: x\r\n", 100).state == INCOMPLETE
    assert framing(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 100).state == COMPLETE


def test_a_body_is_waited_for_up_to_its_content_length():
    request = HEAD + b"Content-Length: 10\r\n\r\n"
    assert framing(request + b"12345", 100).state == INCOMPLETE
    assert framing(request + b"1234567890", 100).state == COMPLETE
    assert framing(request.replace(b"Content-Length", b"content-LENGTH") + b"1234567890", 100).state == COMPLETE


def test_a_body_over_the_limit_is_not_waited_for_and_the_connection_closes_after():
    state = framing(HEAD + b"Content-Length: 1000\r\n\r\n{", 100)
    assert state.state == COMPLETE and state.close_after


def test_expect_100_continue_is_reported_while_the_body_is_due():
    state = framing(HEAD + b"Expect: 100-continue\r\nContent-Length: 10\r\n\r\n", 100)
    assert state.state == INCOMPLETE and state.expects_continue


@pytest.mark.parametrize("chunks, state", [
    (b"5\r\nhello\r\n", INCOMPLETE),
    (b"5\r\nhello\r\n0\r\n", INCOMPLETE),
    (b"5\r\nhello\r\n0\r\n\r\n", COMPLETE),
    (b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", COMPLETE),
    (b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\n", INCOMPLETE),
    (b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n", COMPLETE),
    (b"zz\r\nhello\r\n", COMPLETE),  # malformed: the parser answers 400
])
def test_chunked_bodies_are_complete_after_their_last_chunk_and_trailers(chunks, state):
    assert framing(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunks, 100).state == state


def test_a_chunked_body_over_the_limit_is_refused():
    body = b"".join(b"20\r\n" + b"x" * 32 + b"\r\n" for _ in range(5))
    assert framing(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + body, 100).state == OVERSIZE


def test_endless_headers_go_to_the_parser_which_refuses_them():
    assert framing(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * (MAX_HEADER // 6 + 1), 100).state == COMPLETE


def test_a_malformed_length_goes_to_the_parser():
    assert framing(HEAD + b"Content-Length: ten\r\n\r\n", 100).state == COMPLETE
