"""A CloudEvents sink for the request-log test: accepts HTTP POSTs on an ephemeral port,
reads each with the CNCF SDK's HTTP binding in binary content mode (`from_binary`, which
refuses anything that is not a valid CloudEvent), and prints one JSON line per event: its
attributes and data. Prints `port <n>` first."""

import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from cloudevents.core.bindings.http import HTTPMessage, from_binary
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent


class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        try:
            headers = {k.lower(): v for k, v in self.headers.items()}
            event = from_binary(HTTPMessage(headers=headers, body=body), JSONFormat(), CloudEvent)
        except Exception as error:  # a malformed event is the test's failure, not ours
            print(json.dumps({"invalid": str(error)}), flush=True)
            self.send_response(400)
            self.end_headers()
            return
        attributes = {k: str(v) for k, v in event.get_attributes().items()}
        print(json.dumps({"attributes": attributes, "data": event.get_data()}), flush=True)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", 0), Sink)
print(f"port {server.server_address[1]}", flush=True)
server.serve_forever()
