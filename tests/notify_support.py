"""Real receivers on loopback for the notification tests: an SMTP server (aiosmtpd) and an HTTP server that
checks each webhook's signature the way a receiver should (test equipment only; no project code stands in)."""

import json
import socket
import threading
import time
from email import message_from_bytes
from email.header import decode_header, make_header
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiosmtpd.controller import Controller

from failback.notifications import signing


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mailbox:
    """Collects what the SMTP server accepted: (recipients, subject, body) per message."""

    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        msg = message_from_bytes(envelope.content)
        self.messages.append(
            {
                "to": list(envelope.rcpt_tos),
                "subject": str(make_header(decode_header(msg["Subject"]))),
                "event": msg["X-DR-Portal-Event"],
                "body": msg.get_payload(decode=True).decode(),
            }
        )
        return "250 Message accepted for delivery"

    def subjects(self, to=None):
        return [m["subject"] for m in self.messages if to is None or to in m["to"]]


class SmtpServer:
    def __init__(self):
        self.mailbox = Mailbox()
        self.port = free_port()
        self.controller = Controller(self.mailbox, hostname="127.0.0.1", port=self.port)

    def __enter__(self):
        self.controller.start()
        return self

    def __exit__(self, *exc):
        self.controller.stop()


class WebhookReceiver:
    """An HTTP server on loopback. ``fail_first`` requests are answered 503, each after ``delay`` seconds
    (longer than the portal's timeout: a slow endpoint). Every request is recorded with whether its
    signature and timestamp checked out."""

    def __init__(self, secret="", port=None, fail_first=0, delay=0.0):
        self.secret, self.fail_first, self.delay = secret, fail_first, delay
        self.requests = []
        self.port = port or free_port()
        self.server = None
        self.lock = threading.Lock()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/hooks/dr"

    def start(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    number = len(receiver.requests) + 1
                    receiver.requests.append(
                        {
                            "headers": self.headers,  # case-insensitive, as HTTP names are
                            "body": body,
                            "json": json.loads(body),
                            "valid": signing.verify(
                                receiver.secret,
                                self.headers[signing.TIMESTAMP_HEADER],
                                self.headers[signing.SIGNATURE_HEADER],
                                body,
                            ),
                        }
                    )
                if receiver.delay:
                    time.sleep(receiver.delay)
                status = 503 if number <= receiver.fail_first else 200
                answer = b"busy, try later" if status == 503 else b'{"received": true}'
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the portal gave up waiting (a slow endpoint): nobody reads the answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    def events(self):
        return [r["json"]["event"] for r in self.requests]
