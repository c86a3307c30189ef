// A small uploadhook client with @grpc/grpc-js and @grpc/proto-loader,
// loading ../../proto at run time: CreateUploadWebhook, then GetStatus.
//
//   node client.js --target 127.0.0.1:50051 --key uhk_... --webhook-url http://...
//
// Prints one JSON line; exits non-zero on any failure.

const path = require("node:path");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const { values: args } = parseArgs({
  options: {
    target: { type: "string" },
    key: { type: "string" },
    "webhook-url": { type: "string" },
  },
});

const definition = protoLoader.loadSync("uploadhook/v1/webhook.proto", {
  includeDirs: [path.join(__dirname, "..", "..", "proto")],
  keepCase: false,
  enums: String,
  longs: String,
  defaults: true,
});
const { WebhookService } = grpc.loadPackageDefinition(definition).uploadhook.v1;
const client = new WebhookService(args.target, grpc.credentials.createInsecure());

const metadata = new grpc.Metadata();
metadata.set("authorization", `Bearer ${args.key}`);

const call = (method, request) =>
  new Promise((resolve, reject) =>
    client[method](request, metadata, { deadline: Date.now() + 30000 }, (err, res) =>
      err ? reject(err) : resolve(res),
    ),
  );

(async () => {
  const created = await call("createUploadWebhook", {
    filename: "hello.txt",
    contentType: "text/plain",
    webhook: { url: args["webhook-url"], metadata: { from: "node" } },
  });
  const id = created.webhook.id;
  const got = await call("getStatus", { webhookId: id });
  console.log(
    JSON.stringify({
      webhook_id: id,
      status: got.webhook.status,
      upload_method: created.uploadMethod,
      metadata: got.webhook.metadata,
    }),
  );
  if (got.webhook.status !== "STATUS_PENDING") process.exit(1);
})().catch((err) => {
  console.error(err.message);
  process.exit(1);
});
