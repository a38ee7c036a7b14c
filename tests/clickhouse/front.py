#!/usr/bin/env python3
"""Test ClickHouse server: the ClickHouse HTTP interface over the real engine (chdb).

Tests get real SQL, real MergeTree parts and real insert deduplication without a
ClickHouse install. Only the part of the HTTP protocol that the Rust `clickhouse`
crate uses (plus curl-style queries) is spoken. Control endpoints under /_test/
inject the faults the exporter must survive:

  POST /_test/drop_next_insert_response  the next successful INSERT is applied, then the
                                         connection is closed with no response (lost reply)
  POST /_test/fail_next/N                the next N queries fail with Code 202, not applied
  POST /_test/delay_ms/N                 every request waits N ms first (0 clears)
  POST /_test/poison/HEX                 every INSERT whose data contains the bytes HEX fails
                                         with Code 117 (INCORRECT_DATA), not applied: a batch
                                         refused for good (`off` clears)
  POST /_test/lose_next_insert/N         the next successful INSERT is applied and its
                                         response lost, then the next N queries fail
                                         (an outage right after an applied insert)

Usage: python3 front.py --data DIR --port PORT [--host 127.0.0.1]
Prints `listening on http://HOST:PORT` once ready (PORT 0 picks a free port).
"""

import argparse
import json
import re
import struct
import sys
import threading
import time
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import chdb.session
import lz4.block
import lz4.frame
from clickhouse_cityhash.cityhash import CityHash128

# URL parameters that ClickHouse's HTTP layer consumes itself; every other one is a setting.
HTTP_PARAMS = {
    "query", "database", "default_format", "compress", "decompress", "user", "password",
    "quota_key", "query_id", "session_id", "session_timeout", "session_check", "close_session",
    "role", "stacktrace", "buffer_size", "wait_end_of_query", "client_protocol_version",
}
# `INSERT INTO t (cols) FORMAT Name`, then the data after one whitespace character.
# The data may be binary (RowBinary starts with a varint that can be 0x0a or 0x20),
# so no more than that one character may be skipped.
INSERT_FORMAT = re.compile(rb"\s*(INSERT\s+INTO\s.+?)\s+FORMAT\s+(\w+)(?:\r\n|\s)?", re.I | re.S)
IS_INSERT = re.compile(rb"\s*INSERT\s", re.I)
SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
LZ4_METHOD, NONE_METHOD = 0x82, 0x02


class ClickHouseError(Exception):
    def __init__(self, code, text):
        super().__init__(f"Code: {code}. DB::Exception: {text}")
        self.code = code


def error_code(message):
    # chdb's own exceptions already carry ClickHouse's "Code: NN. DB::Exception: ..." text,
    # sometimes behind a wrapper prefix from the Python binding.
    match = re.search(r"Code: (\d+)\.", message)
    return (int(match.group(1)), message[match.start():]) if match else (1001, message)


def quote_string(value):
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_ident(name):
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def checksum(block):
    # The binding returns CityHash128 as one int with the first 64-bit word high;
    # ClickHouse writes that first word first, each word little-endian.
    value = CityHash128(block)
    return (value >> 64).to_bytes(8, "little") + (value & (1 << 64) - 1).to_bytes(8, "little")


def decompress_blocks(body):
    """Undo ClickHouse's native block compression (request bodies sent with decompress=1)."""
    out, pos = [], 0
    while pos < len(body):
        # checksum(16) | method(1) | size incl. these 9 header bytes (u32) | raw size (u32) | data
        if len(body) - pos < 25:
            raise ClickHouseError(271, "Truncated compressed block header. (CANNOT_DECOMPRESS)")
        method, size, raw_size = struct.unpack_from("<BII", body, pos + 16)
        block = body[pos + 16:pos + 16 + size]
        if size < 9 or len(block) != size:
            raise ClickHouseError(271, "Truncated compressed block. (CANNOT_DECOMPRESS)")
        if body[pos:pos + 16] != checksum(block):
            raise ClickHouseError(40, "Checksum doesn't match: corrupted data. (CHECKSUM_DOESNT_MATCH)")
        if method == LZ4_METHOD:
            out.append(lz4.block.decompress(block[9:], uncompressed_size=raw_size))
        elif method == NONE_METHOD:
            out.append(block[9:])
        else:
            raise ClickHouseError(89, f"Unknown compression method {method:#x}. (UNKNOWN_COMPRESSION_METHOD)")
        pos += 16 + size
    return b"".join(out)


