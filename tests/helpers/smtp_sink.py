"""A real SMTP server for the tests (aiosmtpd): stores every accepted message as a JSON file
in OUTDIR and refuses recipients whose address starts with "bounce" with a permanent 550.

Usage: smtp_sink.py PORT OUTDIR. Prints "ready" once it listens.
"""
import json
import os
import sys
import time
import uuid

from aiosmtpd.controller import Controller


class Sink:
    def __init__(self, outdir):
        self.outdir = outdir

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("bounce"):
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        record = {"from": envelope.mail_from, "to": envelope.rcpt_tos, "data": envelope.content.decode("utf8", "replace")}
        tmp = os.path.join(self.outdir, f".{uuid.uuid4().hex}.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.rename(tmp, os.path.join(self.outdir, f"{time.time_ns()}-{uuid.uuid4().hex[:6]}.json"))
        return "250 Message accepted"


if __name__ == "__main__":
    port, outdir = int(sys.argv[1]), sys.argv[2]
    os.makedirs(outdir, exist_ok=True)
    controller = Controller(Sink(outdir), hostname="127.0.0.1", port=port)
    controller.start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        controller.stop()
