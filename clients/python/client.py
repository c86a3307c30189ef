"""A small uploadhook client from stubs generated with grpcio-tools.

Generates the Python stubs from ../../proto into a temporary directory,
then: opens StreamEvents, CreateUploadWebhook, uploads to the presigned
URL, Confirm, reads the stream until the delivery succeeded, GetStatus.

    python3 client.py --target 127.0.0.1:50051 --key uhk_... --webhook-url http://...

Needs `pip install grpcio-tools`. Prints one JSON line; exits non-zero on
any failure.
"""

import argparse
import json
import os
import sys
import tempfile
import urllib.request

import grpc
import grpc_tools
from grpc_tools import protoc

PROTO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")


def generate(out):
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    files = [
        "uploadhook/v1/webhook.proto",
        "google/api/annotations.proto",
        "google/api/http.proto",
    ]
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(args + files) != 0:
        sys.exit("protoc failed")
    sys.path.insert(0, out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--webhook-url", required=True)
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as out:
        generate(out)
        from uploadhook.v1 import webhook_pb2 as pb
        from uploadhook.v1 import webhook_pb2_grpc as rpc

        md = [("authorization", f"Bearer {a.key}")]
        stub = rpc.WebhookServiceStub(grpc.insecure_channel(a.target))

        # Live from now: wait for the response headers, so that the
        # stream's starting point is set before anything happens.
        stream = stub.StreamEvents(pb.StreamEventsRequest(), metadata=md, timeout=60)
        stream.initial_metadata()

        created = stub.CreateUploadWebhook(
            pb.CreateUploadWebhookRequest(
                filename="hello.txt",
                content_type="text/plain",
                webhook=pb.WebhookTarget(url=a.webhook_url, metadata={"from": "python"}),
            ),
            metadata=md,
        )
        webhook_id = created.webhook.id

        put = urllib.request.Request(
            created.upload_url,
            data=b"hello from python",
            method=created.upload_method,
            headers=dict(created.upload_headers),
        )
        with urllib.request.urlopen(put) as r:
            etag = r.headers.get("ETag", "")

        stub.Confirm(pb.ConfirmRequest(webhook_id=webhook_id, etag=etag), metadata=md)

        types = []
        for msg in stream:
            if msg.WhichOneof("kind") != "event" or msg.event.webhook_id != webhook_id:
                continue
            types.append(msg.event.type)
            if msg.event.type == "delivery.succeeded":
                break
        stream.cancel()

        status = stub.GetStatus(pb.GetStatusRequest(webhook_id=webhook_id), metadata=md).webhook
        print(json.dumps({
            "webhook_id": webhook_id,
            "status": pb.Status.Name(status.status),
            "attempts": len(status.attempts),
            "events": types,
        }))
        if status.status != pb.STATUS_COMPLETED:
            sys.exit(1)


if __name__ == "__main__":
    main()