def compress_blocks(data, block_size=1 << 20):
    """ClickHouse's native block compression, for responses asked for with compress=1."""
    out = []
    for start in range(0, len(data), block_size):
        raw = data[start:start + block_size]
        payload = lz4.block.compress(raw, store_size=False)
        block = struct.pack("<BII", LZ4_METHOD, 9 + len(payload), len(raw)) + payload
        out.append(checksum(block) + block)
    return b"".join(out)


def multipart_fields(content_type, body):
    # The crate sends `query` and `param_*` as multipart/form-data when a query has
    # server-side parameters; it guarantees no value contains the boundary.
    boundary = re.search(r'boundary="?([^";]+)"?', content_type).group(1).encode()
    fields = {}
    for part in body.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        head, _, value = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        name = re.search(rb'name="([^"]*)"', head).group(1).decode()
        fields[name] = value.removesuffix(b"\r\n").decode()
    return fields


class Engine:
    """The one chdb session, and the fault-injection state."""

    def __init__(self, data_dir):
        self.session = chdb.session.Session(data_dir)
        # Each request is several session calls (USE, SETs, the query, resets) that must
        # not interleave with another request's, and chdb is not built for concurrent use.
        self.lock = threading.Lock()
        self.faults_lock = threading.Lock()
        self.drop_insert_responses = 0
        self.fail_next = 0
        self.delay_ms = 0
        self.poison = None
        self.fail_after_lost = 0

    def take_failure(self):
        with self.faults_lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return True
            return False

    def take_drop(self):
        with self.faults_lock:
            if self.drop_insert_responses > 0:
                self.drop_insert_responses -= 1
                if self.drop_insert_responses == 0 and self.fail_after_lost:
                    self.fail_next, self.fail_after_lost = self.fail_after_lost, 0
                return True
            return False

    def poisoned(self, data):
        with self.faults_lock:
            return self.poison is not None and self.poison in data

    def execute(self, params, head, data):
        """Runs one query; returns (output bytes, extra headers)."""
        settings = {k: v for k, v in params.items() if k not in HTTP_PARAMS and not k.startswith("param_")}
        query_params = {k[len("param_"):]: v for k, v in params.items() if k.startswith("param_")}
        insert = INSERT_FORMAT.match(head)
        with self.lock:
            applied = []
            try:
                # The session is shared by all requests, so per-request state is set every time.
                self.session.query("USE " + quote_ident(params.get("database") or "default"))
                for name, value in settings.items():
                    if not SETTING_NAME.fullmatch(name):
                        raise ClickHouseError(115, f"Unknown setting '{name}'. (UNKNOWN_SETTING)")
                    self.session.query(f"SET {name} = {quote_string(value)}")
                    applied.append(name)
                if insert:
                    # Binary input only reaches chdb intact through its streaming insert API.
                    rows = head[insert.end():] + data
                    if self.poisoned(rows):
                        raise ClickHouseError(117, "Poisoned test data. (INCORRECT_DATA)")
                    with self.session.send_insert(insert.group(1).decode(), insert.group(2).decode()) as ins:
                        if rows:
                            ins.append(rows)
                        result = ins.finish()
                    summary = {"read_rows": "0", "read_bytes": "0", "written_rows": str(result.rows_written),
                               "written_bytes": str(result.bytes_written), "total_rows_to_read": "0",
                               "result_rows": str(result.rows_written), "result_bytes": str(result.bytes_written),
                               "elapsed_ns": str(int(result.elapsed * 1e9))}
                    return b"", [("X-ClickHouse-Summary", json.dumps(summary, separators=(",", ":")))]
                sql = head.decode() + ("\n" + data.decode() if data else "")
                fmt = params.get("default_format") or "TabSeparated"
                return self.session.query(sql, fmt, params=query_params or None).bytes(), []
            finally:
                for name in applied:
                    try:
                        self.session.query(f"SET {name} = DEFAULT")
                    except Exception:
                        traceback.print_exc()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the crate pools its connections

    def log_message(self, *args):
        pass  # one line per request would drown the test output

    def do_GET(self):
        self.handle_request()

    def do_POST(self):
        self.handle_request()

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():  # how the crate streams inserts
            parts = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(self, status, body, headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_request(self):
        engine = self.server.engine
        url = urllib.parse.urlsplit(self.path)
        params = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        try:
            body = self.read_body()
        except (ValueError, OSError):
            self.close_connection = True  # the client gave up mid-body (an aborted insert)
            return
        if url.path.startswith("/_test/"):
            return self.control(engine, url.path)
        if engine.delay_ms:
            time.sleep(engine.delay_ms / 1000)
        if url.path == "/ping" or ("query" not in params and not body):
            return self.reply(200, b"Ok.\n")
        try:
            if engine.take_failure():
                raise ClickHouseError(202, "Too many simultaneous queries. Maximum: 1. (TOO_MANY_SIMULTANEOUS_QUERIES)")
            if self.headers.get("Content-Type", "").startswith("multipart/form-data"):
                params.update(multipart_fields(self.headers["Content-Type"], body))
                body = b""
            if params.get("decompress") == "1" and body:
                body = decompress_blocks(body)
            head, data = (params["query"].encode(), body) if "query" in params else (body, b"")
            out, headers = engine.execute(params, head, data)
        except Exception as err:
            if not isinstance(err, (ClickHouseError, chdb.ChdbError, RuntimeError)):
                traceback.print_exc()
            code, message = error_code(str(err))
            return self.reply(500, message.encode() + b"\n", [
                ("Content-Type", "text/plain; charset=UTF-8"), ("X-ClickHouse-Exception-Code", str(code))])
        if IS_INSERT.match(head) and engine.take_drop():
            self.close_connection = True  # applied, but the client never hears back
            return
        if params.get("compress") == "1":
            out = compress_blocks(out)
        elif params.get("enable_http_compression") == "1" and "lz4" in self.headers.get("Accept-Encoding", ""):
            out = lz4.frame.compress(out)
            headers.append(("Content-Encoding", "lz4"))
        self.reply(200, out, headers)

    def control(self, engine, path):
        parts = path.strip("/").split("/")[1:]
        with engine.faults_lock:
            if parts == ["drop_next_insert_response"]:
                engine.drop_insert_responses += 1
            elif len(parts) == 2 and parts[0] == "lose_next_insert" and parts[1].isdigit():
                engine.drop_insert_responses = 1
                engine.fail_after_lost = int(parts[1])
            elif len(parts) == 2 and parts[0] == "poison":
                engine.poison = None if parts[1] == "off" else bytes.fromhex(parts[1])
            elif len(parts) == 2 and parts[0] in ("fail_next", "delay_ms") and parts[1].isdigit():
                setattr(engine, parts[0], int(parts[1]))
            else:
                return self.reply(404, b"unknown control endpoint\n")
        self.reply(200, b"Ok.\n")


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # A client that gave up on a slow answer (a timeout under /_test/delay_ms) resets its
        # connection: expected in the fault tests, not worth a traceback.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="directory the databases live in")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()

    engine = Engine(args.data)
    ThreadingHTTPServer.request_queue_size = 64
    server = QuietServer((args.host, args.port), Handler)
    server.engine = engine
    print(f"listening on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        engine.session.close()


if __name__ == "__main__":
    sys.exit(main())
