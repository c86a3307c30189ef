//! The generated protobuf and gRPC code, and the descriptor set that the REST
//! gateway and gRPC reflection read. Generated code lives in `OUT_DIR`.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("uploadhook.v1");

/// Encoded `FileDescriptorSet` of `proto/`, with imports and the
/// `google.api.http` options.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/uploadhook_descriptor.bin"));

/// The full name of the service, as in gRPC paths.
pub const SERVICE_NAME: &str = "uploadhook.v1.WebhookService";
