pub mod proto {
    tonic::include_proto!("uploadhook.v1");
}
